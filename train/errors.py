"""Errors raised by genrecal.train.

Every message says what went wrong, where (module, sample index, file) and how to fix it.
Callers catch :class:`TrainError` to report any trainer-side failure.
"""

from __future__ import annotations


class TrainError(Exception):
    """Base class of every error raised by genrecal.train."""


class RecalibratorError(TrainError):
    """The Recalibrator got a bad config, student, input tensor or checkpoint directory."""


class LossInputError(TrainError, ValueError):
    """A loss function (genrecal.train.losses) got a tensor or setting it cannot use.

    ``function`` and ``argument`` say where; the message also says how to fix it.
    """

    def __init__(self, function: str, argument: str, problem: str, fix: str):
        self.function = function
        self.argument = argument
        super().__init__(f"{function}: argument `{argument}`: {problem}. Fix: {fix}")


class BatchError(TrainError, ValueError):
    """A TrainBatch is inconsistent (turn counts, shapes, missing teacher features); the message
    names the sample id(s) and the batch field."""


class StageSetupError(TrainError):
    """A training stage cannot start: missing output of an earlier stage, trainable parameter
    groups that cannot be switched as configured, an unsupported option."""


class CheckpointError(TrainError):
    """A training checkpoint is missing, incomplete, corrupt or belongs to another run."""


class SamplerError(TrainError, ValueError):
    """The training order got bad settings, or a resume state that does not fit this run."""


class DataJoinError(TrainError):
    """A dataset sample and its teacher-cache record cannot be joined (or the student side fails).

    ``sample_id`` names the sample when the problem is one sample's (None otherwise).
    """

    def __init__(self, message: str, *, sample_id: str | None = None):
        super().__init__(message)
        self.sample_id = sample_id


class ContentHashMismatchError(DataJoinError):
    """The cache record of a sample was extracted from other content than the dataset sample."""


class EvaluationError(TrainError):
    """An evaluation cannot run: no data for the split, an unknown or unsupported metric, a
    model directory that does not exist."""
