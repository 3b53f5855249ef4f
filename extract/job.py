"""What one teacher pass does: :class:`ExtractJob`, built from a pipeline and CLI overrides.

Two layers:

* :class:`ExtractSettings` is what the cache records (``manifest.header.settings``) and what every
  rank and every resumed run must agree on: the teacher source, the input data (absolute paths),
  the maximum sequence length. It is enough to rerun the teacher on cached samples from the cache
  alone (``genrecal validate CACHE --against-teacher N``, :mod:`genrecal.extract.fidelity`).
* :class:`ExtractJob` adds how this run goes about it: output location, features and codecs,
  shard limits, batch size, plan window, error policy, limit, resume, devices.

The batch plan is made per *window* of ``window`` consecutive samples (dataset order), and
windows, not samples, are dealt to the ranks (window ``w`` goes to rank ``w % world``). The
window size does not depend on the number of ranks, so every batch holds the same samples in a
1-rank and an N-rank run, and in an interrupted and a resumed one: their caches are identical.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, replace
from pathlib import Path

from genrecal.common.config import (Codecs, DataSource, Features, Pipeline, SyntheticData,
                                   TeacherEngine, TinySpec)
from genrecal.extract.errors import ExtractSetupError
from genrecal.store import schema
from genrecal.data import pipeline_data

EXTRACT_SPLIT = "train"
"""The split the teacher pass extracts: the one the training stages read."""
WINDOW_BATCHES = 16
"""Default plan window, in batches: bucketing sorts ``16 * batch_size`` samples at a time."""

def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def _is_url(location: str) -> bool:
    return "://" in location or "::" in location


@dataclass(frozen=True)
class TeacherSource:
    """Where the teacher comes from and in which dtype it runs (recorded in the cache)."""

    location: str  # absolute directory or hub id
    family: str
    dtype: str = "bfloat16"
    trust_remote_code: bool = False
    revision: str | None = None  # hub branch / tag / commit of a hub-id location

    def to_dict(self) -> dict:
        return {"location": self.location, "family": self.family, "dtype": self.dtype,
                "trust_remote_code": self.trust_remote_code, "revision": self.revision}

    @classmethod
    def from_dict(cls, data: dict) -> "TeacherSource":
        return cls(**_known(data, cls.__dataclass_fields__, "settings.teacher"))


@dataclass(frozen=True)
class ExtractSettings:
    """What a cache was extracted from; recorded as ``manifest.header.settings``.

    sources: the train-split data sources with absolute paths (synthetic data appears as the
    LLaVA file it was generated into); read_on_error: the dataset reader's policy; backend: the
    engine that ran the teacher's forward (``teacher_engine.backend``: ``hf`` or ``vllm``), so
    that a resume cannot mix the two (they agree within the bf16 bound of docs/vllm.md, not bit
    for bit). Caches written before it was recorded read back as ``hf``.
    """

    teacher: TeacherSource
    sources: tuple[DataSource, ...]
    max_length: int
    image_cache: str | None = None
    read_on_error: str = "raise"
    backend: str = "hf"

    def to_dict(self) -> dict:
        return {"teacher": self.teacher.to_dict(), "sources": [s.to_dict() for s in self.sources],
                "max_length": self.max_length, "image_cache": self.image_cache,
                "read_on_error": self.read_on_error, "backend": self.backend}

    @classmethod
    def from_dict(cls, data: dict) -> "ExtractSettings":
        data = _known(data, cls.__dataclass_fields__, "settings")
        return cls(teacher=TeacherSource.from_dict(data["teacher"]),
                   sources=tuple(DataSource.from_dict(s, source="settings.sources")
                                 for s in data["sources"]),
                   max_length=int(data["max_length"]), image_cache=data.get("image_cache"),
                   read_on_error=data.get("read_on_error", "raise"),
                   backend=data.get("backend", "hf"))


def _known(data: dict, fields, where: str) -> dict:
    if not isinstance(data, dict):
        raise ExtractSetupError(f"{where} must be a mapping, got {type(data).__name__}; the cache "
                                "was not written by `genrecal extract`")
    unknown = set(data) - set(fields)
    missing = {n for n, f in fields.items()
               if n not in data and f.default is MISSING and f.default_factory is MISSING}
    if unknown or missing:
        raise ExtractSetupError(f"{where}: unknown keys {sorted(unknown)}, missing keys "
                                f"{sorted(missing)}; the cache was written by another genrecal "
                                "version: pass --pipeline to say where the teacher and data are")
    return data


@dataclass(frozen=True)
class ExtractJob:
    """One teacher pass (see the module docstring). Build it with :func:`job_from_pipeline`."""

    settings: ExtractSettings
    out: str
    features: Features = field(default_factory=Features)
    codecs: Codecs = field(default_factory=Codecs)
    batch_size: int = 1
    window: int | None = None  # None: WINDOW_BATCHES * batch_size
    shard_tokens: int | None = 65536
    shard_bytes: int | None = 256 << 20
    on_error: str = "raise"
    limit: int | None = None
    resume: bool = False
    device: str | None = None  # None: cuda if available, else cpu
    device_map: str | dict | None = None
    tiny: TinySpec | None = None  # build the teacher with the kit if its directory is missing
    synthetic: SyntheticData | None = None
    synthetic_dir: str | None = None  # where synthetic data is generated (if missing)
    progress: bool = True
    engine: TeacherEngine = field(default_factory=TeacherEngine)  # hf, or vllm in a subprocess
    encode_workers: int = 0  # processes that encode windows ahead of the forward (0: a thread)

    def __post_init__(self) -> None:
        if self.settings.backend != self.engine.backend:
            raise ExtractSetupError(
                f"the job's recorded backend {self.settings.backend!r} is not its engine's "
                f"{self.engine.backend!r}; build jobs with job_from_pipeline(..., backend=...)")

    @property
    def plan_window(self) -> int:
        return self.window or WINDOW_BATCHES * self.batch_size

    def with_backend(self, backend: str) -> "ExtractJob":
        """A copy whose teacher forward runs on ``backend`` (``hf`` | ``vllm``): the engine and
        the backend the cache records change together."""
        return replace(self, engine=self.engine.model_copy(update={"backend": backend}),
                       settings=replace(self.settings, backend=backend))

    def with_overrides(self, **changes) -> "ExtractJob":
        """A copy with the given fields replaced (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def job_from_pipeline(pipe: Pipeline, *, out: str | None = None, limit: int | None = None,
                      resume: bool = False, window: int | None = None,
                      batch_size: int | None = None, backend: str | None = None) -> ExtractJob:
    """The :class:`ExtractJob` of ``pipe`` with the CLI overrides applied."""
    synthetic_dir = _absolute(str(pipeline_data.synthetic_dir(pipe.output_dir)))
    engine = engine_settings(pipe, backend)
    settings = ExtractSettings(
        teacher=_teacher_source(pipe), sources=_train_sources(pipe, synthetic_dir),
        max_length=pipe.cache.max_length, image_cache=_absolute(f"{pipe.output_dir}/image_cache"),
        read_on_error=pipe.data.on_error, backend=engine.backend)
    location = out or pipe.cache.location
    job = ExtractJob(
        settings=settings, out=location if _is_url(location) else _absolute(location),
        features=pipe.cache.features, codecs=pipe.cache.codecs, batch_size=pipe.cache.batch_size,
        shard_tokens=pipe.cache.shard.max_tokens,
        shard_bytes=None if pipe.cache.shard.max_bytes is None else int(pipe.cache.shard.max_bytes),
        on_error=pipe.cache.on_error, limit=limit, resume=resume, device=pipe.teacher.device,
        device_map=pipe.teacher.device_map, tiny=pipe.teacher.tiny, synthetic=pipe.data.synthetic,
        synthetic_dir=synthetic_dir if pipe.data.synthetic is not None else None,
        engine=engine, encode_workers=pipe.cache.encode_workers)
    return job.with_overrides(window=window, batch_size=batch_size)


def engine_settings(pipe: Pipeline, backend: str | None = None) -> TeacherEngine:
    """The pipeline's ``teacher_engine`` with the CLI's ``--backend`` (if given) applied."""
    engine = pipe.teacher_engine
    return engine if backend is None else engine.model_copy(update={"backend": backend})


def teacher_source(pipe: Pipeline) -> TeacherSource:
    """The pipeline's teacher as the cache records it (absolute path for a local one)."""
    return _teacher_source(pipe)


def _teacher_source(pipe: Pipeline) -> TeacherSource:
    location = pipe.model_location("teacher")
    if pipe.teacher.tiny is not None or Path(location).expanduser().exists():
        location = _absolute(location)
    return TeacherSource(location=location, family=pipe.teacher.family, dtype=pipe.teacher.dtype,
                         trust_remote_code=pipe.teacher.trust_remote_code,
                         revision=pipe.teacher.revision)


def _train_sources(pipe: Pipeline, synthetic_dir: str) -> tuple[DataSource, ...]:
    sources = [s.model_copy(update={"path": _absolute(s.path),
                                    "image_root": _absolute(s.image_root)})
               for s in pipe.data.sources if s.split == EXTRACT_SPLIT]
    if pipe.data.synthetic is not None:
        sources.append(DataSource(path=os.path.join(synthetic_dir, f"{EXTRACT_SPLIT}.jsonl"),
                                  format="llava", split=EXTRACT_SPLIT))
    return tuple(sources)


# ----------------------------------------------------------------------------- features


def feature_specs(features: Features, codecs: Codecs, *, hidden_size: int,
                  vocab_size: int) -> list[schema.FeatureSpec]:
    """The cache's :class:`~genrecal.store.schema.FeatureSpec` s for the configured features."""
    specs = []
    if features.answer_hidden:
        specs.append(schema.answer_hidden(hidden_size, codecs.answer_hidden))
    if features.question_hidden != "none":
        specs.append(schema.question_hidden(hidden_size, codecs.question_hidden,
                                            features.question_hidden))
    if features.visual_gram:
        specs.append(schema.visual_gram(codecs.visual_gram))
    if features.logit_stats is not None:
        specs.append(_logit_stats_spec(features, codecs, vocab_size))
    return specs


def _logit_stats_spec(features: Features, codecs: Codecs, vocab_size: int) -> schema.FeatureSpec:
    top_k = features.logit_stats.top_k
    if top_k > vocab_size:
        raise ExtractSetupError(f"cache.features.logit_stats.top_k = {top_k} exceeds the teacher's "
                                f"vocabulary ({vocab_size} tokens); lower top_k")
    return schema.logit_stats(top_k, features.logit_stats.temperature, codecs.logit_stats)
