"""GenRecal Recalibrator (method.md section 1, "Forward", steps 1-5, and "Positions").

The Recalibrator maps the student's question features and the teacher's answer input into the
teacher's representation space so that the frozen teacher head can read them::

    x = concat_seq(z_qs, P_pre(answer_input))      P_pre: Linear(d_l -> d_s)     (step 1)
    h = RecBody(x)                                 student-style decoder blocks  (step 2)
        positions re-assigned 0..N-1 over x         rotary applied inside blocks  (step 3)
    r = LayerNorm(P_post(h))                       P_post: Linear(d_s -> d_l)    (step 4)
    [r_q, r_a] = split(r)                                                        (step 5)

Padding layout. Inputs are two padded tensors with boolean masks (True = real token). Real
tokens may sit anywhere in their row (left-, right- or un-padded); only their order matters.
Each sample is packed *contiguously* as ``[question real tokens | answer real tokens]`` and
right-padded to the longest packed sample of the batch, so real tokens get positions 0..n-1
(n = n_q + n_a of that sample), attend causally to each other only, and never see padding.
Outputs are scattered back to the input layout; padded output positions are exactly zero.

The Recalibrator is a training-only module; the student architecture is never modified and the
new blocks never share parameters with the student.
"""

from __future__ import annotations

import copy
import inspect
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from genrecal.train.errors import RecalibratorError

_INIT_CHOICES = ("copy", "random")
_ANSWER_INPUT_CHOICES = ("hidden", "embedding")
_SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
_CONFIG_FILE = "recalibrator.json"
_WEIGHTS_FILE = "recalibrator.safetensors"
_FORMAT = "genrecal.recalibrator"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class RecalibratorConfig:
    """Recalibrator switches (method.md section 1, steps 2-3 and "Positions").

    num_blocks: decoder blocks in RecBody (paper: 2; 1 block 74.9, 20 blocks 76.7).
    init: "copy" = deep copy of the student's last ``num_blocks`` blocks (R, default);
        "random" = the student's own ``_init_weights`` (normal, std=initializer_range), seeded.
    answer_input: which teacher tensor the trainer feeds as the answer input:
        "hidden" = z_al (paper), "embedding" = teacher answer token embeddings (width d_l too).
    reset_positions: True = positions 0..N-1 over the packed sequence (paper);
        False = use the positions passed by the caller (ablation).
    """

    num_blocks: int = 2
    init: str = "copy"
    answer_input: str = "hidden"
    reset_positions: bool = True

    def __post_init__(self) -> None:
        problems = _config_problems(self)
        if problems:
            raise RecalibratorError("invalid RecalibratorConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecalibratorConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecalibratorError(
                f"RecalibratorConfig.from_dict: unknown keys {unknown}; allowed keys are "
                f"{sorted(known)}. Remove or rename them.")
        return cls(**data)


def _config_problems(cfg: RecalibratorConfig) -> list[str]:
    problems = []
    if not _is_positive_int(cfg.num_blocks):
        problems.append(f"num_blocks must be an integer >= 1, got {cfg.num_blocks!r}")
    if cfg.init not in _INIT_CHOICES:
        problems.append(f"init must be one of {_INIT_CHOICES}, got {cfg.init!r}")
    if cfg.answer_input not in _ANSWER_INPUT_CHOICES:
        problems.append(f"answer_input must be one of {_ANSWER_INPUT_CHOICES}, "
                        f"got {cfg.answer_input!r}")
    if not isinstance(cfg.reset_positions, bool):
        problems.append(f"reset_positions must be a bool, got {cfg.reset_positions!r}")
    return problems


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class RecalOut:
    """Recalibrator output, in the layout of the inputs (padded positions are zero).

    r_q: [B, N_q, d_l] recalibrated question part (float, parameter dtype).
    r_a: [B, N_a, d_l] recalibrated answer part; the trainer feeds it to head_l.
    """

    r_q: torch.Tensor
    r_a: torch.Tensor


# ----------------------------------------------------------------------------------------------
# Student introspection
# ----------------------------------------------------------------------------------------------

def text_decoder(student: nn.Module) -> nn.Module:
    """Return the student's text decoder (module with ``.layers``, ``.rotary_emb``, ``.config``).

    transformers 5 VLMs (Qwen2-VL, Qwen2.5-VL, LLaVA, Gemma3) expose it as
    ``model.model.language_model``; text-only causal LMs as ``model.model``.
    """
    paths = [("model", "language_model"), ("language_model",), ("model",), ()]
    for path in paths:
        module = _follow(student, path)
        if module is not None and _is_text_decoder(module):
            return module
    raise RecalibratorError(
        f"cannot find the text decoder of student {type(student).__name__}: looked at "
        f"{['.'.join(p) or '<root>' for p in paths]} for a module with `.layers`, `.rotary_emb` "
        "and `.config`. Pass a transformers VLM (Qwen2-VL, Qwen2.5-VL, LLaVA, Gemma3) or a "
        "causal LM.")


def _follow(module: nn.Module, path: tuple[str, ...]) -> nn.Module | None:
    for name in path:
        module = getattr(module, name, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def _is_text_decoder(module: nn.Module) -> bool:
    parts = ("layers", "rotary_emb")
    has_parts = all(isinstance(getattr(module, a, None), nn.Module) for a in parts)
    return has_parts and hasattr(module, "config")


def _source_layers(num_layers: int, num_blocks: int, where: str) -> list[int]:
    if num_blocks > num_layers:
        raise RecalibratorError(
            f"RecalibratorConfig.num_blocks={num_blocks} exceeds the {num_layers} decoder layers "
            f"of the student ({where}); lower num_blocks to at most {num_layers}.")
    return list(range(num_layers - num_blocks, num_layers))


def _layer_types(text_cfg: Any, sources: list[int]) -> list[str]:
    all_types = getattr(text_cfg, "layer_types", None)
    if all_types is None:
        return ["full_attention"] * len(sources)
    types = [all_types[i] for i in sources]
    bad = sorted(set(types) - set(_SUPPORTED_LAYER_TYPES))
    if bad:
        raise RecalibratorError(
            f"student layers {sources} have attention types {bad}, which RecBody does not "
            f"support (supported: {_SUPPORTED_LAYER_TYPES}); use a student with those types.")
    return types


def _block_config(text_cfg: Any, layer_types: list[str]) -> Any:
    """Copy of the student's text config describing only the RecBody blocks."""
    cfg = copy.deepcopy(text_cfg)
    cfg.num_hidden_layers = len(layer_types)
    if getattr(text_cfg, "layer_types", None) is not None:
        cfg.layer_types = list(layer_types)
    return cfg


# ----------------------------------------------------------------------------------------------
# RecBody
# ----------------------------------------------------------------------------------------------

class RecBody(nn.Module):
    """Decoder blocks of the student's own class and config, with their own rotary embedding.

    Built by :meth:`from_student`; ``source_layers`` records which student layers the block
    layer types (and, with init="copy", the weights) come from.
    """

    def __init__(self, block_cls: type[nn.Module], rotary_cls: type[nn.Module], block_cfg: Any,
                 source_layers: list[int]):
        super().__init__()
        self.config = block_cfg
        self.layer_types = _layer_types(block_cfg, list(range(len(source_layers))))
        self.source_layers = list(source_layers)
        self.blocks = nn.ModuleList(block_cls(block_cfg, i) for i in range(len(source_layers)))
        self.rotary_emb = rotary_cls(block_cfg)
        self.is_mrope = hasattr(self.rotary_emb, "mrope_section")
        rotary_params = inspect.signature(self.rotary_emb.forward).parameters
        self._rotary_per_type = "layer_type" in rotary_params

    @classmethod
    def from_student(cls, student: nn.Module, num_blocks: int) -> RecBody:
        """Structure only (weights as constructed); see :func:`_init_body` for initialisation."""
        decoder = text_decoder(student)
        sources = _source_layers(len(decoder.layers), num_blocks, type(student).__name__)
        types = _layer_types(decoder.config, sources)
        block_cfg = _block_config(decoder.config, types)
        return cls(type(decoder.layers[0]), type(decoder.rotary_emb), block_cfg, sources)

    def forward(self, hidden: torch.Tensor, pad_mask: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
        """Run the blocks on a right-padded packed batch.

        hidden: [B, L, d_s] float; pad_mask: [B, L] bool (True = real token, a prefix per row);
        positions: [B, L] long, or [3, B, L] long for multimodal-rotary (mrope) students.
        Returns [B, L, d_s]; rows at padded positions hold finite, meaningless values.
        """
        masks = self._attention_masks(hidden, pad_mask)
        rope = self._position_embeddings(hidden, positions)
        for block, layer_type in zip(self.blocks, self.layer_types):
            hidden = block(hidden, attention_mask=masks[layer_type],
                           position_embeddings=rope[layer_type], position_ids=None)
        return hidden

    def _attention_masks(self, hidden: torch.Tensor, pad_mask: torch.Tensor) -> dict[str, Any]:
        """Causal (+ sliding window) and padding mask per layer type via transformers' utils,
        so every attention implementation of the student (eager, sdpa, flash, flex) works."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        builders = {"full_attention": create_causal_mask,
                    "sliding_attention": create_sliding_window_causal_mask}
        # The 4th parameter is the KV cache (none here): `past_key_values` up to transformers
        # 5.23, `cache` from 5.24 (where the old keyword warns; it goes in 5.40). Passing it by
        # position works with both names and warns with neither.
        return {t: builders[t](self.config, hidden, pad_mask, None, position_ids=None)
                for t in set(self.layer_types)}

    def _position_embeddings(self, hidden: torch.Tensor, positions: torch.Tensor
                             ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) per layer type; mrope students get [3, B, L] positions (text-style)."""
        if self.is_mrope and positions.dim() == 2:
            positions = positions.unsqueeze(0).expand(3, -1, -1)
        if not self._rotary_per_type:
            cos_sin = self.rotary_emb(hidden, positions)
            return {t: cos_sin for t in set(self.layer_types)}
        return {t: self.rotary_emb(hidden, positions, t) for t in set(self.layer_types)}


def _init_body(body: RecBody, student: nn.Module, init: str) -> None:
    """init="copy": load the student's source layers' weights; "random": student's _init_weights."""
    decoder = text_decoder(student)
    if init == "copy":
        for block, src in zip(body.blocks, body.source_layers):
            block.load_state_dict(decoder.layers[src].state_dict(), strict=True)
        return
    init_fn = getattr(decoder, "_init_weights", None)
    if init_fn is None:
        raise RecalibratorError(
            f"init='random' needs the student's text decoder ({type(decoder).__name__}) to have "
            "`_init_weights` (transformers PreTrainedModel); use init='copy' instead.")
    for module in body.blocks.modules():
        init_fn(module)


# ----------------------------------------------------------------------------------------------
# Packing: [q real | a real | pad] per sample
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Packing:
    """order: [B, L] long, index into the concatenated input sequence of each packed slot;
    mask: [B, L] bool prefix mask of real tokens; total: N_q + N_a of the concatenated input."""

    order: torch.Tensor
    mask: torch.Tensor
    total: int


def _plan_packing(mask_cat: torch.Tensor) -> _Packing:
    """Stable sort real tokens first; trim to the longest sample. mask_cat: [B, N] bool."""
    order = torch.argsort((~mask_cat).to(torch.int8), dim=1, stable=True)
    length = int(mask_cat.sum(dim=1).max().item())
    order = order[:, :length]
    return _Packing(order=order, mask=torch.gather(mask_cat, 1, order), total=mask_cat.shape[1])


def _gather_seq(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x: [B, N, D] -> [B, L, D] picking order[b, l] along the sequence."""
    return torch.gather(x, 1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _gather_positions(positions: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """positions: [B, N] or [3, B, N] -> same leading dims with L picked along the last dim."""
    if positions.dim() == 2:
        return torch.gather(positions, 1, order)
    return torch.gather(positions, 2, order.unsqueeze(0).expand(positions.shape[0], -1, -1))


def _unpack(packed: torch.Tensor, packing: _Packing, mask_cat: torch.Tensor) -> torch.Tensor:
    """packed: [B, L, D] -> [B, N, D] in input layout, zero at padded input positions."""
    bsz, _, dim = packed.shape
    out = packed.new_zeros(bsz, packing.total, dim)
    out = out.scatter(1, packing.order.unsqueeze(-1).expand(-1, -1, dim), packed)
    return out * mask_cat.unsqueeze(-1).to(out.dtype)


# ----------------------------------------------------------------------------------------------
# Recalibrator
# ----------------------------------------------------------------------------------------------

class Recalibrator(nn.Module):
    """P_pre -> RecBody -> P_post -> LayerNorm (method.md section 1, steps 1-5).

    Parameters are float32 by default; inputs are cast to the parameter dtype.
    """

    def __init__(self, cfg: RecalibratorConfig, body: RecBody, d_student: int, d_teacher: int):
        super().__init__()
        self.cfg = cfg
        self.d_student = d_student
        self.d_teacher = d_teacher
        self.p_pre = nn.Linear(d_teacher, d_student)
        self.body = body
        self.p_post = nn.Linear(d_student, d_teacher)
        self.norm = nn.LayerNorm(d_teacher)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_student(cls, student_model: nn.Module, d_teacher: int,
                     cfg: RecalibratorConfig | None = None, seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> Recalibrator:
        """Build and initialise from a transformers student (not modified, never shared).

        d_teacher: teacher hidden width d_l. seed: seeds P_pre/P_post (and random blocks)
        without touching the global RNG. The module is placed on the student's device.
        """
        cfg = cfg or RecalibratorConfig()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            rec = cls._build(student_model, d_teacher, cfg)
            _init_body(rec.body, student_model, cfg.init)
        return _place(rec, _device_of(student_model), dtype)

    @classmethod
    def _build(cls, student_model: nn.Module, d_teacher: int,
               cfg: RecalibratorConfig) -> Recalibrator:
        if not _is_positive_int(d_teacher):
            raise RecalibratorError(
                f"d_teacher must be the teacher hidden width (positive int), got {d_teacher!r}; "
                "read it from the teacher cache metadata.")
        body = RecBody.from_student(student_model, cfg.num_blocks)
        return cls(cfg, body, int(body.config.hidden_size), d_teacher)

    # -- forward -----------------------------------------------------------------------------

    def forward(self, z_qs: torch.Tensor, q_mask: torch.Tensor, answer_input: torch.Tensor,
                a_mask: torch.Tensor, q_positions: torch.Tensor | None = None,
                a_positions: torch.Tensor | None = None) -> RecalOut:
        """Student-question + teacher-answer pass (method.md section 1, steps 1-5).

        z_qs: [B, N_q, d_s] float, student post-norm question features (unprojected).
        q_mask: [B, N_q] bool, True at real question tokens.
        answer_input: [B, N_a, d_l] float, teacher answer hidden states z_al or answer token
            embeddings (cfg.answer_input). a_mask: [B, N_a] bool.
        q_positions / a_positions: [B, N] (or [3, B, N] for mrope students) long; only with
            cfg.reset_positions=False, where they are required.
        Returns RecalOut(r_q [B, N_q, d_l], r_a [B, N_a, d_l]).
        """
        self._check_input("z_qs", z_qs, self.d_student, q_mask, "q_mask")
        self._check_input("answer_input", answer_input, self.d_teacher, a_mask, "a_mask")
        x_q = z_qs.to(self.p_pre.weight.dtype)
        return self._recalibrate(x_q, q_mask, self._project_in(answer_input), a_mask,
                                 q_positions, a_positions)

    def forward_teacher_only(self, z_ql: torch.Tensor, q_mask: torch.Tensor, z_al: torch.Tensor,
                             a_mask: torch.Tensor, q_positions: torch.Tensor | None = None,
                             a_positions: torch.Tensor | None = None) -> RecalOut:
        """Teacher-only pass Recalibrator'([z_ql, z_al]) for L_reg (method.md section 1).

        z_ql: [B, N_ql, d_l] float teacher question states; q_mask: [B, N_ql] bool.
        z_al: [B, N_al, d_l] float, the same kind of answer input as in :meth:`forward`
            (cfg.answer_input); a_mask: [B, N_al] bool. Both parts go through P_pre, so
            RecBody runs at width d_s. Returns RecalOut(r_q [B, N_ql, d_l], r_a [B, N_al, d_l]).
        """
        self._check_input("z_ql", z_ql, self.d_teacher, q_mask, "q_mask")
        self._check_input("z_al", z_al, self.d_teacher, a_mask, "a_mask")
        return self._recalibrate(self._project_in(z_ql), q_mask, self._project_in(z_al), a_mask,
                                 q_positions, a_positions)

    def _project_in(self, x: torch.Tensor) -> torch.Tensor:
        return self.p_pre(x.to(self.p_pre.weight.dtype))

    def _recalibrate(self, x_q: torch.Tensor, q_mask: torch.Tensor, x_a: torch.Tensor,
                     a_mask: torch.Tensor, q_positions: torch.Tensor | None,
                     a_positions: torch.Tensor | None) -> RecalOut:
        """x_q: [B, N_q, d_s], x_a: [B, N_a, d_s] -> RecalOut at width d_l."""
        mask_cat = torch.cat([q_mask, a_mask], dim=1).to(device=x_q.device, dtype=torch.bool)
        self._check_nonempty(mask_cat)
        packing = _plan_packing(mask_cat)
        packed = _gather_seq(torch.cat([x_q, x_a], dim=1), packing.order)
        positions = self._packed_positions(packing, q_positions, a_positions)
        hidden = self.body(packed, packing.mask, positions)
        out = _unpack(self.norm(self.p_post(hidden)), packing, mask_cat)
        n_q = x_q.shape[1]
        return RecalOut(r_q=out[:, :n_q], r_a=out[:, n_q:])

    # -- positions ---------------------------------------------------------------------------

    def _packed_positions(self, packing: _Packing, q_positions: torch.Tensor | None,
                          a_positions: torch.Tensor | None) -> torch.Tensor:
        """Positions of the packed slots: 0..L-1 (reset, method.md step 3) or the caller's."""
        given = q_positions is not None or a_positions is not None
        if self.cfg.reset_positions:
            if given:
                raise RecalibratorError(
                    "q_positions/a_positions were passed but RecalibratorConfig.reset_positions "
                    "is True (positions are re-assigned 0..N-1); drop them or set "
                    "reset_positions=False.")
            bsz, length = packing.order.shape
            return torch.arange(length, device=packing.order.device).expand(bsz, -1)
        if q_positions is None or a_positions is None:
            raise RecalibratorError(
                "RecalibratorConfig.reset_positions is False, so forward needs both q_positions "
                "and a_positions (long [B, N] or [3, B, N]); pass the original position ids.")
        return _gather_positions(self._concat_positions(q_positions, a_positions), packing.order)

    def _concat_positions(self, q_pos: torch.Tensor, a_pos: torch.Tensor) -> torch.Tensor:
        """[B, N_q] / [3, B, N_q] and [B, N_a] / [3, B, N_a] -> concatenated along the last dim."""
        if not self.body.is_mrope and 3 in (q_pos.dim(), a_pos.dim()):
            raise RecalibratorError(
                "3-D (mrope) position ids were passed but the student's rotary embedding "
                f"({type(self.body.rotary_emb).__name__}) is 1-D; pass [B, N] positions.")
        if q_pos.dim() != a_pos.dim():
            q_pos, a_pos = (p if p.dim() == 3 else p.unsqueeze(0).expand(3, -1, -1)
                            for p in (q_pos, a_pos))
        device = self.p_pre.weight.device
        return torch.cat([q_pos, a_pos], dim=-1).to(device=device, dtype=torch.long)

    # -- validation --------------------------------------------------------------------------

    @staticmethod
    def _check_input(name: str, x: torch.Tensor, width: int, mask: torch.Tensor,
                     mask_name: str) -> None:
        if x.dim() != 3 or x.shape[-1] != width:
            raise RecalibratorError(
                f"Recalibrator input {name} must have shape [B, N, {width}], got "
                f"{tuple(x.shape)}; check the hidden width of the model that produced it.")
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:2]):
            raise RecalibratorError(
                f"Recalibrator mask {mask_name} must be a bool tensor of shape "
                f"{tuple(x.shape[:2])} matching {name}, got {mask.dtype} {tuple(mask.shape)}.")

    @staticmethod
    def _check_nonempty(mask_cat: torch.Tensor) -> None:
        empty = (~mask_cat.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise RecalibratorError(
                f"batch rows {empty} have no real question or answer token (all masks False); "
                "drop empty samples before calling the Recalibrator.")

    # -- save / load -------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write weights (safetensors) and config (JSON) into ``directory``; returns it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / _WEIGHTS_FILE), metadata={"format": _FORMAT})
        (directory / _CONFIG_FILE).write_text(json.dumps(self._meta(), indent=2, sort_keys=True))
        return directory

    def _meta(self) -> dict[str, Any]:
        return {"format": _FORMAT, "version": _FORMAT_VERSION, "config": self.cfg.to_dict(),
                "d_student": self.d_student, "d_teacher": self.d_teacher,
                "block_class": type(self.body.blocks[0]).__name__,
                "source_layers": self.body.source_layers,
                "dtype": str(self.p_pre.weight.dtype).removeprefix("torch.")}

    @classmethod
    def load(cls, directory: str | Path, student_model: nn.Module) -> Recalibrator:
        """Rebuild from :meth:`save` output for the same student architecture (no pickle)."""
        directory = Path(directory)
        meta = _read_meta(directory)
        cfg = RecalibratorConfig.from_dict(meta["config"])
        rec = cls._build(student_model, int(meta["d_teacher"]), cfg)
        _check_compatible(rec, meta, directory)
        state = load_file(str(directory / _WEIGHTS_FILE))
        try:
            rec.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise RecalibratorError(
                f"weights in {directory / _WEIGHTS_FILE} do not fit a Recalibrator built from "
                f"student {type(student_model).__name__}: {exc}. Load with the student it was "
                "trained for.") from exc
        return _place(rec, _device_of(student_model), _saved_dtype(meta, directory))


def _read_meta(directory: Path) -> dict[str, Any]:
    path = directory / _CONFIG_FILE
    if not path.is_file() or not (directory / _WEIGHTS_FILE).is_file():
        raise RecalibratorError(
            f"{directory} is not a saved Recalibrator: expected {_CONFIG_FILE} and "
            f"{_WEIGHTS_FILE}; point to a directory written by Recalibrator.save.")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RecalibratorError(
            f"{path} is not valid JSON ({exc}); re-save the Recalibrator.") from exc
    if not isinstance(meta, dict):
        raise RecalibratorError(f"{path} must hold a JSON object; re-save the Recalibrator.")
    if meta.get("format") != _FORMAT or meta.get("version") != _FORMAT_VERSION:
        raise RecalibratorError(
            f"{path} is not a {_FORMAT} v{_FORMAT_VERSION} file (format={meta.get('format')!r}, "
            f"version={meta.get('version')!r}); re-save it with this genrecal version.")
    return meta


def _saved_dtype(meta: dict[str, Any], directory: Path) -> torch.dtype:
    dtype = getattr(torch, str(meta.get("dtype")), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise RecalibratorError(
            f"{directory / _CONFIG_FILE}: 'dtype' is {meta.get('dtype')!r}, not a floating torch "
            "dtype name such as 'float32' or 'bfloat16'; fix the field or re-save.")
    return dtype


def _check_compatible(rec: Recalibrator, meta: dict[str, Any], directory: Path) -> None:
    expected = {"d_student": rec.d_student, "block_class": type(rec.body.blocks[0]).__name__,
                "source_layers": rec.body.source_layers}
    wrong = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    if wrong:
        details = ", ".join(f"{k}: saved {s!r} vs student {c!r}" for k, (s, c) in wrong.items())
        raise RecalibratorError(
            f"Recalibrator in {directory} was built for a different student ({details}); load "
            "it with the student architecture it was trained for.")


def _place(rec: Recalibrator, device: torch.device, dtype: torch.dtype) -> Recalibrator:
    """Move to ``device``; cast parameters (not the rotary inv_freq buffers) to ``dtype``."""
    rec.to(device=device)
    for module in (rec.p_pre, rec.body.blocks, rec.p_post, rec.norm):
        module.to(dtype=dtype)
    return rec


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
