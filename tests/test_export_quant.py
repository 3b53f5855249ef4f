"""Export of a QAT student (genrecal.train.export.export_checkpoint, docs/method.md §4):
compressed-tensors pack-quantized int4 / int8 that transformers loads, bf16, refusal of
tampered exports, and the `genrecal export` command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from genrecal import cli
from genrecal.common.config import QuantConfig
from genrecal.model.encoding import encode_sample
from genrecal.model.generate import generate_answers
from genrecal.model.loading import load_vlm
from genrecal.train.export import ExportError, check_export, export_checkpoint
from genrecal.train.quant import (codes_and_scales, dequantized_weight, load_qat_student,
                                  qat_modules, quantize_model, save_qat)

GROUP = 32  # divides the tiny qwen2_vl decoder widths (256, 512)


def _qat_dir(source: Path, out: Path, bits: int) -> Path:
    loaded = load_vlm(source)
    quantize_model(loaded.model, QuantConfig(bits=bits, group_size=GROUP))
    gen = torch.Generator().manual_seed(bits)
    with torch.no_grad():  # as after training: weights and scales moved off their init
        for module in qat_modules(loaded.model).values():
            module.weight.add_(torch.randn(module.weight.shape, generator=gen) * 1e-3)
            module.log_scale.add_(torch.randn(module.log_scale.shape, generator=gen) * 0.05)
    return save_qat(loaded.model, out, processor=loaded.processor)


@pytest.fixture(scope="module")
def dirs(tiny_vlm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("export_quant")
    base = tiny_vlm_dir("qwen2_vl")
    qat4, qat8 = _qat_dir(base, root / "qat4", 4), _qat_dir(base, root / "qat8", 8)
    return {"root": root, "base": base, "qat4": qat4, "qat8": qat8,
            "int4": export_checkpoint(qat4, root / "int4", "int4").path,
            "int4_f32": export_checkpoint(qat4, root / "int4_f32", "int4", dtype="float32").path,
            "int8": export_checkpoint(qat8, root / "int8", "int8").path,
            "bf16": export_checkpoint(qat4, root / "bf16", "bf16").path}


def _qat(path: Path, *, round_unquantised_to_bf16: bool):
    """The QAT student; optionally with every tensor the export stores in bfloat16 (all but the
    quantised weights) rounded to bfloat16, as the bf16-dtype export holds them."""
    loaded = load_qat_student(path)
    if round_unquantised_to_bf16:
        keep = {id(p) for m in qat_modules(loaded.model).values() for p in (m.weight, m.log_scale)}
        with torch.no_grad():
            for p in loaded.model.parameters():
                if id(p) not in keep:
                    p.copy_(p.bfloat16().float())
    return loaded


def _file_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def _file_key(tensors: dict, module: str, leaf: str) -> str:
    """The file key of ``module.leaf`` (transformers saves qwen2_vl under legacy key names:
    match on the part after the text-model prefix)."""
    tail = module.split("language_model.", 1)[-1] + "." + leaf
    found = [k for k in tensors if k.endswith(tail)]
    assert len(found) == 1, (tail, found)
    return found[0]


@pytest.fixture
def sample(make_sample):
    return make_sample(("user", (0, "What colour is the circle?")), ("assistant", ("red",)))


# ----- the packed tensors ----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_packed_codes_and_scales_are_the_qat_ones(dirs, fmt):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    bits = int(fmt[3:])
    qat = load_qat_student(dirs[f"qat{bits}"]).model
    tensors = _file_tensors(dirs[fmt])
    config = json.loads((dirs[fmt] / "config.json").read_text())
    qc = config["quantization_config"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert weights == {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group",
                       "group_size": GROUP, "dynamic": False}
    assert config["dtype"] == "bfloat16"
    modules = qat_modules(qat)
    assert "lm_head" in qc["ignore"] and not set(modules) & set(qc["ignore"])
    assert not any(k.endswith(".weight_zero_point") for k in tensors)
    for name, module in modules.items():
        codes, scales = codes_and_scales(module)
        packed = tensors[_file_key(tensors, name, "weight_packed")]
        shape = tensors[_file_key(tensors, name, "weight_shape")]
        scale = tensors[_file_key(tensors, name, "weight_scale")]
        assert packed.dtype == torch.int32
        assert packed.shape == (module.out_features, module.in_features * bits // 32)
        assert shape.tolist() == [module.out_features, module.in_features]
        assert torch.equal(unpack_from_int32(packed, bits, shape), codes)
        assert scale.dtype == torch.bfloat16 and torch.equal(scale, scales)
        assert not any(k.endswith(name.split("language_model.")[-1] + ".weight") for k in tensors)
    assert check_export(dirs[fmt])["modules"] == list(modules)


def test_packing_equals_compressed_tensors_own_compress(dirs):
    """Given s * q exactly (float32 here), the library's compress() recomputes the same codes,
    so the export is the format's own encoding of the QAT weights."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    qat = load_qat_student(dirs["qat4"]).model
    tensors = _file_tensors(dirs["int4"])
    config = json.loads((dirs["int4"] / "config.json").read_text())
    scheme = QuantizationScheme.model_validate(
        config["quantization_config"]["config_groups"]["group_0"])
    for name, module in qat_modules(qat).items():
        _, scales = codes_and_scales(module)
        state = {"weight": dequantized_weight(module), "weight_scale": scales.float()}
        packed = PackedQuantizationCompressor.compress(state, scheme)["weight_packed"]
        assert torch.equal(packed, tensors[_file_key(tensors, name, "weight_packed")])


def test_a_wrong_packing_is_caught_before_publishing(dirs, tmp_path, monkeypatch):
    from compressed_tensors.compressors.pack_quantized import helpers

    real = helpers.pack_to_int32

    def off_by_one(codes, bits, *args, **kwargs):
        codes = codes.clone()
        codes[0, 0] = 0 if codes[0, 0] != 0 else 1
        return real(codes, bits, *args, **kwargs)

    monkeypatch.setattr(helpers, "pack_to_int32", off_by_one)
    with pytest.raises(ExportError, match="packed codes differ from the QAT codes"):
        export_checkpoint(dirs["qat4"], tmp_path / "bad", "int4")
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".tmp-*"))


def test_int4_packing_layout(dirs):
    """Column i at bits [4i, 4i+4) of its word, stored as q + 8 (lowest nibble = column 0)."""
    qat = load_qat_student(dirs["qat4"]).model
    name, module = next(iter(qat_modules(qat).items()))
    codes, _ = codes_and_scales(module)
    tensors = _file_tensors(dirs["int4"])
    word = int(tensors[_file_key(tensors, name, "weight_packed")][0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [int(c) + 8 for c in codes[0, :8]]


# ----- transformers loads it -------------------------------------------------------------------
@pytest.mark.parametrize("fmt, dtype_rounded", [("int4", True), ("int4_f32", False),
                                                ("int8", True)])
def test_transformers_loads_the_export_with_the_qat_logits(dirs, sample, fmt, dtype_rounded):
    """Loaded in float32, compressed-tensors dequantises q * s in float32, which is exactly
    the fake quantiser's s * q: logits are bit-identical to the QAT model's (whose other tensors
    are rounded to bfloat16 when the export stores them in bfloat16)."""
    from transformers import AutoModelForImageTextToText

    bits = 8 if fmt == "int8" else 4
    qat = _qat(dirs[f"qat{bits}"], round_unquantised_to_bf16=dtype_rounded)
    model = AutoModelForImageTextToText.from_pretrained(dirs[fmt], dtype=torch.float32).eval()
    assert getattr(model.config, "quantization_config", None) is not None
    inputs = encode_sample(qat, sample).inputs
    assert "pixel_values" in inputs
    with torch.no_grad():
        expected = qat.model(**inputs).logits
        got = model(**inputs).logits
    assert torch.equal(got, expected)
    for name, module in qat_modules(qat.model).items():  # decompressed on the first forward
        assert torch.equal(model.get_submodule(name).weight, dequantized_weight(module))


def test_greedy_answers_are_the_qat_answers(dirs, make_sample):
    qat = _qat(dirs["qat4"], round_unquantised_to_bf16=True)
    export = load_vlm(dirs["int4"], dtype="float32")
    samples = [make_sample(("user", (0, "What colour is the circle?")), ("assistant", ("red",))),
               make_sample(("user", ("How many squares?",)), ("assistant", ("2",)), images=())]
    options = dict(max_new_tokens=8, batch_size=2, progress=False)
    want = generate_answers(qat, samples, **options)
    got = generate_answers(export, samples, **options)
    assert got == want and any(g.text for g in got)


def test_int4_loaded_in_bf16_equals_the_bf16_export(dirs, sample):
    """Loaded in bfloat16 the int4 export rounds q * s to bfloat16, exactly as the bf16 export
    stores it."""
    int4 = load_vlm(dirs["int4"], dtype="bfloat16")
    bf16 = load_vlm(dirs["bf16"], dtype="bfloat16")
    inputs = encode_sample(bf16, sample).inputs
    with torch.no_grad():
        a = int4.model(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v
                          for k, v in inputs.items()}).logits
        b = bf16.model(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v
                          for k, v in inputs.items()}).logits
    assert torch.equal(a, b)


# ----- bf16 --------------------------------------------------------------------------------------
def test_bf16_export_holds_the_dequantised_weights(dirs, tmp_path):
    qat = load_qat_student(dirs["qat4"]).model
    exported = load_vlm(dirs["bf16"], dtype="auto").model
    assert exported.dtype == torch.bfloat16
    assert not (dirs["bf16"] / "quantization.json").exists()
    assert "quantization_config" not in json.loads((dirs["bf16"] / "config.json").read_text())
    rounded = 0
    for name, module in qat_modules(qat).items():
        w = dequantized_weight(module)
        assert torch.equal(exported.get_submodule(name).weight, w.to(torch.bfloat16))
        rounded += int((w.to(torch.bfloat16).float() != w).sum())
    assert rounded > 0  # s * q (8 + 3 significant bits) is not always exact in bfloat16
    report = export_checkpoint(dirs["qat4"], tmp_path / "again", "bf16")
    assert report.inexact == rounded and report.quantized == len(qat_modules(qat))
    plain = export_checkpoint(dirs["base"], tmp_path / "plain")  # a plain student: bf16
    assert plain.format == "bf16"
    assert load_vlm(plain.path, dtype="auto").model.dtype == torch.bfloat16


# ----- refusals ----------------------------------------------------------------------------------
def _copy(dirs, tmp_path, fmt="int4") -> Path:
    return Path(shutil.copytree(dirs[fmt], tmp_path / f"tampered-{fmt}"))


def _edit_config(directory: Path, edit) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _edit_tensor(directory: Path, suffix: str, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in sorted(tensors) if k.endswith(suffix))
    tensors[key] = edit(tensors[key])
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_untampered_export_passes(dirs):
    summary = check_export(dirs["int8"])
    assert summary["bits"] == 8 and summary["group_size"] == GROUP and len(summary["modules"]) == 14


@pytest.mark.parametrize("tamper, message", [
    (lambda d: _edit_config(d, lambda c: c.pop("quantization_config")), "no quantization_config"),
    (lambda d: _edit_config(d, lambda c: c["quantization_config"]["config_groups"]["group_0"]
                            ["weights"].update(group_size=64)),
     r"weight_scale is BF16 \[\d+, \d+\]"),
    (lambda d: _edit_config(d, lambda c: c["quantization_config"]["config_groups"]["group_0"]
                            ["weights"].update(num_bits=8)), r"weight_packed is I32"),
    (lambda d: _edit_config(d, lambda c: c["quantization_config"]["ignore"].remove("lm_head")),
     "lm_head: missing weight_packed"),
    (lambda d: _edit_config(d, lambda c: c["quantization_config"].update(format="int-quantized")),
     "expected compressed-tensors / pack-quantized"),
    (lambda d: _edit_config(d, lambda c: c["quantization_config"]["config_groups"]["group_0"]
                            ["weights"].update(symmetric=False)), "symmetric int4/int8"),
    (lambda d: _edit_tensor(d, "q_proj.weight_packed", lambda t: t[:, :-1].contiguous()),
     r"q_proj\.weight_packed is I32 \[256, 31\], expected I32 \[256, 32\]"),
    (lambda d: _edit_tensor(d, "q_proj.weight_packed", lambda t: t.to(torch.int64)),
     r"weight_packed is I64"),
    (lambda d: _edit_tensor(d, "k_proj.weight_shape", lambda t: torch.tensor([128, 224])),
     r"k_proj\.weight_shape is \[128, 224\], the linear is \[128, 256\]"),
    (lambda d: _edit_tensor(d, "v_proj.weight_scale", lambda t: -t), "non-positive"),
])
def test_tampered_export_is_refused(dirs, tmp_path, tamper, message):
    directory = _copy(dirs, tmp_path)
    tamper(directory)
    with pytest.raises(ExportError, match=message):
        check_export(directory)


def test_packed_tensors_of_an_ignored_module_are_refused(dirs, tmp_path):
    directory = _copy(dirs, tmp_path)
    _edit_config(directory, lambda c: c["quantization_config"]["ignore"].append(
        "model.language_model.layers.1.mlp.up_proj"))
    with pytest.raises(ExportError, match="layers.1.mlp.up_proj holds packed tensors"):
        check_export(directory)


def test_bad_export_requests_are_refused(dirs, tmp_path):
    with pytest.raises(ExportError, match="not a QAT student"):
        export_checkpoint(dirs["base"], tmp_path / "x", "int4")
    with pytest.raises(ExportError, match="4-bit QAT; export it as int4"):
        export_checkpoint(dirs["qat4"], tmp_path / "x", "int8")
    with pytest.raises(ExportError, match="unknown export format 'fp8'"):
        export_checkpoint(dirs["qat4"], tmp_path / "x", "fp8")
    for out in (dirs["qat4"], dirs["qat4"] / "out", dirs["qat4"].parent):
        with pytest.raises(ExportError, match="contains the source checkpoint"):
            export_checkpoint(dirs["qat4"], out, "int4")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not a model directory"):
        export_checkpoint(dirs["qat4"], tmp_path / "notes", "int4")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="neither a saved student"):
        export_checkpoint(tmp_path, tmp_path / "x", "int4")
    assert not (tmp_path / "x").exists()


def test_scales_must_be_exact_in_the_export_dtype(dirs, tmp_path):
    loaded = load_vlm(dirs["base"])
    quantize_model(loaded.model, QuantConfig(group_size=GROUP, scale_dtype="float32"))
    qat = save_qat(loaded.model, tmp_path / "qat32", processor=loaded.processor)
    with pytest.raises(ExportError, match="not exact in bfloat16; export with --dtype float32"):
        export_checkpoint(qat, tmp_path / "x", "int4", dtype="bfloat16")
    report = export_checkpoint(qat, tmp_path / "y")  # default: the scale dtype, verified
    assert (report.format, report.dtype) == ("int4", "float32")


# ----- command line ------------------------------------------------------------------------------
def test_cli_export(dirs, tmp_path):
    runner = CliRunner()
    stage = tmp_path / "stage"
    shutil.copytree(dirs["qat4"], stage / "student")
    result = runner.invoke(cli.app, ["export", str(stage), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "int4 export (bfloat16, 14 packed linears)" in result.output
    assert check_export(tmp_path / "out")["bits"] == 4
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert any(k.endswith("weight_packed") for k in f.keys())

    result = runner.invoke(cli.app, ["export", str(dirs["qat4"]), "--out", str(tmp_path / "b"),
                                     "--format", "bf16"])
    assert result.exit_code == 0, result.output and "bf16 export" in result.output

    result = runner.invoke(cli.app, ["export", str(dirs["qat4"]), "--out", str(tmp_path / "c"),
                                     "--format", "int3"])
    assert result.exit_code == cli.EXIT_USER_ERROR
    assert result.stderr.startswith("genrecal: error: unknown export format 'int3'")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output

    result = runner.invoke(cli.app, ["export", str(dirs["base"]), "--out", str(tmp_path / "d"),
                                     "--format", "int4"])
    assert result.exit_code == cli.EXIT_USER_ERROR and "not a QAT student" in result.stderr
