"""genrecal.store.logit_stats.logit_statistics against float64 full-vocabulary references."""

from __future__ import annotations

import math

import pytest
import torch

from genrecal.store import logit_stats
from genrecal.store.errors import FeatureInputError, StoreError
from genrecal.store.logit_stats import LogitStats, logit_statistics
from genrecal.store.logit_transform import LogitTransform


def _problem(t=23, d=32, vocab=1000, *, seed=0, logit_std=3.0, bias=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(t, d, generator=g).to(dtype)
    w = (torch.randn(vocab, d, generator=g) * logit_std / math.sqrt(d)).to(dtype)
    b = (torch.randn(vocab, generator=g)).to(dtype) if bias else None
    targets = torch.randint(0, vocab, (t,), generator=g)
    return z, w, b, targets


def _reference(z, w, b, transform, targets, temperature):
    """Full [T, V] logits in float64 from the (possibly low-precision) inputs' exact values."""
    raw = z.double() @ w.double().T
    if b is not None:
        raw = raw + b.double()
    logits = transform.apply(raw)
    logp = logits.log_softmax(dim=1)
    return {"logits": logits, "logp": logp, "lse": logits.logsumexp(dim=1),
            "lse_t": (logits / temperature).logsumexp(dim=1),
            "entropy": -(logp.exp() * logp).sum(dim=1),
            "target_logit": logits.gather(1, targets[:, None]).squeeze(1)}


def _assert_matches(stats: LogitStats, ref: dict, k: int, rtol=1e-5, atol=1e-5,
                    scale_atol=True):
    if scale_atol:  # float32 logits carry a rounding error proportional to their magnitude
        atol = max(atol, 2e-7 * float(ref["logits"].abs().max()))
    for name in ("lse", "lse_t", "entropy", "target_logit"):
        got = getattr(stats, name)
        assert got.dtype == torch.float32 and got.shape == ref[name].shape
        torch.testing.assert_close(got.double(), ref[name], rtol=rtol, atol=atol, msg=name)
    ref_top = ref["logp"].topk(k, dim=1).values
    torch.testing.assert_close(stats.topk_logprobs.double(), ref_top, rtol=rtol, atol=atol)
    # ids must carry exactly those log-probs (robust to ties), be distinct and sorted by value.
    at_ids = ref["logp"].gather(1, stats.topk_ids.long())
    torch.testing.assert_close(stats.topk_logprobs.double(), at_ids, rtol=rtol, atol=atol)
    assert all(len(set(row.tolist())) == k for row in stats.topk_ids)
    assert bool((stats.topk_logprobs[:, :-1] >= stats.topk_logprobs[:, 1:]).all())


CASES = {
    "vocab_not_divisible": dict(vocab=1000, chunk_size=256, k=8, transform=LogitTransform()),
    "chunk_larger_than_vocab": dict(vocab=300, chunk_size=4096, k=5, transform=LogitTransform()),
    "k_larger_than_chunk": dict(vocab=777, chunk_size=100, k=150, transform=LogitTransform()),
    "softcap_scale_bias": dict(vocab=901, chunk_size=128, k=16, bias=True,
                               transform=LogitTransform(scale=0.5, softcap=30.0, has_bias=True)),
    "softcap_binding": dict(vocab=500, chunk_size=64, k=4, logit_std=40.0,
                            transform=LogitTransform(scale=2.0, softcap=5.0)),
    "peaked_large_logits": dict(vocab=640, chunk_size=97, k=3, logit_std=200.0,
                                transform=LogitTransform()),
    "chunk_size_one": dict(vocab=50, chunk_size=1, k=7, transform=LogitTransform()),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("temperature", [2.0, 0.5])
def test_matches_float64_full_vocab_reference(case, temperature):
    z, w, b, targets = _problem(vocab=case["vocab"], logit_std=case.get("logit_std", 3.0),
                                bias=case.get("bias", False))
    stats = logit_statistics(z, w, b, case["transform"], targets, top_k=case["k"],
                             temperature=temperature, chunk_size=case["chunk_size"], row_block=7)
    _assert_matches(stats, _reference(z, w, b, case["transform"], targets, temperature), case["k"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_upcast(dtype):
    z, w, b, targets = _problem(vocab=513, bias=True, dtype=dtype)
    transform = LogitTransform(has_bias=True)
    stats = logit_statistics(z, w, b, transform, targets, top_k=10, temperature=2.0, chunk_size=64)
    _assert_matches(stats, _reference(z, w, b, transform, targets, 2.0), 10)


def test_float64_accumulation_is_tighter():
    z, w, b, targets = _problem(vocab=2000, logit_std=10.0)
    ref = _reference(z, w, b, LogitTransform(), targets, 2.0)
    stats = logit_statistics(z, w, b, LogitTransform(), targets, top_k=4, temperature=2.0,
                             chunk_size=300, accum_dtype=torch.float64)
    _assert_matches(stats, ref, 4, rtol=3e-7, atol=1e-7, scale_atol=False)


def test_ties_give_valid_topk():
    z, w, _, targets = _problem(vocab=200)
    w[100:] = w[:100]  # every logit appears twice, across different chunks
    stats = logit_statistics(z, w, None, LogitTransform(), targets, top_k=9, temperature=1.0,
                             chunk_size=30)
    _assert_matches(stats, _reference(z, w, None, LogitTransform(), targets, 1.0), 9)


def test_uniform_logits_entropy_is_log_vocab():
    vocab = 321
    z = torch.zeros(3, 8)
    stats = logit_statistics(z, torch.randn(vocab, 8), None, LogitTransform(),
                             torch.tensor([0, 5, 320]), top_k=2, temperature=3.0, chunk_size=50)
    expected = torch.full((3,), math.log(vocab))
    torch.testing.assert_close(stats.entropy, expected)
    torch.testing.assert_close(stats.lse, expected)
    torch.testing.assert_close(stats.lse_t, expected)
    torch.testing.assert_close(stats.target_logit, torch.zeros(3))


def test_never_materialises_more_than_a_block(monkeypatch):
    shapes = []
    original = logit_stats._chunk_logits

    def spy(z_rows, weight, bias, transform):
        out = original(z_rows, weight, bias, transform)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(logit_stats, "_chunk_logits", spy)
    z, w, _, targets = _problem(t=50, vocab=1000)
    logit_statistics(z, w, None, LogitTransform(), targets, top_k=5, temperature=2.0,
                     chunk_size=128, row_block=16)
    assert max(r for r, _ in shapes) == 16 and max(c for _, c in shapes) == 128
    assert sum(r * c for r, c in shapes) == 50 * 1000  # every logit computed exactly once


def test_result_does_not_depend_on_blocking():
    z, w, b, targets = _problem(vocab=700, bias=True)
    tf = LogitTransform(has_bias=True)
    a = logit_statistics(z, w, b, tf, targets, top_k=6, temperature=2.0, chunk_size=700,
                         row_block=1000)
    c = logit_statistics(z, w, b, tf, targets, top_k=6, temperature=2.0, chunk_size=33,
                         row_block=5)
    for name, value in a.to_dict().items():
        torch.testing.assert_close(c.to_dict()[name], value, rtol=1e-5, atol=1e-5, msg=name)


def test_no_autograd_graph_with_parameter_weight():
    z, w, _, targets = _problem(vocab=100)
    head = torch.nn.Parameter(w)
    stats = logit_statistics(z, head, None, LogitTransform(), targets, top_k=3, temperature=2.0)
    assert all(not t.requires_grad for t in stats.to_dict().values())


def test_dtypes_shapes_and_dict_round_trip():
    z, w, _, targets = _problem(t=11, vocab=90)
    stats = logit_statistics(z, w, None, LogitTransform(), targets, top_k=4, temperature=2.0,
                             chunk_size=32)
    assert stats.topk_ids.dtype == torch.int32 and stats.topk_ids.shape == (11, 4)
    assert stats.topk_logprobs.dtype == torch.float32 and stats.topk_logprobs.shape == (11, 4)
    assert stats.num_tokens == 11 and stats.k == 4
    assert list(stats.to_dict()) == ["topk_ids", "topk_logprobs", "target_logit", "lse", "lse_t",
                                     "entropy"]
    again = LogitStats.from_dict(stats.to_dict())
    assert all(torch.equal(again.to_dict()[k], v) for k, v in stats.to_dict().items())
    with pytest.raises(FeatureInputError, match="expected exactly"):
        LogitStats.from_dict({**stats.to_dict(), "extra": torch.zeros(1)})


def test_empty_rows():
    z, w, _, _ = _problem(vocab=40)
    stats = logit_statistics(z[:0], w, None, LogitTransform(), torch.zeros(0, dtype=torch.long),
                             top_k=3, temperature=2.0)
    assert stats.topk_ids.shape == (0, 3) and stats.lse.shape == (0,)


def _bad_calls():
    z, w, b, t = _problem(t=4, d=8, vocab=20, bias=True)
    tf, tfb = LogitTransform(), LogitTransform(has_bias=True)
    kw = dict(top_k=3, temperature=2.0)
    return {
        "z_1d": (lambda: logit_statistics(z[0], w, None, tf, t, **kw), "z must be"),
        "z_int": (lambda: logit_statistics(z.long(), w, None, tf, t, **kw), "z must be"),
        "width_mismatch": (lambda: logit_statistics(z, w[:, :5], None, tf, t, **kw), "weight must"),
        "bias_shape": (lambda: logit_statistics(z, w, b[:5], tfb, t, **kw), "bias must"),
        "bias_without_flag": (lambda: logit_statistics(z, w, b, tf, t, **kw), "has_bias"),
        "flag_without_bias": (lambda: logit_statistics(z, w, None, tfb, t, **kw), "has_bias"),
        "target_too_big": (lambda: logit_statistics(z, w, None, tf, t.clone().fill_(20), **kw),
                           r"out of range \[0, 20\) at rows \[0, 1, 2, 3\]"),
        "target_negative": (lambda: logit_statistics(z, w, None, tf, torch.tensor([0, -1, 0, 0]),
                                                     **kw), r"rows \[1\]"),
        "target_float": (lambda: logit_statistics(z, w, None, tf, t.float(), **kw), "integer"),
        "target_length": (lambda: logit_statistics(z, w, None, tf, t[:2], **kw), "integer"),
        "k_zero": (lambda: logit_statistics(z, w, None, tf, t, top_k=0, temperature=2.0), "top_k"),
        "k_above_vocab": (lambda: logit_statistics(z, w, None, tf, t, top_k=21, temperature=2.0),
                          "top_k"),
        "temperature_zero": (lambda: logit_statistics(z, w, None, tf, t, top_k=3, temperature=0.0),
                             "temperature"),
        "temperature_nan": (lambda: logit_statistics(z, w, None, tf, t, top_k=3,
                                                     temperature=float("nan")), "temperature"),
        "chunk_zero": (lambda: logit_statistics(z, w, None, tf, t, chunk_size=0, **kw),
                       "chunk_size"),
        "row_block_zero": (lambda: logit_statistics(z, w, None, tf, t, row_block=0, **kw),
                           "row_block"),
        "accum_half": (lambda: logit_statistics(z, w, None, tf, t, accum_dtype=torch.float16,
                                                **kw), "accum_dtype"),
        "nan_hidden": (lambda: logit_statistics(torch.where(torch.arange(4)[:, None] == 2,
                                                            float("nan"), z), w, None, tf, t, **kw),
                       r"non-finite logits at answer rows \[2\]"),
    }


BAD = _bad_calls()


@pytest.mark.parametrize("name", BAD.keys())
def test_bad_inputs_raise(name):
    call, pattern = BAD[name]
    with pytest.raises(FeatureInputError, match=pattern) as info:
        call()
    assert isinstance(info.value, StoreError) and isinstance(info.value, ValueError)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_float64_reference_with_head_on_cpu():
    z, w, b, targets = _problem(vocab=3001, bias=True, dtype=torch.bfloat16)
    transform = LogitTransform(scale=0.7, softcap=20.0, has_bias=True)
    stats = logit_statistics(z.cuda(), w, b, transform, targets.cuda(), top_k=32,
                             temperature=2.0, chunk_size=1024, row_block=8)
    assert stats.lse.device.type == "cuda"
    cpu = LogitStats(**{k: v.cpu() for k, v in stats.to_dict().items()})
    _assert_matches(cpu, _reference(z, w, b, transform, targets, 2.0), 32)
