"""Errors of the top-level package: the command line and ``genrecal run``."""

from __future__ import annotations


class RunError(Exception):
    """``genrecal run`` cannot go on: a phase failed its check, or an output it would write
    exists but was not made by an earlier ``genrecal run`` of the same pipeline."""
