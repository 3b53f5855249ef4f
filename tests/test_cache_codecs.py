"""Round trips of every element codec and feature encoder; lossy errors bounded and reported."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from genrecal.store import schema
from genrecal.store.codecs import (
    array_layout, decode_feature, decode_values, encode_feature, encode_values, feature_parts,
)
from genrecal.store.gram import gram_from_upper, visual_gram
from genrecal.store.logit_stats import LogitStats, logit_statistics
from genrecal.store.logit_transform import LogitTransform

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def matrices(draw, max_rows=12, max_width=24):
    """Float32 [n, w] with a per-row magnitude spanning 1e-4 .. 1e3 and exact zeros rows."""
    n = draw(st.integers(0, max_rows))
    w = draw(st.integers(1, max_width))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, w, generator=gen) * torch.logspace(-4, 3, max(n, 1))[:n, None]
    if n and draw(st.booleans()):
        x[draw(st.integers(0, n - 1))] = 0.0
    return x


@SETTINGS
@given(matrices())
def test_bf16_is_lossless_on_bfloat16_input(x):
    xb = x.to(torch.bfloat16)
    parts = encode_values(xb, "bf16")
    assert parts["data"].dtype == np.uint16 and parts["data"].shape == tuple(x.shape)
    back = decode_values(parts, "bf16", torch.bfloat16)
    assert torch.equal(back.view(torch.int16), xb.view(torch.int16))


@SETTINGS
@given(matrices())
def test_f32_is_lossless(x):
    assert torch.equal(decode_values(encode_values(x, "f32"), "f32", torch.float32), x)


@SETTINGS
@given(matrices())
def test_int8_error_within_half_a_step_per_token(x):
    back = decode_values(encode_values(x, "int8"), "int8", torch.float64)
    absmax = x.double().abs().amax(dim=1, keepdim=True) if x.numel() else torch.zeros(x.shape[0], 1)
    bound = absmax / 127 / 2
    err = (back - x.double()).abs()
    assert (err <= bound * (1 + 1e-5) + 1e-30).all(), f"max err/bound {(err / bound.clamp_min(1e-30)).max()}"


@SETTINGS
@given(matrices())
def test_fp8_relative_error_bounded(x):
    parts = encode_values(x, "fp8_e4m3")
    back = decode_values(parts, "fp8_e4m3", torch.float64)
    scale = torch.from_numpy(parts["scale"]).double()[:, None]
    # 3 mantissa bits: half an ulp is 2^-4 relative for normals; subnormal step 2^-9 * scale.
    bound = 2.0**-4 * x.double().abs() + 2.0**-10 * scale
    err = (back - x.double()).abs()
    assert (err <= bound * (1 + 1e-5)).all()


def test_lossy_error_report():
    """The error actually seen on LLM-like states (printed with -s; bounds asserted)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 512, generator=gen) * torch.where(torch.arange(512) % 64 == 0, 20.0, 1.0)
    report = {}
    for codec in ("fp8_e4m3", "int8"):
        back = decode_values(encode_values(x, codec), codec, torch.float32)
        rel = ((back - x).norm(dim=1) / x.norm(dim=1)).max().item()
        report[codec] = rel
    print(f"max per-token relative L2 error: {report}")
    assert report["fp8_e4m3"] < 2.0**-4 and report["int8"] < 0.05


def test_all_zero_rows_decode_to_exact_zeros():
    x = torch.zeros(3, 5)
    for codec in ("fp8_e4m3", "int8", "bf16", "f32"):
        assert torch.equal(decode_values(encode_values(x, codec), codec, torch.float32), x)


def test_unknown_codec_is_refused():
    with pytest.raises(ValueError, match="unknown codec"):
        encode_values(torch.zeros(1, 1), "zip")


# ----------------------------------------------------------------------------- feature encoders


@pytest.mark.parametrize("codec", ["bf16", "fp8_e4m3", "int8"])
@pytest.mark.parametrize("name", ["answer_hidden", "question_hidden"])
def test_hidden_feature_roundtrip(name, codec):
    spec = schema.answer_hidden(7, codec) if name == "answer_hidden" else schema.question_hidden(7, codec, "text")
    x = torch.randn(5, 7).to(torch.bfloat16)
    parts = encode_feature(spec, x)
    assert set(parts) == {p.name for p in feature_parts(spec)}
    back = decode_feature(spec, parts, torch.float32)
    assert back.shape == (5, 7)
    if codec == "bf16":
        assert torch.equal(back, x.float())


@pytest.mark.parametrize("codec", ["f32", "bf16"])
def test_gram_feature_roundtrip(codec):
    spec = schema.visual_gram(codec)
    grams = [gram_from_upper(visual_gram(torch.randn(n, 6)), n) for n in (4, 1, 9)]
    back = decode_feature(spec, encode_feature(spec, grams), torch.float32, [4, 1, 9])
    tol = 0 if codec == "f32" else 2.0**-8
    for k, b in zip(grams, back):  # the upper triangle is what is stored
        assert torch.allclose(b, torch.triu(k) + torch.triu(k, 1).T, atol=tol, rtol=0)
    assert decode_feature(spec, encode_feature(spec, []), torch.float32, []) == ()


@pytest.mark.parametrize("codec", ["f32", "bf16"])
def test_logit_stats_feature_roundtrip(codec):
    spec = schema.logit_stats(4, 2.0, codec)
    stats = logit_statistics(torch.randn(6, 8), torch.randn(30, 8), None, LogitTransform(),
                             torch.randint(0, 30, (6,)), top_k=4, temperature=2.0)
    back = decode_feature(spec, encode_feature(spec, stats), torch.float32)
    assert isinstance(back, LogitStats) and torch.equal(back.topk_ids, stats.topk_ids.long())
    assert torch.equal(back.entropy, stats.entropy) and torch.equal(back.lse_t, stats.lse_t)
    tol = 0 if codec == "f32" else 2.0**-8 * stats.topk_logprobs.abs().max().item()
    assert torch.allclose(back.topk_logprobs, stats.topk_logprobs, atol=tol, rtol=0)


def test_array_layout_blocksize_is_chunk_bytes():
    part = feature_parts(schema.answer_hidden(4096))[0]
    layout = array_layout(1000, part)
    rows = layout["chunks"][0]
    assert layout["compressors"].blocksize == rows * 4096 * 2
    assert layout["shards"][0] % rows == 0 and layout["shards"][0] >= 1000
    assert layout["compressors"].typesize == 2
