"""GRACE loss maths (docs/method.md §2.1, eqs. (2.2)-(2.9); cache routes of §2.4). Pure functions.

1. :func:`gdkd_exact` (``gdkd.source: exact``): gated decoupled KD (2.2)-(2.6) from the cached
   teacher post-norm states through the cached teacher head, over the full vocabulary.
2. :func:`gdkd_from_stats` (``gdkd.source: logit_stats``): the same loss from cached
   :class:`~genrecal.store.logit_stats.LogitStats`; TCKD and the gate exact, NCKD over the
   top-k ids plus ONE tail bucket, teacher and student normalised over the SAME buckets.
3. :func:`rcka_loss`: relational CKA (2.7)-(2.9) between the cached UNCENTRED teacher Grams and
   the student's live Grams, centred once here.
4. :func:`teacher_logit_stats` and :func:`nckd_topk_error`: the cache statistics of the
   teacher head sliced to the student vocabulary, and |NCKD_topk - NCKD_exact| for benchmarks.

Vocabulary. Teacher and student share the tokenizer, but the teacher head may carry more
padded rows (Qwen2-VL-7B 152,064 vs 2B 151,936). Everything runs over V = V_s, the student's
vocabulary: the exact path reads the first V_s rows of the teacher head, and the gate uses
log V_s. For :func:`gdkd_from_stats` to equal :func:`gdkd_exact`, the statistics must come
from the head sliced the same way (:func:`teacher_logit_stats` does that); statistics over
the full teacher head put the padded rows' mass into the tail bucket.

Memory. Neither GDKD path materialises [N, V] logits. Each is a
:class:`torch.autograd.Function` that walks row blocks of N (``row_block``) and vocabulary
chunks of V (``chunk_size``) with per-row online log-sum-exp accumulators, and recomputes each
chunk's logits in its exact backward pass (the style of ``train/losses.py``,
``_ChunkedHeadLoss``). Peak extra memory is a few ``[row_block, chunk_size]`` tensors (both
heads' logits of one chunk, in the exact path) plus O(N) (exact) or O(N k) (stats) per-row
statistics saved for backward.

Precision. Computations run in ``promote(input dtypes, float32)``: bf16/fp16 inputs are
upcast chunk by chunk, float64 inputs stay float64 (reference checks).

Gradients. The GDKD losses reach the student features ``z_student`` and the student head
(weight and bias); the teacher side is detached (a constant target), and so is the gate (2.5).
RCKA reaches ``student_states``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from genrecal.store.artifacts import TeacherHead
from genrecal.store.logit_stats import STAT_FIELDS, LogitStats, logit_statistics
from genrecal.store.logit_transform import LogitTransform
from genrecal.train.errors import LossInputError
from genrecal.train.losses import (DEFAULT_CHUNK_SIZE, DEFAULT_ROW_BLOCK, LmHead, _cast, _check_head,
                                   _head_chunk, _log1mexp, _logits_and_slope, _pick_targets, _spans)

#: Anything with ``weight [V, d]``, ``bias [V] | None`` and ``transform: LogitTransform``.
Head = Union[LmHead, TeacherHead]

DEFAULT_TEMPERATURE = 2.0
DEFAULT_ALPHA = 1.0
DEFAULT_BETA_DKD = 4.0
DEFAULT_MIN_TOKENS = 4
#: A centred Gram counts as degenerate (2.1, skip rule) when ||K~||_F <= tol * ||K||_F.
#: Float32 rounding of the centring leaves ||K~||_F ~ 1e-7 ||K||_F for a truly degenerate K.
DEFAULT_DEGENERATE_TOL = 1e-5

_NEG_INF = -math.inf


# ==============================================================================================
# Results
# ==============================================================================================

@dataclass(frozen=True)
class GdkdOut:
    """Result of :func:`gdkd_exact` / :func:`gdkd_from_stats`, in the computation dtype.

    loss: 0-dim, L_GDKD (2.6) = sum_i gate_i dkd_i / sum_i gate_i (0 when N = 0); gradient
        flows to the student features and head.
    dkd:  [N] per-row DKD (2.4) = (alpha * tckd + beta_dkd * nckd) * T^2.
    tckd: [N] per-row TCKD (2.2) at temperature T (no weight, no T^2).
    nckd: [N] per-row NCKD (2.3) at temperature T (no weight, no T^2); top-k + tail bucket
        approximation on the stats route.
    gate: [N] the confidence gate (2.5), a constant in [exp(-1), 1] (no gradient).
    """

    loss: torch.Tensor
    dkd: torch.Tensor
    tckd: torch.Tensor
    nckd: torch.Tensor
    gate: torch.Tensor


@dataclass(frozen=True)
class RckaOut:
    """Result of :func:`rcka_loss`.

    loss: 0-dim, L_RCKA (2.9) = mean over kept images of (1 - CKA); a zero when no image is
        kept (connected to ``student_states`` when they require grad, so backward works).
    n_images_used: number of kept images.
    cka: [n_images_used] CKA (2.8) of each kept image, in input order.
    kept: indices (into the input lists) of the kept images.
    """

    loss: torch.Tensor
    n_images_used: int
    cka: torch.Tensor
    kept: tuple[int, ...]


@dataclass(frozen=True)
class NckdError:
    """|NCKD_topk - NCKD_exact| over N rows for one k (see :func:`nckd_topk_error`)."""

    k: int
    mean_abs: float
    max_abs: float
    mean_exact: float
    mean_topk: float


# ==============================================================================================
# Shared chunk helpers
# ==============================================================================================

@dataclass(frozen=True)
class _Plan:
    """How a chunked GRACE loss runs. vocab: V = V_s (teacher rows beyond it are never read)."""

    student_transform: LogitTransform
    teacher_transform: LogitTransform | None
    temperature: float
    vocab: int
    chunk_size: int
    row_block: int
    dtype: torch.dtype


class _Lse:
    """Per-row online log-sum-exp over column chunks, -inf entries allowed (masked columns,
    even a whole chunk), optionally with a running softmax-weighted sum of ``values``."""

    def __init__(self, like: torch.Tensor, rows: int, weighted: bool = False):
        self.max = like.new_full((rows,), _NEG_INF)
        self.sum = like.new_zeros(rows)
        self.weighted = like.new_zeros(rows) if weighted else None

    @staticmethod
    def _safe(m: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.isfinite(m), m, torch.zeros_like(m))

    def update(self, x: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """x: [n, c] (may hold -inf); values: [n, c] finite (weighted mode only)."""
        new_max = torch.maximum(self.max, x.amax(dim=1))
        safe = self._safe(new_max)
        rescale = torch.exp(self.max - safe)
        e = torch.exp(x - safe.unsqueeze(1))
        self.sum = self.sum * rescale + e.sum(dim=1)
        if self.weighted is not None:
            self.weighted = self.weighted * rescale + (e * values).sum(dim=1)
        self.max = new_max

    def lse(self) -> torch.Tensor:
        """[n]; -inf for a row that saw no finite entry."""
        return torch.where(self.sum > 0, self._safe(self.max) + torch.log(self.sum),
                           torch.full_like(self.sum, _NEG_INF))

    def mean(self) -> torch.Tensor:
        """sum_v softmax(x)_v values_v (rows with a finite entry)."""
        return self.weighted / self.sum


def _is_col(ids: torch.Tensor, c0: int, width: int) -> torch.Tensor:
    """ids [n] long -> [n, width] bool, True at column ids - c0 (if inside this chunk)."""
    cols = torch.arange(c0, c0 + width, device=ids.device)
    return cols.unsqueeze(0) == ids.unsqueeze(1)


def _local_ids(ids: torch.Tensor, c0: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [n, k] -> (clamped local column [n, k], inside-this-chunk [n, k] bool)."""
    local = ids - c0
    inside = (local >= 0) & (local < width)
    return local.clamp(0, width - 1), inside


def _member(ids: torch.Tensor, c0: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """[n, width] bool, True at columns that one of the row's ids [n, k] points at."""
    local, inside = _local_ids(ids, c0, width)
    hits = like.new_zeros(ids.shape[0], width).scatter_add_(1, local, inside.to(like.dtype))
    return hits > 0


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p (log p - log q) elementwise; 0 where p = 0 (log_p = -inf), gradient-safe in log_q."""
    empty = torch.isneginf(log_p)
    safe_p = torch.where(empty, torch.zeros_like(log_p), log_p)
    return torch.where(empty, torch.zeros_like(log_q), torch.exp(safe_p) * (safe_p - log_q))


def _binary_split(log_nt: torch.Tensor, y_over_t: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """From B = lse_{v != y}(x/T) and x_y/T: (log b, log(1 - b)) with b = softmax(x/T)_y.

    Both logs are differences of log-sum-exps, so 1 - b never suffers cancellation.
    """
    a = torch.logaddexp(log_nt, y_over_t)
    return y_over_t - a, log_nt - a


def _grads_like(needs: Sequence[bool], tensors: Sequence[torch.Tensor | None],
                dtype: torch.dtype) -> list[torch.Tensor | None]:
    return [torch.zeros(x.shape, dtype=dtype, device=x.device) if need and x is not None
            else None for need, x in zip(needs, tensors)]


def _accumulate(grads: list[torch.Tensor | None], g: torch.Tensor, x: torch.Tensor,
                w: torch.Tensor, i0: int, c0: int) -> None:
    """grads = [x, weight, bias] buffers; g: d loss / d raw logits of one block/chunk [n, c]."""
    gx, gw, gb = grads
    if gx is not None:
        gx[i0:i0 + x.shape[0]] += g @ w
    if gw is not None:
        gw[c0:c0 + g.shape[1]] += g.T @ x
    if gb is not None:
        gb[c0:c0 + g.shape[1]] += g.sum(0)


# ==============================================================================================
# 1. GDKD, exact path
# ==============================================================================================

def _exact_forward_rows(xs: torch.Tensor, xt: torch.Tensor, y: torch.Tensor, ws, bs, wt, bt,
                        plan: _Plan) -> tuple[torch.Tensor, ...]:
    """One row block: (B_t, B_s, log bT, log bS, tckd, nckd, entropy), each [n].

    With tT = t/T, sT = s/T, B = lse over v != y, W = sum_{v != y} pT^_v (t_v - s_v)/T:
      NCKD (2.3) = W - B_t + B_s  (pT^_v = exp(tT_v - B_t), pS^_v = exp(sT_v - B_s));
      TCKD (2.2) from log b = x_y/T - logaddexp(B, x_y/T), log(1 - b) = B - logaddexp(...);
      H (2.5) = lse(t) - sum_v softmax(t)_v t_v  (temperature 1).
    """
    n, temp = xs.shape[0], plan.temperature
    one, tea, stu = _Lse(xs, n, weighted=True), _Lse(xs, n, weighted=True), _Lse(xs, n)
    t_y, s_y = xs.new_zeros(n), xs.new_zeros(n)
    for c0, c1 in _spans(plan.vocab, plan.chunk_size):
        w, b = _head_chunk(ws, bs, c0, c1, plan.dtype)
        s, _ = _logits_and_slope(xs, w, b, plan.student_transform)
        w, b = _head_chunk(wt, bt, c0, c1, plan.dtype)
        t, _ = _logits_and_slope(xt, w, b, plan.teacher_transform)
        is_y = _is_col(y, c0, c1 - c0)
        one.update(t, t)
        t_T, s_T = t / temp, s / temp
        tea.update(t_T.masked_fill(is_y, _NEG_INF), t_T - s_T)
        stu.update(s_T.masked_fill(is_y, _NEG_INF))
        t_y = t_y + _pick_targets(t, y, c0)
        s_y = s_y + _pick_targets(s, y, c0)
    b_t, b_s = tea.lse(), stu.lse()
    log_bt, log_nbt = _binary_split(b_t, t_y / temp)
    log_bs, log_nbs = _binary_split(b_s, s_y / temp)
    tckd = _kl_terms(log_bt, log_bs) + _kl_terms(log_nbt, log_nbs)
    nckd = tea.mean() - b_t + b_s
    entropy = (one.lse() - one.mean()).clamp_min(0.0)
    return b_t, b_s, log_bt, log_bs, tckd, nckd, entropy


class _ExactGdkd(torch.autograd.Function):
    """(tckd [N], nckd [N], entropy [N]) of the exact path; gradient to student x, W, b only."""

    @staticmethod
    def forward(ctx, xs, ws, bs, xt, wt, bt, y, plan):  # noqa: D102 (autograd protocol)
        with torch.autocast(xs.device.type, enabled=False):
            blocks = [_exact_forward_rows(xs[i0:i1].to(plan.dtype), xt[i0:i1].to(plan.dtype),
                                          y[i0:i1], ws, bs, wt, bt, plan)
                      for i0, i1 in _spans(xs.shape[0], plan.row_block)]
        if blocks:
            out = [torch.cat(parts) for parts in zip(*blocks)]
        else:
            out = [xs.new_zeros(0, dtype=plan.dtype) for _ in range(7)]
        b_t, b_s, log_bt, log_bs, tckd, nckd, entropy = out
        ctx.save_for_backward(xs, ws, bs, xt, wt, bt, y, b_t, b_s, log_bt, log_bs)
        ctx.plan = plan
        ctx.mark_non_differentiable(entropy)
        return tckd, nckd, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, g_tckd, g_nckd, _g_entropy):  # noqa: D102 (autograd protocol)
        xs, ws, bs, xt, wt, bt, y, b_t, b_s, log_bt, log_bs = ctx.saved_tensors
        plan = ctx.plan
        grads = _grads_like(ctx.needs_input_grad[:3], (xs, ws, bs), plan.dtype)
        if any(g is not None for g in grads):
            g_tckd = torch.zeros_like(b_t) if g_tckd is None else g_tckd.to(plan.dtype)
            g_nckd = torch.zeros_like(b_t) if g_nckd is None else g_nckd.to(plan.dtype)
            with torch.autocast(xs.device.type, enabled=False):
                for i0, i1 in _spans(xs.shape[0], plan.row_block):
                    rows = slice(i0, i1)
                    _exact_backward_rows(xs[rows].to(plan.dtype), xt[rows].to(plan.dtype),
                                         y[rows], ws, bs, wt, bt, b_t[rows], b_s[rows],
                                         log_bt[rows], log_bs[rows], g_tckd[rows],
                                         g_nckd[rows], plan, grads, i0)
        return (*(_cast(g, x) for g, x in zip(grads, (xs, ws, bs))), None, None, None, None,
                None)


def _exact_backward_rows(xs, xt, y, ws, bs, wt, bt, b_t, b_s, log_bt, log_bs, g_tckd, g_nckd,
                         plan: _Plan, grads, i0: int) -> None:
    """d/d sigma_v (sigma = s/T), then / T, chained through the transform and the matmul:

    TCKD: (bT - bS) pS^_v for v != y, bS - bT at v = y;   NCKD: pS^_v - pT^_v for v != y, 0 at y.
    """
    temp = plan.temperature
    d_b = (torch.exp(log_bt) - torch.exp(log_bs)).unsqueeze(1)
    g_t, g_n = g_tckd.unsqueeze(1), g_nckd.unsqueeze(1)
    for c0, c1 in _spans(plan.vocab, plan.chunk_size):
        w, b = _head_chunk(ws, bs, c0, c1, plan.dtype)
        s, slope = _logits_and_slope(xs, w, b, plan.student_transform)
        wt_c, bt_c = _head_chunk(wt, bt, c0, c1, plan.dtype)
        t, _ = _logits_and_slope(xt, wt_c, bt_c, plan.teacher_transform)
        is_y = _is_col(y, c0, c1 - c0)
        p_s = torch.exp(s / temp - b_s.unsqueeze(1)).masked_fill(is_y, 0.0)
        p_t = torch.exp(t / temp - b_t.unsqueeze(1)).masked_fill(is_y, 0.0)
        g = g_t * d_b * p_s + g_n * (p_s - p_t)
        g = torch.where(is_y, -g_t * d_b, g) / temp
        _accumulate(grads, g * slope, xs, w, i0, c0)


def gdkd_exact(z_teacher: torch.Tensor, teacher_head: Head, z_student: torch.Tensor,
               student_head: Head, targets: torch.Tensor, *,
               temperature: float = DEFAULT_TEMPERATURE, alpha: float = DEFAULT_ALPHA,
               beta_dkd: float = DEFAULT_BETA_DKD, chunk_size: int = DEFAULT_CHUNK_SIZE,
               row_block: int = DEFAULT_ROW_BLOCK) -> GdkdOut:
    """Gated decoupled KD over the full vocabulary (docs/method.md §2.1, (2.2)-(2.6); §2.4,
    exact route).

    z_teacher: [N, d_l] float, cached teacher post-norm states at the supervised positions
        (``answer_hidden`` window rows 0..N-1); detached, no gradient.
    teacher_head: the cached teacher head (``TeacherHead`` or ``LmHead``): weight [V_t, d_l],
        bias [V_t] or None, transform (scale, soft-cap). Its first V_s rows are used.
    z_student: [N, d_s] float, the student's post-norm states at the same positions.
    student_head: weight [V_s, d_s], bias [V_s] or None, transform; V_t >= V_s >= 2.
    targets: [N] int, label y of each row, all in [0, V_s) (filter ignored rows first).
    temperature T > 0; alpha, beta_dkd >= 0 (2.4). chunk_size / row_block: see module doc.

    Per row, with pT = softmax(t/T), pS = softmax(s/T), bT = pT_y, bS = pS_y:
      TCKD (2.2), NCKD (2.3) over v != y, DKD (2.4) = (alpha TCKD + beta_dkd NCKD) T^2,
      g (2.5) = exp(-H / log V_s) with H the teacher's T = 1 entropy over the V_s rows,
      L_GDKD (2.6) = sum_i g_i DKD_i / sum_i g_i.
    Implementation: a chunked autograd function (row blocks x vocabulary chunks, online
    log-sum-exp, exact chunked backward that recomputes both heads' logits chunk by chunk);
    peak extra memory ~ a few [row_block, chunk_size] tensors, never [N, V] for either side.
    """
    fn = "gdkd_exact"
    _check_scalars(fn, temperature, alpha, beta_dkd, chunk_size, row_block)
    vocab = _check_student(fn, z_student, student_head)
    _check_head(fn, teacher_head.weight, teacher_head.bias, teacher_head.transform)
    if teacher_head.weight.shape[0] < vocab:
        raise LossInputError(fn, "teacher_head", f"has {teacher_head.weight.shape[0]} rows, "
                             f"fewer than the student's vocabulary V_s = {vocab}",
                             "teacher and student must share the tokenizer; the teacher head "
                             "may only add padded rows beyond V_s")
    _check_features(fn, "z_teacher", z_teacher, teacher_head.weight.shape[1],
                    z_student.shape[0])
    y = _check_labels(fn, targets, z_student.shape[0], vocab)
    _check_same_device(fn, z_student, student_head, z_teacher, teacher_head, y)
    _require_finite(fn, {"z_student": z_student, "z_teacher": z_teacher})
    tb = None if teacher_head.bias is None else teacher_head.bias[:vocab].detach()
    plan = _make_plan([z_student, student_head.weight, student_head.bias, z_teacher,
                       teacher_head.weight], student_head.transform, teacher_head.transform,
                      temperature, vocab, chunk_size, row_block)
    tckd, nckd, entropy = _ExactGdkd.apply(z_student, student_head.weight, student_head.bias,
                                           z_teacher.detach(),
                                           teacher_head.weight[:vocab].detach(), tb, y, plan)
    return _finish_gdkd(fn, tckd, nckd, entropy, vocab, temperature, alpha, beta_dkd)


def _finish_gdkd(fn: str, tckd: torch.Tensor, nckd: torch.Tensor, entropy: torch.Tensor,
                 vocab: int, temperature: float, alpha: float, beta_dkd: float) -> GdkdOut:
    """(2.4)-(2.6) from the per-row terms; the gate is a constant."""
    bad = ~(torch.isfinite(tckd) & torch.isfinite(nckd) & torch.isfinite(entropy))
    if bool(bad.any()):
        rows = bad.nonzero().flatten()[:5].tolist()
        raise LossInputError(fn, "head", f"non-finite loss terms at rows {rows}",
                             "check both heads' weights/bias for inf/NaN and the logits for "
                             "overflow (pass float32 features)")
    gate = torch.exp(-entropy.detach() / math.log(vocab))
    dkd = (alpha * tckd + beta_dkd * nckd) * temperature ** 2
    weighted = (gate * dkd).sum()
    loss = weighted / gate.sum() if gate.numel() else weighted
    return GdkdOut(loss=loss, dkd=dkd, tckd=tckd, nckd=nckd, gate=gate)


# ==============================================================================================
# 2. GDKD from cached logit statistics
# ==============================================================================================

def _bucket_forward_rows(x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, w_all, b_all,
                         plan: _Plan) -> tuple[torch.Tensor, ...]:
    """Student statistics of one row block at temperature T, sigma = s/T:

    (sigma_y [n], B = lse_{v != y} sigma [n], sigma at ids [n, k],
     L = lse over v not in ids and != y [n], -inf when that set is empty).
    """
    n, k = ids.shape
    nt, tail = _Lse(x, n), _Lse(x, n)
    s_y, s_ids = x.new_zeros(n), x.new_zeros(n, k)
    for c0, c1 in _spans(plan.vocab, plan.chunk_size):
        w, b = _head_chunk(w_all, b_all, c0, c1, plan.dtype)
        s, _ = _logits_and_slope(x, w, b, plan.student_transform)
        sig = s / plan.temperature
        is_y = _is_col(y, c0, c1 - c0)
        nt.update(sig.masked_fill(is_y, _NEG_INF))
        tail.update(sig.masked_fill(is_y | _member(ids, c0, c1 - c0, sig), _NEG_INF))
        s_y = s_y + _pick_targets(sig, y, c0)
        local, inside = _local_ids(ids, c0, c1 - c0)
        s_ids = s_ids + torch.where(inside, sig.gather(1, local), torch.zeros_like(s_ids))
    return s_y, nt.lse(), s_ids, tail.lse()


class _StudentBuckets(torch.autograd.Function):
    """Student statistics for the bucketed NCKD, chunked; see :func:`_bucket_forward_rows`."""

    @staticmethod
    def forward(ctx, x, w, b, y, ids, plan):  # noqa: D102 (autograd protocol)
        with torch.autocast(x.device.type, enabled=False):
            blocks = [_bucket_forward_rows(x[i0:i1].to(plan.dtype), y[i0:i1], ids[i0:i1], w, b,
                                           plan)
                      for i0, i1 in _spans(x.shape[0], plan.row_block)]
        if blocks:
            s_y, b_nt, s_ids, l_tail = (torch.cat(parts) for parts in zip(*blocks))
        else:
            s_y, b_nt, l_tail = (x.new_zeros(0, dtype=plan.dtype) for _ in range(3))
            s_ids = x.new_zeros(0, ids.shape[1], dtype=plan.dtype)
        ctx.save_for_backward(x, w, b, y, ids, b_nt, l_tail)
        ctx.plan = plan
        return s_y, b_nt, s_ids, l_tail

    @staticmethod
    @once_differentiable
    def backward(ctx, g_y, g_nt, g_ids, g_tail):  # noqa: D102 (autograd protocol)
        x, w_all, b_all, y, ids, b_nt, l_tail = ctx.saved_tensors
        plan = ctx.plan
        grads = _grads_like(ctx.needs_input_grad[:3], (x, w_all, b_all), plan.dtype)
        if any(g is not None for g in grads):
            def prep(g, like):
                return torch.zeros_like(like) if g is None else g.to(plan.dtype)
            g_y, g_nt, g_tail = prep(g_y, b_nt), prep(g_nt, b_nt), prep(g_tail, b_nt)
            g_ids = torch.zeros(ids.shape, dtype=plan.dtype, device=x.device) \
                if g_ids is None else g_ids.to(plan.dtype)
            l_safe = torch.where(torch.isfinite(l_tail), l_tail, torch.zeros_like(l_tail))
            with torch.autocast(x.device.type, enabled=False):
                for i0, i1 in _spans(x.shape[0], plan.row_block):
                    r = slice(i0, i1)
                    _bucket_backward_rows(x[r].to(plan.dtype), y[r], ids[r], w_all, b_all,
                                          b_nt[r], l_safe[r], g_y[r], g_nt[r], g_ids[r],
                                          g_tail[r], plan, grads, i0)
        return (*(_cast(g, t) for g, t in zip(grads, (x, w_all, b_all))), None, None, None)


def _bucket_backward_rows(x, y, ids, w_all, b_all, b_nt, l_tail, g_y, g_nt, g_ids, g_tail,
                          plan: _Plan, grads, i0: int) -> None:
    """d/d sigma_v = g_y [v = y] + g_nt softmax_{v != y}(sigma)_v + sum_j g_ids_j [v = id_j]
    + g_tail softmax_{tail}(sigma)_v; then / T, chained through the transform and the matmul."""
    for c0, c1 in _spans(plan.vocab, plan.chunk_size):
        w, b = _head_chunk(w_all, b_all, c0, c1, plan.dtype)
        s, slope = _logits_and_slope(x, w, b, plan.student_transform)
        sig = s / plan.temperature
        is_y = _is_col(y, c0, c1 - c0)
        covered = is_y | _member(ids, c0, c1 - c0, sig)
        g = g_nt.unsqueeze(1) * torch.exp(sig - b_nt.unsqueeze(1)).masked_fill(is_y, 0.0)
        g = g + g_tail.unsqueeze(1) * torch.exp(sig - l_tail.unsqueeze(1)).masked_fill(covered,
                                                                                        0.0)
        g = g + is_y.to(g.dtype) * g_y.unsqueeze(1)
        local, inside = _local_ids(ids, c0, c1 - c0)
        g = g.scatter_add(1, local, torch.where(inside, g_ids, torch.zeros_like(g_ids)))
        _accumulate(grads, g / plan.temperature * slope, x, w, i0, c0)


def _teacher_buckets(stats: LogitStats, y: torch.Tensor, ids: torch.Tensor, vocab: int,
                     temperature: float, dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher side of the stats route (docs/method.md §2.4), all at temperature T.

    Returns (log bT [N], log(1 - bT) [N], log pT^ on the support [N, k] (-inf at an id equal
    to y), log pT^ of the tail bucket [N] (-inf when empty)), pT^ normalised over the
    non-target buckets:
      log pT_y = target_logit/T - lse_t (exact);  log pT_v = (topk_logprob_v + lse)/T - lse_t;
      support S = top-k ids != y, m_S = sum_S pT_v;
      tail = min((1 - bT) - m_S, n_tail * min_topk pT_v),  n_tail = V - 1 - |S|,
             set to 0 when (1 - bT) - m_S <= delta;
      1 - bT := m_S + tail (the non-target mass the buckets are normalised by).
    delta = 2 eps (|target_logit|/T + |lse|/T + |lse_t|) bounds the rounding of that
    difference (eps of the stats' dtype; measured errors of float32 ``logit_statistics``
    stay below eps * (...)). For very peaked teachers 1 - bT falls below the float32
    resolution of lse_t and the difference is rounding noise: such an unresolvable tail is
    treated as empty (the top-k renormalised) instead. The cap is exact (every tail id's
    logit is at most the smallest top-k logit) and makes the tail 0 when S covers every
    non-target id. A difference <= 0 (rounded log-probs whose mass exceeds 1 - bT) also
    gives an empty tail, S renormalised by m_S (as ``topk_kd_loss``).
    """
    temp = temperature
    lse, lse_t = stats.lse.to(dtype), stats.lse_t.to(dtype)
    log_bt = (stats.target_logit.to(dtype) / temp - lse_t).clamp_max(0.0)
    log_p_all = (stats.topk_logprobs.to(dtype) + lse.unsqueeze(1)) / temp - lse_t.unsqueeze(1)
    support = ids != y.unsqueeze(1)
    log_p = log_p_all.masked_fill(~support, _NEG_INF)
    log_ms = torch.logsumexp(log_p, dim=1)
    n_tail = (vocab - 1 - support.sum(dim=1)).to(dtype)
    log_cap = torch.log(n_tail) + log_p_all.amin(dim=1)           # -inf when n_tail = 0
    log_nt = _log1mexp(log_bt)                                     # -inf when bT rounds to 1
    # absolute rounding bound of (1 - bT) - m_S: both come from differences of stored values
    # of magnitude ~ |target_logit|/T + |lse|/T + |lse_t|, each rounded to the stats' dtype
    eps = torch.finfo(stats.lse_t.dtype).eps if stats.lse_t.is_floating_point() else 0.0
    scale = (stats.target_logit.to(dtype).abs() + lse.abs()) / temp + lse_t.abs()
    log_delta = torch.log(2 * eps * scale)
    gap = (log_ms - log_nt).clamp_max(0.0)
    log_rest = log_nt + _log1mexp(gap)                             # log((1 - bT) - m_S)
    resolved = (log_ms < log_nt) & (log_rest > log_delta)
    log_rest = torch.where(resolved, log_rest, torch.full_like(log_nt, _NEG_INF))
    log_tail = torch.minimum(log_rest, log_cap)
    log_d = torch.logaddexp(log_ms, log_tail)
    finite = torch.isfinite(log_d)
    log_d_safe = torch.where(finite, log_d, torch.zeros_like(log_d))
    top = log_p - log_d_safe.unsqueeze(1)
    # no non-target mass resolved at all (S empty, bT rounds to 1): the tail is the only bucket
    tail = torch.where(finite, log_tail - log_d_safe, torch.zeros_like(log_d))
    return log_bt, log_d, top, tail


def gdkd_from_stats(stats: LogitStats, z_student: torch.Tensor, student_head: Head,
                    targets: torch.Tensor, *, temperature: float = DEFAULT_TEMPERATURE,
                    alpha: float = DEFAULT_ALPHA, beta_dkd: float = DEFAULT_BETA_DKD,
                    stats_temperature: float | None = None,
                    chunk_size: int = DEFAULT_CHUNK_SIZE,
                    row_block: int = DEFAULT_ROW_BLOCK) -> GdkdOut:
    """Gated decoupled KD from cached teacher logit statistics (docs/method.md §2.4, (2.2)-(2.6)).

    stats: :class:`LogitStats` of N rows: topk_ids [N, k] int (distinct per row, in [0, V_s)),
        topk_logprobs [N, k] float (T = 1), target_logit / lse / lse_t / entropy [N] float;
        ``lse_t`` must be at ``temperature`` (pass ``stats_temperature`` to have it checked).
    z_student: [N, d_s] float, student post-norm states; student_head: weight [V_s, d_s],
        bias or None, transform. targets: [N] int labels in [0, V_s), the ids the stats' target
        logits belong to. temperature, alpha, beta_dkd, chunk_size, row_block: as
        :func:`gdkd_exact`.

    TCKD (2.2): exact (bT = exp(target_logit/T - lse_t); student from its full logits).
    Gate (2.5): exact, exp(-entropy / log V_s).
    NCKD (2.3): KL over the buckets {top-k ids != y} + {one tail bucket of every other
    non-target id}, teacher AND student each normalised over exactly these buckets (their
    non-target mass): pS^_v = pS_v / (1 - pS_y), pS^_tail = (1 - pS_y - sum_S pS_v) / (1 - pS_y),
    the student's tail taken as a masked log-sum-exp (no cancellation). By the log-sum
    inequality it is <= the exact NCKD, with equality when the tail is empty (k = V_s - 1 ids
    other than y) or holds one id.
    The teacher's tail mass is a difference, (1 - bT) - m_S, capped by n_tail times the
    smallest top-k probability and set to 0 when below its rounding bound (see
    :func:`_teacher_buckets`): for very peaked teachers, whose 1 - bT is below the float32
    resolution of lse_t, an unresolvable tail becomes empty instead of rounding noise.
    Student logits are streamed (row blocks x vocabulary chunks) in an autograd function
    with an exact chunked backward; only [N] and [N, k] statistics are kept.
    """
    fn = "gdkd_from_stats"
    _check_scalars(fn, temperature, alpha, beta_dkd, chunk_size, row_block)
    if stats_temperature is not None and not math.isclose(stats_temperature, temperature,
                                                           rel_tol=1e-9):
        raise LossInputError(fn, "stats_temperature", f"the statistics' lse_t is at T = "
                             f"{stats_temperature}, the loss runs at T = {temperature}",
                             "extract logit_stats at gdkd.temperature or use source: exact")
    vocab = _check_student(fn, z_student, student_head)
    n = z_student.shape[0]
    ids = _check_stats(fn, stats, n, vocab)
    y = _check_labels(fn, targets, n, vocab)
    _check_same_device(fn, z_student, student_head, stats.topk_logprobs, None, y)
    _require_finite(fn, {"z_student": z_student,
                         **{f"stats.{f}": getattr(stats, f) for f in
                            ("topk_logprobs", *STAT_FIELDS)}})
    plan = _make_plan([z_student, student_head.weight, student_head.bias],
                      student_head.transform, None, temperature, vocab, chunk_size, row_block)
    s_y, b_nt, s_ids, l_tail = _StudentBuckets.apply(z_student, student_head.weight,
                                                      student_head.bias, y, ids, plan)
    log_bt, log_nbt, t_top, t_tail = _teacher_buckets(stats, y, ids, vocab, temperature,
                                                      plan.dtype)
    log_bs, log_nbs = _binary_split(b_nt, s_y)
    tckd = _kl_terms(log_bt, log_bs) + _kl_terms(log_nbt, log_nbs)
    s_top = s_ids - b_nt.unsqueeze(1)
    s_tail = l_tail - b_nt
    nckd = _kl_terms(t_top, s_top).sum(dim=1) + _kl_terms(t_tail, s_tail)
    return _finish_gdkd(fn, tckd, nckd, stats.entropy.to(plan.dtype), vocab, temperature,
                        alpha, beta_dkd)


# ==============================================================================================
# 3. RCKA
# ==============================================================================================

def _centre(k: torch.Tensor) -> torch.Tensor:
    """K~ = H K H with H = I - 11^T/n (2.7), as K - row means - column means + grand mean."""
    return k - k.mean(dim=0, keepdim=True) - k.mean(dim=1, keepdim=True) + k.mean()


def rcka_loss(teacher_grams: Sequence[torch.Tensor], student_states: Sequence[torch.Tensor],
              min_tokens: int = DEFAULT_MIN_TOKENS, *,
              degenerate_tol: float = DEFAULT_DEGENERATE_TOL) -> RckaOut:
    """Relational CKA on visual tokens (docs/method.md §2.1, (2.7)-(2.9)).

    teacher_grams: per image, [n_i, n_i] float, the cached UNCENTRED K_T = V V^T of the
        row-normalised teacher block L-2 states (``visual_gram`` + ``gram_from_upper`` /
        ``decode_feature``); a constant (detached).
    student_states: per image, [n_i, d_s] float, the student's own block L-2 states at that
        image's visual tokens, raw (row-normalised here; an all-zero row stays zero).
    min_tokens: images with n_i < min_tokens are skipped (config ``rcka.min_tokens``).
    degenerate_tol: an image is skipped when either centred Gram has
        ||K~||_F <= degenerate_tol * ||K||_F (zero up to rounding; an all-zero K counts).

    Per kept image: K_S = V_S V_S^T, K~ = H K H for both (centred once, here), CKA (2.8) =
    <K~_T, K~_S>_F / (||K~_T||_F ||K~_S||_F); L_RCKA (2.9) = mean of (1 - CKA). Computed in
    promote(dtypes, float32); the gradient flows to ``student_states`` through K_S.
    No kept image: loss is 0 (times the student states, so it still has a grad_fn when they
    require grad) and n_images_used = 0.
    """
    fn = "rcka_loss"
    grams, states = list(teacher_grams), list(student_states)
    _check_rcka(fn, grams, states, min_tokens, degenerate_tol)
    dtype = torch.float32
    for x in (*grams, *states):
        dtype = torch.promote_types(dtype, x.dtype)
    candidates, centred = [], []
    for i, (k_t, x) in enumerate(zip(grams, states)):
        if k_t.shape[0] < min_tokens:
            continue
        k_t = k_t.detach().to(dtype)
        v = F.normalize(x.to(dtype), p=2.0, dim=1, eps=1e-12)
        k_s = v @ v.T
        candidates.append(i)
        centred.append((k_t, _centre(k_t), k_s, _centre(k_s)))
    kept, cka = [], []
    if centred:
        norms = torch.stack([torch.stack([torch.linalg.norm(kt), torch.linalg.norm(ct),
                                          torch.linalg.norm(ks.detach()),
                                          torch.linalg.norm(cs.detach())])
                             for kt, ct, ks, cs in centred]).tolist()
        for i, (_, c_t, _, c_s), (n_kt, n_ct, n_ks, n_cs) in zip(candidates, centred, norms):
            if n_ct <= degenerate_tol * n_kt or n_cs <= degenerate_tol * n_ks:
                continue
            kept.append(i)
            cka.append((c_t * c_s).sum() / (torch.linalg.norm(c_t) * torch.linalg.norm(c_s)))
    if cka:
        values = torch.stack(cka)
        loss = (1.0 - values).mean()
    else:
        device = states[0].device if states else torch.device("cpu")
        values = torch.zeros(0, dtype=dtype, device=device)
        loss = torch.zeros((), dtype=dtype, device=device)
        for x in states:
            if x.requires_grad:
                loss = loss + 0.0 * x.to(dtype).sum()
    return RckaOut(loss=loss, n_images_used=len(kept), cka=values, kept=tuple(kept))


# ==============================================================================================
# 4. Statistics of the sliced teacher head, and the top-k NCKD error for benchmarks
# ==============================================================================================

def teacher_logit_stats(z_teacher: torch.Tensor, teacher_head: Head, targets: torch.Tensor, *,
                        top_k: int, temperature: float = DEFAULT_TEMPERATURE,
                        vocab_size: int | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                        row_block: int = DEFAULT_ROW_BLOCK,
                        accum_dtype: torch.dtype = torch.float32) -> LogitStats:
    """:func:`genrecal.store.logit_stats.logit_statistics` of the teacher head restricted to its
    first ``vocab_size`` rows (the student's V_s; default: all rows), so that
    :func:`gdkd_from_stats` and :func:`gdkd_exact` see the same vocabulary.

    z_teacher: [N, d_l] float; targets: [N] int in [0, vocab_size). Returns float32 stats.
    """
    vocab = teacher_head.weight.shape[0] if vocab_size is None else int(vocab_size)
    if not 2 <= vocab <= teacher_head.weight.shape[0]:
        raise LossInputError("teacher_logit_stats", "vocab_size", f"{vocab} is not in [2, "
                             f"{teacher_head.weight.shape[0]}]", "pass the student's V_s")
    bias = None if teacher_head.bias is None else teacher_head.bias[:vocab]
    return logit_statistics(z_teacher, teacher_head.weight[:vocab], bias,
                            teacher_head.transform, targets, top_k=top_k,
                            temperature=temperature, chunk_size=chunk_size,
                            row_block=row_block, accum_dtype=accum_dtype)


def nckd_topk_error(z_teacher: torch.Tensor, teacher_head: Head, z_student: torch.Tensor,
                    student_head: Head, targets: torch.Tensor, *,
                    ks: Sequence[int] = (16, 64, 256),
                    temperature: float = DEFAULT_TEMPERATURE,
                    chunk_size: int = DEFAULT_CHUNK_SIZE,
                    row_block: int = DEFAULT_ROW_BLOCK) -> dict[int, NckdError]:
    """|NCKD_topk - NCKD_exact| per row, summarised for each k in ``ks`` (benchmark helper).

    Inputs as :func:`gdkd_exact`. The statistics are built once at max(ks) with
    :func:`teacher_logit_stats` (teacher head sliced to V_s); smaller k take the prefix of the
    top-k (ids sorted by decreasing logit). Runs without gradient. Every k must be <= V_s.
    """
    vocab = int(student_head.weight.shape[0])
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or ks[-1] > vocab:
        raise LossInputError("nckd_topk_error", "ks", f"{ks} must be non-empty, each in "
                             f"[1, V_s={vocab}]", "pass e.g. ks=(16, 64, 256)")
    common = dict(temperature=temperature, chunk_size=chunk_size, row_block=row_block)
    with torch.no_grad():
        exact = gdkd_exact(z_teacher, teacher_head, z_student, student_head, targets,
                           **common).nckd
        full = teacher_logit_stats(z_teacher, teacher_head, targets, top_k=ks[-1],
                                   vocab_size=vocab, temperature=temperature,
                                   chunk_size=chunk_size, row_block=row_block)
        out = {}
        for k in ks:
            stats = LogitStats(topk_ids=full.topk_ids[:, :k],
                               topk_logprobs=full.topk_logprobs[:, :k],
                               **{f: getattr(full, f) for f in STAT_FIELDS})
            approx = gdkd_from_stats(stats, z_student, student_head, targets, **common).nckd
            err = (approx - exact).abs()
            out[k] = NckdError(k=k, mean_abs=_mean(err), max_abs=_max(err),
                               mean_exact=_mean(exact), mean_topk=_mean(approx))
    return out


def _mean(x: torch.Tensor) -> float:
    return float(x.mean()) if x.numel() else 0.0


def _max(x: torch.Tensor) -> float:
    return float(x.max()) if x.numel() else 0.0


# ==============================================================================================
# Validation
# ==============================================================================================

def _check_scalars(fn: str, temperature, alpha, beta_dkd, chunk_size, row_block) -> None:
    for name, value, default in (("chunk_size", chunk_size, DEFAULT_CHUNK_SIZE),
                                 ("row_block", row_block, DEFAULT_ROW_BLOCK)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LossInputError(fn, name, f"must be a positive int, got {value!r}",
                                 f"pass e.g. {name}={default}")
    if not _is_number(temperature) or not temperature > 0:
        raise LossInputError(fn, "temperature", f"must be a finite number > 0, got "
                             f"{temperature!r}", "use gdkd.temperature (default 2.0)")
    for name, value in (("alpha", alpha), ("beta_dkd", beta_dkd)):
        if not _is_number(value) or value < 0:
            raise LossInputError(fn, name, f"must be a finite number >= 0, got {value!r}",
                                 "use the gdkd config values (alpha 1, beta_dkd 4)")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_features(fn: str, name: str, x, width: int, rows: int | None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point() \
            or x.shape[1] != width:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise LossInputError(fn, name, f"expected a float [N, {width}] tensor (width of its "
                             f"head), got {got}", "pass post-norm states flattened to [N, d] "
                             "at the supervised positions")
    if rows is not None and x.shape[0] != rows:
        raise LossInputError(fn, name, f"has {x.shape[0]} rows, z_student has {rows}",
                             "teacher and student rows must be the same positions, in order")


def _check_student(fn: str, z_student, head: Head) -> int:
    _check_head(fn, head.weight, head.bias, head.transform)
    vocab = int(head.weight.shape[0])
    if vocab < 2:
        raise LossInputError(fn, "student_head", f"vocabulary of {vocab} < 2 rows",
                             "pass the student's lm_head")
    _check_features(fn, "z_student", z_student, head.weight.shape[1], None)
    return vocab


def _check_labels(fn: str, targets, rows: int, vocab: int) -> torch.Tensor:
    if not isinstance(targets, torch.Tensor) or targets.dim() != 1 or targets.shape[0] != rows \
            or targets.is_floating_point() or targets.dtype == torch.bool:
        got = f"{targets.dtype} {tuple(targets.shape)}" if isinstance(targets, torch.Tensor) \
            else type(targets).__name__
        raise LossInputError(fn, "targets", f"expected integer labels of shape [{rows}], got "
                             f"{got}", "pass one label y per row")
    y = targets.long()
    bad = (y < 0) | (y >= vocab)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise LossInputError(fn, "targets", f"row {row} holds {int(y[row])}, outside "
                             f"[0, {vocab})", "drop ignored (-100) positions before the loss; "
                             "labels must be student-vocabulary ids")
    return y


def _check_stats(fn: str, stats, rows: int, vocab: int) -> torch.Tensor:
    if not isinstance(stats, LogitStats):
        raise LossInputError(fn, "stats", f"expected LogitStats, got {type(stats).__name__}",
                             "decode the logit_stats feature with store.codecs.decode_feature")
    k = stats.topk_ids.shape[1] if stats.topk_ids.dim() == 2 else -1
    problems = stats.problems(k) if k >= 1 else [f"topk_ids has shape "
                                                 f"{tuple(stats.topk_ids.shape)}, expected [N, k]"]
    if stats.n != rows:
        problems.append(f"{stats.n} rows, z_student has {rows}")
    if stats.topk_ids.is_floating_point() or stats.topk_ids.dtype == torch.bool:
        problems.append(f"topk_ids dtype {stats.topk_ids.dtype} is not an integer type")
    if not all(getattr(stats, f).is_floating_point() for f in ("topk_logprobs", *STAT_FIELDS)):
        problems.append("log-probs and scalars must be float tensors")
    if problems:
        raise LossInputError(fn, "stats", "; ".join(problems),
                             "pass the LogitStats of exactly the N supervised rows")
    if k > vocab:
        raise LossInputError(fn, "stats.topk_ids", f"k = {k} > V_s = {vocab}",
                             "extract at most V_s top-k ids")
    ids = stats.topk_ids.long()
    if bool(((ids < 0) | (ids >= vocab)).any()):
        raise LossInputError(fn, "stats.topk_ids", f"ids outside [0, {vocab})",
                             "teacher and student must share the tokenizer; extract the stats "
                             "from the teacher head sliced to V_s (teacher_logit_stats)")
    ordered = ids.sort(dim=1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise LossInputError(fn, "stats.topk_ids", "a row repeats an id, which would count its "
                             "mass twice", "cache distinct top-k ids per position")
    return ids


def _check_same_device(fn: str, z_student, student_head: Head, other, teacher_head,
                       y: torch.Tensor) -> None:
    tensors = {"z_student": z_student, "student_head.weight": student_head.weight,
               "student_head.bias": student_head.bias, "teacher": other, "targets": y}
    if teacher_head is not None:
        tensors["teacher_head.weight"] = teacher_head.weight
        tensors["teacher_head.bias"] = teacher_head.bias
    devices = {name: str(x.device) for name, x in tensors.items() if x is not None}
    if len(set(devices.values())) > 1:
        raise LossInputError(fn, "/".join(devices), f"tensors are on different devices "
                             f"{devices}", "move features, heads, statistics and targets to "
                             "one device")


def _require_finite(fn: str, tensors: dict[str, torch.Tensor]) -> None:
    """One device sync for all of ``tensors``."""
    names = [k for k, v in tensors.items() if v.numel()]
    if not names:
        return
    ok = torch.stack([tensors[k].isfinite().all() for k in names]).tolist()
    bad = [k for k, good in zip(names, ok) if not good]
    if bad:
        raise LossInputError(fn, "/".join(bad), "contains inf/NaN",
                             "check the cache record and the student forward (float16 "
                             "overflow? run in bfloat16/float32)")


def _check_rcka(fn: str, grams: list, states: list, min_tokens, degenerate_tol) -> None:
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
        raise LossInputError(fn, "min_tokens", f"must be a positive int, got {min_tokens!r}",
                             "use rcka.min_tokens (default 4)")
    if not _is_number(degenerate_tol) or degenerate_tol < 0:
        raise LossInputError(fn, "degenerate_tol", f"must be a finite number >= 0, got "
                             f"{degenerate_tol!r}", f"use {DEFAULT_DEGENERATE_TOL}")
    if len(grams) != len(states):
        raise LossInputError(fn, "teacher_grams/student_states", f"{len(grams)} teacher Grams "
                             f"for {len(states)} student images", "pass one Gram per image, "
                             "in the same order as the student's images")
    for i, (k, x) in enumerate(zip(grams, states)):
        if not isinstance(k, torch.Tensor) or k.dim() != 2 or k.shape[0] != k.shape[1] \
                or not k.is_floating_point():
            got = f"{k.dtype} {tuple(k.shape)}" if isinstance(k, torch.Tensor) else \
                type(k).__name__
            raise LossInputError(fn, f"teacher_grams[{i}]", f"expected a float [n, n] Gram, "
                                 f"got {got}", "rebuild it with gram_from_upper(flat, n)")
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point() \
                or x.shape[0] != k.shape[0]:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else \
                type(x).__name__
            raise LossInputError(fn, f"student_states[{i}]", f"expected a float [{k.shape[0]}, "
                                 f"d_s] tensor (n of the teacher Gram), got {got}",
                                 "teacher and student must see the same visual tokens (same "
                                 "input ids)")
        if k.device != x.device:
            raise LossInputError(fn, f"teacher_grams[{i}]", f"on {k.device}, the student "
                                 f"states on {x.device}", "move both to one device")
    tensors = {f"teacher_grams[{i}]": k for i, k in enumerate(grams)}
    tensors.update({f"student_states[{i}]": x for i, x in enumerate(states)})
    if tensors:
        _require_finite(fn, {name: t.detach() for name, t in tensors.items()})


def _make_plan(tensors: list[torch.Tensor | None], student_transform: LogitTransform,
               teacher_transform: LogitTransform | None, temperature: float, vocab: int,
               chunk_size: int, row_block: int) -> _Plan:
    dtype = torch.float32
    for x in tensors:
        if x is not None:
            dtype = torch.promote_types(dtype, x.dtype)
    return _Plan(student_transform, teacher_transform, float(temperature), vocab, chunk_size,
                 row_block, dtype)
