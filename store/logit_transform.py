"""The map from a post-norm hidden state z to a model's exact logits.

``logits = softcap * tanh((z @ W.T + bias) * scale / softcap)`` when ``softcap`` is set,
else ``(z @ W.T + bias) * scale``. The cache stores it next to the lm_head weight (teacher
artifacts) so the trainer reproduces the teacher's logits without the teacher.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class LogitTransform:
    scale: float = 1.0
    softcap: float | None = None
    has_bias: bool = False

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [..., V] raw ``z @ W.T (+ b)``; returns the model's logits, same shape/dtype."""
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LogitTransform":
        unknown = set(data) - {"scale", "softcap", "has_bias"}
        if unknown:
            raise ValueError(f"LogitTransform: unknown keys {sorted(unknown)}")
        return cls(**data)
