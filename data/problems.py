"""The internal signal for one bad dataset row, and the public skip record.

Row parsers raise :class:`RowProblem` (what is wrong + how to fix it) without knowing the
sample id or file; :mod:`genrecal.data.readers` adds both and turns it into a
:class:`~genrecal.store.errors.DatasetError` (``on_error="raise"``) or a :class:`Skip`
(``on_error="skip"``).
"""

from __future__ import annotations

from dataclasses import dataclass

from genrecal.store.errors import DatasetError


class RowProblem(Exception):
    """One row of a dataset is invalid: ``reason`` says what is wrong, ``fix`` how to fix it."""

    def __init__(self, reason: str, fix: str):
        super().__init__(reason)
        self.reason = reason
        self.fix = fix

    def to_error(self, sample_id: str, file: str) -> DatasetError:
        message = f"{self.reason} (sample {sample_id!r} in {file}). Fix: {self.fix}."
        return DatasetError(message, sample_id=sample_id, file=file, reason=self.reason)


@dataclass(frozen=True)
class Skip:
    """A sample left out under ``on_error="skip"``: which one, from which file, and why."""

    sample_id: str
    file: str
    reason: str
