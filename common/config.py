"""Typed schema of ``pipelines.yaml``: the single source of truth for every run.

A file holds a top-level ``pipelines:`` mapping, name -> :class:`Pipeline`. A pipeline names the
teacher and the student (:class:`ModelSpec`), the input data (:class:`DataConfig`), the teacher
cache and what the teacher pass extracts into it (:class:`CacheConfig`), the Recalibrator
(:class:`RecalibratorConfig`), the training stages (:data:`Stage`) and the evaluation.

Every model is a frozen pydantic model that forbids unknown keys, with ``to_dict()`` /
``from_dict()``. Validation collects EVERY problem of a file before any work starts and raises
one :class:`~genrecal.common.errors.ConfigError` whose problems name the YAML path
(``pipelines.demo.stages[1].lr_start``), the expected form and the line in the file. Types are
strict (``"8"`` is not an integer, ``1`` is not ``true``). The cross-field checks of a mapping
(steps XOR epochs, stage order, features a loss needs...) run once its own keys are valid.

Conventions:

* Relative paths (cache location, data paths, output directories) are resolved against the
  current working directory by the code that uses them, not against the YAML file.
* Top-level keys starting with ``x-`` are ignored; they hold YAML anchors shared by pipelines
  (``<<: *paper_stage`` merges them into a mapping).
* ``1e-4`` is read as a number (plain YAML 1.1 would read it as a string).
"""

from __future__ import annotations

import re
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ByteSize, ConfigDict, Field
from pydantic import model_validator
from pydantic_core import PydanticCustomError
from typing_extensions import Self

from genrecal.common.errors import ConfigError
from genrecal.common.vocabulary import (FAMILY_NAMES, FEATURE_CODECS, GENRECAL_STAGES, METRICS,
                                         QUANT_MODULES, ROW_TITLES, STAGE_ORDER, TEXT_FAMILY_NAMES,
                                         TINY_KINDS)
from genrecal.common.yaml_validation import Context, choices, format_path, read_document, render, validate

#: Default location of the packaged pipelines file inside the ``genrecal`` package.
PIPELINESFILENAME = "pipelines.yaml"

Family = Literal[FAMILY_NAMES]  # type: ignore[valid-type]
TinyKind = Literal[tuple(TINY_KINDS)]  # type: ignore[valid-type]
Dtype = Literal["float32", "bfloat16", "float16"]
Codec = Literal["f32", "bf16", "fp8_e4m3", "int8"]  # which ones a feature takes: FEATURE_CODECS
OnError = Literal["raise", "skip"]
Precision = Literal["fp32", "bf16"]
Metric = Literal[METRICS]  # type: ignore[valid-type]
QuantModule = Literal[QUANT_MODULES]  # type: ignore[valid-type]

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
NonEmptyStr = Annotated[str, Field(min_length=1)]

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

Problem = tuple[tuple[Union[str, int], ...], str]  # (location relative to a model, message)


# --------------------------------------------------------------------------------------------
# Base model
# --------------------------------------------------------------------------------------------

class ConfigModel(BaseModel):
    """Frozen, strict, closed model; cross-field checks come from :meth:`_problems`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict; ``from_dict(to_dict())`` gives an equal model."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<dict>") -> Self:
        """Validate ``data``; raise ConfigError listing every problem (paths relative to it)."""
        return validate(cls, data, Context(source=source))

    def _problems(self) -> list[Problem]:
        """Cross-field problems as ``(location relative to this model, message)``."""
        return []

    @model_validator(mode="after")
    def _check_cross_fields(self):
        problems = self._problems()
        if problems:
            summary = "; ".join(f"{format_path(loc)}: {msg}" for loc, msg in problems)
            raise PydanticCustomError("config", "{summary}",
                                      {"summary": summary, "problems": problems})
        return self


# --------------------------------------------------------------------------------------------
# Models: teacher / student
# --------------------------------------------------------------------------------------------

class TinySpec(ConfigModel):
    """A tiny random VLM built by the kit (``genrecal.model.tiny.build_tiny_vlm``).

    Sizes left out (None) take the kit's default for the kind."""

    kind: TinyKind
    seed: NonNegInt = 0
    tokenizer_seed: NonNegInt | None = None  # None: seed; equal ones give one tokenizer (GRACE)
    vocab_size: PosInt | None = None
    hidden_size: PosInt | None = None
    num_layers: PosInt | None = None
    num_heads: PosInt | None = None
    num_kv_heads: PosInt | None = None
    path: NonEmptyStr | None = None  # where it is built; None: <pipeline output>/models/<role>

    def _problems(self) -> list[Problem]:
        problems: list[Problem] = []
        pairs = (("hidden_size", "num_heads"), ("num_heads", "num_kv_heads"))
        for whole, part in pairs:
            a, b = getattr(self, whole), getattr(self, part)
            if a is not None and b is not None and a % b:
                problems.append(((whole,), f"must be divisible by {part} ({b}); got {a}"))
        return problems

    def build_kwargs(self) -> dict[str, int]:
        """Keyword arguments of ``build_tiny_vlm(kind, out_dir, **kwargs)``."""
        return {k: v for k, v in self.model_dump(exclude={"kind", "path"}).items()
                if v is not None}


class ModelSpec(ConfigModel):
    """Where a teacher or student VLM comes from and how it is loaded."""

    source: NonEmptyStr | None = None  # local directory or hub id (e.g. Qwen/Qwen2-VL-2B-Instruct)
    tiny: TinySpec | None = None
    family: Family | None = None  # filled from tiny.kind when left out
    revision: NonEmptyStr | None = None
    dtype: Dtype = "bfloat16"
    device: NonEmptyStr | None = None  # e.g. cpu, cuda, cuda:1
    device_map: NonEmptyStr | dict[str, Union[int, str]] | None = None  # e.g. auto
    trust_remote_code: bool = False

    @model_validator(mode="before")
    @classmethod
    def _family_from_tiny(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("family") is None:
            kind = data.get("tiny", {}).get("kind") if isinstance(data.get("tiny"), dict) else None
            if kind in TINY_KINDS:
                return {**data, "family": TINY_KINDS[kind]}
        return data

    def _problems(self) -> list[Problem]:
        problems: list[Problem] = []
        if (self.source is None) == (self.tiny is None):
            problems.append((("source",), "set exactly one of 'source' (a local directory or a "
                             "hub id such as Qwen/Qwen2-VL-2B-Instruct) or 'tiny' (a tiny model "
                             "built by the kit)"))
        if self.source is not None and self.family is None:
            problems.append((("family",), f"required with 'source'; one of {choices(FAMILY_NAMES)}"))
        elif self.tiny is not None and self.family != TINY_KINDS[self.tiny.kind]:
            problems.append((("family",), f"{self.family!r} contradicts tiny.kind "
                             f"{self.tiny.kind!r} (family {TINY_KINDS[self.tiny.kind]!r}); "
                             "leave 'family' out for a tiny model"))
        if self.device is not None and self.device_map is not None:
            problems.append((("device_map",), "set 'device' or 'device_map', not both"))
        return problems

    @property
    def label(self) -> str:
        """Short human description: the source, or the tiny model's shape."""
        if self.tiny is None:
            return str(self.source)
        sizes = [f"{key}={value}" for key, value in (("d", self.tiny.hidden_size),
                                                       ("V", self.tiny.vocab_size)) if value]
        return f"tiny:{self.tiny.kind}" + (f"({','.join(sizes)})" if sizes else "")


# --------------------------------------------------------------------------------------------
# Models: data
# --------------------------------------------------------------------------------------------

class DataSource(ConfigModel):
    """One input dataset: a local file / directory or a hub dataset, and the split it gives."""

    path: NonEmptyStr
    format: Literal["auto", "llava", "messages"] = "auto"
    image_root: NonEmptyStr | None = None
    split: NonEmptyStr = "train"
    limit: PosInt | None = None


class SyntheticData(ConfigModel):
    """Generated VQA samples for the demo and the tests (splits ``train`` and ``test``, and
    ``validation`` when ``n_validation`` > 0: the split to tune hyper-parameters on; the three
    draw from disjoint scenes).

    ``modality``: ``image`` (the scenes rendered as images, genrecal.data.synthetic) or ``text``
    (the same scenes and questions with each scene described in words and no image, for
    text-only teachers and students, genrecal.data.synthetic_text; ``image_size`` is unused).

    ``jitter``: how far (pixels, each axis) every object's centre may move from its place,
    drawn per object after the split (0, the default: the fixed places; at most
    genrecal.data.synthetic.max_jitter: 2 at 32 px, 4 at 64). Images only."""

    n_train: PosInt = 64
    n_test: NonNegInt = 16
    n_validation: NonNegInt = 0
    image_size: Annotated[int, Field(ge=8, le=1024)] = 32
    seed: NonNegInt = 0
    modality: Literal["image", "text"] = "image"
    jitter: NonNegInt = 0

    def _problems(self) -> list[Problem]:
        problems: list[Problem] = []
        if self.modality == "text" and self.n_validation:
            problems.append((("n_validation",), "the text set has train and test splits only; "
                             "leave n_validation out (or 0) for modality: text"))
        if self.modality == "text" and self.jitter:
            problems.append((("jitter",), "the text set describes places in words, it has no "
                             "pixels to move; leave jitter out for modality: text"))
        return problems


class DataConfig(ConfigModel):
    """Input data of a pipeline: declared sources and/or synthetic samples."""

    sources: list[DataSource] = Field(default_factory=list)
    synthetic: SyntheticData | None = None
    on_error: OnError = "raise"

    def _problems(self) -> list[Problem]:
        if not self.sources and self.synthetic is None:
            return [(("sources",), "declare at least one data source (sources: [{path: ...}]) "
                     "or a 'synthetic:' block")]
        return []

    def splits(self) -> set[str]:
        """Every split name the data provides."""
        provided = {source.split for source in self.sources}
        if self.synthetic is not None:
            provided |= {"train"} | ({"test"} if self.synthetic.n_test else set()) | (
                {"validation"} if self.synthetic.n_validation else set())
        return provided


# --------------------------------------------------------------------------------------------
# Models: teacher cache
# --------------------------------------------------------------------------------------------

class LogitStatsFeature(ConfigModel):
    """Per answer token: target logit, logsumexp at T=1 and T, entropy, top-k (docs/method.md §2)."""

    top_k: Annotated[int, Field(ge=1, le=4096)] = 128
    temperature: PosFloat = 2.0


class Features(ConfigModel):
    """What the teacher pass stores per sample (docs/method.md §3)."""

    answer_hidden: bool = True  # z_al over the answer window
    question_hidden: Literal["all", "text", "none"] = "all"  # z_ql; 'all' includes image tokens
    visual_gram: bool = False  # uncentred Gram K = V V^T of block L-2 visual states (GRACE RCKA, docs/method.md §2.4)
    logit_stats: LogitStatsFeature | None = None
    input_embeddings: bool = False  # teacher input-embedding matrix, a cache artifact

    def _problems(self) -> list[Problem]:
        if not (self.answer_hidden or self.question_hidden != "none" or self.visual_gram
                or self.logit_stats is not None):
            return [(("answer_hidden",), "every feature is off: the cache would hold no teacher "
                     "features; enable at least one")]
        return []


class Codecs(ConfigModel):
    """Storage codec per cached feature (each one of :data:`FEATURE_CODECS` for its feature)."""

    answer_hidden: Codec = "bf16"
    question_hidden: Codec = "bf16"
    visual_gram: Codec = "bf16"
    logit_stats: Codec = "bf16"

    def _problems(self) -> list[Problem]:
        return [((feature,), f"{getattr(self, feature)!r} is not a codec of {feature}; the cache "
                 f"stores it as one of {choices(allowed)}")
                for feature, allowed in FEATURE_CODECS.items() if getattr(self, feature) not in allowed]


class ShardLimits(ConfigModel):
    """A cache shard closes when either bound is reached (None: no bound of that kind)."""

    max_tokens: PosInt | None = 65536
    max_bytes: ByteSize | None = ByteSize(256 * 2**20)  # accepts 256MiB, "1 GB", 1048576

    def _problems(self) -> list[Problem]:
        if self.max_tokens is None and self.max_bytes is None:
            return [(("max_tokens",), "set max_tokens or max_bytes (or both)")]
        if self.max_bytes is not None and self.max_bytes <= 0:
            return [(("max_bytes",), f"must be positive, got {int(self.max_bytes)}")]
        return []


class GenerateAnswers(ConfigModel):
    """Teacher-answers mode: the teacher answers each question before features are cached."""

    max_new_tokens: PosInt = 512
    temperature: NonNegFloat = 0.0  # 0: greedy
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    replace: Literal["always", "if_correct"] = "if_correct"  # keep the reference otherwise


class CacheConfig(ConfigModel):
    """Teacher cache location and extraction settings."""

    location: NonEmptyStr  # local path or fsspec URL (s3://bucket/x, memory://x)
    features: Features = Field(default_factory=Features)
    codecs: Codecs = Field(default_factory=Codecs)
    shard: ShardLimits = Field(default_factory=ShardLimits)
    batch_size: PosInt = 1
    max_length: PosInt = 4096
    on_error: OnError = "raise"
    generate_answers: GenerateAnswers | None = None
    # processes that encode samples (chat template, tokenizer, images) ahead of the teacher's
    # forward; 0: a thread of the extraction process (best on few cores: docs/cache_speed.md)
    encode_workers: NonNegInt = 0

    def _problems(self) -> list[Problem]:
        unknown = _unknown_protocols(self.location)
        if unknown:
            return [(("location",), f"unknown storage protocol(s) {choices(unknown)} in "
                     f"{self.location!r}; use a local path or a URL fsspec knows (s3://, gs://, "
                     "memory://, file://...)")]
        return []


def _unknown_protocols(location: str) -> list[str]:
    """Protocols of a (possibly chained ``a::b://``) URL that fsspec does not know."""
    from fsspec.registry import known_implementations, registry

    protocols = [m.group(1) for part in location.split("::")
                 if (m := re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", part))]
    if "::" in location:
        protocols += [part for part in location.split("::")[:-1] if "://" not in part]
    return [p for p in protocols if p not in known_implementations and p not in registry]


# --------------------------------------------------------------------------------------------
# Models: training
# --------------------------------------------------------------------------------------------

class RecalibratorConfig(ConfigModel):
    """The Recalibrator shared by the align and distill stages (docs/method.md §1.1, §1.2).

    The one config type of :class:`genrecal.train.recalibrator.Recalibrator`: it is built from
    it and saves it (``to_dict``) next to its weights.

    blocks: decoder blocks in RecBody (paper: 2; 1 block 74.9, 20 blocks 76.7); at most the
        student's decoder layers (checked when the Recalibrator is built).
    init: ``copy`` = the student's last ``blocks`` decoder blocks (R); ``random`` = the
        student's own ``_init_weights`` (normal, std=initializer_range), seeded.
    answer_input: the answer input ``e`` fed to P_pre: ``hidden`` = z_al (paper),
        ``embedding`` = the teacher's answer token embeddings (width d_l too).
    reassign_positions: True = positions 0..N_qs+N_al-1 over the packed row (paper); False =
        the caller's positions (NPE ablation, docs/method.md §1.2).
    """

    blocks: Annotated[int, Field(ge=1, le=64)] = 2
    init: Literal["copy", "random"] = "copy"  # copy: the student's last `blocks` decoder blocks
    answer_input: Literal["hidden", "embedding"] = "hidden"  # z_al, or teacher token embeddings
    reassign_positions: bool = True  # positions 0..N_qs+N_al-1 over the concatenation


class TrainSwitches(ConfigModel):
    """Which parameter groups a stage trains; everything else is frozen."""

    recalibrator: bool = False
    vision_encoder: bool = False
    projector: bool = False
    student_body: bool = False
    student_embeddings: bool = False
    student_head: bool = False

    def student_parts(self) -> list[str]:
        """Names of the trainable student parameter groups."""
        return [k for k, on in self.model_dump().items() if on and k != "recalibrator"]


class Losses(ConfigModel):
    """GenRecal loss weights (0 turns a loss off) and the KL temperature (docs/method.md §1).

    ``reg`` weighs L_reg; ``reg_terms`` picks its terms: ``ce+kl`` (the paper's choice),
    ``ce`` or ``kl`` alone (the paper's regulariser ablation).
    """

    ar: NonNegFloat = 1.0
    kl: NonNegFloat = 1.0
    reg: NonNegFloat = 1.0
    reg_terms: Literal["ce+kl", "ce", "kl"] = "ce+kl"
    ce_student: NonNegFloat = 0.0
    temperature: PosFloat = 1.0

    @property
    def reg_ce(self) -> float:
        """Weight of CE(head_l(r'_al), teacher answer ids), the CE term of L_reg."""
        return self.reg if "ce" in self.reg_terms else 0.0

    @property
    def reg_kl(self) -> float:
        """Weight of KL(head_l(z_al) || head_l(r'_al)), the KL term of L_reg."""
        return self.reg if "kl" in self.reg_terms else 0.0


class GdkdConfig(ConfigModel):
    """Confidence-gated decoupled KD of GRACE: DKD = (alpha*TCKD + beta_dkd*NCKD) * T^2, gated by
    the teacher's entropy (docs/method.md §2.1, eqs. (2.2)-(2.6)).

    ``source``: where the teacher's logits come from: ``exact`` (the cached ``answer_hidden``
    through the cached teacher head, chunked over the vocabulary) or ``logit_stats`` (TCKD and
    the gate exact, NCKD over the top-k plus one tail bucket, docs/method.md §2.4).
    ``warmup_steps``: w_d of (2.1) rises linearly from 0 to 1 over this many optimizer steps.
    """

    temperature: PosFloat = 2.0
    alpha: NonNegFloat = 1.0
    beta_dkd: NonNegFloat = 4.0
    source: Literal["exact", "logit_stats"] = "logit_stats"
    warmup_steps: NonNegInt = 0


class RckaConfig(ConfigModel):
    """Relational CKA on visual tokens, weight omega with a linear warm-up (docs/method.md §2)."""

    omega: NonNegFloat = 3.0
    warmup_steps: NonNegInt = 400
    min_tokens: Annotated[int, Field(ge=2)] = 4


class ControllerConfig(ConfigModel):
    """Lagrangian controller of beta: beta <- clip(beta + eta*(EMA(L_GDKD) - tau))."""

    beta_init: NonNegFloat = 0.5
    beta_min: NonNegFloat = 0.1
    beta_max: NonNegFloat = 1.0
    tau: NonNegFloat = 3.0
    eta: NonNegFloat = 0.003
    ema: Annotated[float, Field(ge=0, lt=1)] = 0.99

    def _problems(self) -> list[Problem]:
        if not self.beta_min <= self.beta_init <= self.beta_max:
            return [(("beta_init",), f"needs beta_min <= beta_init <= beta_max; got "
                     f"{self.beta_min} <= {self.beta_init} <= {self.beta_max}")]
        return []


class QuantConfig(ConfigModel):
    """Weight-only fake quantisation of the student's decoder linears: quantisation-aware
    training in any stage (docs/method.md §2.3).

    Symmetric signed codes of ``bits`` bits, one learnable log-scale per group of
    ``group_size`` input columns (initialised by an MSE grid search), straight-through
    rounding; the scales train in their own optimizer group at ``scale_lr_mult`` times the
    stage's learning rate, without weight decay. ``scale_dtype``: the precision the exported
    checkpoint stores scales in; the fake-quantiser rounds to it, so training sees the scales
    the export carries.
    """

    bits: Literal[4, 8] = 4
    group_size: PosInt = 128
    scale_lr_mult: PosFloat = 10.0
    scale_dtype: Dtype = "bfloat16"
    modules: list[QuantModule] = Field(default_factory=lambda: list(QUANT_MODULES))

    def _problems(self) -> list[Problem]:
        if not self.modules:
            return [(("modules",), f"list at least one of {choices(QUANT_MODULES)}")]
        if len(set(self.modules)) != len(self.modules):
            return [(("modules",), f"lists a module twice: {self.modules}")]
        return []


class _StageBase(ConfigModel):
    """Settings every training stage has: schedule, batch, length, precision, output."""

    #: Per nested block, the stage type's defaults; keys given in the file override them.
    block_defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    name: str  # the stage type; each subclass narrows it to its Literal
    lr_start: PosFloat = 1e-4
    lr_end: NonNegFloat = 1e-5  # linear from lr_start to lr_end over the stage
    warmup: NonNegInt = 0  # optimizer steps of linear warm-up from 0 to lr_start
    weight_decay: NonNegFloat = 0.0
    batch_size: PosInt = 8
    grad_accum: PosInt = 1
    steps: PosInt | None = None  # optimizer steps; exactly one of steps / epochs
    epochs: PosInt | None = None
    precision: Precision = "bf16"
    grad_clip: PosFloat | None = 1.0
    gradient_checkpointing: bool = False
    seed: NonNegInt = 0
    output: NonEmptyStr | None = None  # None: <pipeline output>/<stage name>
    trains: TrainSwitches = Field(default_factory=TrainSwitches)
    quantize: QuantConfig | None = None  # QAT of the student's decoder linears; None: off
    #: How the processes of a torchrun job share the work (one process: no difference but the
    #: checkpoint format). ``ddp``: every rank holds the whole model and optimizer, gradients
    #: are all-reduced. ``fsdp``: FSDP2 shards parameters, gradients and AdamW states over the
    #: ranks, one unit per decoder block of the student and of the Recalibrator plus the root;
    #: checkpoints are sharded (torch.distributed.checkpoint) and resume at another world size.
    #: See genrecal/train/loop.py and docs/memory.md.
    parallel: Literal["ddp", "fsdp"] = "ddp"

    @model_validator(mode="before")
    @classmethod
    def _merge_block_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for key, defaults in cls.block_defaults.items():
            given = data.get(key, {})
            if isinstance(given, dict):
                merged[key] = {**defaults, **given}
        return merged

    def _problems(self) -> list[Problem]:
        problems: list[Problem] = []
        if (self.steps is None) == (self.epochs is None):
            got = "both" if self.steps is not None else "neither"
            problems.append((("steps",), f"set exactly one of 'steps' or 'epochs' (got {got})"))
        if self.steps is not None and self.warmup >= self.steps:
            problems.append((("warmup",), f"must be smaller than steps ({self.steps}); "
                             f"got {self.warmup}"))
        if not any(self.trains.model_dump().values()):
            problems.append((("trains",), "trains nothing: switch on at least one of "
                             f"{choices(TrainSwitches.model_fields)}"))
        return problems

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step on one process (times the world size when distributed)."""
        return self.batch_size * self.grad_accum


class _GenRecalStage(_StageBase):
    """A stage that trains through the Recalibrator with the GenRecal losses."""

    losses: Losses = Field(default_factory=Losses)

    def _problems(self) -> list[Problem]:
        problems = super()._problems()
        if self.losses.ar + self.losses.kl + self.losses.reg + self.losses.ce_student == 0:
            problems.append((("losses",), "every loss weight is 0"))
        if self.losses.ce_student > 0 and not self.trains.student_parts():
            problems.append((("losses", "ce_student"), "CE_s needs a trainable student part "
                             "(trains.student_body, ...)"))
        return problems


class AlignStage(_GenRecalStage):
    """Stage 1: trains the Recalibrator alone; L_ar + L_kl + L_reg (docs/method.md §1)."""

    name: Literal["align"]
    block_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "trains": {"recalibrator": True},
        "losses": {"ce_student": 0.0},
    }


class DistillStage(_GenRecalStage):
    """Stage 2: Recalibrator + student body; L_ar + L_kl + CE_s (+ L_reg) (docs/method.md §1)."""

    name: Literal["distill"]
    block_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "trains": {"recalibrator": True, "student_body": True},
        "losses": {"ce_student": 1.0},
    }


class FinetuneStage(_StageBase):
    """Stage 3: every student part except the vision encoder, CE_s only (docs/method.md §1)."""

    name: Literal["finetune"]
    block_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "trains": {"projector": True, "student_body": True, "student_embeddings": True,
                   "student_head": True},
    }

    def _problems(self) -> list[Problem]:
        problems = super()._problems()
        if self.trains.recalibrator:
            problems.append((("trains", "recalibrator"), "finetune trains the student alone "
                             "(CE_s); the Recalibrator is not used in this stage"))
        return problems


class TeacherFinetune(FinetuneStage):
    """Makes a tiny / local teacher competent on the task before its cache is extracted
    (``genrecal run``, phase 3): the trainer's finetune stage, with the teacher in the student's
    seat. ``data`` is the teacher's own training data (None: the pipeline's data); giving the
    teacher more labelled samples than the student sees is how the demo makes its signal matter.
    ``output`` None: ``<pipeline output>/teacher``."""

    name: Literal["finetune"] = "finetune"
    data: DataConfig | None = None

    def _problems(self) -> list[Problem]:
        problems = super()._problems()
        if self.data is not None and "train" not in self.data.splits():
            problems.append((("data", "sources"), "the teacher's data gives no 'train' split to "
                             f"fine-tune on; splits given: {choices(sorted(self.data.splits()))}"))
        return problems


class GraceStage(_StageBase):
    """GRACE: L = ce*CE + beta*L_GDKD + omega*L_RCKA, optional QAT (docs/method.md §2)."""

    name: Literal["grace"]
    block_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "trains": {"projector": True, "student_body": True, "student_embeddings": True,
                   "student_head": True},
    }

    ce: NonNegFloat = 1.0
    gdkd: GdkdConfig = Field(default_factory=GdkdConfig)
    rcka: RckaConfig = Field(default_factory=RckaConfig)
    controller: ControllerConfig = Field(default_factory=ControllerConfig)

    def _problems(self) -> list[Problem]:
        problems = super()._problems()
        if self.trains.recalibrator:
            problems.append((("trains", "recalibrator"), "GRACE has no Recalibrator"))
        return problems


Stage = Annotated[Union[AlignStage, DistillStage, FinetuneStage, GraceStage],
                  Field(discriminator="name")]


class EvaluationConfig(ConfigModel):
    """How the trained student is evaluated."""

    split: NonEmptyStr = "test"
    max_new_tokens: PosInt = 64
    batch_size: PosInt = 8
    limit: PosInt | None = None
    metrics: list[Metric] = Field(default_factory=lambda: ["exact_match", "token_f1"])

    def _problems(self) -> list[Problem]:
        if not self.metrics:
            return [(("metrics",), f"list at least one of {choices(METRICS)}")]
        if len(set(self.metrics)) != len(self.metrics):
            return [(("metrics",), f"lists a metric twice: {self.metrics}")]
        return []


# --------------------------------------------------------------------------------------------
# Models: the teacher's inference engine (issue 13: vLLM)
# --------------------------------------------------------------------------------------------

class TeacherEngine(ConfigModel):
    """Which engine runs the teacher for ``genrecal answers`` and ``genrecal extract``.

    ``hf``: transformers in this process (``teacher.device`` / ``device_map``). ``vllm``: vLLM
    in its own environment, as a subprocess (``make venv-vllm``; see
    :mod:`genrecal.extract.vllm_engine`); the settings below are vLLM's engine arguments.
    The CLI's ``--backend`` overrides ``backend``.
    """

    backend: Literal["hf", "vllm"] = "hf"
    tensor_parallel_size: PosInt = 1
    # share of device memory vLLM may take (on a CPU machine: of host memory); None: 0.9 on a
    # GPU, 0.05 on a CPU
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] | None = None
    max_model_len: PosInt | None = None  # None: cache.max_length (+ max_new_tokens when answering)
    enforce_eager: bool = False  # True: no torch.compile / CUDA graphs (faster start-up)
    cpu_kvcache_gib: PosInt = 1  # VLLM_CPU_KVCACHE_SPACE on a CPU machine
    python: NonEmptyStr | None = None  # the vLLM environment's interpreter; None: .venv-vllm
    seed: NonNegInt = 0


# --------------------------------------------------------------------------------------------
# Models: pipeline and file
# --------------------------------------------------------------------------------------------

class StudyVariant(ConfigModel):
    """One ablation row of ``genrecal run`` (``run.variants``): the GenRecal row, same seeds,
    initial students and data, with these changes (None: as the pipeline has it).

    ``answer_input``, ``reassign_positions``, ``blocks``: the Recalibrator's (the variant's
    cache then also holds the teacher's input embeddings, for ``embedding``); ``reg_terms``: L_reg
    of the align and distill stages (``off``: weight 0); ``question_hidden_codec``: how the
    variant's cache stores z_ql (its own cache when it differs); ``quantize``: QAT in every stage
    that trains the student, the row evaluated as its real export (the cross-tokenizer
    INT4 student).
    """

    name: NonEmptyStr
    answer_input: Literal["hidden", "embedding"] | None = None
    reg_terms: Literal["off", "ce", "kl", "ce+kl"] | None = None
    reassign_positions: bool | None = None
    blocks: Annotated[int, Field(ge=1, le=64)] | None = None
    question_hidden_codec: Codec | None = None
    quantize: QuantConfig | None = None

    def _problems(self) -> list[Problem]:
        codec = self.question_hidden_codec
        if codec is not None and codec not in FEATURE_CODECS["question_hidden"]:
            return [(("question_hidden_codec",), f"{codec!r} is not a codec of question_hidden; "
                     f"use one of {choices(FEATURE_CODECS['question_hidden'])}")]
        return []


class RunConfig(ConfigModel):
    """How ``genrecal run`` compares its student rows (the data regime of the demo).

    ``labelled``: how many samples of the train split keep their labels for the label-only row
    (SFT on labels: the first ``labelled`` ones; None: all). With ``cache.generate_answers``
    the teacher answers the whole train split (an image pool mostly without labels), and the
    rows that learn from the teacher (SFT on teacher answers, GenRecal) read its answers: every
    row sees the same images, only the label-only row is limited to the labelled ones.
    ``grace``: the name of a GRACE pipeline in the same file whose rows (GRACE bf16, GRACE int4,
    QAT-only int4) join this run's table; it runs on this run's fine-tuned teacher and on the
    data its teacher-learning rows read, with its own same-tokenizer student, cache and stage.
    ``variants``: ablations of the GenRecal row (:class:`StudyVariant`), each one more row of
    the table, compared with GenRecal over the same seeds.
    """

    labelled: PosInt | None = None
    grace: NonEmptyStr | None = None  # a GRACE pipeline of the same file whose rows join the table
    variants: list[StudyVariant] = Field(default_factory=list)

    def _problems(self) -> list[Problem]:
        names = [v.name for v in self.variants]
        return [(("variants", i, "name"), f"{name!r} names two variants (or a row of the "
                 "table); give each variant its own name")
                for i, name in enumerate(names) if names.index(name) != i or name in ROW_TITLES.values()]


class Pipeline(ConfigModel):
    """One teacher -> student recipe. ``name`` is the pipeline's key in the file."""

    name: NonEmptyStr
    description: str = ""
    teacher: ModelSpec
    student: ModelSpec
    data: DataConfig
    cache: CacheConfig
    recalibrator: RecalibratorConfig = Field(default_factory=RecalibratorConfig)
    stages: Annotated[list[Stage], Field(min_length=1)]
    evaluation: EvaluationConfig | None = Field(default_factory=EvaluationConfig)
    output: NonEmptyStr | None = None  # None: runs/<name>
    teacher_finetune: TeacherFinetune | None = None  # genrecal run only; tiny / local teachers
    run: RunConfig = Field(default_factory=RunConfig)  # genrecal run only: the rows' data regime
    teacher_engine: TeacherEngine = Field(default_factory=TeacherEngine)  # answers / extract

    def _problems(self) -> list[Problem]:
        bad_name = [] if _NAME_RE.fullmatch(self.name) else [
            (("name",), f"invalid pipeline name {self.name!r}: use letters, digits, '.', '_' "
             "and '-', starting with a letter or a digit")]
        return [*bad_name, *_stage_order_problems(self.stages), *_cache_feature_problems(self),
                *_text_model_problems(self),
                *_recalibrator_problems(self), *_grace_problems(self), *_split_problems(self),
                *_teacher_finetune_problems(self), *_engine_problems(self)]

    @property
    def output_dir(self) -> str:
        """Root directory of this pipeline's outputs."""
        return self.output or f"runs/{self.name}"

    def stage(self, name: str) -> AlignStage | DistillStage | FinetuneStage | GraceStage:
        """The stage called ``name``; KeyError naming the stages that exist otherwise."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"pipeline {self.name!r} has no stage {name!r}; it has "
                       f"{choices(s.name for s in self.stages)}")

    def stage_dir(self, name: str) -> str:
        """Output directory of stage ``name``."""
        return self.stage(name).output or f"{self.output_dir}/{name}"

    def model_location(self, role: Literal["teacher", "student"]) -> str:
        """Hub id / directory of a model; for a tiny model, the directory it is built into."""
        spec = self.teacher if role == "teacher" else self.student
        if spec.tiny is None:
            return str(spec.source)
        return spec.tiny.path or f"{self.output_dir}/models/{role}"

    def summary(self) -> str:
        """One line: teacher -> student | stages."""
        stages = " -> ".join(stage.name for stage in self.stages)
        return f"{self.teacher.label} -> {self.student.label} | {stages}"


def _stage_order_problems(stages: list) -> list[Problem]:
    problems: list[Problem] = []
    ranks = [STAGE_ORDER.index(stage.name) for stage in stages]
    for i, stage in enumerate(stages):
        if stage.name in [s.name for s in stages[:i]]:
            problems.append((("stages", i, "name"), f"stage {stage.name!r} appears twice"))
        elif i and ranks[i] < max(ranks[:i]):
            problems.append((("stages", i, "name"), f"stage {stage.name!r} is out of order; "
                             f"stages run in the order {' -> '.join(STAGE_ORDER)}"))
    return problems


def _cache_feature_problems(pipe: Pipeline) -> list[Problem]:
    """The GenRecal stages' losses need teacher features that the cache must extract."""
    features, problems = pipe.cache.features, []
    feeding = _stage_labels(pipe, lambda s: s.name in GENRECAL_STAGES)
    if feeding and not features.answer_hidden:
        problems.append((("cache", "features", "answer_hidden"), f"must be true: {feeding} "
                         "feed z_al to the Recalibrator"))
    regularised = _stage_labels(pipe, lambda s: isinstance(s, _GenRecalStage) and s.losses.reg)
    if regularised and features.question_hidden == "none":
        problems.append((("cache", "features", "question_hidden"), f"must be 'all' or 'text': "
                         f"{regularised} use L_reg, which needs z_ql (or set losses.reg: 0)"))
    return problems


def _text_model_problems(pipe: Pipeline) -> list[Problem]:
    """A text-only model (TEXT_FAMILY_NAMES) has no visual tokens and sees no images."""
    problems: list[Problem] = []
    teacher = pipe.teacher.family
    if teacher in TEXT_FAMILY_NAMES and pipe.cache.features.visual_gram:
        problems.append((("cache", "features", "visual_gram"), f"must be false: the teacher's "
                         f"family {teacher!r} is text-only, so there are no visual tokens to take "
                         "a Gram matrix of (GRACE's RCKA needs a vision-language pair; set "
                         "rcka.omega: 0 for a text pair)"))
    text_roles = [role for role in ("teacher", "student")
                  if getattr(pipe, role).family in TEXT_FAMILY_NAMES]
    readers = {"data": (pipe.data, text_roles),  # the teacher's own fine-tuning data: the teacher
               "teacher_finetune.data": (pipe.teacher_finetune and pipe.teacher_finetune.data,
                                         [r for r in text_roles if r == "teacher"])}
    for where, (data, text_roles) in readers.items():
        synthetic = data.synthetic if data is not None else None
        if text_roles and synthetic is not None and synthetic.modality == "image":
            problems.append(((*where.split("."), "synthetic", "modality"), f"the {' and '.join(text_roles)} "
                             f"{'is' if len(text_roles) == 1 else 'are'} text-only and cannot read "
                             "the synthetic images; set modality: text (each scene described in "
                             "words)"))
    return problems


def _stage_labels(pipe: Pipeline, predicate) -> str:
    """``stages[0] (align), stages[1] (distill)`` for the stages that satisfy ``predicate``."""
    return ", ".join(f"stages[{i}] ({s.name})" for i, s in enumerate(pipe.stages) if predicate(s))


def _recalibrator_problems(pipe: Pipeline) -> list[Problem]:
    if not any(stage.name in GENRECAL_STAGES for stage in pipe.stages):
        return []
    rec, problems = pipe.recalibrator, []
    if rec.answer_input == "embedding" and not pipe.cache.features.input_embeddings:
        problems.append((("cache", "features", "input_embeddings"), "must be true: "
                         "recalibrator.answer_input 'embedding' reads the teacher's input "
                         "embeddings from the cache"))
    tiny = pipe.student.tiny
    if rec.init == "copy" and tiny is not None and tiny.num_layers is not None \
            and rec.blocks > tiny.num_layers:
        problems.append((("recalibrator", "blocks"), f"init 'copy' copies the student's last "
                         f"{rec.blocks} blocks but it has {tiny.num_layers}"))
    return problems


def _grace_problems(pipe: Pipeline) -> list[Problem]:
    """GRACE reads same-tokenizer logit information and, for RCKA, visual Grams."""
    problems: list[Problem] = []
    features = pipe.cache.features
    for i, stage in enumerate(pipe.stages):
        if not isinstance(stage, GraceStage):
            continue
        where = f"stages[{i}] (grace)"
        if pipe.teacher.family != pipe.student.family:
            problems.append((("student", "family"), f"{where} needs teacher and student of the "
                             f"same family and tokenizer; got {pipe.teacher.family!r} and "
                             f"{pipe.student.family!r}"))
        if stage.gdkd.source == "exact" and not features.answer_hidden:
            problems.append((("cache", "features", "answer_hidden"), f"must be true: {where} has "
                             "gdkd.source 'exact' (teacher logits from the cached z and head); or "
                             "set gdkd.source: logit_stats"))
        elif stage.gdkd.source == "logit_stats" and features.logit_stats is None:
            problems.append((("cache", "features", "logit_stats"), f"must be set: {where} has "
                             "gdkd.source 'logit_stats'; or set gdkd.source: exact with "
                             "answer_hidden: true"))
        elif stage.gdkd.source == "logit_stats" and \
                features.logit_stats.temperature != stage.gdkd.temperature:
            problems.append((("cache", "features", "logit_stats", "temperature"),
                             f"must equal {where} gdkd.temperature ({stage.gdkd.temperature})"))
        if stage.rcka.omega > 0 and not features.visual_gram:
            problems.append((("cache", "features", "visual_gram"), f"must be true: {where} has "
                             "rcka.omega > 0 (or set rcka.omega: 0)"))
    return problems


def _engine_problems(pipe: Pipeline) -> list[Problem]:
    """vLLM's context must hold the longest sequence the pipeline encodes."""
    limit = pipe.teacher_engine.max_model_len
    if limit is not None and limit < pipe.cache.max_length:
        return [(("teacher_engine", "max_model_len"), f"{limit} is below cache.max_length "
                 f"({pipe.cache.max_length}): vLLM would refuse the longest samples; raise it "
                 "or leave it out (default: cache.max_length, plus the answer length when "
                 "answering)")]
    return []


def _teacher_finetune_problems(pipe: Pipeline) -> list[Problem]:
    """Only a teacher built here or read from a local directory may be fine-tuned in place."""
    source = pipe.teacher.source
    if pipe.teacher_finetune is None or source is None or _is_local_path(source):
        return []
    return [(("teacher_finetune",), f"fine-tunes tiny or local teachers only; teacher.source "
             f"{source!r} is a hub id: give a local directory (./path or /path) or remove "
             "teacher_finetune")]


def _is_local_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or Path(source).is_absolute()


def _split_problems(pipe: Pipeline) -> list[Problem]:
    provided = pipe.data.splits()
    problems: list[Problem] = []
    if "train" not in provided:
        problems.append((("data", "sources"), f"no source gives the 'train' split that the "
                         f"stages train on; splits given: {choices(sorted(provided))}"))
    if pipe.evaluation is not None and pipe.evaluation.split not in provided:
        problems.append((("evaluation", "split"), f"{pipe.evaluation.split!r} is not given by "
                         f"the data; splits given: {choices(sorted(provided))}"))
    return problems


class PipelinesFile(ConfigModel):
    """A whole pipelines.yaml: ``pipelines: {name: Pipeline}``; top-level ``x-*`` keys ignored."""

    pipelines: Annotated[dict[str, Pipeline], Field(min_length=1)]

    @model_validator(mode="before")
    @classmethod
    def _prepare(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith("x-"))}
        if isinstance(data.get("pipelines"), dict):
            data["pipelines"] = {k: _with_name(v, str(k)) for k, v in data["pipelines"].items()}
        return data

    def _problems(self) -> list[Problem]:
        return [(("pipelines", key, "name"), f"must equal the pipeline's key {key!r} (or be "
                 f"left out); got {pipe.name!r}")
                for key, pipe in self.pipelines.items() if pipe.name != key]


def _with_name(raw: Any, name: str) -> Any:
    """The pipeline mapping with its key as ``name`` (kept if the file sets one)."""
    if isinstance(raw, dict) and "name" not in raw:
        return {"name": name, **raw}
    return raw


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def locate_pipelines_file(path: str | Path | None = None) -> Path | Traversable:
    """The file ``load_pipelines(path)`` reads: ``path``, else ./pipelines.yaml if present,
    else the default packaged with genrecal."""
    if path is not None:
        return Path(path)
    local = Path.cwd() / PIPELINESFILENAME
    if local.is_file():
        return local
    return resources.files("genrecal").joinpath(PIPELINESFILENAME)


def pipelines_source(path: str | Path | None = None) -> str:
    """How messages name the file ``load_pipelines(path)`` reads."""
    where = locate_pipelines_file(path)
    if path is None and where != Path.cwd() / PIPELINESFILENAME:
        return f"{where} (packaged default)"
    return str(where)


def load_pipelines(path: str | Path | None = None) -> PipelinesFile:
    """Read and validate a whole pipelines file; ConfigError lists every problem."""
    doc = read_document(locate_pipelines_file(path), pipelines_source(path))
    return validate(PipelinesFile, doc.data, doc.context())


def get_pipeline(name: str, path: str | Path | None = None) -> Pipeline:
    """Read one pipeline; only its own problems (and the file's shape) can make this fail."""
    doc = read_document(locate_pipelines_file(path), pipelines_source(path))
    raw = doc.data.get("pipelines") if isinstance(doc.data, dict) else None
    if not isinstance(raw, dict):
        raise ConfigError(doc.source, render([(("pipelines",), "expected a top-level "
                                                "'pipelines:' mapping of name -> pipeline")],
                                              doc.context()))
    if name not in raw:
        raise ConfigError(doc.source, render([(("pipelines", name), f"no pipeline named "
                                                f"{name!r}; the file has {choices(raw)}")],
                                              doc.context()))
    return validate(Pipeline, _with_name(raw[name], name), doc.context(("pipelines", name)))


