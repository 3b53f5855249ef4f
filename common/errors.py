"""Errors of genrecal.common: the pipeline configuration and the torchrun environment."""

from __future__ import annotations


class ConfigError(Exception):
    """pipelines.yaml failed validation. ``problems`` lists every ``(yaml_path, message)``."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s) in the pipeline configuration:"]
        lines += [f"  - {path}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


class DistributedEnvError(ValueError):
    """The torchrun environment (RANK / WORLD_SIZE / LOCAL_RANK) is malformed or inconsistent."""
