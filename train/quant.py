"""Quantisation-aware training (QAT): weight-only fake quantisation of the student's decoder
linears (docs/method.md §2.3; the export in :mod:`genrecal.train.export`, §4).

:func:`quantize_model` replaces, in place, the linears named in ``QuantConfig.modules``
(``q_proj`` ... ``down_proj``) inside the LLM decoder blocks -- found through the family
registry (``get_family(model.config).decoder_layers(model)``) -- by :class:`FakeQuantLinear`.
The vision tower, the projector, the embeddings, the norms and ``lm_head`` stay as they are.

The fake quantiser of a weight ``W [out, in]``, ``b`` bits, group ``G`` along ``in``::

    s    = round_to(scale_dtype, exp(log_scale))       [out, in/G], straight-through
    code = clamp(round(W / s), -2^(b-1), 2^(b-1) - 1)   round straight-through (gradient 1)
    W_q  = s * code                                      (2.12)-(2.14)

``s`` is cast back to the weight's dtype after the rounding. With float32 master weights and a
16-bit ``scale_dtype`` ``W_q = s * code`` is exact (at most 11 + 8 significant bits); with
float32 scales it is the float32 rounding of the product, which is also what compressed-tensors'
dequantisation computes in float32.
Gradients are LSQ's: ``dW_q/dW = 1`` where the rounded code lies inside the clamp range, 0
outside; ``dW_q/ds = code - W/s`` inside, ``code`` (the clamp bound) outside; ``dL/dlog_scale =
s * dL/ds``. :func:`dequantized_weight` runs the same code path without gradient, so it is
bit for bit what the forward multiplies with; :func:`codes_and_scales` gives its integer codes
and its scales in ``scale_dtype`` (what the export writes).

Init: per group a small MSE grid search over ``absmax / qmax * f``, ``f`` in [0.5, 1.0]
(:data:`INIT_FACTORS`), each candidate evaluated with the scale the forward will really use
(after the ``scale_dtype`` rounding); ``f = 1`` (plain absmax) is one of the candidates, so the
init is never worse than absmax.

Optimizer: :func:`param_groups` puts the log-scales in their own AdamW group (weight decay 0,
``lr_mult = QuantConfig.scale_lr_mult``); every group carries an ``lr_mult`` key and the
trainer sets ``group["lr"] = lr * group["lr_mult"]`` (:func:`set_lr`) at every step.

Files: :func:`save_qat` writes a normal ``save_pretrained`` student directory (the master
weights, not quantised, no log-scales in it) plus ``quantization.safetensors`` (one
``<module>.log_scale`` tensor per wrapped module) and ``quantization.json`` (the QuantConfig
and the wrapped module names); :func:`load_qat_student` rebuilds the fake-quantised model.
safetensors and JSON only, nothing is unpickled.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from genrecal.common.config import QuantConfig
from genrecal.common.errors import ConfigError
from genrecal.train.errors import TrainError

__all__ = ["INIT_FACTORS", "QAT_CONFIG", "QAT_SCALES", "FakeQuantLinear", "QuantError",
           "codes_and_scales", "dequantized_weight", "effective_scale", "fake_quant",
           "is_qat_dir", "load_qat_scales", "load_qat_student", "param_groups", "qat_modules",
           "qrange", "quantize_model", "read_qat_config", "save_qat", "scale_parameters",
           "set_lr", "unwrapped"]

QAT_SCALES = "quantization.safetensors"
QAT_CONFIG = "quantization.json"
QAT_FORMAT = "genrecal-qat"
QAT_VERSION = 1
#: Candidate scales of the init, as fractions of ``absmax / qmax`` (1.0 = plain absmax).
INIT_FACTORS: tuple[float, ...] = tuple(round(0.5 + 0.025 * i, 3) for i in range(21))

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class QuantError(TrainError):
    """QAT cannot be set up, or a QAT student directory is missing, damaged or inconsistent."""


def qrange(bits: int) -> tuple[int, int]:
    """``(qmin, qmax)`` of signed symmetric ``bits``-bit codes: (-8, 7) at 4 bits."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _ste(value: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``value`` exactly (plus an exact 0), with the gradient of the identity on ``source``."""
    return value + (source - source.detach()).to(value.dtype)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` (half to even) in value, gradient 1."""
    return _ste(torch.round(x.detach()), x)


def effective_scale(log_scale: torch.Tensor, scale_dtype: torch.dtype,
                    weight_dtype: torch.dtype) -> torch.Tensor:
    """``exp(log_scale)`` rounded to ``scale_dtype`` (kept at least its smallest normal, so a
    scale is never 0) and then cast to ``weight_dtype``; straight-through for the rounding.

    ``exp`` runs in float64 and is rounded to float32 first: CPU and CUDA ``expf`` differ in
    the last bit now and then, which after rounding would give a GPU-trained scale and its CPU
    export different values; a float64 ``exp`` rounded to float32 agrees across devices except
    with probability ~2^-28 per scale. (MPS has no float64: float32 there.)
    """
    wide = torch.float32 if log_scale.device.type == "mps" else torch.float64
    raw = torch.exp(log_scale.to(wide))
    rounded = (raw.detach().float().clamp(min=torch.finfo(scale_dtype).tiny)
               .to(scale_dtype).to(weight_dtype))
    return _ste(rounded, raw)


def fake_quant(weight: torch.Tensor, scale: torch.Tensor, bits: int,
               group_size: int) -> torch.Tensor:
    """``W_q = s * clamp(round_ste(W / s), qmin, qmax)``; ``scale`` [out, in/group] in the
    weight's dtype (:func:`effective_scale`), groups along the input dimension."""
    qmin, qmax = qrange(bits)
    out, inp = weight.shape
    w = weight.reshape(out, inp // group_size, group_size)
    s = scale.unsqueeze(-1)
    codes = torch.clamp(_round_ste(w / s), qmin, qmax)
    return (s * codes).reshape(out, inp)


class FakeQuantLinear(nn.Module):
    """An ``nn.Linear`` with its weight fake-quantised in the forward (module docstring).

    Holds the linear's own ``weight`` and ``bias`` Parameters (same objects, same state-dict
    names) plus ``log_scale`` [out, in / group_size] (float32, trainable).
    """

    def __init__(self, linear: nn.Linear, cfg: QuantConfig, *, name: str = "linear",
                 init: bool = True):
        super().__init__()
        out, inp = linear.weight.shape
        if inp % cfg.group_size:
            raise QuantError(
                f"{name}: in_features {inp} is not a multiple of quantize.group_size "
                f"{cfg.group_size}; choose a group size that divides it (e.g. "
                f"{math.gcd(inp, cfg.group_size)}) or leave this module out of quantize.modules")
        self.in_features, self.out_features = inp, out
        self.bits, self.group_size = int(cfg.bits), int(cfg.group_size)
        self.scale_dtype_name = cfg.scale_dtype
        self.weight = linear.weight
        self.bias = linear.bias
        self.log_scale = nn.Parameter(torch.zeros(out, inp // cfg.group_size, dtype=torch.float32,
                                                  device=linear.weight.device))
        if init:
            self.init_scales()

    @property
    def scale_dtype(self) -> torch.dtype:
        return _DTYPES[self.scale_dtype_name]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}, group_size={self.group_size}, "
                f"scale_dtype={self.scale_dtype_name}")

    def scale(self) -> torch.Tensor:
        """The scale the forward uses, [out, in/group] in the weight's dtype (with gradient)."""
        return effective_scale(self.log_scale, self.scale_dtype, self.weight.dtype)

    def quantized_weight(self) -> torch.Tensor:
        return fake_quant(self.weight, self.scale(), self.bits, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)

    @torch.no_grad()
    def init_scales(self, factors: Iterable[float] = INIT_FACTORS) -> None:
        """Per group, the ``absmax / qmax * f`` minimising ``||W - W_q||^2`` (module docstring)."""
        qmin, qmax = qrange(self.bits)
        w = self.weight.detach()
        groups = w.reshape(self.out_features, -1, self.group_size)
        absmax = groups.abs().amax(dim=-1).float()
        best_err = best_log = None
        floor = math.log(torch.finfo(self.scale_dtype).tiny)
        for f in factors:
            log = torch.log(absmax * (float(f) / qmax)).clamp(min=floor)
            s = effective_scale(log, self.scale_dtype, w.dtype).unsqueeze(-1)
            err = (groups - s * torch.clamp(torch.round(groups / s), qmin, qmax)).float()
            err = err.square().sum(dim=-1)
            if best_err is None:
                best_err, best_log = err, log
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_log = torch.where(better, log, best_log)
        self.log_scale.copy_(best_log)


# ----- model-level -----------------------------------------------------------------------------
def _decoder_linears(model: nn.Module, cfg: QuantConfig) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of the linears (plain or already wrapped) of
    ``cfg.modules`` inside the decoder blocks, in model order."""
    from genrecal.model.families import get_family

    layers = get_family(model.config).decoder_layers(model)
    inside = {id(m) for layer in layers for m in layer.modules()}
    wanted = set(cfg.modules)
    return [(name, m) for name, m in model.named_modules()
            if id(m) in inside and isinstance(m, (nn.Linear, FakeQuantLinear))
            and name.rsplit(".", 1)[-1] in wanted]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: nn.Module, cfg: QuantConfig, *, init: bool = True) -> list[str]:
    """Wrap the decoder linears of ``cfg.modules`` in :class:`FakeQuantLinear`, in place.

    Returns their qualified names. ``init=False`` skips the MSE init (scales to be loaded).
    Every module is checked (group size) before any is replaced.
    """
    found = _decoder_linears(model, cfg)
    if not found:
        raise QuantError(f"quantize: no decoder linear named {cfg.modules} in "
                         f"{type(model).__name__}; check quantize.modules")
    already = [n for n, m in found if isinstance(m, FakeQuantLinear)]
    if already:
        raise QuantError(f"quantize: {already[0]} (and {len(already) - 1} more) is already "
                         "fake-quantised; quantize a model once")
    bad = [(n, m.in_features) for n, m in found if m.in_features % cfg.group_size]
    if bad:
        names = ", ".join(f"{n} (in_features {i})" for n, i in bad[:3])
        raise QuantError(f"quantize: group_size {cfg.group_size} does not divide the input "
                         f"width of {names}{' ...' if len(bad) > 3 else ''}; choose a group size "
                         "that divides every quantised module's in_features")
    for name, linear in found:
        _set_submodule(model, name, FakeQuantLinear(linear, cfg, name=name, init=init))
    return [n for n, _ in found]


def qat_modules(model: nn.Module) -> dict[str, FakeQuantLinear]:
    """Qualified name -> :class:`FakeQuantLinear` of every wrapped module, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def scale_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, log_scale)`` of every wrapped module (names as in ``model.named_parameters``)."""
    return [(f"{n}.log_scale", m.log_scale) for n, m in qat_modules(model).items()]


def param_groups(model: nn.Module, params: Iterable[tuple[str, nn.Parameter]], *,
                 weight_decay: float, scale_lr_mult: float) -> list[dict[str, Any]]:
    """AdamW parameter groups for the trainable ``params`` (``(name, parameter)`` pairs).

    The log-scales among them go into a group ``{"params", "weight_decay": 0.0, "lr_mult":
    scale_lr_mult, "name": "qat_scales"}``, everything else into ``{"params", "weight_decay":
    weight_decay, "lr_mult": 1.0, "name": "weights"}``; empty groups are left out. Use as
    ``torch.optim.AdamW(param_groups(...), lr=lr)`` and set the LR with :func:`set_lr`
    (``group["lr"] = lr * group["lr_mult"]``), also before the first step.
    """
    scales = {id(p) for _, p in scale_parameters(model)}
    params = list(params)
    groups = [{"params": [p for _, p in params if id(p) not in scales], "name": "weights",
               "weight_decay": float(weight_decay), "lr_mult": 1.0},
              {"params": [p for _, p in params if id(p) in scales], "name": "qat_scales",
               "weight_decay": 0.0, "lr_mult": float(scale_lr_mult)}]
    return [g for g in groups if g["params"]]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """``group["lr"] = lr * group.get("lr_mult", 1.0)`` for every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr * float(group.get("lr_mult", 1.0))


@torch.no_grad()
def dequantized_weight(module: FakeQuantLinear) -> torch.Tensor:
    """Exactly the weight the forward uses (same code path, no gradient), in the weight's dtype."""
    return module.quantized_weight().detach()


@torch.no_grad()
def codes_and_scales(module: FakeQuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 [out, in], scales [out, in/group] in scale_dtype)`` with
    ``dequantized_weight(module) == scales.to(wdtype).repeat_interleave(group, 1) * codes``."""
    qmin, qmax = qrange(module.bits)
    s = module.scale()
    w = module.weight.reshape(module.out_features, -1, module.group_size)
    codes = torch.clamp(torch.round(w / s.unsqueeze(-1)), qmin, qmax)
    scales = s.to(module.scale_dtype)
    if not torch.equal(scales.to(s.dtype), s):
        raise QuantError(f"the scales of a {module.weight.dtype} weight are not representable in "
                         f"scale_dtype {module.scale_dtype_name}; keep the master weights in "
                         "float32")
    return codes.to(torch.int8).reshape(module.out_features, module.in_features), scales


# ----- unwrapping (saving, export) -------------------------------------------------------------
def _plain_linear(module: FakeQuantLinear, weight: torch.Tensor | None = None) -> nn.Linear:
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                       device="meta")
    linear.weight = module.weight if weight is None else nn.Parameter(weight, requires_grad=False)
    linear.bias = module.bias
    return linear


@contextmanager
def unwrapped(model: nn.Module, *, dequantize: bool = False) -> Iterator[nn.Module]:
    """``model`` with every :class:`FakeQuantLinear` swapped for a plain ``nn.Linear`` sharing
    its weight and bias (``dequantize``: holding :func:`dequantized_weight` instead); the
    wrappers are put back on exit."""
    wrapped = qat_modules(model)
    try:
        for name, module in wrapped.items():
            weight = dequantized_weight(module) if dequantize else None
            _set_submodule(model, name, _plain_linear(module, weight))
        yield model
    finally:
        for name, module in wrapped.items():
            _set_submodule(model, name, module)


# ----- files -----------------------------------------------------------------------------------
def save_qat(model: nn.Module, directory: str | Path, *, processor: Any = None,
             cfg: QuantConfig | None = None) -> Path:
    """Write the QAT student into ``directory`` (created if missing).

    ``model.save_pretrained`` of the unwrapped model (its master weights as they are, float32
    in training; no log-scales), ``quantization.safetensors`` (``<module>.log_scale``) and
    ``quantization.json`` (``cfg``, the stage's QuantConfig, when given -- it must match the
    wrappers -- else one rebuilt from them); the processor too when given (``save_processor``).
    """
    from safetensors.torch import save_file

    from genrecal.model.families import get_family

    wrapped = qat_modules(model)
    if not wrapped:
        raise QuantError("save_qat: the model has no fake-quantised module; call quantize_model "
                         "first (or save a plain student with save_pretrained)")
    cfgs = {(m.bits, m.group_size, m.scale_dtype_name) for m in wrapped.values()}
    if len(cfgs) != 1:
        raise QuantError(f"save_qat: the wrapped modules disagree on (bits, group_size, "
                         f"scale_dtype): {sorted(cfgs)}")
    bits, group_size, scale_dtype = cfgs.pop()
    kinds = sorted({n.rsplit(".", 1)[-1] for n in wrapped})
    if cfg is None:
        cfg = QuantConfig(bits=bits, group_size=group_size, scale_dtype=scale_dtype, modules=kinds)
    elif ((cfg.bits, cfg.group_size, cfg.scale_dtype) != (bits, group_size, scale_dtype)
          or not set(kinds) <= set(cfg.modules)):
        raise QuantError(f"save_qat: cfg {cfg.to_dict()} does not match the wrapped modules "
                         f"(bits {bits}, group_size {group_size}, scale_dtype {scale_dtype}, "
                         f"modules {kinds})")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    with unwrapped(model):
        model.save_pretrained(out)
    save_file({f"{n}.log_scale": m.log_scale.detach().float().cpu().contiguous()
               for n, m in wrapped.items()}, str(out / QAT_SCALES),
              metadata={"format": QAT_FORMAT})
    record = {"format": QAT_FORMAT, "version": QAT_VERSION, "config": cfg.to_dict(),
              "wrapped": list(wrapped)}
    (out / QAT_CONFIG).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    if processor is not None:
        from genrecal.model.saving import save_processor

        save_processor(processor, get_family(model.config), out)
    return out


def is_qat_dir(directory: str | Path) -> bool:
    """Whether ``directory`` holds a QAT record (``quantization.json``)."""
    return (Path(directory) / QAT_CONFIG).is_file()


def read_qat_config(directory: str | Path) -> tuple[QuantConfig, list[str]]:
    """The QuantConfig and wrapped module names recorded in ``directory/quantization.json``."""
    path = Path(directory) / QAT_CONFIG
    if not path.is_file():
        raise QuantError(f"{path} does not exist: {directory} is not a QAT student directory "
                         "(written by save_qat)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QuantError(f"{path} is unreadable ({exc}); re-save the QAT student") from exc
    if not isinstance(record, dict) or record.get("format") != QAT_FORMAT:
        raise QuantError(f"{path} is not a genrecal QAT record (format {QAT_FORMAT!r})")
    if record.get("version") != QAT_VERSION:
        raise QuantError(f"{path}: QAT record version {record.get('version')!r}, this genrecal "
                         f"reads version {QAT_VERSION}")
    try:
        cfg = QuantConfig.from_dict(record.get("config"), source=str(path))
    except ConfigError as exc:
        raise QuantError(f"{path}: bad quantisation config: {exc}") from exc
    wrapped = record.get("wrapped")
    if not isinstance(wrapped, list) or not wrapped or not all(isinstance(n, str) for n in wrapped):
        raise QuantError(f"{path}: 'wrapped' must be a non-empty list of module names")
    return cfg, wrapped


def load_qat_scales(model: nn.Module, directory: str | Path, wrapped: list[str]) -> None:
    """Copy the log-scales of ``directory/quantization.safetensors`` into ``model``'s wrappers,
    which must be exactly ``wrapped`` with the recorded shapes."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / QAT_SCALES
    modules = qat_modules(model)
    if list(modules) != list(wrapped):
        missing = sorted(set(wrapped) - set(modules)) or sorted(set(modules) - set(wrapped))
        raise QuantError(f"{Path(directory) / QAT_CONFIG} lists other quantised modules than the "
                         f"model has (first difference: {missing[:1] or 'order'}); the record "
                         "does not belong to this model")
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise QuantError(f"cannot read {path} ({exc}); re-save the QAT student") from exc
    expected = {f"{n}.log_scale" for n in wrapped}
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)
        raise QuantError(f"{path}: tensors do not match the wrapped modules (e.g. {odd[0]})")
    for name, module in modules.items():
        value = tensors[f"{name}.log_scale"]
        if value.shape != module.log_scale.shape or not value.is_floating_point():
            raise QuantError(f"{path}: {name}.log_scale has shape {tuple(value.shape)} "
                             f"({value.dtype}), expected {tuple(module.log_scale.shape)} float")
        if not torch.isfinite(value).all():
            raise QuantError(f"{path}: {name}.log_scale holds non-finite values")
        with torch.no_grad():
            module.log_scale.copy_(value)


def load_qat_student(directory: str | Path, *, dtype: str = "float32", device: str = "cpu",
                     family: str | None = None):
    """Rebuild a QAT student saved by :func:`save_qat`: ``load_vlm`` (weights in ``dtype``,
    float32 by default: the master weights), :func:`quantize_model` with the saved config,
    then the saved log-scales. Returns the :class:`~genrecal.model.loading.LoadedVLM`."""
    from genrecal.model.loading import load_vlm

    cfg, wrapped = read_qat_config(directory)
    loaded = load_vlm(directory, family=family, dtype=dtype, device=device)
    try:
        quantize_model(loaded.model, cfg, init=False)
    except QuantError as exc:
        raise QuantError(f"{directory}: {exc}") from exc
    load_qat_scales(loaded.model, directory, wrapped)
    return loaded
