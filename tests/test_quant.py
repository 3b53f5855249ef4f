"""Quantisation-aware training (genrecal.train.quant, docs/method.md §2.3): the fake quantiser
against a float64 reference, its LSQ gradients, the MSE init, scale rounding, which modules are
wrapped, optimizer groups and the save/load round trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from genrecal.common.config import QUANT_MODULES, QuantConfig
from genrecal.model.loading import load_vlm
from genrecal.train.quant import (QAT_CONFIG, QAT_SCALES, FakeQuantLinear, QuantError,
                                  codes_and_scales, dequantized_weight, load_qat_student,
                                  param_groups, qat_modules, qrange, quantize_model,
                                  read_qat_config, save_qat, scale_parameters, set_lr, unwrapped)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _module(bits=4, group=32, out=24, inp=96, scale_dtype="bfloat16", seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(inp, out, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out, inp, generator=gen) * 0.05)
        linear.weight[0, 3] = 0.9  # an outlier: clamping matters in its group
        if bias:
            linear.bias.copy_(torch.randn(out, generator=gen))
    module = FakeQuantLinear(linear, QuantConfig(bits=bits, group_size=group,
                                                 scale_dtype=scale_dtype))
    with torch.no_grad():  # move the scales off the init, as training would
        module.log_scale.add_(torch.randn(module.log_scale.shape, generator=gen) * 0.3)
    return module


def _reference(module: FakeQuantLinear):
    """float64: codes and W_q from the scale the module uses (exact bf16/fp16/fp32 values)."""
    qmin, qmax = qrange(module.bits)
    s = module.scale().detach().double()                                    # [out, groups]
    w = module.weight.detach().double().reshape(module.out_features, -1, module.group_size)
    q = torch.clamp(torch.round(w / s[..., None]), qmin, qmax)
    return q.reshape(module.out_features, -1), (s[..., None] * q).reshape(module.out_features, -1)


# ----- values ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("scale_dtype", ["bfloat16", "float32"])
def test_fake_quant_equals_float64_reference(bits, scale_dtype):
    module = _module(bits=bits, scale_dtype=scale_dtype)
    qmin, qmax = qrange(bits)
    ref_q, ref_w = _reference(module)
    codes, scales = codes_and_scales(module)
    w_q = dequantized_weight(module)
    assert codes.dtype == torch.int8 and codes.shape == module.weight.shape
    assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
    assert int(codes.min()) == qmin or int(codes.max()) == qmax  # the clamp is exercised
    assert torch.equal(codes.double(), ref_q)
    # float32 of the exact product; with 16-bit scales s * q is exact in float32 (<= 11 + 8 bits)
    assert torch.equal(w_q, ref_w.float())
    if scale_dtype != "float32":
        assert torch.equal(w_q.double(), ref_w)
    assert scales.dtype == DTYPES[scale_dtype] and scales.shape == (24, 96 // 32)
    # groups run along the input dimension: columns [g*G, (g+1)*G) share scale column g
    for g in range(3):
        cols = slice(32 * g, 32 * (g + 1))
        assert torch.equal(w_q[:, cols], scales[:, g:g + 1].float() * codes[:, cols].float())
    # the forward is F.linear with exactly that weight
    x = torch.randn(5, 96)
    assert torch.equal(module(x), torch.nn.functional.linear(x, w_q, module.bias))


def test_codes_of_4_bits_use_the_asymmetric_signed_range():
    assert qrange(4) == (-8, 7) and qrange(8) == (-128, 127)


# ----- gradients ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_ste_and_lsq_gradients(bits):
    module = _module(bits=bits)
    qmin, qmax = qrange(bits)
    x = torch.randn(7, 96, dtype=torch.float32)
    upstream = torch.randn(7, 24)
    (module(x) * upstream).sum().backward()

    ref_q, ref_w = _reference(module)
    s = module.scale().detach().double()
    w = module.weight.detach().double()
    raw = module.weight.detach().double().reshape(24, -1, 32) / s[..., None]
    inside = ((torch.round(raw) >= qmin) & (torch.round(raw) <= qmax)).reshape(24, 96)
    assert (~inside).any() and inside.any()
    # d out / d W: the plain linear's gradient with W_q inside the clamp range, 0 outside
    g_wq = upstream.double().T @ x.double()                      # dL/dW_q of F.linear
    grad_w = module.weight.grad.double()
    assert torch.allclose(grad_w[inside], g_wq[inside], rtol=1e-5, atol=1e-6)
    assert torch.all(grad_w[~inside] == 0)
    # d out / d s: LSQ, (q - W/s) inside, q (the clamp bound) outside; d s / d log_scale = exp
    ds_elem = torch.where(inside, ref_q - (w.reshape(24, -1, 32) / s[..., None]).reshape(24, 96),
                          ref_q)
    grad_s = (g_wq * ds_elem).reshape(24, -1, 32).sum(-1)
    expected = grad_s * torch.exp(module.log_scale.detach().double())
    assert torch.allclose(module.log_scale.grad.double(), expected, rtol=1e-4, atol=1e-6)
    assert torch.allclose(module.bias.grad, upstream.sum(0))


def test_gradient_reaches_scales_through_the_dtype_rounding():
    module = _module(scale_dtype="bfloat16")
    module(torch.randn(3, 96)).square().sum().backward()
    assert module.log_scale.grad is not None and module.log_scale.grad.abs().sum() > 0


# ----- scales ------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale_dtype", ["bfloat16", "float16", "float32"])
def test_scales_are_rounded_to_scale_dtype(scale_dtype):
    module = _module(scale_dtype=scale_dtype)
    s = module.scale().detach()
    exact = torch.exp(module.log_scale.detach().double())
    assert s.dtype == torch.float32
    assert torch.equal(s.to(DTYPES[scale_dtype]).float(), s)          # representable
    assert torch.equal(s, exact.float().to(DTYPES[scale_dtype]).float())  # exp in float64
    rel = ((s.double() - exact) / exact).abs().max()
    assert rel <= torch.finfo(DTYPES[scale_dtype]).eps  # round to nearest: half an ulp, plus exp
    if scale_dtype != "float32":
        assert not torch.equal(s.double(), exact)  # the rounding is real
    _, scales = codes_and_scales(module)
    assert scales.dtype == DTYPES[scale_dtype] and torch.equal(scales.float(), s)


def test_scale_never_reaches_zero():
    module = _module(scale_dtype="float16")
    with torch.no_grad():
        module.log_scale.fill_(-200.0)
    assert (module.scale() > 0).all()
    assert torch.isfinite(module(torch.randn(2, 96))).all()


# ----- init --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_mse_init_is_no_worse_than_absmax(bits):
    gen = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(256, 64, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(64, 256, generator=gen) * 0.02)
        linear.weight[::5, ::17] *= 8  # heavy-tailed groups, where absmax is a poor scale
    cfg = QuantConfig(bits=bits, group_size=64)
    mse = FakeQuantLinear(linear, cfg)
    absmax = FakeQuantLinear(linear, cfg, init=False)
    absmax.init_scales(factors=(1.0,))
    expected_absmax = (linear.weight.detach().reshape(64, 4, 64).abs().amax(-1)
                       / qrange(bits)[1]).to(torch.bfloat16).float()
    assert torch.equal(absmax.scale().detach(), expected_absmax)

    def group_err(m):
        diff = dequantized_weight(m) - linear.weight.detach()
        return diff.reshape(64, 4, 64).square().sum(-1)

    assert torch.all(group_err(mse) <= group_err(absmax))
    if bits == 4:  # at 8 bits absmax is often already the best grid point
        assert group_err(mse).sum() < group_err(absmax).sum()


def test_zero_weights_get_a_finite_scale():
    linear = torch.nn.Linear(32, 4, bias=False)
    with torch.no_grad():
        linear.weight.zero_()
    module = FakeQuantLinear(linear, QuantConfig(group_size=32))
    assert torch.isfinite(module.log_scale).all()
    assert torch.equal(dequantized_weight(module), torch.zeros(4, 32))


def test_group_size_must_divide_in_features():
    with pytest.raises(QuantError, match=r"blocks\.0\.q_proj: in_features 96 .*group_size 64"):
        FakeQuantLinear(torch.nn.Linear(96, 8), QuantConfig(group_size=64),
                        name="blocks.0.q_proj")


# ----- which modules ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["qwen2_vl", "llava_qwen2"])
def test_only_decoder_linears_are_wrapped(kind, tiny_vlm_dir):
    loaded = load_vlm(tiny_vlm_dir(kind))
    model, family = loaded.model, loaded.family
    before = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    names = quantize_model(model, QuantConfig(group_size=32))
    layers = family.decoder_layers(model)
    assert len(names) == len(layers) * len(QUANT_MODULES)
    assert names == list(qat_modules(model))
    decoder_prefix = family.text_model_path + ".layers."
    assert all(n.startswith(decoder_prefix) and n.rsplit(".", 1)[-1] in QUANT_MODULES
               for n in names)
    # the vision tower (CLIP has q_proj/k_proj/v_proj too), projector and lm_head stay plain
    untouched = [n for n in before if n not in names]
    assert untouched and all(type(model.get_submodule(n)) is torch.nn.Linear for n in untouched)
    assert any(n.endswith("q_proj") for n in untouched) == (kind == "llava_qwen2")
    assert type(family.lm_head(model)) is torch.nn.Linear
    assert not any(isinstance(m, FakeQuantLinear) for m in family.vision_encoder(model).modules())
    assert not any(isinstance(m, FakeQuantLinear) for m in family.projector(model).modules())
    # the wrappers keep the linears' own parameters
    for name in names:
        assert model.get_submodule(name).weight is before[name].weight
    with pytest.raises(QuantError, match="already"):
        quantize_model(model, QuantConfig(group_size=32))


def test_quantize_a_subset_and_refuse_a_bad_group(tiny_vlm_dir):
    model = load_vlm(tiny_vlm_dir("llava_qwen2")).model
    with pytest.raises(QuantError, match=r"group_size 48 .*layers\.0\.self_attn\.q_proj"):
        quantize_model(model, QuantConfig(group_size=48))
    assert not qat_modules(model)  # nothing replaced when one module fails
    names = quantize_model(model, QuantConfig(group_size=32, modules=["q_proj", "down_proj"]))
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "down_proj"}
    assert type(model.get_submodule(names[0].replace("q_proj", "k_proj"))) is torch.nn.Linear


# ----- optimizer ---------------------------------------------------------------------------------
def test_param_groups_put_scales_apart():
    model = torch.nn.Sequential()
    model.add_module("a", _module())
    model.add_module("b", torch.nn.Linear(4, 4))
    params = list(model.named_parameters())
    groups = param_groups(model, params, weight_decay=0.1, scale_lr_mult=10.0)
    scales = [p for _, p in scale_parameters(model)]
    assert [n for n, _ in scale_parameters(model)] == ["a.log_scale"]
    weights, qat = groups
    assert qat["params"] == scales and qat["weight_decay"] == 0.0 and qat["lr_mult"] == 10.0
    assert weights["weight_decay"] == 0.1 and weights["lr_mult"] == 1.0
    assert len(weights["params"]) == len(params) - 1
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    set_lr(optimizer, 2e-4)
    assert [g["lr"] for g in optimizer.param_groups] == [2e-4, pytest.approx(2e-3)]
    only_weights = param_groups(model, [p for p in params if p[0] != "a.log_scale"],
                                weight_decay=0.0, scale_lr_mult=10.0)
    assert len(only_weights) == 1


# ----- files -------------------------------------------------------------------------------------
def _trained_qat_student(tiny_vlm_dir, bits=4):
    loaded = load_vlm(tiny_vlm_dir("qwen2_vl"))
    quantize_model(loaded.model, QuantConfig(bits=bits, group_size=32))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a training step's worth of change in weights and scales
        for module in qat_modules(loaded.model).values():
            module.weight.add_(torch.randn(module.weight.shape, generator=gen) * 1e-3)
            module.log_scale.add_(torch.randn(module.log_scale.shape, generator=gen) * 0.05)
    return loaded


def test_save_load_round_trip_is_bitwise(tiny_vlm_dir, tmp_path):
    loaded = _trained_qat_student(tiny_vlm_dir)
    model = loaded.model
    out = save_qat(model, tmp_path / "qat", processor=loaded.processor)
    assert qat_modules(model)  # the wrappers are back after saving

    record = json.loads((out / QAT_CONFIG).read_text())
    assert record["config"]["bits"] == 4 and record["config"]["group_size"] == 32
    assert record["wrapped"] == list(qat_modules(model))
    cfg, wrapped = read_qat_config(out)
    assert cfg.scale_dtype == "bfloat16" and wrapped == record["wrapped"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert not any("log_scale" in k for k in keys)
        assert all(f.get_slice(k).get_dtype() == "F32" for k in keys)  # float32 masters
    with safe_open(str(out / QAT_SCALES), "pt") as f:
        assert set(f.keys()) == {f"{n}.log_scale" for n in wrapped}

    back = load_qat_student(out).model
    for (name, a), (name_b, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert name == name_b and torch.equal(a, b), name
    for name, module in qat_modules(model).items():
        other = qat_modules(back)[name]
        assert torch.equal(dequantized_weight(module), dequantized_weight(other))
        assert all(torch.equal(a, b) for a, b in zip(codes_and_scales(module),
                                                      codes_and_scales(other)))
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, back(input_ids=ids).logits)
    # the directory is also a normal student checkpoint (the master weights)
    plain = load_vlm(out).model
    with unwrapped(model):
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                     plain.state_dict().values()))


def test_damaged_qat_directories_are_refused(tiny_vlm_dir, tmp_path):
    loaded = _trained_qat_student(tiny_vlm_dir)
    out = save_qat(loaded.model, tmp_path / "qat", processor=loaded.processor)
    record = json.loads((out / QAT_CONFIG).read_text())

    (out / QAT_CONFIG).write_text(json.dumps({**record, "wrapped": record["wrapped"][1:]}))
    with pytest.raises(QuantError, match="other quantised modules"):
        load_qat_student(out)
    (out / QAT_CONFIG).write_text(json.dumps({**record, "config": {**record["config"],
                                                                   "bits": 3}}))
    with pytest.raises(QuantError, match="bad quantisation config"):
        read_qat_config(out)
    (out / QAT_CONFIG).write_text(json.dumps({**record, "config": {**record["config"],
                                                                   "group_size": 64}}))
    with pytest.raises(QuantError, match="shape"):
        load_qat_student(out)
    (out / QAT_CONFIG).write_text("{not json")
    with pytest.raises(QuantError, match="unreadable"):
        read_qat_config(out)
    (out / QAT_CONFIG).write_text(json.dumps(record))
    (out / QAT_SCALES).write_bytes(b"garbage")
    with pytest.raises(QuantError, match="cannot read"):
        load_qat_student(out)
    (out / QAT_CONFIG).unlink()
    with pytest.raises(QuantError, match="not a QAT student"):
        read_qat_config(out)


def test_save_qat_needs_a_quantised_model_and_a_matching_config(tiny_vlm_dir, tmp_path):
    model = load_vlm(tiny_vlm_dir("qwen2_vl")).model
    with pytest.raises(QuantError, match="no fake-quantised module"):
        save_qat(model, tmp_path / "x")
    cfg = QuantConfig(group_size=32, scale_lr_mult=3.0)
    quantize_model(model, cfg)
    with pytest.raises(QuantError, match="does not match the wrapped modules"):
        save_qat(model, tmp_path / "x", cfg=QuantConfig(group_size=64))
    save_qat(model, tmp_path / "x", cfg=cfg)
    assert read_qat_config(tmp_path / "x")[0] == cfg  # the stage's config, scale_lr_mult kept
