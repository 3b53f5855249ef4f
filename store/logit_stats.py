"""Per-token teacher logit statistics for GRACE (docs/method.md §2.4).

At each answer target position (the next token is an answer token, see
:func:`genrecal.store.schema.answer_target_positions`) the cache can hold: the top-k token ids
and their log-probabilities at T=1, the target token's logit, ``logsumexp`` of the logits at
T=1 and at the distillation temperature T, and the exact T=1 entropy that drives the confidence
gate ``g = exp(-H / log|V|)`` (docs/method.md §2.1). With them TCKD and the gate are exact;
NCKD is approximated on the top-k support plus one tail bucket.

:func:`logit_statistics` computes them from hidden states and the lm_head, streaming the
vocabulary in chunks, so a 150k-vocabulary teacher never materialises ``[T, V]`` logits in full
precision. Extraction and the trainer's online mode share it. Everything runs under
``torch.no_grad``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from genrecal.store.errors import FeatureInputError
from genrecal.store.logit_transform import LogitTransform

STAT_FIELDS = ("target_logit", "lse", "lse_t", "entropy")
DEFAULT_CHUNK_SIZE = 8192
DEFAULT_ROW_BLOCK = 512
_ACCUM_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class LogitStats:
    """Per-token logit statistics of T answer positions (all tensors on one device).

    topk_ids:      int32   [T, k]  the k highest-logit token ids, highest first (ties: any order).
    topk_logprobs: float32 [T, k]  ``log_softmax`` at temperature 1 of those ids.
    target_logit:  float32 [T]     logit of the next (target) token.
    lse:           float32 [T]     ``logsumexp(logits)`` at temperature 1.
    lse_t:         float32 [T]     ``logsumexp(logits / temperature)``.
    entropy:       float32 [T]     exact entropy (nats) of ``softmax(logits)`` at temperature 1.
    """

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    target_logit: torch.Tensor
    lse: torch.Tensor
    lse_t: torch.Tensor
    entropy: torch.Tensor

    @property
    def n(self) -> int:
        """Number of positions T."""
        return int(self.topk_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        """Same as :attr:`n`."""
        return self.n

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[1])

    def problems(self, k: int) -> list[str]:
        """Every shape inconsistency of these stats with top-``k`` and with each other."""
        out = []
        for name in ("topk_ids", "topk_logprobs"):
            t = getattr(self, name)
            if t.ndim != 2 or tuple(t.shape) != (self.n, k):
                out.append(f"{name} has shape {tuple(t.shape)}, expected ({self.n}, {k})")
        for name in STAT_FIELDS:
            t = getattr(self, name)
            if t.ndim != 1 or t.shape[0] != self.n:
                out.append(f"{name} has shape {tuple(t.shape)}, expected ({self.n},)")
        return out

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Field name -> tensor, in declaration order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, torch.Tensor]) -> "LogitStats":
        """Inverse of :meth:`to_dict`; raises FeatureInputError on missing or unknown keys."""
        expected = {f.name for f in fields(cls)}
        if set(data) != expected:
            raise FeatureInputError(
                f"LogitStats.from_dict: got keys {sorted(data)}, expected exactly "
                f"{sorted(expected)}; pass the dict produced by LogitStats.to_dict")
        return cls(**data)


@dataclass(frozen=True)
class _Partial:
    """Streaming summary of the logits ``l`` of some vocabulary columns, per row ([R] each).

    m: max logit; s: sum exp(l - m); u: sum exp(l - m) * (l - m); s_t: sum exp((l - m) / temp);
    top_vals / top_ids: [R, <=k] the highest logits seen so far and their global token ids.
    """

    m: torch.Tensor
    s: torch.Tensor
    u: torch.Tensor
    s_t: torch.Tensor
    top_vals: torch.Tensor
    top_ids: torch.Tensor


def _chunk_partial(logits: torch.Tensor, offset: int, k: int, temperature: float) -> _Partial:
    """Summarise logits [R, C] of vocabulary columns offset..offset+C-1."""
    m = logits.amax(dim=1)
    shifted = logits - m[:, None]
    e = shifted.exp()
    vals, idx = logits.topk(min(k, logits.shape[1]), dim=1)
    return _Partial(m=m, s=e.sum(dim=1), u=(e * shifted).sum(dim=1),
                    s_t=(shifted / temperature).exp().sum(dim=1),
                    top_vals=vals, top_ids=idx + offset)


def _merge(a: _Partial, b: _Partial, k: int, temperature: float) -> _Partial:
    """Combine two summaries over disjoint columns, rescaling both to the common max.

    With m = max(m_a, m_b) and d = m_a - m <= 0:  s = e^d s_a (+ same for b),
    u = e^d (u_a + d s_a) (+ same for b), s_t = e^(d/temp) s_t_a (+ same for b).
    """
    m = torch.maximum(a.m, b.m)
    da, db = a.m - m, b.m - m
    ea, eb = da.exp(), db.exp()
    vals = torch.cat([a.top_vals, b.top_vals], dim=1)
    ids = torch.cat([a.top_ids, b.top_ids], dim=1)
    top_vals, pos = vals.topk(min(k, vals.shape[1]), dim=1)
    return _Partial(m=m, s=ea * a.s + eb * b.s,
                    u=ea * (a.u + da * a.s) + eb * (b.u + db * b.s),
                    s_t=(da / temperature).exp() * a.s_t + (db / temperature).exp() * b.s_t,
                    top_vals=top_vals, top_ids=ids.gather(1, pos))


def _check_logit_inputs(z, weight, bias, transform, targets, top_k, temperature,
                        chunk_size, row_block, accum_dtype) -> None:
    if z.ndim != 2 or not z.is_floating_point():
        raise FeatureInputError(f"logit_statistics: z must be a float [T, d] tensor, got "
                                f"{z.dtype} {tuple(z.shape)}; pass the post-norm hidden states "
                                "at the answer positions of one sequence or a flattened batch")
    if weight.ndim != 2 or weight.shape[1] != z.shape[1]:
        raise FeatureInputError(f"logit_statistics: weight must be [V, d] with d = {z.shape[1]} "
                                f"(z's width), got {tuple(weight.shape)}; pass the lm_head weight")
    vocab = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise FeatureInputError(f"logit_statistics: bias must be [V] = [{vocab}], got "
                                f"{tuple(bias.shape)}")
    if transform.has_bias != (bias is not None):
        raise FeatureInputError(f"logit_statistics: transform.has_bias={transform.has_bias} but "
                                f"bias is {'given' if bias is not None else 'None'}; pass the "
                                "lm_head bias exactly when the LogitTransform says it has one")
    _check_targets(targets, z.shape[0], vocab)
    if not 1 <= top_k <= vocab:
        raise FeatureInputError(f"logit_statistics: top_k={top_k} must lie in [1, V={vocab}]")
    if not (math.isfinite(temperature) and temperature > 0):
        raise FeatureInputError(f"logit_statistics: temperature={temperature} must be finite "
                                "and > 0 (GRACE uses 2.0)")
    if chunk_size < 1 or row_block < 1:
        raise FeatureInputError(f"logit_statistics: chunk_size={chunk_size} and "
                                f"row_block={row_block} must both be >= 1")
    if accum_dtype not in _ACCUM_DTYPES:
        raise FeatureInputError(f"logit_statistics: accum_dtype={accum_dtype} must be "
                                "torch.float32 or torch.float64")


def _check_targets(targets: torch.Tensor, num_rows: int, vocab: int) -> None:
    if targets.ndim != 1 or targets.shape[0] != num_rows or targets.is_floating_point():
        raise FeatureInputError(f"logit_statistics: targets must be an integer [T] = [{num_rows}] "
                                f"tensor, got {targets.dtype} {tuple(targets.shape)}")
    bad = ((targets < 0) | (targets >= vocab)).nonzero().flatten()
    if bad.numel():
        rows = bad[:5].tolist()
        raise FeatureInputError(
            f"logit_statistics: target ids out of range [0, {vocab}) at rows {rows} (values "
            f"{targets[bad[:5]].tolist()}); targets must be next-token ids in the lm_head's "
            "vocabulary (tokenizer added tokens beyond the head size?)")


def _chunk_logits(z_rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  transform: LogitTransform) -> torch.Tensor:
    """z_rows [R, d] (accum dtype), weight [C, d], bias [C] | None -> model logits [R, C]."""
    raw = z_rows @ weight.T
    if bias is not None:
        raw = raw + bias
    return transform.apply(raw)


def _stream(z, weight, bias, transform, targets, k, temperature, chunk_size, row_block,
            accum_dtype):
    """Vocabulary chunks outer (each weight chunk is upcast once), row blocks inner."""
    rows = [slice(r, min(r + row_block, z.shape[0])) for r in range(0, z.shape[0], row_block)]
    partials: list[_Partial | None] = [None] * len(rows)
    target_logit = torch.full((z.shape[0],), float("nan"), dtype=accum_dtype, device=z.device)
    for c0 in range(0, weight.shape[0], chunk_size):
        w = weight[c0:c0 + chunk_size].to(device=z.device, dtype=accum_dtype)
        b = (None if bias is None
             else bias[c0:c0 + chunk_size].to(device=z.device, dtype=accum_dtype))
        for i, r in enumerate(rows):
            logits = _chunk_logits(z[r], w, b, transform)
            _pick_targets(target_logit[r], logits, targets[r], c0)
            part = _chunk_partial(logits, c0, k, temperature)
            partials[i] = part if partials[i] is None else _merge(partials[i], part, k, temperature)
    return partials, target_logit


def _pick_targets(out: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, c0: int) -> None:
    """Write logits[r, targets[r] - c0] into out[r] for the rows whose target is in this chunk.

    Branch-free (no host sync on GPU): every row gathers a clamped column, only hits are kept.
    """
    local = targets - c0
    hit = (local >= 0) & (local < logits.shape[1])
    picked = logits.gather(1, local.clamp(0, logits.shape[1] - 1)[:, None]).squeeze(1)
    out.copy_(torch.where(hit, picked, out))


def _finish(partials: list[_Partial], target_logit: torch.Tensor, temperature: float) -> LogitStats:
    p = _Partial(*(torch.cat([getattr(x, f.name) for x in partials]) for f in fields(_Partial)))
    log_s = p.s.log()
    lse = p.m + log_s
    stats = LogitStats(
        topk_ids=p.top_ids.to(torch.int32),
        topk_logprobs=(p.top_vals - lse[:, None]).float(),
        target_logit=target_logit.float(),
        lse=lse.float(),
        lse_t=(p.m / temperature + p.s_t.log()).float(),
        entropy=(log_s - p.u / p.s).float(),
    )
    _check_finite(stats)
    return stats


def _check_finite(stats: LogitStats) -> None:
    bad = ~(stats.lse.isfinite() & stats.lse_t.isfinite() & stats.entropy.isfinite()
            & stats.target_logit.isfinite())
    if bool(bad.any()):
        rows = bad.nonzero().flatten()[:5].tolist()
        raise FeatureInputError(
            f"logit_statistics: non-finite logits at answer rows {rows}; the hidden states or the "
            "lm_head contain inf/NaN (float16 overflow in the teacher? run it in bfloat16)")


def _empty_stats(k: int, device: torch.device) -> LogitStats:
    empty = torch.zeros(0, dtype=torch.float32, device=device)
    return LogitStats(topk_ids=torch.zeros(0, k, dtype=torch.int32, device=device),
                      topk_logprobs=torch.zeros(0, k, dtype=torch.float32, device=device),
                      target_logit=empty, lse=empty, lse_t=empty, entropy=empty)


def logit_statistics(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     transform: LogitTransform, targets: torch.Tensor, *, top_k: int,
                     temperature: float, chunk_size: int = DEFAULT_CHUNK_SIZE,
                     row_block: int = DEFAULT_ROW_BLOCK,
                     accum_dtype: torch.dtype = torch.float32) -> LogitStats:
    """Exact per-token logit statistics of the teacher, streamed over the vocabulary.

    z:       [T, d] any float dtype; post-norm last hidden states at the answer positions.
    weight:  [V, d] any float dtype; the lm_head weight (may live on another device: each
             chunk is moved to z's device).
    bias:    [V] or None; the lm_head bias (must match ``transform.has_bias``).
    transform: maps raw ``z @ W.T + b`` to the model's logits (scale, softcap).
    targets: [T] integer; the next-token id at each position.

    Logits are computed as ``transform.apply(z @ W.T + b)`` with z, W and b upcast to
    ``accum_dtype`` (float32, or float64 for reference checks) -- the logits of the stored
    weights to that precision, not the model's bf16-rounded ones. Memory is bounded by
    ``row_block x chunk_size`` logits plus one upcast weight chunk; the streaming logsumexp,
    entropy and top-k merges are those of :func:`_merge`. Returns float32/int32 tensors on z's
    device, see :class:`LogitStats`.

    On CUDA the float32 path is exact only with TF32 matmuls off (PyTorch's default); a caller
    that enables TF32 for the teacher's forward should pass ``accum_dtype=torch.float64`` or
    turn it off around this call.
    """
    _check_logit_inputs(z, weight, bias, transform, targets, top_k, temperature, chunk_size,
                        row_block, accum_dtype)
    if z.shape[0] == 0:
        return _empty_stats(top_k, z.device)
    with torch.no_grad():
        partials, target_logit = _stream(
            z.to(accum_dtype), weight, bias, transform, targets.to(z.device, torch.int64),
            top_k, temperature, chunk_size, row_block, accum_dtype)
        return _finish(partials, target_logit, temperature)
