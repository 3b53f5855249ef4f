"""Tests of genrecal.train.losses against independent float64 references.

References materialise the full [N, V] logits in float64 with LogitTransform.apply and use
torch's own log_softmax / cross_entropy; the losses under test never do either.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from genrecal.store.logit_transform import LogitTransform
from genrecal.train import losses
from genrecal.train.errors import LossInputError
from genrecal.train.losses import (IGNORE_INDEX, GenRecalWeights, LmHead, answer_window,
                                   chunked_ce, chunked_kl, chunked_kl_ce, genrecal_losses,
                                   next_token_targets, student_ce, topk_kd_loss, window_targets)

F64 = torch.float64
TRANSFORMS = {
    "plain": LogitTransform(),
    "bias": LogitTransform(has_bias=True),
    "scale_softcap_bias": LogitTransform(scale=0.8, softcap=12.0, has_bias=True),
}


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def make_head(vocab: int, width: int, transform: LogitTransform, seed: int = 0,
              dtype: torch.dtype = torch.float32) -> LmHead:
    """Head whose logits have std ~4 for unit-variance features."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, width, generator=gen, dtype=F64) * (4.0 / math.sqrt(width))
    bias = torch.randn(vocab, generator=gen, dtype=F64) if transform.has_bias else None
    return LmHead(weight.to(dtype), None if bias is None else bias.to(dtype), transform)


def features(*shape: int, seed: int, dtype: torch.dtype = torch.float32,
             grad: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype).requires_grad_(grad)


def ref_logits(x: torch.Tensor, head: LmHead) -> torch.Tensor:
    """Materialised float64 logits, the model's own map."""
    bias = None if head.bias is None else head.bias.to(F64)
    return head.transform.apply(F.linear(x.to(F64), head.weight.to(F64), bias))


def ref_kl(z: torch.Tensor, r: torch.Tensor, head: LmHead, temperature: float) -> torch.Tensor:
    log_p = torch.log_softmax(ref_logits(z, head) / temperature, dim=-1)
    log_q = torch.log_softmax(ref_logits(r, head) / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def ref_ce(r: torch.Tensor, head: LmHead, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(ref_logits(r, head), targets, reduction="none",
                           ignore_index=IGNORE_INDEX)


def rel_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    diff = (value.detach().to(F64) - reference.detach()).abs().max()
    return float(diff / reference.detach().abs().max())


def leaf64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(F64).requires_grad_(True)


def random_targets(n: int, vocab: int, seed: int, ignored: tuple[int, ...] = ()) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[list(ignored)] = IGNORE_INDEX
    return targets


# ----------------------------------------------------------------------------------------------
# 1. chunked teacher-head losses
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_kl_matches_float64_reference(name, temperature):
    head = make_head(1499, 24, TRANSFORMS[name], seed=1)
    z = features(19, 24, seed=2)
    r = features(19, 24, seed=3, grad=True)
    kl = chunked_kl(z, r, head.weight, head.bias, head.transform, temperature=temperature,
                    chunk_size=256, row_block=7)
    r64 = leaf64(r)
    reference = ref_kl(z, r64, head, temperature)
    assert kl.dtype == torch.float32 and kl.shape == (19,)
    assert rel_err(kl, reference) < 1e-5
    weights = torch.linspace(0.5, 2.0, 19)  # a non-uniform upstream gradient
    (grad,) = torch.autograd.grad((kl * weights).sum(), r)
    (grad_ref,) = torch.autograd.grad((reference * weights.to(F64)).sum(), r64)
    assert rel_err(grad, grad_ref) < 1e-5


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_chunked_ce_matches_float64_reference(name):
    head = make_head(1203, 16, TRANSFORMS[name], seed=4)
    r = features(21, 16, seed=5, grad=True)
    targets = random_targets(21, 1203, seed=6, ignored=(0, 7, 20))
    ce = chunked_ce(r, head.weight, head.bias, head.transform, targets, chunk_size=300,
                    row_block=8)
    r64 = leaf64(r)
    reference = ref_ce(r64, head, targets)
    assert rel_err(ce, reference) < 1e-5
    assert torch.all(ce[[0, 7, 20]] == 0)
    (grad,) = torch.autograd.grad(ce.sum(), r)
    (grad_ref,) = torch.autograd.grad(reference.sum(), r64)
    assert rel_err(grad, grad_ref) < 1e-5
    assert torch.all(grad[[0, 7, 20]] == 0)


@pytest.mark.parametrize("chunk_size,row_block", [(1, 13), (97, 5), (1000, 64), (4096, 3)])
def test_chunking_does_not_change_results(chunk_size, row_block):
    """Chunk sizes that divide V, do not, equal 1, or exceed V: the same float64 answer."""
    head = make_head(1000, 8, TRANSFORMS["scale_softcap_bias"], seed=7, dtype=F64)
    z, r = features(13, 8, seed=8, dtype=F64), features(13, 8, seed=9, dtype=F64)
    targets = random_targets(13, 1000, seed=10, ignored=(4,))
    kl, ce = chunked_kl_ce(z, r, head.weight, head.bias, head.transform, targets,
                           temperature=1.5, chunk_size=chunk_size, row_block=row_block)
    assert kl.dtype == F64
    torch.testing.assert_close(kl, ref_kl(z, r, head, 1.5), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ce, ref_ce(r, head, targets), rtol=1e-12, atol=1e-12)


def test_fused_kl_ce_equals_separate_losses_and_their_gradients():
    head = make_head(1500, 12, TRANSFORMS["bias"], seed=11)
    z = features(17, 12, seed=12)
    r = features(17, 12, seed=13, grad=True)
    targets = random_targets(17, 1500, seed=14, ignored=(3,))
    kw = dict(chunk_size=256, row_block=6)
    kl, ce = chunked_kl_ce(z, r, head.weight, head.bias, head.transform, targets,
                           temperature=2.0, **kw)
    kl_alone = chunked_kl(z, r, head.weight, head.bias, head.transform, temperature=2.0, **kw)
    ce_alone = chunked_ce(r, head.weight, head.bias, head.transform, targets, **kw)
    torch.testing.assert_close(kl, kl_alone, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ce, ce_alone, rtol=1e-6, atol=1e-7)
    (g_fused,) = torch.autograd.grad(kl.sum() + 3 * ce.sum(), r)
    (g_sep,) = torch.autograd.grad(kl_alone.sum() + 3 * ce_alone.sum(), r)
    torch.testing.assert_close(g_fused, g_sep, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_gradcheck_all_inputs_float64(temperature):
    """Gradients wrt features, teacher features, head weight and bias (softcap + scale)."""
    head = make_head(11, 4, TRANSFORMS["scale_softcap_bias"], seed=15, dtype=F64)
    inputs = (features(5, 4, seed=16, dtype=F64, grad=True),
              features(5, 4, seed=17, dtype=F64, grad=True),
              head.weight.clone().requires_grad_(True), head.bias.clone().requires_grad_(True))
    targets = torch.tensor([1, IGNORE_INDEX, 10, 0, 5])

    def fn(z, r, weight, bias):
        return chunked_kl_ce(z, r, weight, bias, head.transform, targets,
                             temperature=temperature, chunk_size=3, row_block=2)

    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_ce_only_float64():
    head = make_head(9, 3, TRANSFORMS["plain"], seed=18, dtype=F64)
    r = features(4, 3, seed=19, dtype=F64, grad=True)
    weight = head.weight.clone().requires_grad_(True)
    targets = torch.tensor([8, 0, IGNORE_INDEX, 4])
    assert torch.autograd.gradcheck(
        lambda r, w: chunked_ce(r, w, None, head.transform, targets, chunk_size=4, row_block=3),
        (r, weight))


def test_kl_is_zero_with_zero_gradient_when_student_equals_teacher():
    head = make_head(1200, 10, TRANSFORMS["scale_softcap_bias"], seed=20)
    z = features(9, 10, seed=21)
    r = z.clone().requires_grad_(True)
    kl = chunked_kl(z, r, head.weight, head.bias, head.transform, chunk_size=128)
    assert kl.abs().max() < 1e-5
    (grad,) = torch.autograd.grad(kl.sum(), r)
    assert grad.abs().max() < 1e-5


def test_bf16_inputs_are_upcast_and_exact_for_their_values():
    head = make_head(1100, 32, TRANSFORMS["bias"], seed=22, dtype=torch.bfloat16)
    z = features(11, 32, seed=23, dtype=torch.bfloat16)
    r = features(11, 32, seed=24, dtype=torch.bfloat16, grad=True)
    kl = chunked_kl(z, r, head.weight, head.bias, head.transform, chunk_size=200)
    assert kl.dtype == torch.float32
    r64 = leaf64(r)
    reference = ref_kl(z, r64, head, 1.0)
    assert rel_err(kl, reference) < 1e-5
    (grad,) = torch.autograd.grad(kl.sum(), r)
    (grad_ref,) = torch.autograd.grad(reference.sum(), r64)
    assert grad.dtype == torch.bfloat16
    assert rel_err(grad.float(), grad_ref) < 1e-2  # bf16 rounding of the returned gradient


def test_memory_is_bounded_by_row_block_times_chunk(monkeypatch):
    """No head matmul ever produces more than [row_block, chunk_size] logits."""
    shapes = []
    real = losses._logits_and_slope

    def spy(x, w, b, transform):
        shapes.append((x.shape[0], w.shape[0]))
        return real(x, w, b, transform)

    monkeypatch.setattr(losses, "_logits_and_slope", spy)
    head = make_head(1001, 8, TRANSFORMS["plain"], seed=25)
    z, r = features(20, 8, seed=26), features(20, 8, seed=27, grad=True)
    kl = chunked_kl(z, r, head.weight, None, head.transform, chunk_size=256, row_block=8)
    kl.sum().backward()
    n_blocks, n_chunks = 3, 4  # ceil(20/8), ceil(1001/256)
    assert max(rows for rows, _ in shapes) == 8 and max(c for _, c in shapes) == 256
    assert len(shapes) == 2 * 2 * n_blocks * n_chunks  # teacher+student, forward+backward


def test_empty_input_gives_empty_output_and_zero_gradient():
    head = make_head(100, 4, TRANSFORMS["plain"], seed=28)
    r = torch.zeros(0, 4, requires_grad=True)
    ce = chunked_ce(r, head.weight, None, head.transform, torch.zeros(0, dtype=torch.long))
    assert ce.shape == (0,)
    ce.sum().backward()
    assert r.grad.shape == (0, 4)


def test_frozen_head_gets_no_gradient_buffer():
    head = make_head(300, 4, TRANSFORMS["plain"], seed=29)
    r = features(6, 4, seed=30, grad=True)
    targets = random_targets(6, 300, seed=31)
    chunked_ce(r, head.weight, None, head.transform, targets).sum().backward()
    assert head.weight.grad is None and r.grad is not None


@pytest.mark.parametrize("case,argument", [
    ("bias_missing", "bias"), ("bias_unexpected", "bias"), ("wrong_width", "r_student"),
    ("rows_mismatch", "z_teacher"), ("target_too_big", "targets"),
    ("target_negative", "targets"), ("ignore_in_vocab", "ignore_index"),
    ("chunk_zero", "chunk_size"), ("row_block_float", "row_block"),
    ("temperature_zero", "temperature"), ("integer_features", "r_student"),
    ("targets_shape", "targets"),
])
def test_chunked_loss_rejects_bad_inputs(case, argument):
    head = make_head(50, 4, TRANSFORMS["bias"], seed=32)
    args = dict(z=features(3, 4, seed=33), r=features(3, 4, seed=34), weight=head.weight,
                bias=head.bias, transform=head.transform, targets=torch.tensor([1, 2, 3]))
    kw = dict(temperature=1.0, ignore_index=IGNORE_INDEX, chunk_size=16, row_block=2)
    edits = {
        "bias_missing": lambda: args.update(bias=None),
        "bias_unexpected": lambda: args.update(transform=LogitTransform()),
        "wrong_width": lambda: args.update(r=features(3, 5, seed=0)),
        "rows_mismatch": lambda: args.update(z=features(4, 4, seed=0)),
        "target_too_big": lambda: args.update(targets=torch.tensor([1, 50, 3])),
        "target_negative": lambda: args.update(targets=torch.tensor([1, -5, 3])),
        "ignore_in_vocab": lambda: kw.update(ignore_index=0),
        "chunk_zero": lambda: kw.update(chunk_size=0),
        "row_block_float": lambda: kw.update(row_block=2.0),
        "temperature_zero": lambda: kw.update(temperature=0.0),
        "integer_features": lambda: args.update(r=torch.ones(3, 4, dtype=torch.long)),
        "targets_shape": lambda: args.update(targets=torch.tensor([[1, 2, 3]])),
    }
    edits[case]()
    with pytest.raises(LossInputError) as info:
        chunked_kl_ce(args["z"], args["r"], args["weight"], args["bias"], args["transform"],
                      args["targets"], **kw)
    assert info.value.argument == argument
    assert "Fix:" in str(info.value)


# ----------------------------------------------------------------------------------------------
# 2. GenRecal positions and losses
# ----------------------------------------------------------------------------------------------

def test_next_token_targets_shift_by_one():
    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [1, 2, 3, 4, 0, 0]])
    supervised = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    expected = torch.full_like(ids, IGNORE_INDEX)
    for b in range(2):
        for t in range(5):
            if supervised[b, t + 1]:
                expected[b, t] = ids[b, t + 1]
    assert torch.equal(next_token_targets(ids, supervised), expected)
    assert next_token_targets(ids, supervised)[0].tolist() == [-100, 7, 8, 9, -100, -100]


def test_window_targets_and_answer_window_line_up():
    """Window j = 0 is the last real question token; j = 1..N the real answer tokens."""
    q_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)   # left / right pad
    a_mask = torch.tensor([[1, 1, 1], [0, 1, 1]], dtype=torch.bool)        # padding first
    r_q = features(2, 4, 3, seed=35, grad=True)
    r_a = features(2, 3, 3, seed=36, grad=True)
    window, window_mask = answer_window(r_q, q_mask, r_a, a_mask)
    assert window.shape == (2, 4, 3)
    assert window_mask.tolist() == [[True] * 4, [True, True, True, False]]
    torch.testing.assert_close(window[0], torch.cat([r_q[0, 3:4], r_a[0]]))
    torch.testing.assert_close(window[1, :3], torch.cat([r_q[1, 1:2], r_a[1, 1:3]]))
    assert torch.all(window[1, 3] == 0)
    targets = window_targets(torch.tensor([[11, 12, 13], [0, 21, 22]]), a_mask)
    assert targets.tolist() == [[11, 12, 13, -100], [21, 22, -100, -100]]


def test_answer_window_rejects_sample_without_question():
    q_mask = torch.tensor([[True, False], [False, False]])
    with pytest.raises(LossInputError, match="no question token"):
        answer_window(torch.zeros(2, 2, 3), q_mask, torch.zeros(2, 1, 3),
                      torch.ones(2, 1, dtype=torch.bool))


def _genrecal_batch(head: LmHead, width: int):
    """Two samples with their own lengths, right-padded, plus a per-sample loop reference.

    Per sample: student question length n_qs, teacher question length n_ql, n_a answer
    tokens a_1..a_N (teacher ids), a full teacher sequence z_l of length n_ql + n_a.
    """
    specs = [(4, 6, 3), (2, 5, 5)]  # (n_qs, n_ql, n_a)
    n_qs_max, n_a_max = 4, 5
    batch = dict(r_q=features(2, n_qs_max, width, seed=40, dtype=F64, grad=True),
                 r_a=features(2, n_a_max, width, seed=41, dtype=F64, grad=True),
                 rt_q=features(2, 6, width, seed=42, dtype=F64, grad=True),
                 rt_a=features(2, n_a_max, width, seed=43, dtype=F64, grad=True))
    q_mask = torch.zeros(2, n_qs_max, dtype=torch.bool)
    ql_mask = torch.zeros(2, 6, dtype=torch.bool)
    a_mask = torch.zeros(2, n_a_max, dtype=torch.bool)
    answer_ids = torch.zeros(2, n_a_max, dtype=torch.long)
    z_window = torch.zeros(2, n_a_max + 1, width, dtype=F64)
    z_full = []
    for b, (n_qs, n_ql, n_a) in enumerate(specs):
        q_mask[b, :n_qs], ql_mask[b, :n_ql], a_mask[b, :n_a] = True, True, True
        answer_ids[b, :n_a] = torch.randint(0, head.vocab_size, (n_a,),
                                            generator=torch.Generator().manual_seed(50 + b))
        z_full.append(features(n_ql + n_a, width, seed=60 + b, dtype=F64))
        z_window[b, :n_a + 1] = z_full[b][n_ql - 1:]  # the cached answer window
    masks = dict(q_mask=q_mask, ql_mask=ql_mask, a_mask=a_mask)
    return batch, masks, answer_ids, z_window, (specs, z_full)


def _loop_reference(head, batch, answer_ids, specs, z_full, weights):
    """Per-token loop straight from docs/method.md §1.2: the output at position t predicts token t+1."""
    temp, terms = weights.temperature, {"ar": [], "kl": [], "reg_ce": [], "reg_kl": []}
    for b, (n_qs, n_ql, n_a) in enumerate(specs):
        student_seq = torch.cat([batch["r_q"][b, :n_qs], batch["r_a"][b, :n_a]])
        teacher_seq = torch.cat([batch["rt_q"][b, :n_ql], batch["rt_a"][b, :n_a]])
        for k in range(1, n_a + 1):  # predict a_k
            target = answer_ids[b, k - 1:k]
            z = z_full[b][n_ql - 1 + k - 1:n_ql + k - 1]       # teacher logit for a_k
            r = student_seq[n_qs - 1 + k - 1:n_qs + k - 1]
            rt = teacher_seq[n_ql - 1 + k - 1:n_ql + k - 1]
            terms["ar"].append(ref_ce(r, head, target))
            terms["kl"].append(ref_kl(z, r, head, temp))
            terms["reg_ce"].append(ref_ce(rt, head, target))
            terms["reg_kl"].append(ref_kl(z, rt, head, temp))
    means = {k: torch.cat(v).mean() for k, v in terms.items()}
    total = (weights.ar * means["ar"] + weights.kl * means["kl"]
             + weights.reg_ce * means["reg_ce"] + weights.reg_kl * means["reg_kl"])
    return means, total


def test_genrecal_losses_match_per_token_loop_reference():
    head = make_head(1013, 6, TRANSFORMS["scale_softcap_bias"], seed=44, dtype=F64)
    batch, masks, answer_ids, z_window, (specs, z_full) = _genrecal_batch(head, 6)
    weights = GenRecalWeights(ar=1.0, kl=0.7, reg_ce=0.3, reg_kl=1.9, temperature=1.5)
    r_window, _ = answer_window(batch["r_q"], masks["q_mask"], batch["r_a"], masks["a_mask"])
    rt_window, _ = answer_window(batch["rt_q"], masks["ql_mask"], batch["rt_a"],
                                 masks["a_mask"])
    out = genrecal_losses(head, z_window, r_window, window_targets(answer_ids, masks["a_mask"]),
                          r_teacher_window=rt_window, weights=weights, chunk_size=100,
                          row_block=3)
    means, total = _loop_reference(head, batch, answer_ids, specs, z_full, weights)
    assert int(out.n_tokens) == 8
    for name, value in means.items():
        torch.testing.assert_close(getattr(out, name), value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.total, total, rtol=1e-10, atol=1e-12)
    leaves = list(batch.values())
    grads = torch.autograd.grad(out.total, leaves)
    grads_ref = torch.autograd.grad(total, leaves)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)
    assert torch.all(grads[1][0, 2] == 0)  # r_al[-1] (last answer position) predicts nothing


def test_genrecal_zero_weight_skips_term_and_sum_reduction():
    head = make_head(500, 6, TRANSFORMS["plain"], seed=45, dtype=F64)
    batch, masks, answer_ids, z_window, _ = _genrecal_batch(head, 6)
    r_window, _ = answer_window(batch["r_q"], masks["q_mask"], batch["r_a"], masks["a_mask"])
    rt_window, _ = answer_window(batch["rt_q"], masks["ql_mask"], batch["rt_a"],
                                 masks["a_mask"])
    targets = window_targets(answer_ids, masks["a_mask"])
    weights = GenRecalWeights(reg_kl=0.0)
    mean = genrecal_losses(head, z_window, r_window, targets, r_teacher_window=rt_window,
                           weights=weights)
    summed = genrecal_losses(head, z_window, r_window, targets, r_teacher_window=rt_window,
                             weights=weights, reduction="sum")
    assert mean.reg_kl is None and mean.reg_ce is not None
    torch.testing.assert_close(mean.total, mean.ar + mean.kl + mean.reg_ce)
    torch.testing.assert_close(summed.total, mean.total * 8)
    no_reg = genrecal_losses(head, z_window, r_window, targets)
    assert no_reg.reg_ce is None and no_reg.reg_kl is None
    assert set(no_reg.scalars()) == {"total", "ar", "kl", "n_tokens"}


def test_genrecal_without_targets_is_zero_and_differentiable():
    head = make_head(100, 4, TRANSFORMS["plain"], seed=46)
    r_window = features(2, 3, 4, seed=47, grad=True)
    targets = torch.full((2, 3), IGNORE_INDEX)
    out = genrecal_losses(head, features(2, 3, 4, seed=48), r_window, targets)
    assert float(out.total.detach()) == 0.0
    out.total.backward()
    assert torch.all(r_window.grad == 0)


def test_genrecal_input_errors():
    head = make_head(100, 4, TRANSFORMS["plain"], seed=49)
    z, r = features(2, 3, 4, seed=50), features(2, 3, 4, seed=51)
    targets = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(LossInputError, match="r_window"):
        genrecal_losses(head, z, features(2, 2, 4, seed=0), targets)
    with pytest.raises(LossInputError, match="targets"):
        genrecal_losses(head, z, r, targets[:, :2])
    with pytest.raises(LossInputError, match="reg_ce"):
        genrecal_losses(head, z, r, targets, r_teacher_window=r,
                        weights=GenRecalWeights(reg_ce=0.0, reg_kl=0.0))
    with pytest.raises(LossInputError, match="reduction"):
        genrecal_losses(head, z, r, targets, reduction="avg")


def test_genrecal_weights_validation_and_round_trip():
    weights = GenRecalWeights(ar=1.0, kl=0.5, reg_ce=0.0, reg_kl=2.0, temperature=2.0)
    assert GenRecalWeights.from_dict(weights.to_dict()) == weights
    for bad in (dict(kl=-1.0), dict(temperature=0.0), dict(ar=float("nan")),
                dict(ar=0.0, kl=0.0), dict(reg_ce=True)):
        with pytest.raises(LossInputError):
            GenRecalWeights(**bad)
    with pytest.raises(LossInputError, match="unknown"):
        GenRecalWeights.from_dict({"ar": 1.0, "beta": 2.0})


def test_student_ce_logits_and_head_paths_match_reference():
    head = make_head(1234, 8, TRANSFORMS["bias"], seed=52)
    z = features(2, 5, 8, seed=53, grad=True)
    ids = torch.randint(0, 1234, (2, 5), generator=torch.Generator().manual_seed(54))
    supervised = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    targets = next_token_targets(ids, supervised)
    logits = ref_logits(z, head).float()
    from_logits = student_ce(logits, targets)
    from_head = student_ce(z, targets, head=head, chunk_size=100)
    flat = targets.reshape(-1)
    reference = F.cross_entropy(ref_logits(z.detach(), head).reshape(-1, 1234), flat,
                                ignore_index=IGNORE_INDEX)
    assert rel_err(from_logits, reference) < 1e-6 and rel_err(from_head, reference) < 1e-5
    torch.testing.assert_close(student_ce(logits, targets, reduction="sum"), from_logits * 5)
    with pytest.raises(LossInputError, match="targets"):
        student_ce(logits, targets[:, :4])
    with pytest.raises(LossInputError, match="targets"):
        student_ce(logits, torch.full_like(targets, 5000))


# ----------------------------------------------------------------------------------------------
# 3. top-k + tail KD (same tokenizer)
# ----------------------------------------------------------------------------------------------

def _topk_case(n: int, vocab: int, k: int, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, vocab, generator=gen, dtype=F64) * 4.0
    student = (torch.randn(n, vocab, generator=gen, dtype=F64) * 4.0).to(dtype)
    log_p = torch.log_softmax(teacher, dim=-1)
    top = log_p.topk(k, dim=-1)
    return student.requires_grad_(True), top.indices, top.values.to(dtype), log_p


def ref_bucket_kl(student: torch.Tensor, ids: torch.Tensor, topk_logprobs: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    """Float64 (k+1)-bucket KL from probabilities (tail = 1 - sum of the top-k, 0 log 0 = 0)."""
    q = torch.softmax(student.to(F64), dim=-1)
    p_top, q_top = topk_logprobs.to(F64).exp(), q.gather(-1, ids)
    p_tail, q_tail = (1 - p_top.sum(-1)).clamp_min(0), 1 - q_top.sum(-1)

    def terms(p, q):
        return torch.special.xlogy(p, p) - torch.special.xlogy(p, q)

    kl = terms(p_top, q_top).sum(-1) + terms(p_tail, q_tail)
    return kl[mask].mean()


def test_topk_kd_with_k_equal_v_is_the_full_vocabulary_kl():
    student, ids, logprobs, log_p = _topk_case(12, 1031, 1031, seed=60, dtype=F64)
    perm = torch.randperm(1031, generator=torch.Generator().manual_seed(61))
    ids, logprobs = ids[:, perm], logprobs[:, perm]  # any order of the support
    mask = torch.ones(12, dtype=torch.bool)
    mask[5] = False
    loss = topk_kd_loss(student, ids, logprobs, mask)
    full = (log_p.exp() * (log_p - torch.log_softmax(student, -1))).sum(-1)[mask].mean()
    torch.testing.assert_close(loss, full, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(loss, student)
    (grad_ref,) = torch.autograd.grad(full, student)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-14)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("k", [1, 64, 400])
def test_topk_kd_matches_float64_bucket_reference(k):
    student, ids, logprobs, _ = _topk_case(20, 1537, k, seed=62)
    mask = torch.rand(20, generator=torch.Generator().manual_seed(63)) > 0.3
    loss = topk_kd_loss(student, ids, logprobs, mask)
    s64 = leaf64(student)
    reference = ref_bucket_kl(s64, ids, logprobs, mask)
    assert rel_err(loss, reference) < 1e-5
    (grad,) = torch.autograd.grad(loss, student)
    (grad_ref,) = torch.autograd.grad(reference, s64)
    assert rel_err(grad, grad_ref) < 1e-5


def test_topk_kd_gradcheck_float64():
    student, ids, logprobs, _ = _topk_case(4, 13, 5, seed=64, dtype=F64)
    mask = torch.tensor([True, False, True, True])
    assert torch.autograd.gradcheck(lambda s: topk_kd_loss(s, ids, logprobs, mask), (student,))


def _buggy_topk_kd(student, ids, logprobs, mask):
    """The bug two public KD trainers shipped: teacher renormalised over its top-k, student
    normalised over the FULL vocabulary, so the two live on different supports."""
    p = torch.softmax(logprobs.to(F64), dim=-1)
    log_q = torch.log_softmax(student.to(F64), dim=-1).gather(-1, ids)
    return (p * (p.log() - log_q)).sum(-1)[mask].mean()


def test_different_supports_bug_gives_a_different_answer():
    student, ids, logprobs, log_p = _topk_case(16, 1200, 32, seed=65)
    mask = torch.ones(16, dtype=torch.bool)
    correct = topk_kd_loss(student, ids, logprobs, mask)
    buggy = _buggy_topk_kd(student, ids, logprobs, mask)
    correct, buggy = float(correct.detach()), float(buggy.detach())
    assert abs(correct - buggy) > 1e-2 * abs(correct)
    # At the optimum (student = teacher) the same-support loss vanishes, the buggy one does not:
    # it keeps pushing the student to move tail mass onto the top-k.
    at_optimum = log_p.float()
    assert abs(float(topk_kd_loss(at_optimum, ids, logprobs, mask))) < 1e-5
    assert float(_buggy_topk_kd(at_optimum, ids, logprobs, mask)) > 0.05


def test_topk_kd_tiny_student_tail_is_stable_in_float32():
    """Student tail mass ~1e-12: exp(lse) - sum exp(top-k) would cancel to 0 in float32."""
    student, ids, logprobs, _ = _topk_case(6, 1100, 8, seed=66)
    boosted = student.detach().scatter_add(1, ids, torch.full(ids.shape, 60.0))
    boosted.requires_grad_(True)
    mask = torch.ones(6, dtype=torch.bool)
    loss = topk_kd_loss(boosted, ids, logprobs, mask)
    q = torch.softmax(boosted.detach().to(F64), -1)
    q_tail = q.scatter(1, ids, 0.0).sum(-1)  # exact tail, no cancellation
    assert float(q_tail.max()) < 1e-10
    p_top = logprobs.to(F64).exp()
    p_tail = 1 - p_top.sum(-1)
    reference = ((p_top * (p_top.log() - q.gather(1, ids).log())).sum(-1)
                 + p_tail * (p_tail.log() - q_tail.log())).mean()
    assert torch.isfinite(loss) and rel_err(loss, reference) < 1e-5
    (grad,) = torch.autograd.grad(loss, boosted)
    assert torch.isfinite(grad).all()


def test_topk_kd_handles_rounded_and_infinite_teacher_logprobs():
    student, ids, logprobs, _ = _topk_case(3, 200, 10, seed=67)
    logprobs = logprobs.clone()
    logprobs[0] = logprobs[0] - torch.logsumexp(logprobs[0], 0) + 1e-4  # cached mass 1 + 1e-4
    logprobs[1, 5:] = -math.inf                                         # teacher zeros
    renormalised = logprobs.clone()
    renormalised[0] = logprobs[0] - torch.logsumexp(logprobs[0], 0)     # tail empty
    for row in range(3):
        mask = torch.arange(3) == row
        loss = topk_kd_loss(student, ids, logprobs, mask)
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(grad).all()
        reference = ref_bucket_kl(student.detach(), ids, renormalised, mask)
        assert rel_err(loss, reference) < 1e-5, row


def test_topk_kd_ignores_masked_rows_and_rejects_bad_inputs():
    student, ids, logprobs, _ = _topk_case(4, 50, 5, seed=68)
    mask = torch.tensor([True, True, False, True])
    ids, logprobs = ids.clone(), logprobs.clone()
    ids[2], logprobs[2] = -1, math.nan  # padding rows of a cache may hold anything
    loss = topk_kd_loss(student, ids, logprobs, mask)
    assert torch.isfinite(loss)
    none = topk_kd_loss(student, ids, logprobs, torch.zeros(4, dtype=torch.bool))
    assert float(none.detach()) == 0.0
    duplicate = ids.clone()
    duplicate[0, 1] = duplicate[0, 0]
    out_of_range = ids.clone()
    out_of_range[1, 0] = 50
    for bad_ids, bad_mask, match in ((duplicate, mask, "repeats"), (out_of_range, mask, "outside"),
                                     (ids, mask.long(), "mask"), (ids[:, :3], mask, "topk_ids")):
        with pytest.raises(LossInputError, match=match):
            topk_kd_loss(student, bad_ids, logprobs, bad_mask)


# ----------------------------------------------------------------------------------------------
# CUDA: real sizes, peak memory, autocast
# ----------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kl_ce_exact_and_memory_bounded_at_real_vocab_size():
    device, n, width, vocab = torch.device("cuda"), 1024, 256, 50_000
    head = make_head(vocab, width, TRANSFORMS["scale_softcap_bias"], seed=70)
    weight, bias = head.weight.to(device), head.bias.to(device)
    z = features(n, width, seed=71).to(device)
    r = features(n, width, seed=72).to(device).requires_grad_(True)
    targets = random_targets(n, vocab, seed=73, ignored=(5,)).to(device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    kl, ce = chunked_kl_ce(z, r, weight, bias, head.transform, targets, temperature=2.0,
                           chunk_size=4096, row_block=256)
    (grad,) = torch.autograd.grad(kl.sum() + ce.sum(), r)
    peak = torch.cuda.max_memory_allocated() - base
    full_logits_bytes = n * vocab * 4
    assert peak < full_logits_bytes / 2, f"peak {peak / 2**20:.0f} MiB"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        kl_amp, _ = chunked_kl_ce(z, r, weight, bias, head.transform, targets, temperature=2.0,
                                  chunk_size=4096, row_block=256)
    torch.testing.assert_close(kl_amp, kl, rtol=0, atol=0)
    rows = slice(0, 64)  # row i's loss depends on row i only: check a slice in float64
    head64 = LmHead(weight.double(), bias.double(), head.transform)
    r64 = r[rows].detach().double().requires_grad_(True)
    kl_ref = ref_kl(z[rows], r64, head64, 2.0)
    ce_ref = ref_ce(r64, head64, targets[rows])
    (grad_ref,) = torch.autograd.grad(kl_ref.sum() + ce_ref.sum(), r64)
    assert rel_err(kl[rows], kl_ref) < 1e-5 and rel_err(ce[rows], ce_ref) < 1e-5
    assert rel_err(grad[rows], grad_ref) < 1e-5
