"""GenRecal Recalibrator (docs/method.md §1.1 "Notation and forward", §1.2 "Positions").

The Recalibrator maps the student's question features and the teacher's answer input into the
teacher's representation space so that the frozen teacher head can read them (step numbers
are those of docs/method.md §1.1)::

    e = z_al or teacher answer embeddings           RecalibratorConfig.answer_input (step 1)
    x = concat_seq(z_qs, P_pre(e))                  P_pre: Linear(d_l -> d_s)     (step 2)
    packed per row: [q real | a real | pad]                                       (step 3)
    h = RecBody(x, positions)                       student-style decoder blocks  (step 4)
        positions 0..n_q+n_a-1 over the packed row  (reassign_positions, §1.2)
    r = LayerNorm(P_post(h))                        P_post: Linear(d_s -> d_l)    (step 5)
    [r_q, r_a] = unpack(r)                          input layout, padding zero    (step 6)

Padding layout. Inputs are two padded tensors with boolean masks (True = real token). Real
tokens may sit anywhere in their row (left-, right- or un-padded); only their order matters.
Each sample is packed *contiguously* as ``[question real tokens | answer real tokens]`` and
right-padded to the longest packed sample of the batch, so real tokens get positions 0..n-1
(n = n_q + n_a of that sample), attend causally to each other only, and never see padding.
Outputs are scattered back to the input layout; padded output positions are exactly zero.

Student structure. Where the student keeps its decoder layers, their class, its rotary
embedding and its text config, and how that rotary embedding takes positions, is asked of the
student's :class:`~genrecal.model.families.Family` (``genrecal.model.families``), never probed.

Configuration is the pipeline's own :class:`genrecal.common.config.RecalibratorConfig`
(``blocks``, ``init``, ``answer_input``, ``reassign_positions``); it is also what
:meth:`Recalibrator.save` writes and :meth:`Recalibrator.load` reads.

The Recalibrator is a training-only module; the student architecture is never modified and the
new blocks never share parameters with the student.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from genrecal.common.config import RecalibratorConfig
from genrecal.common.errors import ConfigError
from genrecal.model.families import Family, get_family
from genrecal.store.errors import ModelLoadError
from genrecal.train.errors import RecalibratorError

_SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
_CONFIG_FILE = "recalibrator.json"
_WEIGHTS_FILE = "recalibrator.safetensors"
_FORMAT = "genrecal.recalibrator"
_FORMAT_VERSION = 1
# Config keys of Recalibrators saved before the config became the pipeline's RecalibratorConfig;
# such files are refused with the rename to make (see _saved_config).
_OLD_CONFIG_KEYS = {"num_blocks": "blocks", "reset_positions": "reassign_positions"}


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
# Student structure, from the Family registry
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Student:
    """What the Recalibrator needs of a student, as its :class:`Family` locates it."""

    family: Family
    text_model: nn.Module  # the decoder stack (owner of ``_init_weights`` for init="random")
    layers: nn.ModuleList
    layer_class: type[nn.Module]
    rotary_class: type[nn.Module]
    text_config: Any


def _student(student: nn.Module) -> _Student:
    """Locate the student's decoder through ``get_family(student.config)``."""
    try:
        config = getattr(student, "config", None)
        if config is None:
            raise ModelLoadError("it has no transformers `config`")
        family = get_family(config)
        return _Student(family=family, text_model=family.text_model(student),
                        layers=family.decoder_layers(student),
                        layer_class=family.decoder_layer_class(student),
                        rotary_class=type(family.rotary_embedding(student)),
                        text_config=family.text_config(config))
    except ModelLoadError as exc:
        raise RecalibratorError(
            f"cannot find the text decoder of student {type(student).__name__}: {exc}. Pass a "
            "transformers VLM or text LLM of a family in genrecal.model.families.FAMILIES "
            "(Qwen2-VL, Qwen2.5-VL, LLaVA, Gemma 3, InternVL; text-only Qwen2, Llama).") from exc


def _source_layers(num_layers: int, blocks: int, where: str) -> list[int]:
    """The student's last ``blocks`` layers (docs/method.md §1.1 step 4, init R)."""
    if blocks > num_layers:
        raise RecalibratorError(
            f"RecalibratorConfig.blocks={blocks} exceeds the {num_layers} decoder layers "
            f"of the student ({where}); lower recalibrator.blocks to at most {num_layers}.")
    return list(range(num_layers - blocks, num_layers))


def _layer_types(text_cfg: Any, sources: list[int]) -> list[str]:
    """Attention type (full / sliding window) of each source layer (docs/method.md §1.1 step 4)."""
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
    """Decoder blocks of the student's own class and config, with their own rotary embedding
    (docs/method.md §1.1 step 4).

    Built by :meth:`from_student`; ``source_layers`` records which student layers the block
    layer types (and, with init="copy", the weights) come from.
    """

    def __init__(self, family: Family, block_cls: type[nn.Module], rotary_cls: type[nn.Module],
                 block_cfg: Any, source_layers: list[int]):
        super().__init__()
        self.family = family
        self.config = block_cfg
        self.layer_types = _layer_types(block_cfg, list(range(len(source_layers))))
        self.source_layers = list(source_layers)
        self.blocks = nn.ModuleList(block_cls(block_cfg, i) for i in range(len(source_layers)))
        self.rotary_emb = rotary_cls(block_cfg)

    @property
    def is_mrope(self) -> bool:
        """The rotary embedding takes [3, B, L] (M-RoPE) positions (``Family.multimodal_rope``)."""
        return self.family.multimodal_rope

    @classmethod
    def from_student(cls, student: nn.Module, blocks: int) -> RecBody:
        """Structure only (weights as constructed); see :func:`_init_body` for initialisation."""
        parts = _student(student)
        sources = _source_layers(len(parts.layers), blocks, type(student).__name__)
        types = _layer_types(parts.text_config, sources)
        block_cfg = _block_config(parts.text_config, types)
        return cls(parts.family, parts.layer_class, parts.rotary_class, block_cfg, sources)

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
        """(cos, sin) per layer type at the positions of docs/method.md §1.2; [B, L] positions are
        put in the family's rotary shape ([3, B, L] on every axis for M-RoPE students)."""
        if positions.dim() == 2:
            positions = self.family.rotary_position_ids(positions)
        return {t: self.family.rotary_cos_sin(self.rotary_emb, hidden, positions, t)
                for t in set(self.layer_types)}


def _init_body(body: RecBody, student: nn.Module, init: str) -> None:
    """Initialisation (docs/method.md §1.1 step 4): init="copy" loads the student's source layers'
    weights; "random" applies the student's ``_init_weights`` (seeded by the caller)."""
    parts = _student(student)
    if init == "copy":
        for block, src in zip(body.blocks, body.source_layers):
            block.load_state_dict(parts.layers[src].state_dict(), strict=True)
        return
    init_fn = getattr(parts.text_model, "_init_weights", None)
    if init_fn is None:
        raise RecalibratorError(
            f"init='random' needs the student's text decoder ({type(parts.text_model).__name__}) "
            "to have `_init_weights` (transformers PreTrainedModel); use init='copy' instead.")
    for module in body.blocks.modules():
        init_fn(module)


# ----------------------------------------------------------------------------------------------
# Packing: [q real | a real | pad] per sample (docs/method.md §1.1 steps 3 and 6)
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
    """P_pre -> RecBody -> P_post -> LayerNorm (docs/method.md §1.1, steps 1-6).

    ``cfg`` is the pipeline's :class:`genrecal.common.config.RecalibratorConfig`. Parameters
    are float32 by default; inputs are cast to the parameter dtype.
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

        d_teacher: teacher hidden width d_l. cfg: the pipeline's ``recalibrator`` section
        (default: its defaults). seed: seeds P_pre/P_post (and random blocks) without touching
        the global RNG. The module is placed on the student's device.
        """
        cfg = RecalibratorConfig() if cfg is None else cfg
        if not isinstance(cfg, RecalibratorConfig):
            raise RecalibratorError(
                f"cfg must be a genrecal.common.config.RecalibratorConfig (the pipeline's "
                f"`recalibrator` section), got {type(cfg).__name__}; pass pipeline.recalibrator.")
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
        body = RecBody.from_student(student_model, cfg.blocks)
        return cls(cfg, body, int(body.config.hidden_size), d_teacher)

    # -- forward -----------------------------------------------------------------------------

    def forward(self, z_qs: torch.Tensor, q_mask: torch.Tensor, answer_input: torch.Tensor,
                a_mask: torch.Tensor, q_positions: torch.Tensor | None = None,
                a_positions: torch.Tensor | None = None) -> RecalOut:
        """Student-question + teacher-answer pass (docs/method.md §1.1, steps 1-6).

        z_qs: [B, N_q, d_s] float, student post-norm question features (unprojected).
        q_mask: [B, N_q] bool, True at real question tokens.
        answer_input: [B, N_a, d_l] float, teacher answer hidden states z_al or answer token
            embeddings (cfg.answer_input). a_mask: [B, N_a] bool.
        q_positions / a_positions: [B, N] (or [3, B, N] for mrope students) long; only with
            cfg.reassign_positions=False (docs/method.md §1.2 NPE ablation), where they are
            required.
        Returns RecalOut(r_q [B, N_q, d_l], r_a [B, N_a, d_l]).
        """
        self._check_input("z_qs", z_qs, self.d_student, q_mask, "q_mask")
        self._check_input("answer_input", answer_input, self.d_teacher, a_mask, "a_mask")
        x_q = z_qs.to(self.p_pre.weight.dtype)  # step 2: x_q = z_qs, not projected
        return self._recalibrate(x_q, q_mask, self._project_in(answer_input), a_mask,
                                 q_positions, a_positions)

    def forward_teacher_only(self, z_ql: torch.Tensor, q_mask: torch.Tensor, z_al: torch.Tensor,
                             a_mask: torch.Tensor, q_positions: torch.Tensor | None = None,
                             a_positions: torch.Tensor | None = None) -> RecalOut:
        """Teacher-only pass Recalibrator'([z_ql, z_al]) for L_reg (docs/method.md §1.1, last part).

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
        """P_pre: Linear(d_l -> d_s) (docs/method.md §1.1 step 2)."""
        return self.p_pre(x.to(self.p_pre.weight.dtype))

    def _recalibrate(self, x_q: torch.Tensor, q_mask: torch.Tensor, x_a: torch.Tensor,
                     a_mask: torch.Tensor, q_positions: torch.Tensor | None,
                     a_positions: torch.Tensor | None) -> RecalOut:
        """x_q: [B, N_q, d_s], x_a: [B, N_a, d_s] -> RecalOut at width d_l."""
        mask_cat = torch.cat([q_mask, a_mask], dim=1).to(device=x_q.device, dtype=torch.bool)
        self._check_nonempty(mask_cat)
        packing = _plan_packing(mask_cat)  # step 3: [q real | a real | pad] per row
        packed = _gather_seq(torch.cat([x_q, x_a], dim=1), packing.order)
        positions = self._packed_positions(packing, q_positions, a_positions)  # §1.2
        hidden = self.body(packed, packing.mask, positions)  # step 4: h = RecBody(x, positions)
        out = _unpack(self.norm(self.p_post(hidden)), packing, mask_cat)  # steps 5-6
        n_q = x_q.shape[1]
        return RecalOut(r_q=out[:, :n_q], r_a=out[:, n_q:])

    # -- positions ---------------------------------------------------------------------------

    def _packed_positions(self, packing: _Packing, q_positions: torch.Tensor | None,
                          a_positions: torch.Tensor | None) -> torch.Tensor:
        """Positions of the packed slots (docs/method.md §1.2 "Positions inside RecBody"):
        0..L-1 over the packed row (reassign_positions, the paper's default) or, in the NPE
        ablation, the caller's positions gathered into the packed layout."""
        given = q_positions is not None or a_positions is not None
        if self.cfg.reassign_positions:
            if given:
                raise RecalibratorError(
                    "q_positions/a_positions were passed but "
                    "RecalibratorConfig.reassign_positions is True (positions are re-assigned "
                    "0..N-1); drop them or set reassign_positions: false.")
            bsz, length = packing.order.shape
            return torch.arange(length, device=packing.order.device).expand(bsz, -1)
        if q_positions is None or a_positions is None:
            raise RecalibratorError(
                "RecalibratorConfig.reassign_positions is False, so forward needs both q_positions "
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
        cfg = _saved_config(meta, directory / _CONFIG_FILE)
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


def _saved_config(meta: dict[str, Any], path: Path) -> RecalibratorConfig:
    """The saved ``config`` through :meth:`RecalibratorConfig.from_dict` (what ``save`` wrote
    with ``to_dict``). Files with the pre-pipeline-config keys are refused, naming the renames."""
    data = meta.get("config")
    if not isinstance(data, dict):
        raise RecalibratorError(
            f"{path}: 'config' must be a JSON object (RecalibratorConfig.to_dict()), got "
            f"{data!r}; re-save the Recalibrator.")
    old = [key for key in _OLD_CONFIG_KEYS if key in data]
    if old:
        renames = ", ".join(f"{key!r} -> {_OLD_CONFIG_KEYS[key]!r}" for key in old)
        raise RecalibratorError(
            f"{path} holds the old Recalibrator config keys {old}, which this genrecal no longer "
            f"reads (the config is now the pipeline's RecalibratorConfig): rename {renames} in "
            "its 'config' object (the weights are unaffected) or re-save the Recalibrator.")
    try:
        return RecalibratorConfig.from_dict(data, source=str(path))
    except ConfigError as exc:
        problems = "; ".join(f"config.{where}: {msg}" for where, msg in exc.problems)
        raise RecalibratorError(
            f"{path}: 'config' is not a valid RecalibratorConfig ({problems}); fix it or re-save "
            "the Recalibrator.") from exc


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
