"""Errors raised by genrecal.store.

Every message says what went wrong, where (file, sample id, YAML path, cache path) and how
to fix it. Callers catch :class:`StoreError` to report any store-side failure.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error raised by genrecal.store."""


class ModelLoadError(StoreError):
    """A teacher or student VLM (or its processor) could not be loaded or is unsupported."""


class SpanError(StoreError):
    """The image / question / answer spans of a chat-formatted sequence could not be found."""


class DatasetError(StoreError):
    """A sample in an input dataset is invalid (missing image, bad role, escaping path...)."""

    def __init__(self, message: str, *, sample_id: str | None = None, file: str | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.sample_id = sample_id
        self.file = file
        self.reason = reason or message


class CacheError(StoreError):
    """Base class of every teacher-cache error (format, integrity, fingerprint, writer misuse)."""


class CacheFormatError(CacheError):
    """A cache has an unknown format version, an invalid manifest, or a path escaping its root."""


class CacheIntegrityError(CacheError):
    """A cache's files disagree with its manifest: missing, truncated, altered or inconsistent."""


class FingerprintMismatchError(CacheError):
    """A cache was written for another teacher (config, weights or tokenizer) than expected."""


class CacheWriteError(CacheError):
    """A cache writer was misused: invalid sample, duplicate id, settings mismatch, busy rank."""


class FeatureInputError(StoreError, ValueError):
    """Tensors handed to a feature function (logit statistics, visual Gram) are malformed."""


class PaddingError(StoreError, ValueError):
    """Per-sample model inputs cannot be padded into one batch (missing or mismatched keys)."""


class GenerationError(StoreError):
    """A VLM cannot generate answers for a sample (no question to answer, bad turn selection,
    control tokens in the text, a tokenizer without a padding token)."""


class DuplicateSampleError(DatasetError):
    """Two data sources of one pipeline give the same sample id (caches are keyed by id)."""
