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
