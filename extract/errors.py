"""Errors raised by genrecal.extract (the teacher pass).

Every message says what went wrong, where (argument, sample index, item number) and how to
fix it. Callers catch :class:`ExtractError` to report any extract-side failure.
"""

from __future__ import annotations


class ExtractError(Exception):
    """Base class of every error raised by genrecal.extract."""


class BatchingError(ExtractError, ValueError):
    """Lengths or per-sample tensors cannot be planned into batches or padded together."""


class WriterError(ExtractError):
    """The background writer failed; ``__cause__`` holds the sink's original exception."""


class ExtractSetupError(ExtractError, ValueError):
    """The pipeline cannot be extracted as configured (codec, top-k, devices, data location)."""


class CacheExistsError(ExtractError):
    """The output cache already holds data and ``--resume`` was not given."""


class SampleError(ExtractError):
    """One sample cannot be extracted (bad image, empty or over-long answer...) under on_error=raise.

    ``sample_id``, ``file`` (its dataset file) and ``reason`` say which one and why.
    """

    def __init__(self, message: str, *, sample_id: str, file: str = "", reason: str = ""):
        super().__init__(message)
        self.sample_id = sample_id
        self.file = file
        self.reason = reason or message


class NothingExtractedError(ExtractError):
    """No sample could be cached: every one was skipped (``skipped``: their skip records, from
    every rank) or the data gave none. Nothing is committed."""

    def __init__(self, message: str, *, skipped: list | None = None):
        super().__init__(message)
        self.skipped = list(skipped or [])


class DistributedError(ExtractError):
    """The torchrun environment cannot start a process group (WORLD_SIZE > 1, no MASTER_ADDR);
    malformed RANK / WORLD_SIZE / LOCAL_RANK raise common.errors.DistributedEnvError."""


class FidelityError(ExtractError):
    """``validate --against-teacher`` cannot rerun the teacher on the cached samples."""


class AnswersError(ExtractError):
    """Teacher answers cannot be written: no samples, an output path of the wrong kind, images
    outside the chosen image root, text that the LLaVA format cannot hold."""


class EngineSetupError(ExtractSetupError):
    """``--backend vllm`` cannot start: no vLLM environment, more tensor-parallel ranks than
    devices, a VLM teacher without a GPU. Raised before any engine starts."""


class EngineError(ExtractError, RuntimeError):
    """The vLLM worker failed or died while running; the message quotes its log."""
