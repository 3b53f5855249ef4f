"""Tests of genrecal.train.grace_losses against independent float64 references.

The references follow docs/method.md §2.1 / §2.4 literally: full-vocabulary softmaxes in
float64 with explicit per-row loops, (2.2)-(2.6) written term by term, the top-k + tail
buckets built explicitly, and (2.7)-(2.8) with an explicit centring matrix H.

Tolerances. float64 runs of the losses are compared at rtol 1e-9 (only summation order
differs). float32 runs: a per-row term is a difference of log-sum-exps of magnitude
S = max|logit|/T + log V, each carrying a relative rounding error of a few float32 epsilons
(pairwise sums over chunks of V ~ 1000 add ~log2(V) eps), so the absolute error is bounded
by ~ 64 * eps32 * S; the test derives its atol from that.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from genrecal.store import schema
from genrecal.store.artifacts import TeacherHead
from genrecal.store.codecs import decode_feature, encode_feature
from genrecal.store.gram import gram_from_upper, visual_gram
from genrecal.store.logit_stats import LogitStats, logit_statistics
from genrecal.store.logit_transform import LogitTransform
from genrecal.train.errors import LossInputError
from genrecal.train.grace_losses import (GdkdOut, RckaOut, gdkd_exact, gdkd_from_stats,
                                         nckd_topk_error, rcka_loss, teacher_logit_stats)
from genrecal.train.losses import LmHead

F64 = torch.float64
EPS32 = torch.finfo(torch.float32).eps
T = 2.0


# ----------------------------------------------------------------------------------------------
# fixtures and float64 references
# ----------------------------------------------------------------------------------------------

def make_head(vocab: int, width: int, transform: LogitTransform, seed: int, scale: float = 4.0,
              dtype=F64, grad: bool = False, cls=LmHead):
    """Logits of std ~scale for unit-variance features."""
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(vocab, width, generator=gen, dtype=F64) * (scale / math.sqrt(width)))
    bias = torch.randn(vocab, generator=gen, dtype=F64) if transform.has_bias else None
    weight = weight.to(dtype).requires_grad_(grad)
    if bias is not None:
        bias = bias.to(dtype).requires_grad_(grad)
    return cls(weight, bias, transform)


def feats(n: int, d: int, seed: int, dtype=F64, grad: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=F64).to(dtype).requires_grad_(grad)


def labels(n: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def ref_logits(x: torch.Tensor, head, vocab: int | None = None) -> torch.Tensor:
    """float64 [N, V] logits of the first ``vocab`` head rows (graph kept for autograd)."""
    w, b = head.weight, head.bias
    if vocab is not None:
        w, b = w[:vocab], None if b is None else b[:vocab]
    raw = x.to(F64) @ w.to(F64).T + (0 if b is None else b.to(F64))
    return head.transform.apply(raw)


def ref_row(t: torch.Tensor, s: torch.Tensor, y: int, temp: float) -> dict[str, torch.Tensor]:
    """(2.2)-(2.5) for one row, written from the method text, float64."""
    vocab = t.shape[0]
    p_t, p_s = torch.softmax(t / temp, 0), torch.softmax(s / temp, 0)
    b_t, b_s = p_t[y], p_s[y]
    tckd = b_t * torch.log(b_t / b_s) + (1 - b_t) * torch.log((1 - b_t) / (1 - b_s))
    keep = torch.arange(vocab) != y
    ph_t, ph_s = p_t[keep] / (1 - b_t), p_s[keep] / (1 - b_s)
    nckd = (ph_t * torch.log(ph_t / ph_s)).sum()
    p1 = torch.softmax(t, 0)
    entropy = -(p1 * torch.log(p1)).sum()
    gate = torch.exp(-entropy / math.log(vocab))
    return {"tckd": tckd, "nckd": nckd, "gate": gate.detach()}


def ref_gdkd(t: torch.Tensor, s: torch.Tensor, y: torch.Tensor, temp: float = T,
             alpha: float = 1.0, beta: float = 4.0) -> dict[str, torch.Tensor]:
    rows = [ref_row(t[i], s[i], int(y[i]), temp) for i in range(t.shape[0])]
    out = {k: torch.stack([r[k] for r in rows]) for k in ("tckd", "nckd", "gate")}
    out["dkd"] = (alpha * out["tckd"] + beta * out["nckd"]) * temp ** 2
    out["loss"] = (out["gate"] * out["dkd"]).sum() / out["gate"].sum()
    return out


def ref_topk_nckd_row(t: torch.Tensor, s: torch.Tensor, y: int, ids: list[int],
                      temp: float) -> torch.Tensor:
    """NCKD over {top-k ids != y} + one tail bucket, both sides over the SAME buckets (§2.4)."""
    vocab = t.shape[0]
    p_t, p_s = torch.softmax(t / temp, 0), torch.softmax(s / temp, 0)
    support = [v for v in ids if v != y]
    rest = [v for v in range(vocab) if v != y and v not in support]
    teacher = [p_t[v] for v in support]
    student = [p_s[v] for v in support]
    if rest:
        teacher.append(1 - p_t[y] - sum(p_t[v] for v in support))
        student.append(1 - p_s[y] - sum(p_s[v] for v in support))
    teacher = torch.stack(teacher) / (1 - p_t[y])
    student = torch.stack(student) / (1 - p_s[y])
    return (teacher * torch.log(teacher / student)).sum()


def buggy_topk_nckd_row(t, s, y, ids, temp) -> torch.Tensor:
    """The classic bug: teacher renormalised over its top-k, student over its full
    non-target distribution (different supports)."""
    p_t, p_s = torch.softmax(t / temp, 0), torch.softmax(s / temp, 0)
    support = [v for v in ids if v != y]
    teacher = torch.stack([p_t[v] for v in support])
    teacher = teacher / teacher.sum()
    student = torch.stack([p_s[v] for v in support]) / (1 - p_s[y])
    return (teacher * torch.log(teacher / student)).sum()


def topk_ids(t: torch.Tensor, k: int) -> list[list[int]]:
    return t.topk(k, dim=1).indices.tolist()


def f32_atol(t: torch.Tensor, s: torch.Tensor, vocab: int) -> float:
    """~64 eps32 * S, S = max|logit|/T + log V (see module doc)."""
    scale = max(float(t.detach().abs().max()), float(s.detach().abs().max())) / T \
        + math.log(vocab)
    return 64 * EPS32 * scale


TEACHER_TF = LogitTransform(scale=0.9, softcap=15.0, has_bias=True)
STUDENT_TFS = {"plain": LogitTransform(), "bias": LogitTransform(has_bias=True),
               "softcap_bias": LogitTransform(scale=1.1, softcap=20.0, has_bias=True)}


def setup(n=9, vocab=37, extra=5, d_l=12, d_s=8, student_tf=LogitTransform(has_bias=True),
          dtype=F64, grad=True, teacher_scale=4.0, seed=0, teacher_tf=TEACHER_TF):
    """Teacher head with ``extra`` padded rows beyond the student's vocabulary."""
    th = make_head(vocab + extra, d_l, teacher_tf, seed, scale=teacher_scale, dtype=dtype,
                   cls=TeacherHead)
    sh = make_head(vocab, d_s, student_tf, seed + 1, dtype=dtype, grad=grad)
    zt = feats(n, d_l, seed + 2, dtype)
    zs = feats(n, d_s, seed + 3, dtype, grad=grad)
    return zt, th, zs, sh, labels(n, vocab, seed + 4)


# ----------------------------------------------------------------------------------------------
# GDKD, exact path
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("student_tf", STUDENT_TFS.values(), ids=STUDENT_TFS.keys())
def test_exact_path_matches_reference_in_float64(student_tf):
    zt, th, zs, sh, y = setup(student_tf=student_tf)
    out = gdkd_exact(zt, th, zs, sh, y, temperature=T, chunk_size=8, row_block=4)
    ref = ref_gdkd(ref_logits(zt, th, 37), ref_logits(zs, sh), y)
    assert isinstance(out, GdkdOut)
    for name in ("tckd", "nckd", "gate", "dkd", "loss"):
        torch.testing.assert_close(getattr(out, name), ref[name].detach(), rtol=1e-9,
                                   atol=1e-12, msg=name)
    assert not out.gate.requires_grad


def test_exact_path_slices_the_padded_teacher_rows():
    """Padded teacher rows beyond V_s with huge logits must not count (nor in log V)."""
    zt, th, zs, sh, y = setup(extra=6)
    w = th.weight.clone()
    w[37:] = 50.0 * zt[0] / zt[0].norm()
    bias = th.bias.clone()
    bias[37:] = 30.0
    th = TeacherHead(w, bias, th.transform)
    out = gdkd_exact(zt, th, zs, sh, y)
    ref = ref_gdkd(ref_logits(zt, th, 37), ref_logits(zs, sh), y)
    torch.testing.assert_close(out.loss, ref["loss"].detach(), rtol=1e-9, atol=0)
    unsliced = ref_logits(zt, th)
    assert not torch.allclose(torch.softmax(unsliced[:, :37], 1),
                              torch.softmax(unsliced, 1)[:, :37], atol=1e-3)


@pytest.mark.parametrize("temp,alpha,beta", [(1.0, 1.0, 4.0), (2.0, 1.0, 4.0), (3.5, 0.3, 2.0)])
def test_dkd_weights_and_t_squared(temp, alpha, beta):
    zt, th, zs, sh, y = setup()
    out = gdkd_exact(zt, th, zs, sh, y, temperature=temp, alpha=alpha, beta_dkd=beta)
    ref = ref_gdkd(ref_logits(zt, th, 37), ref_logits(zs, sh), y, temp, alpha, beta)
    torch.testing.assert_close(out.dkd, ref["dkd"].detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.dkd, (alpha * out.tckd + beta * out.nckd) * temp ** 2)


def test_gate_limits_and_gated_normalisation():
    vocab, n = 23, 4
    zs_head = make_head(vocab, 5, LogitTransform(), 1)
    zs = feats(n, 5, 2)
    y = labels(n, vocab, 3)
    uniform = LmHead(torch.zeros(vocab, 3, dtype=F64))
    out = gdkd_exact(feats(n, 3, 4), uniform, zs, zs_head, y)
    torch.testing.assert_close(out.gate, torch.full((n,), math.exp(-1.0), dtype=F64))
    # one-hot teacher (logit gap 400 at T=1): H ~ 0 so g ~ 1
    w = torch.zeros(vocab, 3, dtype=F64)
    w[0, 0] = 400.0
    onehot = gdkd_exact(torch.ones(n, 3, dtype=F64), LmHead(w), zs, zs_head, y)
    torch.testing.assert_close(onehot.gate, torch.ones(n, dtype=F64))
    # (2.6): the loss is the gate-weighted mean of DKD, not the plain mean
    zt, th, zs2, sh, y2 = setup()
    mixed = gdkd_exact(zt, th, zs2, sh, y2)
    weighted = (mixed.gate * mixed.dkd).sum() / mixed.gate.sum()
    torch.testing.assert_close(mixed.loss, weighted)
    assert not torch.isclose(mixed.loss, mixed.dkd.mean())
    assert bool(((mixed.gate >= math.exp(-1) - 1e-12) & (mixed.gate <= 1)).all())


def test_exact_path_float32_within_rounding_bound():
    zt, th, zs, sh, y = setup(dtype=torch.float32, grad=False, n=16, vocab=997, extra=3)
    t64, s64 = ref_logits(zt, th, 997), ref_logits(zs, sh)
    out = gdkd_exact(zt, th, zs, sh, y, chunk_size=128, row_block=5)
    ref = ref_gdkd(t64, s64, y)
    atol = f32_atol(t64, s64, 997)
    assert out.loss.dtype == torch.float32
    for name in ("tckd", "nckd"):
        torch.testing.assert_close(getattr(out, name).double(), ref[name], rtol=0, atol=atol)
    torch.testing.assert_close(out.gate.double(), ref["gate"], rtol=0, atol=atol)
    torch.testing.assert_close(out.loss.double(), ref["loss"], rtol=0,
                               atol=atol * (1 + 4) * T ** 2)


def _grads(out_loss, tensors):
    return torch.autograd.grad(out_loss, tensors)


def test_exact_path_gradients_match_reference_autograd():
    zt, th, zs, sh, y = setup(student_tf=STUDENT_TFS["softcap_bias"])
    zt.requires_grad_(True)
    leaves = [zs, sh.weight, sh.bias]
    out = gdkd_exact(zt, th, zs, sh, y, chunk_size=5, row_block=3)
    mixed = out.loss + 0.3 * out.tckd.sum() - 0.2 * out.nckd[2]   # arbitrary upstream grads
    got = _grads(mixed, leaves)
    ref = ref_gdkd(ref_logits(zt.detach(), th, 37), ref_logits(zs, sh), y)
    want = _grads(ref["loss"] + 0.3 * ref["tckd"].sum() - 0.2 * ref["nckd"][2], leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)
    gdkd_exact(zt, th, zs, sh, y).loss.backward()
    assert zt.grad is None and th.weight.grad is None and zs.grad is not None


def test_exact_path_gradcheck_tiny():
    zt, th, _, _, y = setup(n=3, vocab=7, extra=2, d_l=4, d_s=3)
    sh = make_head(7, 3, STUDENT_TFS["softcap_bias"], 9, grad=True)
    zs = feats(3, 3, 10, grad=True)

    def fn(x, w, b):
        out = gdkd_exact(zt, th, x, LmHead(w, b, sh.transform), y, chunk_size=3, row_block=2)
        return out.loss, out.dkd

    assert torch.autograd.gradcheck(fn, (zs, sh.weight, sh.bias))


@pytest.mark.parametrize("chunk_size,row_block", [(1, 1), (3, 2), (7, 9), (37, 4), (1000, 100)])
def test_exact_path_chunking_invariant(chunk_size, row_block):
    zt, th, zs, sh, y = setup()
    base = gdkd_exact(zt, th, zs, sh, y, chunk_size=37, row_block=9)
    base_g = _grads(base.loss, [zs, sh.weight, sh.bias])
    out = gdkd_exact(zt, th, zs, sh, y, chunk_size=chunk_size, row_block=row_block)
    for name in ("tckd", "nckd", "gate", "loss"):
        torch.testing.assert_close(getattr(out, name), getattr(base, name), rtol=1e-12,
                                   atol=1e-13)
    for g, b in zip(_grads(out.loss, [zs, sh.weight, sh.bias]), base_g):
        torch.testing.assert_close(g, b, rtol=1e-10, atol=1e-13)


def test_logits_are_only_ever_built_per_row_block_and_chunk(monkeypatch):
    """Memory bound: every logit tensor either path builds, forward and backward, is at most
    [row_block, chunk_size], never [N, V]."""
    from genrecal.train import grace_losses
    shapes = []
    original = grace_losses._logits_and_slope

    def spy(x, w, b, transform):
        shapes.append((x.shape[0], w.shape[0]))
        return original(x, w, b, transform)

    monkeypatch.setattr(grace_losses, "_logits_and_slope", spy)
    zt, th, zs, sh, y = setup(n=11)
    gdkd_exact(zt, th, zs, sh, y, chunk_size=8, row_block=4).loss.backward()
    gdkd_from_stats(stats_of(zt, th, y, 5, 37), zs, sh, y, chunk_size=8,
                    row_block=4).loss.backward()
    assert shapes and max(r for r, _ in shapes) <= 4 and max(c for _, c in shapes) <= 8


def test_exact_path_bf16_inputs_compute_in_float32():
    zt, th, zs, sh, y = setup(dtype=torch.bfloat16, grad=True)
    out = gdkd_exact(zt, th, zs, sh, y, chunk_size=8)
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert zs.grad.dtype == torch.bfloat16 and sh.weight.grad.dtype == torch.bfloat16


def test_empty_rows_give_zero_loss():
    zt, th, zs, sh, y = setup()
    out = gdkd_exact(zt[:0], th, zs[:0], sh, y[:0])
    assert out.loss.item() == 0.0 and out.dkd.shape == (0,)
    out.loss.backward()


# ----------------------------------------------------------------------------------------------
# GDKD from logit statistics
# ----------------------------------------------------------------------------------------------

def stats_of(zt, th, y, k, vocab, dtype=F64) -> LogitStats:
    return teacher_logit_stats(zt, th, y, top_k=k, vocab_size=vocab, temperature=T,
                               accum_dtype=dtype)


@pytest.mark.parametrize("k", [1, 4, 16])
def test_stats_path_matches_bucket_reference(k):
    zt, th, zs, sh, y = setup(n=12)
    t, s = ref_logits(zt, th, 37), ref_logits(zs, sh)
    y[:3] = t[:3].argmax(1)      # y inside the top-k for some rows
    stats = stats_of(zt, th, y, k, 37)
    out = gdkd_from_stats(stats, zs, sh, y, temperature=T, chunk_size=6, row_block=5)
    ids = stats.topk_ids.tolist()
    nckd = torch.stack([ref_topk_nckd_row(t[i], s[i], int(y[i]), ids[i], T) for i in range(12)])
    exact = ref_gdkd(t, s, y)
    # the stats are float32: relative errors ~ a few eps32 on the teacher probabilities
    torch.testing.assert_close(out.nckd, nckd.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.tckd, exact["tckd"].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.gate, exact["gate"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.dkd, (out.tckd + 4 * out.nckd) * T ** 2)
    # log-sum inequality: the bucketed NCKD never exceeds the exact one
    assert bool((out.nckd <= exact["nckd"] + 1e-6).all())


@pytest.mark.parametrize("k", [36, 37])
def test_stats_path_equals_exact_when_tail_is_exact(k):
    """k = V-1: the support is every non-target id (y outside the top-k) or all but one
    (y inside), so the bucketed NCKD is exact; k = V: no tail at all."""
    zt, th, zs, sh, y = setup(n=10)
    t = ref_logits(zt, th, 37)
    y[:4] = t[:4].argmax(1)            # y in the top-(V-1)
    y[4:7] = t[4:7].argmin(1)          # y is the one id outside the top-(V-1)
    stats = stats_of(zt, th, y, k, 37)
    out = gdkd_from_stats(stats, zs, sh, y)
    exact = gdkd_exact(zt, th, zs, sh, y)
    for name in ("tckd", "nckd", "gate", "dkd", "loss"):
        torch.testing.assert_close(getattr(out, name), getattr(exact, name).detach(),
                                   rtol=1e-5, atol=1e-6, msg=name)
    got = _grads(out.loss, [zs, sh.weight, sh.bias])
    want = _grads(exact.loss, [zs, sh.weight, sh.bias])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("accum", [torch.float32, F64])
def test_stats_path_close_to_exact_for_peaked_teachers(accum):
    """Top-16 of 300 holding > 99% of the non-target mass: NCKD within 1% of exact, also
    on rows whose 1 - bT (< 1e-5) is below the float32 resolution of lse_t, where the tail
    mass cannot be read from the stats (it must not turn into rounding noise; float64
    accumulation rounds target_logit and lse_t independently, exposing it)."""
    zt, th, zs, sh, y = setup(n=16, vocab=301, extra=0, teacher_scale=24.0,
                              teacher_tf=LogitTransform(has_bias=True))
    t = ref_logits(zt, th, 301)
    y[:] = t.argmax(1)
    stats = teacher_logit_stats(zt.to(accum), TeacherHead(th.weight.to(accum),
                                                          th.bias.to(accum), th.transform),
                                y, top_k=16, vocab_size=301, temperature=T, accum_dtype=accum)
    p = torch.softmax(t / T, 1)
    non_target = p.scatter(1, y[:, None], 0.0)
    top_share = non_target.gather(1, stats.topk_ids.long()).sum(1) / non_target.sum(1)
    assert float(top_share.min()) > 0.99
    assert float((1 - p.max(1).values).min()) < 1e-5
    out = gdkd_from_stats(stats, zs, sh, y)
    exact = gdkd_exact(zt, th, zs, sh, y)
    torch.testing.assert_close(out.nckd, exact.nckd.detach(), rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(out.tckd, exact.tckd.detach(), rtol=1e-4, atol=1e-5)


def test_stats_path_normalises_both_sides_over_the_same_buckets():
    """Identical teacher and student -> TCKD = NCKD = 0 for any k; the different-support
    normalisation (teacher over top-k, student over all) would not be 0."""
    zt, th, _, _, y = setup(n=8, extra=0)
    head = LmHead(th.weight.clone().requires_grad_(True), th.bias.clone(), th.transform)
    zs = zt.clone().requires_grad_(True)
    t = ref_logits(zt, th, 37)
    for k in (2, 5, 20):
        stats = stats_of(zt, th, y, k, 37)
        out = gdkd_from_stats(stats, zs, head, y)
        torch.testing.assert_close(out.nckd, torch.zeros(8, dtype=F64), rtol=0, atol=1e-6)
        torch.testing.assert_close(out.tckd, torch.zeros(8, dtype=F64), rtol=0, atol=1e-6)
        ids = stats.topk_ids.tolist()
        buggy = torch.stack([buggy_topk_nckd_row(t[i], t[i], int(y[i]), ids[i], T)
                             for i in range(8)])
        assert float(buggy.min()) > 1e-3


def test_stats_path_gradcheck_tiny():
    zt, th, _, _, y = setup(n=4, vocab=9, extra=0, d_l=4, d_s=3)
    stats = stats_of(zt, th, y, 3, 9)
    stats = LogitStats(**{k: (v.double() if v.is_floating_point() else v)
                          for k, v in stats.to_dict().items()})
    sh = make_head(9, 3, STUDENT_TFS["softcap_bias"], 9, grad=True)
    zs = feats(4, 3, 10, grad=True)

    def fn(x, w, b):
        out = gdkd_from_stats(stats, x, LmHead(w, b, sh.transform), y, chunk_size=2,
                              row_block=3)
        return out.loss, out.nckd

    assert torch.autograd.gradcheck(fn, (zs, sh.weight, sh.bias))


@pytest.mark.parametrize("chunk_size,row_block", [(1, 1), (4, 3), (37, 12)])
def test_stats_path_chunking_invariant(chunk_size, row_block):
    zt, th, zs, sh, y = setup(n=12)
    stats = stats_of(zt, th, y, 5, 37)
    base = gdkd_from_stats(stats, zs, sh, y, chunk_size=37, row_block=12)
    out = gdkd_from_stats(stats, zs, sh, y, chunk_size=chunk_size, row_block=row_block)
    torch.testing.assert_close(out.loss, base.loss, rtol=1e-12, atol=1e-13)
    for g, b in zip(_grads(out.loss, [zs, sh.weight, sh.bias]),
                    _grads(base.loss, [zs, sh.weight, sh.bias])):
        torch.testing.assert_close(g, b, rtol=1e-10, atol=1e-13)


def test_stats_with_rounded_mass_above_one_use_an_empty_tail():
    """bf16-rounded log-probs can sum above 1: tail empty, finite loss."""
    zt, th, zs, sh, y = setup(n=6)
    stats = stats_of(zt, th, y, 8, 37)
    bumped = LogitStats(**{**stats.to_dict(), "topk_logprobs": stats.topk_logprobs + 0.05})
    out = gdkd_from_stats(bumped, zs, sh, y)
    assert bool(torch.isfinite(out.nckd).all())
    out.loss.backward()
    assert bool(torch.isfinite(zs.grad).all())


def test_nckd_topk_error_shrinks_with_k():
    zt, th, zs, sh, y = setup(n=10, vocab=400, extra=4, teacher_scale=6.0)
    errors = nckd_topk_error(zt, th, zs.detach(), sh, y, ks=(16, 64, 256, 399))
    assert sorted(errors) == [16, 64, 256, 399]
    means = [errors[k].mean_abs for k in (16, 64, 256, 399)]
    assert all(a >= b - 1e-7 for a, b in zip(means, means[1:]))
    t, s_ = ref_logits(zt, th, 400), ref_logits(zs.detach(), sh)
    assert errors[399].max_abs < f32_atol(t, s_, 400)     # float32 stats, exact at k = V-1
    exact = gdkd_exact(zt, th, zs, sh, y).nckd.detach()
    assert errors[16].mean_exact == pytest.approx(float(exact.mean()), rel=1e-9)


def test_teacher_logit_stats_equals_logit_statistics_on_the_sliced_head():
    zt, th, _, _, y = setup(extra=5)
    a = teacher_logit_stats(zt, th, y, top_k=4, vocab_size=37)
    b = logit_statistics(zt, th.weight[:37], th.bias[:37], th.transform, y, top_k=4,
                         temperature=T)
    for k, v in a.to_dict().items():
        torch.testing.assert_close(v, getattr(b, k))


# ----------------------------------------------------------------------------------------------
# RCKA
# ----------------------------------------------------------------------------------------------

def ref_cka(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(2.7)-(2.8) from raw states, float64, explicit H."""
    n = a.shape[0]
    h = torch.eye(n, dtype=F64) - torch.ones(n, n, dtype=F64) / n
    va, vb = F.normalize(a.to(F64), dim=1), F.normalize(b.to(F64), dim=1)
    ka, kb = h @ (va @ va.T) @ h, h @ (vb @ vb.T) @ h
    return (ka * kb).sum() / (ka.norm() * kb.norm())


def cached_grams(teacher_states: list[torch.Tensor]) -> list[torch.Tensor]:
    """Through the cache path: visual_gram -> gram_from_upper -> f32 codec round trip."""
    spec = schema.visual_gram("f32")
    grams = [gram_from_upper(visual_gram(x), x.shape[0]) for x in teacher_states]
    parts = encode_feature(spec, grams)
    return list(decode_feature(spec, parts, torch.float32,
                               gram_n=[x.shape[0] for x in teacher_states]))


def test_rcka_from_cached_grams_equals_cka_from_raw_states():
    sizes = [6, 9, 16]
    teacher = [feats(n, 24, 10 + i) for i, n in enumerate(sizes)]
    student = [(feats(n, 7, 20 + i) + 0.5 * teacher[i][:, :7]).float().requires_grad_(True)
               for i, n in enumerate(sizes)]
    out = rcka_loss(cached_grams(teacher), student, min_tokens=4)
    assert isinstance(out, RckaOut) and out.n_images_used == 3 and out.kept == (0, 1, 2)
    ref = torch.stack([ref_cka(a, b.detach()) for a, b in zip(teacher, student)])
    # float32 Grams and centring: entries carry ~ eps32 * d relative error -> rtol 1e-5
    torch.testing.assert_close(out.cka.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), (1 - ref).mean(), rtol=1e-5, atol=1e-6)


def test_rcka_gradient_matches_reference_autograd():
    teacher = [feats(n, 10, 30 + n) for n in (5, 8)]
    student = [feats(n, 6, 40 + n, grad=True) for n in (5, 8)]
    student[1].data[2] = 0.0                     # an all-zero row stays zero
    grams = [gram_from_upper(visual_gram(x, eps=1e-12), x.shape[0]).double() for x in teacher]
    grams = [F.normalize(x, dim=1) @ F.normalize(x, dim=1).T for x in teacher]   # exact f64
    out = rcka_loss(grams, student)
    got = torch.autograd.grad(out.loss, student)
    ref = torch.stack([ref_cka(a, b) for a, b in zip(teacher, student)])
    want = torch.autograd.grad((1 - ref).mean(), student)
    torch.testing.assert_close(out.cka, ref.detach(), rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: rcka_loss(grams[:1], [x]).loss, (student[0],))


def test_rcka_identity_and_width_independence():
    x = feats(12, 16, 1)
    k = F.normalize(x, dim=1) @ F.normalize(x, dim=1).T
    out = rcka_loss([k], [x * 3.0])        # row scaling does not matter
    torch.testing.assert_close(out.cka, torch.ones(1, dtype=F64))
    assert abs(float(out.loss)) < 1e-12


def test_rcka_skip_rules():
    good_t, good_s = feats(6, 8, 1), feats(6, 5, 2)
    small_t, small_s = feats(3, 8, 3), feats(3, 5, 4)
    same = feats(1, 8, 5).expand(7, 8).clone()         # identical rows: K = 11^T, K~ = 0
    deg_t_s = feats(7, 5, 6)
    deg_s_t = feats(7, 8, 7)
    deg_s_s = feats(1, 5, 8).expand(7, 5).clone()
    zero_s = torch.zeros(6, 5, dtype=F64)              # all-zero rows: K = 0

    def gram(x):
        v = F.normalize(x, dim=1)
        return v @ v.T

    out = rcka_loss([gram(good_t), gram(small_t), gram(same), gram(deg_s_t), gram(good_t)],
                    [good_s, small_s, deg_t_s, deg_s_s, zero_s], min_tokens=4)
    assert out.kept == (0,) and out.n_images_used == 1
    torch.testing.assert_close(out.cka, ref_cka(good_t, good_s).reshape(1))
    # min_tokens applies with >=: n = 3 is kept at min_tokens = 3
    assert rcka_loss([gram(small_t)], [small_s], min_tokens=3).n_images_used == 1


def test_rcka_with_nothing_kept_is_a_zero_with_a_grad_path():
    x = feats(2, 5, 1, grad=True)
    v = F.normalize(feats(2, 4, 2), dim=1)
    out = rcka_loss([v @ v.T], [x], min_tokens=4)
    assert out.n_images_used == 0 and out.cka.shape == (0,) and float(out.loss.detach()) == 0.0
    out.loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    empty = rcka_loss([], [])
    assert empty.n_images_used == 0 and float(empty.loss) == 0.0


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

def _bad_exact_cases():
    zt, th, zs, sh, y = setup(grad=False)
    nan_zs = zs.clone()
    nan_zs[1, 2] = float("nan")
    small_teacher = TeacherHead(th.weight[:30], th.bias[:30], th.transform)
    return {
        "rows": ((zt[:5], th, zs, sh, y), {}, "z_teacher"),
        "teacher width": ((zt[:, :5], th, zs, sh, y), {}, "z_teacher"),
        "student width": ((zt, th, zs[:, :3], sh, y), {}, "z_student"),
        "targets length": ((zt, th, zs, sh, y[:4]), {}, "targets"),
        "targets float": ((zt, th, zs, sh, y.double()), {}, "targets"),
        "ignored label": ((zt, th, zs, sh, torch.full_like(y, -100)), {}, "targets"),
        "label too big": ((zt, th, zs, sh, torch.full_like(y, 37)), {}, "targets"),
        "nan": ((zt, th, nan_zs, sh, y), {}, "z_student"),
        "teacher smaller": ((zt, small_teacher, zs, sh, y), {}, "teacher_head"),
        "temperature": ((zt, th, zs, sh, y), {"temperature": 0.0}, "temperature"),
        "chunk": ((zt, th, zs, sh, y), {"chunk_size": 0}, "chunk_size"),
        "alpha": ((zt, th, zs, sh, y), {"alpha": -1.0}, "alpha"),
    }


@pytest.mark.parametrize("case", list(_bad_exact_cases()))
def test_exact_path_bad_input(case):
    args, kwargs, argument = _bad_exact_cases()[case]
    with pytest.raises(LossInputError, match=argument) as info:
        gdkd_exact(*args, **kwargs)
    assert "Fix:" in str(info.value)


def test_non_finite_head_is_reported():
    zt, th, zs, sh, y = setup(grad=False)
    w = sh.weight.clone()
    w[3, 0] = float("inf")
    with pytest.raises(LossInputError, match="non-finite"):
        gdkd_exact(zt, th, zs, LmHead(w, sh.bias, sh.transform), y)


def _bad_stats_cases():
    zt, th, zs, sh, y = setup(grad=False)
    stats = stats_of(zt, th, y, 4, 37)
    d = stats.to_dict()
    dup = d["topk_ids"].clone()
    dup[0, 1] = dup[0, 0]
    big = d["topk_ids"].clone()
    big[2, 0] = 40
    nan_lse = d["lse"].clone()
    nan_lse[3] = float("nan")
    return zs, sh, y, {
        "rows": (LogitStats(**{k: v[:5] for k, v in d.items()}), "stats"),
        "k mismatch": (LogitStats(**{**d, "topk_logprobs": d["topk_logprobs"][:, :3]}), "stats"),
        "duplicate ids": (LogitStats(**{**d, "topk_ids": dup}), "topk_ids"),
        "id outside vocab": (LogitStats(**{**d, "topk_ids": big}), "topk_ids"),
        "nan": (LogitStats(**{**d, "lse": nan_lse}), "stats.lse"),
        "not stats": (d, "stats"),
    }


@pytest.mark.parametrize("case", list(_bad_stats_cases()[3]))
def test_stats_path_bad_input(case):
    zs, sh, y, cases = _bad_stats_cases()
    stats, argument = cases[case]
    with pytest.raises(LossInputError, match=argument):
        gdkd_from_stats(stats, zs, sh, y)


def test_stats_temperature_mismatch_is_refused():
    zt, th, zs, sh, y = setup(grad=False)
    with pytest.raises(LossInputError, match="stats_temperature"):
        gdkd_from_stats(stats_of(zt, th, y, 4, 37), zs, sh, y, temperature=2.0,
                        stats_temperature=1.0)


def test_rcka_bad_input():
    x = feats(5, 4, 1)
    k = F.normalize(x, dim=1) @ F.normalize(x, dim=1).T
    nan_x = x.clone()
    nan_x[0, 0] = float("nan")
    cases = [
        (([k], [x, x]), "teacher_grams/student_states"),
        (([k[:, :4]], [x]), r"teacher_grams\[0\]"),
        (([k], [x[:4]]), r"student_states\[0\]"),
        (([k], [nan_x]), r"student_states\[0\]"),
        (([k], [x], 0), "min_tokens"),
    ]
    for args, argument in cases:
        with pytest.raises(LossInputError, match=argument):
            rcka_loss(*args)
