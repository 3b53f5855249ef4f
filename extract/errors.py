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
