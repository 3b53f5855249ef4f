"""Per-token teacher logit statistics for GRACE (method.md section 2, "What this puts in the cache").

At each answer target position (the next token is an answer token, see
:func:`genrecal.store.schema.answer_target_positions`) the cache can hold: the top-k token ids
and their log-probabilities at T=1, the target token's logit, ``logsumexp`` of the logits at
T=1 and at the configured T, and the exact T=1 entropy over the full vocabulary. With them TCKD
and the confidence gate ``g = exp(-H / log|V|)`` are exact; NCKD is approximated on the top-k
support plus one tail bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STAT_FIELDS = ("target_logit", "lse", "lse_t", "entropy")


@dataclass(frozen=True)
class LogitStats:
    """Statistics at ``n`` positions.

    topk_ids: int [n, k]; topk_logprobs: float [n, k] (log-softmax at T=1, descending);
    target_logit, lse (logsumexp at T=1), lse_t (logsumexp of logits / T), entropy (T=1, nats):
    float [n] each.
    """

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    target_logit: torch.Tensor
    lse: torch.Tensor
    lse_t: torch.Tensor
    entropy: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.topk_ids.shape[0])

    def problems(self, k: int) -> list[str]:
        """Every shape inconsistency of these stats with top-``k`` and each other."""
        n = self.n
        out = []
        for name in ("topk_ids", "topk_logprobs"):
            t = getattr(self, name)
            if t.ndim != 2 or tuple(t.shape) != (n, k):
                out.append(f"{name} has shape {tuple(t.shape)}, expected ({n}, {k})")
        for name in STAT_FIELDS:
            t = getattr(self, name)
            if t.ndim != 1 or t.shape[0] != n:
                out.append(f"{name} has shape {tuple(t.shape)}, expected ({n},)")
        return out


def compute_logit_stats(logits: torch.Tensor, targets: torch.Tensor, k: int, temperature: float,
                        chunk: int = 256) -> LogitStats:
    """Statistics of ``logits`` (float [n, V], the model's real logits) at targets (int [n]).

    Computed in float32, ``chunk`` rows at a time to bound memory for large vocabularies.
    ``entropy = lse - sum_v p_v * logit_v`` with ``p = softmax(logits)`` (masked ``-inf`` logits
    contribute 0).
    """
    if logits.ndim != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(f"logits must be [n, V] and targets [n]; got {tuple(logits.shape)} and {tuple(targets.shape)}")
    if not 0 < k <= logits.shape[1]:
        raise ValueError(f"top-k {k} must be in [1, vocabulary size {logits.shape[1]}]")
    pieces = [_stats_chunk(logits[i:i + chunk], targets[i:i + chunk], k, temperature)
              for i in range(0, logits.shape[0], chunk)] or [_stats_chunk(logits[:0], targets[:0], k, temperature)]
    return LogitStats(*(torch.cat([getattr(p, f) for p in pieces]) for f in
                        ("topk_ids", "topk_logprobs") + STAT_FIELDS))


def _stats_chunk(logits: torch.Tensor, targets: torch.Tensor, k: int, temperature: float) -> LogitStats:
    x = logits.to(torch.float32)
    lse = torch.logsumexp(x, dim=-1)
    top_vals, top_ids = torch.topk(x, k, dim=-1)
    probs = torch.softmax(x, dim=-1)
    return LogitStats(
        topk_ids=top_ids.to(torch.int32),
        topk_logprobs=top_vals - lse[:, None],
        target_logit=x.gather(1, targets.long()[:, None])[:, 0],
        lse=lse,
        lse_t=torch.logsumexp(x / temperature, dim=-1),
        entropy=lse - torch.where(probs > 0, probs * x, torch.zeros_like(x)).sum(dim=-1),
    )
