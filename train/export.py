"""Stage outputs: the student as a plain transformers checkpoint, the Recalibrator apart.

``export_student`` writes ``model.save_pretrained`` plus the processor files into one directory
that ``AutoModelForImageTextToText.from_pretrained`` / ``load_vlm`` load directly; the
Recalibrator (a training-only module, docs/method.md §1) never enters it and is saved with
:meth:`Recalibrator.save` next to it. Both are written into a temporary directory and renamed
into place, so a killed export never leaves a half-written model behind.

The processor is written by :func:`genrecal.model.saving.save_processor`, in the form
``load_vlm`` reassembles (video-slot processors as their parts, without torchvision).

``stage_done.json`` marks a finished stage and tells the next stage where the student (and
the Recalibrator) to continue from.

:func:`export_checkpoint` (``genrecal export``) turns a saved student -- a QAT student written by
:func:`genrecal.train.quant.save_qat`, or a plain one -- into a deployable checkpoint: ``bf16``,
or ``int4`` / ``int8`` in compressed-tensors' ``pack-quantized`` format (docs/method.md §4),
packed from the QAT codes and scales and verified bit for bit; :func:`check_export` refuses an
int4/int8 directory whose tensors do not match its ``quantization_config``.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from genrecal.common.atomic import replace_dir, write_json_atomic
from genrecal.model.families import Family, get_family
from genrecal.model.saving import save_processor
from genrecal.store.errors import ModelLoadError
from genrecal.train.errors import StageSetupError, TrainError
from genrecal.train.recalibrator import Recalibrator

DONE = "stage_done.json"
STUDENT_DIR = "student"
RECALIBRATOR_DIR = "recalibrator"


def _fresh_tmp(final: Path) -> Path:
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def export_student(model: torch.nn.Module, processor: Any, family: Family, directory: str | Path,
                   dtype: torch.dtype | None = None) -> Path:
    """Save the student (weights in ``dtype``, default: as is) and its processor atomically.

    The model is cast in place; call this at the end of training.
    """
    final = Path(directory)
    tmp = _fresh_tmp(final)
    if dtype is not None:
        model.to(dtype=dtype)
    model.save_pretrained(tmp)
    save_processor(processor, family, tmp)
    replace_dir(tmp, final)
    return final


def export_recalibrator(recalibrator: Recalibrator, directory: str | Path) -> Path:
    """Recalibrator.save into ``directory`` atomically."""
    final = Path(directory)
    recalibrator.save(_fresh_tmp(final))
    replace_dir(final.with_name(f".tmp-{final.name}"), final)
    return final


def write_done(stage_dir: str | Path, record: dict[str, Any]) -> Path:
    """Mark a stage finished; ``record`` holds at least ``student`` (a model directory) and
    ``recalibrator`` (a directory or None)."""
    path = Path(stage_dir) / DONE
    return write_json_atomic(path, record, indent=1, sort_keys=True)


def read_done(stage_dir: str | Path) -> dict[str, Any] | None:
    """The record of a finished stage, or None if it has not finished."""
    path = Path(stage_dir) / DONE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise StageSetupError(f"{path} is damaged ({exc}); delete it and re-run the "
                              "stage.") from exc
    if not isinstance(record, dict) or "student" not in record:
        raise StageSetupError(f"{path} lacks the 'student' entry; delete it and re-run the stage.")
    return record


# ----- export of a saved student: bf16 / compressed-tensors int4 / int8 (docs/method.md §4) ------
#
# ``export_checkpoint(source, out, fmt)`` reads a student directory -- a QAT student written by
# genrecal.train.quant.save_qat (master weights + quantization.safetensors/.json), or a plain
# one for bf16 -- and writes a deployable checkpoint:
#
# * ``int4`` / ``int8``: a compressed-tensors ``pack-quantized`` checkpoint (W4A16 / W8A16:
#   weight-only, symmetric int, group strategy with the QAT group size, no zero-point) that
#   ``AutoModelForImageTextToText.from_pretrained`` loads through compressed-tensors. Per
#   quantised linear: ``weight_packed`` (int32, packed by compressed-tensors' ``pack_to_int32``
#   from the QAT's integer codes -- codes are never recomputed from weights), ``weight_scale``
#   (the QAT scales, exactly) and ``weight_shape``. ``config.json`` carries the
#   ``quantization_config`` (written by compressed-tensors' ``ModelCompressor.update_config``):
#   one group, targets ``["Linear"]``, every other linear (vision tower, projector, lm_head,
#   decoder linears left out of quantize.modules) listed by name in ``ignore``. Everything else
#   is stored in ``dtype`` (default: the QAT scale_dtype, bfloat16 by default, so the scales are
#   stored exactly in the weight dtype, as the format wants). After writing, the export is read
#   back, checked (:func:`check_export`) and dequantised with compressed-tensors'
#   ``PackedQuantizationCompressor.decompress`` in the QAT weight dtype: it must equal
#   ``dequantized_weight`` of the QAT model bit for bit, or nothing is published.
# * ``bf16``: a plain ``save_pretrained`` directory in bfloat16; a QAT student's quantised linears
#   hold ``s * q`` rounded to bfloat16 (``s * q`` has up to 8 + 3 (int4) / 8 + 7 (int8)
#   significant bits, bfloat16 keeps 8, so some values round; ``ExportReport.inexact`` counts
#   them). The same rounding happens when an int4/int8 export is loaded in bfloat16.
#
# The processor (chat template included) is saved with save_processor in every format.

EXPORT_FORMATS = ("bf16", "int4", "int8")
_FMT_BITS = {"int4": 4, "int8": 8}
_EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PACKED = ("weight_packed", "weight_scale", "weight_shape")


class ExportError(TrainError):
    """A checkpoint cannot be exported, or an exported directory does not match its config."""


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_checkpoint` wrote."""

    path: Path
    format: str
    dtype: str          # dtype of the unquantised tensors (and of the int4/int8 scales)
    quantized: int      # linears written packed (int4/int8) or dequantised (bf16 of a QAT student)
    inexact: int = 0    # bf16 of a QAT student: elements of s * q that bfloat16 rounds

    def summary(self) -> str:
        what = (f"{self.quantized} packed linears" if self.format != "bf16"
                else f"{self.quantized} dequantised linears ({self.inexact} values rounded to "
                     "bfloat16)" if self.quantized else "no quantised linear")
        return f"{self.format} export ({self.dtype}, {what}) -> {self.path}"


def resolve_student_dir(path: str | Path) -> Path:
    """``path`` if it holds config.json, else its ``student/`` (a stage output directory)."""
    path = Path(path).expanduser()
    if (path / "config.json").is_file():
        return path
    if (path / STUDENT_DIR / "config.json").is_file():
        return path / STUDENT_DIR
    raise ExportError(f"{path} is neither a saved student (no config.json) nor a stage output "
                      f"holding {STUDENT_DIR}/; pass the directory written by training")


def _fmt_for(source: Path, fmt: str | None) -> str:
    from genrecal.train.quant import is_qat_dir, read_qat_config

    qat = is_qat_dir(source)
    if fmt is None:
        return f"int{read_qat_config(source)[0].bits}" if qat else "bf16"
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "bf16":
        return fmt
    if not qat:
        raise ExportError(f"{source} is not a QAT student (no quantization.json): an {fmt} export "
                          "needs the scales and codes quantisation-aware training learned; train "
                          "with `quantize:` set, or export --format bf16")
    bits = read_qat_config(source)[0].bits
    if _FMT_BITS[fmt] != bits:
        raise ExportError(f"{source} was trained with {bits}-bit QAT; export it as int{bits} (or "
                          f"bf16), not {fmt}")
    return fmt


def export_checkpoint(source_dir: str | Path, out_dir: str | Path, fmt: str | None = None, *,
                      dtype: str | None = None) -> ExportReport:
    """Export the student in ``source_dir`` (or ``source_dir/student``) to ``out_dir`` as
    ``fmt`` (``bf16``, ``int4``, ``int8``; default: ``int<bits>`` for a QAT student, else bf16).

    ``dtype`` (int4/int8 only): dtype of the unquantised tensors and of the stored scales;
    default the QAT ``scale_dtype``; the scales must be exact in it. The directory is written
    beside ``out_dir``, verified, then renamed into place (see the comment above).
    """
    source = resolve_student_dir(source_dir)
    final = Path(out_dir).expanduser()
    src, dst = source.resolve(), final.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise ExportError(f"--out {final} is, is inside or contains the source checkpoint "
                          f"{source}; export into another directory")
    if final.exists() and not (final / "config.json").is_file() and (
            not final.is_dir() or any(final.iterdir())):
        raise ExportError(f"--out {final} exists and is not a model directory; it would be "
                          "replaced: choose a new directory or delete it first")
    fmt = _fmt_for(source, fmt)
    if fmt != "bf16" and dtype is not None and dtype not in _EXPORT_DTYPES:
        raise ExportError(f"unknown export dtype {dtype!r}; use one of {sorted(_EXPORT_DTYPES)}")
    if fmt == "bf16" and dtype not in (None, "bfloat16"):
        raise ExportError("--format bf16 writes bfloat16; use int4/int8 for another dtype")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_tmp(final)
    try:
        report = (_export_bf16(source, tmp) if fmt == "bf16"
                  else _export_packed(source, tmp, fmt, dtype))
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return replace(report, path=final)


def _export_bf16(source: Path, tmp: Path) -> ExportReport:
    from genrecal.model.loading import load_vlm
    from genrecal.train.quant import (dequantized_weight, is_qat_dir, load_qat_student,
                                      qat_modules, unwrapped)

    if not is_qat_dir(source):
        loaded = load_vlm(source, dtype="auto")
        loaded.model.to(dtype=torch.bfloat16).save_pretrained(tmp)
        save_processor(loaded.processor, loaded.family, tmp)
        return ExportReport(tmp, "bf16", "bfloat16", 0)
    loaded = load_qat_student(source, dtype="auto")
    modules = qat_modules(loaded.model)
    inexact = 0
    for module in modules.values():
        w = dequantized_weight(module)
        inexact += int((w.to(torch.bfloat16).to(w.dtype) != w).sum())
    with unwrapped(loaded.model, dequantize=True) as model:
        model.to(dtype=torch.bfloat16).save_pretrained(tmp)
    save_processor(loaded.processor, loaded.family, tmp)
    return ExportReport(tmp, "bf16", "bfloat16", len(modules), inexact)


class _PackedLinear(torch.nn.Module):
    """A linear's compressed-tensors ``pack-quantized`` tensors, for ``save_pretrained``."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, shape: torch.Tensor,
                 bias: torch.Tensor | None):
        super().__init__()
        self.weight_packed = torch.nn.Parameter(packed, requires_grad=False)
        self.weight_scale = torch.nn.Parameter(scale, requires_grad=False)
        self.weight_shape = torch.nn.Parameter(shape, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(),
                                                                 requires_grad=False)


def _quantization_config(model: torch.nn.Module, wrapped: list[str], bits: int, group_size: int):
    """compressed-tensors QuantizationConfig: W<bits>A16, symmetric int, group, pack-quantized,
    targets Linear, every linear that is not in ``wrapped`` ignored by name."""
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig,
                                                 QuantizationScheme, QuantizationStatus)

    quantized = set(wrapped)
    ignore = [n for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n not in quantized]
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group",
                               group_size=group_size, dynamic=False)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, format="pack-quantized")
    return QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                              quantization_status=QuantizationStatus.COMPRESSED, ignore=ignore)


def _export_packed(source: Path, tmp: Path, fmt: str, dtype: str | None) -> ExportReport:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from genrecal.train.quant import (QuantError, codes_and_scales, load_qat_student,
                                      qat_modules, read_qat_config)

    cfg, _ = read_qat_config(source)
    dtype = dtype or cfg.scale_dtype
    torch_dtype = _EXPORT_DTYPES[dtype]
    loaded = load_qat_student(source, dtype="auto")
    model, modules = loaded.model, qat_modules(loaded.model)
    wrapped = list(modules)
    for name, module in modules.items():
        try:
            codes, scales = codes_and_scales(module)
        except QuantError as exc:
            raise ExportError(f"{source}: {name}: {exc}") from exc
        stored = scales.to(torch_dtype)
        if not torch.equal(stored.to(scales.dtype), scales):
            raise ExportError(f"{source}: the {cfg.scale_dtype} scales of {name} are not exact in "
                              f"{dtype}; export with --dtype {cfg.scale_dtype}")
        shape = torch.tensor([module.out_features, module.in_features], dtype=torch.int64)
        packed = _PackedLinear(pack_to_int32(codes, cfg.bits), stored, shape,
                               None if module.bias is None else module.bias.to(torch_dtype))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, packed)
    qconfig = _quantization_config(model, wrapped, cfg.bits, cfg.group_size)
    model.to(dtype=torch_dtype)
    model.save_pretrained(tmp)
    ModelCompressor(quantization_config=qconfig).update_config(str(tmp))
    save_processor(loaded.processor, loaded.family, tmp)
    _verify_packed(tmp, modules)  # the wrappers, swapped out above, still hold the QAT state
    return ExportReport(tmp, fmt, dtype, len(wrapped))


# ----- reading an export back --------------------------------------------------------------------
def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ExportError(f"{index} is damaged ({exc}); export again") from exc
        return [directory / n for n in names]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise ExportError(f"{directory} has no model.safetensors(.index.json); export again")


def _tensor_meta(directory: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, Path]]:
    """Per file key: (safetensors dtype, shape), and the file holding it."""
    from safetensors import SafetensorError, safe_open

    meta, where = {}, {}
    for path in _weight_files(directory):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    meta[key], where[key] = (sl.get_dtype(), tuple(sl.get_shape())), path
        except (OSError, SafetensorError) as exc:
            raise ExportError(f"cannot read {path} ({exc}); export again") from exc
    return meta, where


def _read_tensors(where: dict[str, Path], keys: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for key in keys:
        by_file.setdefault(where[key], []).append(key)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            out.update({n: f.get_tensor(n) for n in names})
    return out


def _key_to_module_name(model: torch.nn.Module):
    """File key -> model parameter name, as transformers renames checkpoint keys on loading
    (transformers 5 saves some families under their legacy key names)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (WeightConverter, WeightRenaming,
                                                     rename_source_key)
    except ImportError:  # pragma: no cover - other transformers layout: keys as they are
        return lambda key: key
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    state = dict.fromkeys(n for n, _ in model.named_parameters(remove_duplicate=False))
    prefix = getattr(model, "base_model_prefix", None)

    def rename(key: str) -> str:
        return rename_source_key(key, renamings, converters, base_model_prefix=prefix,
                                 meta_state_dict=state)[0]
    return rename


def _load_qconfig(directory: Path):
    from compressed_tensors.quantization import QuantizationConfig

    path = directory / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {path} ({exc}); export again") from exc
    raw = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(raw, dict):
        raise ExportError(f"{path} has no quantization_config: {directory} is not a quantised "
                          "(compressed-tensors) export; export with --format int4/int8")
    if raw.get("quant_method") != "compressed-tensors" or raw.get("format") != "pack-quantized":
        raise ExportError(f"{path}: quantization_config is {raw.get('quant_method')!r} / "
                          f"{raw.get('format')!r}, expected compressed-tensors / pack-quantized")
    fields = set(QuantizationConfig.model_fields)
    try:
        qconfig = QuantizationConfig.model_validate({k: v for k, v in raw.items() if k in fields})
    except ValueError as exc:
        raise ExportError(f"{path}: invalid quantization_config: {exc}") from exc
    groups = list(qconfig.config_groups.values())
    w = groups[0].weights if len(groups) == 1 else None
    if (w is None or w.type != "int" or not w.symmetric or w.strategy != "group"
            or w.num_bits not in (4, 8) or not w.group_size or w.dynamic
            or groups[0].input_activations is not None or groups[0].output_activations is not None
            or groups[0].format not in (None, "pack-quantized")):
        raise ExportError(f"{path}: quantization_config must hold one weight-only symmetric int4/"
                          f"int8 group scheme (W4A16 / W8A16) as genrecal writes it; found "
                          f"{[g.model_dump(exclude_none=True) for g in groups]}")
    return qconfig, groups[0]


@dataclass(frozen=True)
class _Export:
    """An int4/int8 export read back: its config, the linears it quantises, its tensors."""

    scheme: Any                              # the compressed-tensors QuantizationScheme
    quantized: dict[str, torch.nn.Module]    # name -> linear (meta) the config quantises
    keys: dict[str, str]                     # model parameter name -> file key
    where: dict[str, Path]                   # file key -> safetensors file

    def tensors(self, module: str, leaves=_PACKED) -> list[torch.Tensor]:
        keys = [self.keys[f"{module}.{leaf}"] for leaf in leaves]
        found = _read_tensors(self.where, keys)
        return [found[k] for k in keys]


def _read_export(directory: Path) -> _Export:
    import transformers
    from compressed_tensors.utils.match import match_named_modules
    from transformers import AutoConfig

    qconfig, scheme = _load_qconfig(directory)
    bits, group = scheme.weights.num_bits, scheme.weights.group_size
    try:
        config = AutoConfig.from_pretrained(directory)
        auto = getattr(transformers, get_family(config).auto_class)  # text-only: AutoModelForCausalLM
        with torch.device("meta"):
            skeleton = auto.from_config(config)
    except (OSError, ValueError, KeyError, ModelLoadError) as exc:
        raise ExportError(f"{directory}: cannot build the model of its config.json "
                          f"({exc})") from exc
    quantized = dict(match_named_modules(skeleton, scheme.targets, qconfig.ignore))
    if not quantized:
        raise ExportError(f"{directory}: quantization_config quantises no linear of the model")
    meta, where = _tensor_meta(directory)
    rename = _key_to_module_name(skeleton)
    keys = {rename(key): key for key in meta}
    leaves_of: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    for name, key in keys.items():
        module, _, leaf = name.rpartition(".")
        leaves_of.setdefault(module, {})[leaf] = meta[key]
    stray = sorted(m for m, leaves in leaves_of.items()
                   if m not in quantized and any(leaf in leaves for leaf in _PACKED))
    if stray:
        raise ExportError(f"{directory}: {stray[0]} holds packed tensors but quantization_config "
                          "does not quantise it (ignore list / targets); the file does not match "
                          "its config")
    for name, module in quantized.items():
        leaves = leaves_of.get(name, {})
        bad = f"{directory}: {name}"
        missing = [leaf for leaf in _PACKED if leaf not in leaves]
        if missing:
            raise ExportError(f"{bad}: missing {', '.join(missing)} (quantization_config "
                              "quantises this linear); the file does not match its config")
        if "weight" in leaves or "weight_zero_point" in leaves:
            raise ExportError(f"{bad}: holds a dense weight or a zero-point besides "
                              "weight_packed (symmetric pack-quantized has neither)")
        out, inp = module.weight.shape
        if inp % group:
            raise ExportError(f"{bad}: in_features {inp} is not a multiple of group_size {group}")
        want = {"weight_packed": (("I32",), (out, math.ceil(inp * bits / 32))),
                "weight_scale": (("BF16", "F16", "F32"), (out, inp // group)),
                "weight_shape": (("I64", "I32"), (2,))}
        for leaf, (dtypes, shape) in want.items():
            got_dtype, got_shape = leaves[leaf]
            if got_shape != shape or got_dtype not in dtypes:
                raise ExportError(f"{bad}.{leaf} is {got_dtype} {list(got_shape)}, expected "
                                  f"{'/'.join(dtypes)} {list(shape)} for a [{out}, {inp}] linear "
                                  f"at {bits} bits, group {group}: the file does not match its "
                                  "config")
    return _Export(scheme, quantized, keys, where)


def check_export(out_dir: str | Path) -> dict[str, Any]:
    """Validate an int4/int8 export against its ``quantization_config``; raise ExportError.

    Checks: config.json has a compressed-tensors ``pack-quantized`` quantization_config with one
    weight-only symmetric int4/int8 group scheme; every linear it quantises (targets minus
    ignore, matched by compressed-tensors on the model built from config.json on the meta
    device) has ``weight_packed`` int32 ``[out, ceil(in*bits/32)]``, ``weight_scale`` float
    ``[out, in/group]`` (finite, > 0) and ``weight_shape == (out, in)`` of that linear, and
    neither a dense ``weight`` nor a zero-point; no other module holds packed tensors.
    Returns ``{"bits", "group_size", "modules"}``.
    """
    directory = Path(out_dir)
    return _check_export(directory, _read_export(directory))


def _check_export(directory: Path, export) -> dict[str, Any]:
    """:func:`check_export` on an export already read."""
    for name, module in export.quantized.items():
        scale, shape = export.tensors(name, ("weight_scale", "weight_shape"))
        if shape.tolist() != list(module.weight.shape):
            raise ExportError(f"{directory}: {name}.weight_shape is {shape.tolist()}, the linear "
                              f"is {list(module.weight.shape)}: the file does not match its config")
        if not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise ExportError(f"{directory}: {name}.weight_scale holds non-finite or non-positive "
                              "scales")
    weights = export.scheme.weights
    return {"bits": weights.num_bits, "group_size": weights.group_size,
            "modules": list(export.quantized)}


def _verify_packed(directory: Path, expected: dict[str, Any]) -> None:
    """Read the export back: structure (check_export), the packed codes, the stored scales, and
    compressed-tensors' dequantisation (in the QAT weight dtype) against the QAT model's
    ``dequantized_weight``, bit for bit."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from genrecal.train.quant import codes_and_scales, dequantized_weight

    export = _read_export(directory)
    _check_export(directory, export)
    if sorted(export.quantized) != sorted(expected):
        raise ExportError(f"{directory}: the config quantises {len(export.quantized)} linears, "
                          f"the QAT model {len(expected)}")
    bits = export.scheme.weights.num_bits
    for name, module in expected.items():
        codes, scales = codes_and_scales(module)
        weight = dequantized_weight(module)
        packed, scale, shape = export.tensors(name)
        if not torch.equal(unpack_from_int32(packed, bits, shape), codes):
            raise ExportError(f"{directory}: {name}: the packed codes differ from the QAT codes")
        if not torch.equal(scale.to(scales.dtype), scales):
            raise ExportError(f"{directory}: {name}: the stored scales differ from the QAT scales")
        state = {"weight_packed": packed, "weight_scale": scale.to(weight.dtype),
                 "weight_shape": shape}
        dense = PackedQuantizationCompressor.decompress(state, export.scheme)["weight"]
        if dense.dtype != weight.dtype or not torch.equal(_bits(dense), _bits(weight)):
            raise ExportError(f"{directory}: {name}: the dequantised export differs from the "
                              "fake-quantised weight of the QAT model")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (so -0.0 != 0.0 and NaNs compare by payload)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
