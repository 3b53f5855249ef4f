"""Errors of the thin top-level package (configuration and command line)."""

from __future__ import annotations


class ConfigError(Exception):
    """pipelines.yaml failed validation. ``problems`` lists every ``(yaml_path, message)``."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s) in the pipeline configuration:"]
        lines += [f"  - {path}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


class RunError(Exception):
    """``genrecal run`` cannot go on: a phase failed its check, or an output it would write
    exists but was not made by an earlier ``genrecal run`` of the same pipeline."""
