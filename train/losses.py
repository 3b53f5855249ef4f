"""Loss functions of the trainer (docs/method.md §1 and §2).

Three groups:

1. Chunked teacher-head losses (:func:`chunked_kl`, :func:`chunked_ce`, :func:`chunked_kl_ce`).
   The teacher vocabulary is large (V_l ~ 150k) and the head is applied to thousands of answer
   positions, so ``[N, V]`` logits are never materialised: each loss is a
   :class:`torch.autograd.Function` that walks row blocks of N and vocabulary chunks of V,
   keeps per-row running log-sum-exp statistics, and recomputes each chunk's logits in the
   backward pass. Peak extra memory is a few ``[row_block, chunk_size]`` tensors.
2. GenRecal (docs/method.md §1): the answer-window position helpers
   (:func:`answer_window`, :func:`window_targets`, :func:`next_token_targets`) and
   :func:`genrecal_losses` (L_ar, L_kl, L_reg), plus :func:`student_ce` (CE_s of stages 2-3).
3. Same-tokenizer KD from cached top-k teacher statistics (:func:`topk_kd_loss`,
   docs/method.md §2.4): teacher and student are normalised
   over the SAME support, the top-k ids plus one tail bucket.

Exact logits. A head maps features x to ``transform.apply(x @ W.T + b)``
(:class:`genrecal.store.logit_transform.LogitTransform`: scale, then optional softcap), which is
what the model's own lm_head produces from its post-norm hidden state (docs/method.md §1.1).

Precision. Chunked losses compute in ``promote(input dtypes, float32)``: bf16/fp16 features
and weights are upcast chunk by chunk, float64 inputs stay float64. They return per-position
values in that dtype.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from genrecal.store.logit_transform import LogitTransform
from genrecal.train.errors import LossInputError

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 8192
DEFAULT_ROW_BLOCK = 1024

Reduction = Literal["mean", "sum"]


# ==============================================================================================
# 1. Chunked teacher-head losses
# ==============================================================================================

@dataclass(frozen=True)
class _Plan:
    """How a chunked head loss runs. dtype: accumulation dtype (>= float32)."""

    transform: LogitTransform
    temperature: float
    ignore_index: int
    chunk_size: int
    row_block: int
    dtype: torch.dtype


def _spans(total: int, step: int) -> list[tuple[int, int]]:
    return [(i, min(i + step, total)) for i in range(0, total, step)]


def _head_chunk(weight: torch.Tensor, bias: torch.Tensor | None, c0: int, c1: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows c0:c1 of the head: weight [c, d] and bias [c] (or None), cast to ``dtype``."""
    b = None if bias is None else bias[c0:c1].to(dtype)
    return weight[c0:c1].to(dtype), b


def _logits_and_slope(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                      transform: LogitTransform) -> tuple[torch.Tensor, torch.Tensor | float]:
    """Exact logits of one chunk and their derivative wrt the raw ``x @ w.T + b``.

    x: [n, d], w: [c, d] -> (logits [n, c], slope [n, c] tensor or a float). Same maths as
    ``LogitTransform.apply``: u = raw*scale; logits = softcap*tanh(u/softcap) or u.
    """
    u = F.linear(x, w, b)
    if transform.scale != 1.0:
        u = u * transform.scale
    if transform.softcap is None:
        return u, float(transform.scale)
    th = torch.tanh(u / transform.softcap)
    return th * transform.softcap, transform.scale * (1.0 - th * th)


def _chain(grad: torch.Tensor, slope: torch.Tensor | float) -> torch.Tensor:
    """d loss / d raw = d loss / d logits * slope (elementwise)."""
    if isinstance(slope, float) and slope == 1.0:
        return grad
    return grad * slope


def _over_t(x: torch.Tensor, temperature: float) -> torch.Tensor:
    return x if temperature == 1.0 else x / temperature


def _pick_targets(logits: torch.Tensor, targets: torch.Tensor, c0: int) -> torch.Tensor:
    """logits [n, c] of vocab columns c0..c0+c-1, targets [n] (-1 = none) -> [n] target logit
    where the target falls in this chunk, else 0."""
    local = targets - c0
    inside = (local >= 0) & (local < logits.shape[1])
    picked = logits.gather(1, local.clamp(0, logits.shape[1] - 1).unsqueeze(1)).squeeze(1)
    return torch.where(inside, picked, torch.zeros_like(picked))


def _subtract_onehot(grad: torch.Tensor, targets: torch.Tensor, c0: int,
                     scale: torch.Tensor) -> None:
    """grad[i, targets[i]-c0] -= scale[i] for targets inside this chunk (in place)."""
    local = targets - c0
    inside = (local >= 0) & (local < grad.shape[1])
    values = torch.where(inside, -scale, torch.zeros_like(scale)).unsqueeze(1)
    grad.scatter_add_(1, local.clamp(0, grad.shape[1] - 1).unsqueeze(1), values)


class _OnlineLogSumExp:
    """Per-row running log-sum-exp over column chunks, optionally with a running
    softmax-weighted sum of ``values`` (flash-attention style rescaling)."""

    def __init__(self, like: torch.Tensor, rows: int, weighted: bool = False):
        self.max = like.new_full((rows,), -math.inf)
        self.sum = like.new_zeros(rows)
        self.weighted = like.new_zeros(rows) if weighted else None

    def update(self, x: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """x: [n, c] logits of one chunk; values: [n, c] (weighted mode only)."""
        new_max = torch.maximum(self.max, x.amax(dim=1))
        rescale = torch.exp(self.max - new_max)
        e = torch.exp(x - new_max.unsqueeze(1))
        self.sum = self.sum * rescale + e.sum(dim=1)
        if self.weighted is not None:
            self.weighted = self.weighted * rescale + (e * values).sum(dim=1)
        self.max = new_max

    def lse(self) -> torch.Tensor:
        return self.max + torch.log(self.sum)

    def mean(self) -> torch.Tensor:
        """Softmax-weighted mean of the values, sum_v softmax(x)_v * values_v."""
        return self.weighted / self.sum


@dataclass(frozen=True)
class _RowStats:
    """Per-row forward results, all [n] in the plan dtype (zeros where not computed).

    kl: KL(p || q) at temperature T; ce: CE at T=1 (0 at ignored rows; None in the backward
    pass, which does not need it); lse_t / lse_s: log-sum-exp of teacher / student logits / T;
    lse_ce: log-sum-exp of the student logits (T = 1).
    """

    kl: torch.Tensor
    ce: torch.Tensor | None
    lse_t: torch.Tensor
    lse_s: torch.Tensor
    lse_ce: torch.Tensor


def _forward_rows(r: torch.Tensor, z: torch.Tensor | None, tgt: torch.Tensor | None,
                  weight: torch.Tensor, bias: torch.Tensor | None, plan: _Plan) -> _RowStats:
    """One row block, one pass over the vocabulary.

    KL(p||q) = sum_v p_v (t_v - s_v)/T - lse(t/T) + lse(s/T), with p = softmax(t/T),
    q = softmax(s/T); the first term is accumulated online as a p-weighted mean.
    CE = lse(s) - s_y (temperature 1). tgt: [n] long, -1 where ignored.
    """
    n, temp = r.shape[0], plan.temperature
    t_acc = _OnlineLogSumExp(r, n, weighted=True) if z is not None else None
    s_acc = _OnlineLogSumExp(r, n) if z is not None else None
    ce_acc = None
    if tgt is not None:
        ce_acc = s_acc if (s_acc is not None and temp == 1.0) else _OnlineLogSumExp(r, n)
    picked = r.new_zeros(n)
    for c0, c1 in _spans(weight.shape[0], plan.chunk_size):
        w, b = _head_chunk(weight, bias, c0, c1, plan.dtype)
        s, _ = _logits_and_slope(r, w, b, plan.transform)
        if z is not None:
            t, _ = _logits_and_slope(z, w, b, plan.transform)
            t_acc.update(_over_t(t, temp), _over_t(t - s, temp))
            s_acc.update(_over_t(s, temp))
        if tgt is not None:
            if ce_acc is not s_acc:
                ce_acc.update(s)
            picked = picked + _pick_targets(s, tgt, c0)
    return _finish_rows(r, tgt, t_acc, s_acc, ce_acc, picked)


def _finish_rows(r: torch.Tensor, tgt: torch.Tensor | None, t_acc: _OnlineLogSumExp | None,
                 s_acc: _OnlineLogSumExp | None, ce_acc: _OnlineLogSumExp | None,
                 picked: torch.Tensor) -> _RowStats:
    zeros = r.new_zeros(r.shape[0])
    kl, lse_t, lse_s, ce, lse_ce = zeros, zeros, zeros, zeros, zeros
    if t_acc is not None:
        lse_t, lse_s = t_acc.lse(), s_acc.lse()
        kl = t_acc.mean() - lse_t + lse_s
    if ce_acc is not None:
        lse_ce = ce_acc.lse()
        ce = torch.where(tgt >= 0, lse_ce - picked, zeros)
    return _RowStats(kl=kl, ce=ce, lse_t=lse_t, lse_s=lse_s, lse_ce=lse_ce)


def _forward_all(r: torch.Tensor, z: torch.Tensor | None, tgt: torch.Tensor | None,
                 weight: torch.Tensor, bias: torch.Tensor | None, plan: _Plan) -> _RowStats:
    """All rows, row block by row block; tensors in, [N] statistics out."""
    blocks = [_forward_rows(r[i0:i1].to(plan.dtype), _rows(z, i0, i1, plan.dtype),
                            None if tgt is None else tgt[i0:i1], weight, bias, plan)
              for i0, i1 in _spans(r.shape[0], plan.row_block)]
    if not blocks:
        return _RowStats(*(r.new_zeros(0, dtype=plan.dtype) for _ in fields(_RowStats)))
    return _RowStats(*(torch.cat([getattr(b, f.name) for b in blocks])
                       for f in fields(_RowStats)))


def _rows(x: torch.Tensor | None, i0: int, i1: int, dtype: torch.dtype) -> torch.Tensor | None:
    return None if x is None else x[i0:i1].to(dtype)


@dataclass
class _Grads:
    """Gradient buffers in the plan dtype; None where no gradient is wanted."""

    r: torch.Tensor | None
    z: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None


def _chunk_logit_grads(r: torch.Tensor, z: torch.Tensor | None, tgt: torch.Tensor | None,
                       st: _RowStats, g_kl: torch.Tensor, g_ce: torch.Tensor, w: torch.Tensor,
                       b: torch.Tensor | None, c0: int, plan: _Plan, want_z: bool
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients wrt the RAW student / teacher logits of one chunk, [n, c] each.

    d KL / d s_v = (q_v - p_v) / T;  d KL / d t_v = p_v (log p_v - log q_v - KL) / T;
    d CE / d s_v = softmax(s)_v - [v = y]. Then chained through the logit transform.
    """
    temp = plan.temperature
    s, ds = _logits_and_slope(r, w, b, plan.transform)
    g_s, g_t = None, None
    if z is not None:
        t, dt = _logits_and_slope(z, w, b, plan.transform)
        log_p = _over_t(t, temp) - st.lse_t.unsqueeze(1)
        log_q = _over_t(s, temp) - st.lse_s.unsqueeze(1)
        p, scale = torch.exp(log_p), (g_kl / temp).unsqueeze(1)
        g_s = scale * (torch.exp(log_q) - p)
        if want_z:
            g_t = _chain(scale * p * (log_p - log_q - st.kl.unsqueeze(1)), dt)
    if tgt is not None:
        g_c = torch.exp(s - st.lse_ce.unsqueeze(1)) * g_ce.unsqueeze(1)
        _subtract_onehot(g_c, tgt, c0, g_ce)
        g_s = g_c if g_s is None else g_s + g_c
    return _chain(g_s, ds), g_t


def _backward_rows(r: torch.Tensor, z: torch.Tensor | None, tgt: torch.Tensor | None,
                   st: _RowStats, g_kl: torch.Tensor, g_ce: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None, plan: _Plan, grads: _Grads, i0: int) -> None:
    """Recompute each chunk of one row block and accumulate its input gradients."""
    i1 = i0 + r.shape[0]
    for c0, c1 in _spans(weight.shape[0], plan.chunk_size):
        w, b = _head_chunk(weight, bias, c0, c1, plan.dtype)
        g_s, g_t = _chunk_logit_grads(r, z, tgt, st, g_kl, g_ce, w, b, c0, plan,
                                      want_z=grads.z is not None)
        if grads.r is not None:
            grads.r[i0:i1] += g_s @ w
        if grads.z is not None:
            grads.z[i0:i1] += g_t @ w
        if grads.weight is not None:
            grads.weight[c0:c1] += g_s.T @ r + (0.0 if g_t is None else g_t.T @ z)
        if grads.bias is not None:
            grads.bias[c0:c1] += g_s.sum(0) + (0.0 if g_t is None else g_t.sum(0))


def _new_grads(needs: tuple[bool, ...], r: torch.Tensor, z: torch.Tensor | None,
               weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> _Grads:
    def buf(flag: bool, x: torch.Tensor | None) -> torch.Tensor | None:
        return torch.zeros(x.shape, dtype=dtype, device=x.device) if flag and x is not None \
            else None
    return _Grads(r=buf(needs[0], r), z=buf(needs[1], z), weight=buf(needs[2], weight),
                  bias=buf(needs[3], bias))


class _ChunkedHeadLoss(torch.autograd.Function):
    """(kl [N], ce [N]) = per-row KL(teacher || student) at T and CE at T=1 of a shared head."""

    @staticmethod
    def forward(ctx, r, z, weight, bias, tgt, plan):  # noqa: D102 (autograd protocol)
        with torch.autocast(r.device.type, enabled=False):
            st = _forward_all(r, z, tgt, weight, bias, plan)
        ctx.save_for_backward(r, z, weight, bias, tgt, st.kl, st.lse_t, st.lse_s, st.lse_ce)
        ctx.plan = plan
        if z is None:
            ctx.mark_non_differentiable(st.kl)
        if tgt is None:
            ctx.mark_non_differentiable(st.ce)
        return st.kl, st.ce

    @staticmethod
    @once_differentiable
    def backward(ctx, g_kl, g_ce):  # noqa: D102 (autograd protocol)
        r, z, weight, bias, tgt, kl, lse_t, lse_s, lse_ce = ctx.saved_tensors
        plan = ctx.plan
        g_kl = g_kl.to(plan.dtype)
        g_ce = torch.where(tgt >= 0, g_ce.to(plan.dtype), 0.0) if tgt is not None else g_ce
        grads = _new_grads(ctx.needs_input_grad[:4], r, z, weight, bias, plan.dtype)
        with torch.autocast(r.device.type, enabled=False):
            for i0, i1 in _spans(r.shape[0], plan.row_block):
                st = _RowStats(kl[i0:i1], None, lse_t[i0:i1], lse_s[i0:i1], lse_ce[i0:i1])
                _backward_rows(r[i0:i1].to(plan.dtype), _rows(z, i0, i1, plan.dtype),
                               None if tgt is None else tgt[i0:i1], st, g_kl[i0:i1],
                               g_ce[i0:i1], weight, bias, plan, grads, i0)
        return (_cast(grads.r, r), _cast(grads.z, z), _cast(grads.weight, weight),
                _cast(grads.bias, bias), None, None)


def _cast(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return None if grad is None else grad.to(like.dtype)


# -- validation of the chunked losses ----------------------------------------------------------

def _check_features(fn: str, name: str, x: torch.Tensor, width: int, rows: int | None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != width:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise LossInputError(fn, name, f"expected a [N, {width}] float tensor (width = "
                             f"weight.shape[1]), got {shape}",
                             "flatten leading dims with x.reshape(-1, d) and pass features "
                             "of the head's input width")
    if not x.is_floating_point():
        raise LossInputError(fn, name, f"dtype {x.dtype} is not floating point",
                             "pass float features (bf16/fp16/fp32/fp64)")
    if rows is not None and x.shape[0] != rows:
        raise LossInputError(fn, name, f"has {x.shape[0]} rows but r_student has {rows}",
                             "teacher and student features must be aligned row by row")


def _check_head(fn: str, weight: torch.Tensor, bias: torch.Tensor | None,
                transform: LogitTransform) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise LossInputError(fn, "weight", "expected the lm_head weight as a float [V, d] "
                             "tensor", "pass head.weight (teacher artifact) unchanged")
    if not isinstance(transform, LogitTransform):
        raise LossInputError(fn, "transform", f"expected a LogitTransform, got "
                             f"{type(transform).__name__}",
                             "use LogitTransform.from_dict(cache teacher metadata)")
    if (bias is not None) != transform.has_bias:
        raise LossInputError(fn, "bias", f"bias is {'given' if bias is not None else 'None'} "
                             f"but transform.has_bias={transform.has_bias}",
                             "pass the head bias exactly when the LogitTransform says it has one")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise LossInputError(fn, "bias", f"shape {tuple(bias.shape)} != ({weight.shape[0]},)",
                             "pass the [V] bias of the same head as the weight")


def _check_targets(fn: str, targets: torch.Tensor, rows: int, vocab: int,
                   ignore_index: int) -> torch.Tensor:
    """Returns targets as long with ignored entries mapped to -1."""
    if not isinstance(targets, torch.Tensor) or targets.dim() != 1 or targets.shape[0] != rows \
            or targets.is_floating_point() or targets.dtype == torch.bool:
        raise LossInputError(fn, "targets", f"expected integer ids of shape [{rows}], got "
                             f"{getattr(targets, 'shape', type(targets).__name__)}",
                             "pass one target id per feature row (ignore_index where none)")
    if 0 <= ignore_index < vocab:
        raise LossInputError(fn, "ignore_index", f"{ignore_index} is a real token id (vocab "
                             f"size {vocab})", "use a negative ignore_index such as -100")
    targets = targets.long()
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise LossInputError(fn, "targets", f"row {row} holds id {int(targets[row])}, outside "
                             f"[0, {vocab}) and not ignore_index={ignore_index}",
                             "map answer ids with the TEACHER tokenizer that owns this head")
    return torch.where(valid, targets, torch.full_like(targets, -1))


def _make_plan(fn: str, tensors: list[torch.Tensor | None], transform: LogitTransform,
               temperature: float, ignore_index: int, chunk_size: int, row_block: int) -> _Plan:
    for name, value, default in (("chunk_size", chunk_size, DEFAULT_CHUNK_SIZE),
                                 ("row_block", row_block, DEFAULT_ROW_BLOCK)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LossInputError(fn, name, f"must be a positive int, got {value!r}",
                                 f"pass e.g. {name}={default}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise LossInputError(fn, "temperature", f"must be a finite number > 0, got "
                             f"{temperature!r}", "use 1.0 (docs/method.md §1)")
    dtype = torch.float32
    for x in tensors:
        if x is not None:
            dtype = torch.promote_types(dtype, x.dtype)
    return _Plan(transform, float(temperature), ignore_index, chunk_size, row_block, dtype)


def _check_devices(fn: str, tensors: dict[str, torch.Tensor | None]) -> None:
    devices = {name: x.device for name, x in tensors.items() if x is not None}
    if len(set(devices.values())) > 1:
        raise LossInputError(fn, "/".join(devices), f"tensors are on different devices "
                             f"{ {k: str(v) for k, v in devices.items()} }",
                             "move features, head weight, bias and targets to one device")


def _run_head_loss(fn: str, z: torch.Tensor | None, r: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None, transform: LogitTransform,
                   targets: torch.Tensor | None, temperature: float, ignore_index: int,
                   chunk_size: int, row_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_head(fn, weight, bias, transform)
    _check_features(fn, "r_student", r, weight.shape[1], None)
    if z is not None:
        _check_features(fn, "z_teacher", z, weight.shape[1], r.shape[0])
    _check_devices(fn, {"r_student": r, "z_teacher": z, "weight": weight, "bias": bias,
                        "targets": targets})
    tgt = None if targets is None else _check_targets(fn, targets, r.shape[0], weight.shape[0],
                                                      ignore_index)
    plan = _make_plan(fn, [r, z, weight, bias], transform, temperature, ignore_index,
                      chunk_size, row_block)
    return _ChunkedHeadLoss.apply(r, z, weight, bias, tgt, plan)


def chunked_kl_ce(z_teacher: torch.Tensor, r_student: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None, transform: LogitTransform, targets: torch.Tensor, *,
                  temperature: float = 1.0, ignore_index: int = IGNORE_INDEX,
                  chunk_size: int = DEFAULT_CHUNK_SIZE, row_block: int = DEFAULT_ROW_BLOCK
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KL(p_teacher || q_student) and CE(student, targets) through ONE frozen head.

    Fuses :func:`chunked_kl` and :func:`chunked_ce` so the student logits are computed once
    per chunk (GenRecal's L_kl + L_ar, and L_reg's KL + CE, share them).

    z_teacher: [N, d] float, teacher features (the KL target; gradient supported, normally none).
    r_student: [N, d] float, student-side features (gradient flows here).
    weight: [V, d] float head weight; bias: [V] or None; transform: exact logit map.
    targets: [N] int ids in [0, V) or ``ignore_index``.
    Returns (kl [N], ce [N]) in promote(dtypes, float32); ce is 0 at ignored rows.
    KL uses softmax(logits / temperature) on both sides, CE uses temperature 1; no T^2 factor.
    """
    return _run_head_loss("chunked_kl_ce", z_teacher, r_student, weight, bias, transform,
                          targets, temperature, ignore_index, chunk_size, row_block)


def chunked_kl(z_teacher: torch.Tensor, r_student: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None, transform: LogitTransform, *,
               temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
               row_block: int = DEFAULT_ROW_BLOCK) -> torch.Tensor:
    """Per-row forward KL over the FULL head vocabulary (docs/method.md §1.3, eq. (1.2)).

    ``KL_i = sum_v p_iv (log p_iv - log q_iv)`` with ``p_i = softmax(head(z_i) / T)`` (teacher,
    the target) and ``q_i = softmax(head(r_i) / T)``, ``head(x) = transform.apply(x W^T + b)``.
    Gradient wrt r: ``(q - p) / T`` per logit, chained through the transform and the matmul.
    No T^2 factor is applied (docs/method.md §1.3: temperature 1). Shapes as in :func:`chunked_kl_ce`;
    returns kl [N] in promote(dtypes, float32). Memory: O(row_block * chunk_size) beyond inputs.
    """
    kl, _ = _run_head_loss("chunked_kl", z_teacher, r_student, weight, bias, transform, None,
                           temperature, IGNORE_INDEX, chunk_size, row_block)
    return kl


def chunked_ce(r: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               transform: LogitTransform, targets: torch.Tensor, *,
               ignore_index: int = IGNORE_INDEX, chunk_size: int = DEFAULT_CHUNK_SIZE,
               row_block: int = DEFAULT_ROW_BLOCK) -> torch.Tensor:
    """Per-row cross entropy ``lse(head(r_i)) - head(r_i)[y_i]`` (docs/method.md §1.3, eq. (1.1)).

    r: [N, d] float; weight [V, d]; bias [V] or None; targets: [N] int, ``ignore_index`` rows
    give 0 and no gradient. Returns ce [N] in promote(dtypes, float32).
    """
    _, ce = _run_head_loss("chunked_ce", None, r, weight, bias, transform, targets, 1.0,
                           ignore_index, chunk_size, row_block)
    return ce


# ==============================================================================================
# 2. GenRecal (docs/method.md §1)
# ==============================================================================================

@dataclass(frozen=True)
class LmHead:
    """A frozen lm_head: ``logits = transform.apply(x @ weight.T + bias)``.

    weight: [V, d] float (e.g. the cached teacher head_l, [V_l, d_l]); bias: [V] or None.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    transform: LogitTransform = LogitTransform()

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])


@dataclass(frozen=True)
class GenRecalWeights:
    """Loss weights and KL temperature (docs/method.md §1.3; config values).

    total = ar*L_ar + kl*L_kl + reg_ce*CE(head_l(r'_al)) + reg_kl*KL(head_l(z_al)||head_l(r'_al)).
    Paper: all 1, temperature 1. A weight of 0 skips that term (L_reg ablation: CE only, KL only).
    """

    ar: float = 1.0
    kl: float = 1.0
    reg_ce: float = 1.0
    reg_kl: float = 1.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0:
                raise LossInputError("GenRecalWeights", f.name, f"must be a finite number >= 0, "
                                     f"got {value!r}", "fix the loss weights in the config")
        if self.temperature == 0:
            raise LossInputError("GenRecalWeights", "temperature", "must be > 0",
                                 "use 1.0 (docs/method.md §1)")
        if self.ar == 0 and self.kl == 0:
            raise LossInputError("GenRecalWeights", "ar/kl", "both are 0, so r_al gets no loss",
                                 "keep L_ar (the paper: without it the student collapses)")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GenRecalWeights:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise LossInputError("GenRecalWeights.from_dict", ",".join(unknown), "unknown keys",
                                 f"use only {[f.name for f in fields(cls)]}")
        return cls(**data)


@dataclass(frozen=True)
class GenRecalLosses:
    """Result of :func:`genrecal_losses`. Scalars (0-dim tensors); None = term not computed.

    total: the weighted sum to back-propagate. n_tokens: number of answer tokens (targets).
    """

    total: torch.Tensor
    ar: torch.Tensor | None
    kl: torch.Tensor | None
    reg_ce: torch.Tensor | None
    reg_kl: torch.Tensor | None
    n_tokens: torch.Tensor

    def scalars(self) -> dict[str, float]:
        """Detached Python floats for logging (synchronises the device)."""
        return {f.name: float(getattr(self, f.name).detach()) for f in fields(self)
                if getattr(self, f.name) is not None}


def _real_first_order(mask: torch.Tensor) -> torch.Tensor:
    """mask [B, N] bool -> [B, N] long: indices of True entries in order, then the others."""
    return torch.argsort((~mask).to(torch.int8), dim=1, stable=True)


def answer_window(r_q: torch.Tensor, q_mask: torch.Tensor, r_a: torch.Tensor,
                  a_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the answer window of a concatenated [question | answer] sequence.

    docs/method.md §1.2: the output at position t predicts token t+1,
    so the predictions of answer tokens a_1..a_N come from the last question position and the
    first N-1 answer positions: ``[r_q[-1], r_al[0..N-2]]``. The window is every position from
    the last question token through the last answer token (width N+1); its position j < N
    predicts a_{j+1}, position N predicts nothing. It lines up position by position with the
    teacher's cached window ``z_window`` (z at the last question token, then at a_1..a_N).

    r_q: [B, N_q, d] question-side outputs (Recalibrator r_qs or r'_ql, or student z_qs);
    q_mask: [B, N_q] bool, real question tokens (anywhere in the row, in order);
    r_a: [B, N_a, d] answer-side outputs; a_mask: [B, N_a] bool.
    Returns (window [B, N_a + 1, d], window_mask [B, N_a + 1] bool); window rows beyond a
    sample's N+1 are zero. Gradient flows to r_q and r_a.
    """
    _check_window_inputs(r_q, q_mask, r_a, a_mask)
    positions = torch.arange(q_mask.shape[1], device=q_mask.device)
    last_q = torch.where(q_mask, positions, -1).amax(dim=1, keepdim=True)
    index = torch.cat([last_q, q_mask.shape[1] + _real_first_order(a_mask)], dim=1)
    n_answer = a_mask.sum(dim=1, keepdim=True)
    slots = torch.arange(a_mask.shape[1] + 1, device=a_mask.device).unsqueeze(0)
    window_mask = slots <= n_answer
    seq = torch.cat([r_q, r_a], dim=1)
    window = torch.gather(seq, 1, index.unsqueeze(-1).expand(-1, -1, seq.shape[-1]))
    return window * window_mask.unsqueeze(-1).to(window.dtype), window_mask


def _check_window_inputs(r_q: torch.Tensor, q_mask: torch.Tensor, r_a: torch.Tensor,
                         a_mask: torch.Tensor) -> None:
    fn = "answer_window"
    for name, x, mask in (("r_q", r_q, q_mask), ("r_a", r_a, a_mask)):
        if x.dim() != 3 or mask.dim() != 2 or tuple(mask.shape) != tuple(x.shape[:2]) \
                or mask.dtype != torch.bool:
            raise LossInputError(fn, name, f"shape {tuple(x.shape)} with mask "
                                 f"{tuple(mask.shape)} {mask.dtype}",
                                 "pass [B, N, d] features with a [B, N] bool mask")
    if r_q.shape[0] != r_a.shape[0] or r_q.shape[2] != r_a.shape[2]:
        raise LossInputError(fn, "r_a", f"shape {tuple(r_a.shape)} does not match r_q "
                             f"{tuple(r_q.shape)} in batch or width",
                             "pass both parts of the same Recalibrator output")
    empty = ~q_mask.any(dim=1)
    if bool(empty.any()):
        raise LossInputError(fn, "q_mask", f"sample {int(empty.nonzero()[0, 0])} has no "
                             "question token, so nothing predicts its first answer token",
                             "drop samples without a question from the batch")


def window_targets(answer_ids: torch.Tensor, a_mask: torch.Tensor,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token targets on the answer window (docs/method.md §1.2).

    answer_ids: [B, N_a] int, answer token ids (teacher tokenizer for L_ar/L_reg, student
    tokenizer for CE_s); a_mask: [B, N_a] bool, real answer tokens (anywhere, in order).
    Returns [B, N_a + 1] long: window position j holds a_{j+1} for j < N, else ignore_index,
    aligned with :func:`answer_window` built from the same ``a_mask``.
    """
    if answer_ids.shape != a_mask.shape or answer_ids.dim() != 2 or a_mask.dtype != torch.bool:
        raise LossInputError("window_targets", "answer_ids", f"shape {tuple(answer_ids.shape)} "
                             f"with mask {tuple(a_mask.shape)} {a_mask.dtype}",
                             "pass [B, N_a] ids with the [B, N_a] bool answer mask")
    order = _real_first_order(a_mask)
    ids = torch.gather(answer_ids.long(), 1, order)
    real = torch.gather(a_mask, 1, order)
    ids = torch.where(real, ids, torch.full_like(ids, ignore_index))
    return F.pad(ids, (0, 1), value=ignore_index)


def next_token_targets(ids: torch.Tensor, supervised: torch.Tensor,
                       ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Targets for a whole causal sequence: position t predicts token t+1.

    ids: [B, L] int token ids; supervised: [B, L] bool, True at tokens that are targets
    (answer tokens incl. end-of-turn). Returns [B, L] long: targets[:, t] = ids[:, t+1] where
    supervised[:, t+1], else ignore_index (always at t = L-1).
    """
    if ids.shape != supervised.shape or ids.dim() != 2 or supervised.dtype != torch.bool:
        raise LossInputError("next_token_targets", "supervised", f"shape "
                             f"{tuple(supervised.shape)} {supervised.dtype} vs ids "
                             f"{tuple(ids.shape)}", "pass [B, L] ids and a [B, L] bool mask")
    shifted = torch.where(supervised[:, 1:], ids[:, 1:].long(),
                          torch.full_like(ids[:, 1:], ignore_index, dtype=torch.long))
    return F.pad(shifted, (0, 1), value=ignore_index)


def _reduce(per_row: torch.Tensor, n_tokens: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    total = per_row.sum()
    return total if reduction == "sum" else total / n_tokens.clamp_min(1).to(total.dtype)


def _pair_terms(head: LmHead, z: torch.Tensor, r: torch.Tensor, y: torch.Tensor, w_ce: float,
                w_kl: float, temperature: float, n_tokens: torch.Tensor, reduction: Reduction,
                chunk_size: int, row_block: int
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(CE(head(r), y), KL(head(z) || head(r))) reduced over answer tokens; None if weight 0."""
    common = dict(chunk_size=chunk_size, row_block=row_block)
    tf = head.transform
    if w_kl > 0 and w_ce > 0:
        kl, ce = chunked_kl_ce(z, r, head.weight, head.bias, tf, y, temperature=temperature,
                               **common)
        return _reduce(ce, n_tokens, reduction), _reduce(kl, n_tokens, reduction)
    if w_kl > 0:
        kl = chunked_kl(z, r, head.weight, head.bias, tf, temperature=temperature, **common)
        return None, _reduce(kl, n_tokens, reduction)
    ce = chunked_ce(r, head.weight, head.bias, tf, y, **common)
    return _reduce(ce, n_tokens, reduction), None


def _check_genrecal_inputs(z_window: torch.Tensor, r_window: torch.Tensor,
                           targets: torch.Tensor, r_teacher_window: torch.Tensor | None,
                           weights: GenRecalWeights, reduction: str) -> None:
    fn = "genrecal_losses"
    if z_window.dim() != 3 or targets.shape != z_window.shape[:2]:
        raise LossInputError(fn, "z_window/targets", f"shapes {tuple(z_window.shape)} and "
                             f"{tuple(targets.shape)}", "pass z_window [B, W, d_l] and "
                             "targets [B, W] (see window_targets)")
    for name, x in (("r_window", r_window), ("r_teacher_window", r_teacher_window)):
        if x is not None and x.shape != z_window.shape:
            raise LossInputError(fn, name, f"shape {tuple(x.shape)} != z_window "
                                 f"{tuple(z_window.shape)}", "build it with answer_window "
                                 "from the same answer mask as the cached teacher window")
    if r_teacher_window is not None and weights.reg_ce == 0 and weights.reg_kl == 0:
        raise LossInputError(fn, "r_teacher_window", "given but weights.reg_ce and "
                             "weights.reg_kl are 0", "skip the teacher-only pass or set L_reg "
                             "weights")
    if reduction not in ("mean", "sum"):
        raise LossInputError(fn, "reduction", f"{reduction!r}", "use 'mean' or 'sum'")


def genrecal_losses(head: LmHead, z_window: torch.Tensor, r_window: torch.Tensor,
                    targets: torch.Tensor, *, r_teacher_window: torch.Tensor | None = None,
                    weights: GenRecalWeights = GenRecalWeights(), reduction: Reduction = "mean",
                    chunk_size: int = DEFAULT_CHUNK_SIZE,
                    row_block: int = DEFAULT_ROW_BLOCK) -> GenRecalLosses:
    """GenRecal losses L_ar, L_kl and L_reg (docs/method.md §1.3).

    All tensors live on the teacher's answer window (see :func:`answer_window`): position j of
    a sample's window (j = 0: last question token, j = 1..N: answer tokens a_1..a_N) is the
    position whose output predicts the next token, a_{j+1} for j < N.

    head: the frozen teacher head head_l (weight [V_l, d_l], bias, LogitTransform).
    z_window: [B, W, d_l] cached teacher post-norm states on the window (the z_al of the KL
        target, method notation; no gradient expected).
    r_window: [B, W, d_l] Recalibrator outputs on the window, ``[r_qs[-1], r_al[:-1], r_al[-1]]``
        (``answer_window(r_qs, q_mask_s, r_al, a_mask)``).
    targets: [B, W] long, teacher answer ids a_{j+1} or IGNORE_INDEX (``window_targets``);
        padding and the last window position are IGNORE_INDEX.
    r_teacher_window: [B, W, d_l] teacher-only-pass outputs ``[r'_ql[-1], r'_al]`` or None
        (then L_reg is not computed).
    weights: loss weights and temperature T (config). reduction: "mean" over answer tokens
        (the paper's choice) or "sum" (divide by a global token count yourself).

    With p = softmax(head_l(z_window)/T), q = softmax(head_l(r_window)/T),
    q' = softmax(head_l(r_teacher_window)/T), per answer token:
      L_ar   = CE(head_l(r_window), a)                    (temperature 1)
      L_kl   = KL(p || q)                                 over the full teacher vocabulary
      L_reg  = CE(head_l(r_teacher_window), a) + KL(p || q')
    total = w.ar*L_ar + w.kl*L_kl + w.reg_ce*L_reg_CE + w.reg_kl*L_reg_KL.
    """
    _check_genrecal_inputs(z_window, r_window, targets, r_teacher_window, weights, reduction)
    valid = targets != IGNORE_INDEX
    n_tokens = valid.sum()
    z, y = z_window[valid], targets[valid]
    args = (weights.temperature, n_tokens, reduction, chunk_size, row_block)
    ar, kl = _pair_terms(head, z, r_window[valid], y, weights.ar, weights.kl, *args)
    reg_ce = reg_kl = None
    if r_teacher_window is not None:
        reg_ce, reg_kl = _pair_terms(head, z, r_teacher_window[valid], y, weights.reg_ce,
                                     weights.reg_kl, *args)
    terms = [(weights.ar, ar), (weights.kl, kl), (weights.reg_ce, reg_ce),
             (weights.reg_kl, reg_kl)]
    total = sum(w * t for w, t in terms if t is not None)
    return GenRecalLosses(total=total, ar=ar, kl=kl, reg_ce=reg_ce, reg_kl=reg_kl,
                          n_tokens=n_tokens)


def student_ce(x: torch.Tensor, targets: torch.Tensor, *, head: LmHead | None = None,
               ignore_index: int = IGNORE_INDEX, reduction: Reduction = "mean",
               chunk_size: int = DEFAULT_CHUNK_SIZE,
               row_block: int = DEFAULT_ROW_BLOCK) -> torch.Tensor:
    """Student next-token CE, CE_s(head_s(z_as), student answer ids) (docs/method.md §1.3, eq. (1.4)).

    x: [..., V_s] student logits when ``head`` is None, else [..., d_s] student post-norm
    features (e.g. ``answer_window(z_qs, q_mask, z_as, a_mask)``) read through ``head``
    (head_s) chunk by chunk, without materialising [N, V_s].
    targets: [...] long, aligned next-token targets (``window_targets`` or
    ``next_token_targets``) in the STUDENT tokenizer, ignore_index where none.
    Returns a scalar: mean over target tokens (0 if none) or their sum.
    """
    if x.shape[:-1] != targets.shape:
        raise LossInputError("student_ce", "targets", f"shape {tuple(targets.shape)} does not "
                             f"match x {tuple(x.shape)} without its last dim",
                             "align targets with x (window_targets / next_token_targets)")
    if reduction not in ("mean", "sum"):
        raise LossInputError("student_ce", "reduction", f"{reduction!r}", "use 'mean' or 'sum'")
    valid = targets != ignore_index
    rows, y = x[valid], targets[valid]
    n_tokens = valid.sum()
    if head is None:
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
        y = _check_targets("student_ce", y, rows.shape[0], rows.shape[1], ignore_index)
        return _reduce(F.cross_entropy(rows, y, reduction="none"), n_tokens, reduction)
    ce = chunked_ce(rows, head.weight, head.bias, head.transform, y, ignore_index=ignore_index,
                    chunk_size=chunk_size, row_block=row_block)
    return _reduce(ce, n_tokens, reduction)


# ==============================================================================================
# 3. Same-tokenizer KD from cached top-k statistics (docs/method.md §2)
# ==============================================================================================

def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2 (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)),
                       torch.log1p(-torch.exp(x)))


def _teacher_buckets(topk_logprobs: torch.Tensor, full_support: bool
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher log-probs on the (k + 1)-bucket support: ([n, k], tail [n] or None).

    With L = logsumexp(topk_logprobs) (log of the top-k mass): tail = log(1 - exp(L)).
    Rounding in the cache can make L > 0; then the top-k are renormalised by L and the tail is
    empty. When the top-k cover the whole vocabulary (k = V) there is no tail bucket and the
    top-k are renormalised exactly.
    """
    mass = torch.logsumexp(topk_logprobs, dim=1)
    if full_support:
        return topk_logprobs - mass.unsqueeze(1), None
    top = topk_logprobs - mass.clamp_min(0.0).unsqueeze(1)
    return top, _log1mexp(mass.clamp_max(0.0))


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p (log p - log q) elementwise, 0 where p = 0 (log_p = -inf), gradient-safe in log_q."""
    empty = torch.isneginf(log_p)
    safe_p = torch.where(empty, torch.zeros_like(log_p), log_p)
    return torch.where(empty, torch.zeros_like(log_q), torch.exp(safe_p) * (safe_p - log_q))


def _check_topk_inputs(student_logits: torch.Tensor, topk_ids: torch.Tensor,
                       topk_logprobs: torch.Tensor, mask: torch.Tensor) -> None:
    fn = "topk_kd_loss"
    lead, vocab = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    if topk_ids.shape != topk_logprobs.shape or tuple(topk_ids.shape[:-1]) != lead \
            or topk_ids.shape[-1] > vocab or topk_ids.is_floating_point():
        raise LossInputError(fn, "topk_ids/topk_logprobs", f"shapes {tuple(topk_ids.shape)} "
                             f"{topk_ids.dtype} and {tuple(topk_logprobs.shape)} for student "
                             f"logits {tuple(student_logits.shape)}",
                             "pass [..., k] int ids and [..., k] log-probs with k <= V")
    if tuple(mask.shape) != lead or mask.dtype != torch.bool:
        raise LossInputError(fn, "mask", f"shape {tuple(mask.shape)} {mask.dtype}, expected "
                             f"{lead} bool", "pass True at supervised answer positions")


def _check_topk_ids(ids: torch.Tensor, vocab: int) -> None:
    fn = "topk_kd_loss"
    if bool(((ids < 0) | (ids >= vocab)).any()):
        raise LossInputError(fn, "topk_ids", f"ids outside [0, {vocab})",
                             "teacher and student must share the tokenizer and vocabulary")
    ordered = ids.sort(dim=1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise LossInputError(fn, "topk_ids", "a row repeats an id, which would count its mass "
                             "twice", "cache distinct top-k ids per position")


def topk_kd_loss(student_logits: torch.Tensor, topk_ids: torch.Tensor,
                 topk_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Forward KL(teacher || student) on the top-k + tail support, temperature 1.

    docs/method.md §2.4: both distributions are normalised
    over the SAME k + 1 buckets: the teacher's top-k ids and one tail bucket holding the rest.
      teacher: P_i = exp(topk_logprobs_i), P_tail = 1 - sum_i P_i (log1mexp of their logsumexp);
      student: Q_i = softmax(s)_{id_i}, Q_tail = sum over the other V - k ids (a masked
               logsumexp of the student logits, stable even when the tail is tiny).
    loss = mean over masked positions of sum_b P_b (log P_b - log Q_b). With k = V the tail is
    empty and this is the exact full-vocabulary KL.

    Temperature: only T = 1 is supported. The cached log-probs are at T = 1; at T != 1 the
    teacher's top-k probabilities and tail mass also need its log-sum-exp at T = 1 and at T,
    which this signature does not carry.

    student_logits: [..., V] float (gradient flows here); topk_ids: [..., k] int, distinct per
    position; topk_logprobs: [..., k] float, teacher log-softmax at T = 1 (a constant target:
    detached); mask: [...] bool, True at supervised positions. Returns a scalar (0 if no
    position is masked in).
    """
    _check_topk_inputs(student_logits, topk_ids, topk_logprobs, mask)
    vocab, k = student_logits.shape[-1], topk_ids.shape[-1]
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    logits, ids = student_logits[mask].to(dtype), topk_ids[mask].long()
    _check_topk_ids(ids, vocab)
    log_q = torch.log_softmax(logits, dim=-1)
    top_p, tail_p = _teacher_buckets(topk_logprobs[mask].detach().to(dtype), k == vocab)
    per_row = _kl_terms(top_p, log_q.gather(1, ids)).sum(dim=1)
    if tail_p is not None:
        tail_q = torch.logsumexp(log_q.scatter(1, ids, -math.inf), dim=1)
        per_row = per_row + _kl_terms(tail_p, tail_q)
    return per_row.sum() / max(per_row.shape[0], 1)
