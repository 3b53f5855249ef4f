"""The plan of one ``genrecal run``: the pipelines each phase runs, derived from the pipeline
(the teacher's fine-tuning, one pipeline per seed, the SFT-only baseline), and where their
outputs and the evaluated models live. :mod:`genrecal.runner` runs it; :mod:`genrecal.report`
reads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from genrecal.common.config import FinetuneStage, Pipeline
from genrecal.common.vocabulary import GENRECAL_STAGES, ROW_TITLES
from genrecal.errors import RunError

#: The rows of a GenRecal run (stages align -> distill -> finetune) and of a GRACE run (one
#: grace stage with quantize: the configured INT4 GRACE beside its BF16 and QAT-only ablations).
ROWS = ("teacher", "student_init", "student_sft", "student_genrecal")
#: With teacher answers (cache.generate_answers): SFT on the teacher's answers joins them.
ANSWER_ROWS = ("teacher", "student_init", "student_sft", "student_sft_answers", "student_genrecal")
GRACE_ROWS = ("teacher", "student_init", "grace_bf16", "grace_int4", "qat_int4")
#: The pairs of rows the report compares (a - b, paired over seeds), when a run has both.
#: GRACE int4 against BF16 SFT: SFT on the teacher's answers when the run has it (the data the
#: GRACE rows read: the same images and targets, no teacher logits, no QAT), else SFT on labels.
COMPARISONS = (("student_genrecal", "student_sft_answers"), ("student_genrecal", "student_sft"),
               ("grace_int4", "qat_int4"), ("grace_int4", "grace_bf16"),
               ("grace_int4", ("student_sft_answers", "student_sft")))
#: GRACE run variants: the row, what the stage becomes, where its model is evaluated from.
GRACE_VARIANTS = ("grace_bf16", "grace_int4", "qat_int4")
EXPORTS_DIR = "exports"
EVAL_DIR = "eval"
REPORT_DIR = "report"


# ==============================================================================================
# The plan: the pipelines each phase runs, derived from the pipeline
# ==============================================================================================

@dataclass(frozen=True)
class RunPlan:
    """The derived pipelines and paths of one ``genrecal run`` of ``pipeline`` over ``seeds``."""

    pipeline: Pipeline
    seeds: tuple[int, ...]
    companion: Pipeline | None = None  # run.grace's pipeline: its rows join the table

    def __post_init__(self) -> None:
        _check_runnable(self.pipeline, self.seeds)
        if (self.companion is None) != (self.pipeline.run.grace is None) or (
                self.companion is not None and self.companion.name != self.pipeline.run.grace):
            raise RunError(f"pipeline {self.pipeline.name!r}: run.grace names "
                           f"{self.pipeline.run.grace!r}; pass that pipeline as the companion")

    @cached_property
    def grace_plan(self) -> RunPlan | None:
        """The companion GRACE run, on this run's fine-tuned teacher and teacher data, under
        ``<output>/grace`` (its evaluations go to this run's ``eval/``)."""
        if self.companion is None:
            return None
        data = self.companion.to_dict()
        root = self.root / "grace"
        cache = {**data["cache"], "location": str(root / "cache")}
        derived = {**data, "teacher": self._teacher_spec(), "teacher_finetune": None,
                   "data": self._teacher_data(), "cache": cache, "output": str(root),
                   "evaluation": self.pipeline.evaluation.to_dict(), "run": {}}
        return RunPlan(Pipeline.from_dict(derived, source=f"genrecal run {self.pipeline.name} "
                                                         f"(run.grace: {self.companion.name})"), self.seeds)

    @property
    def root(self) -> Path:
        return Path(self.pipeline.output_dir).resolve()

    @property
    def split(self) -> str:
        """The split every row is evaluated on (``evaluation.split``)."""
        return self.pipeline.evaluation.split

    def eval_file(self, name: str, root: Path | None = None) -> Path:
        """Where the evaluation ``name`` (a row, ``-seed-<k>`` for a student) on :attr:`split`
        is written, under ``root`` (default: this run's; a companion's is its parent's)."""
        return (root or self.root) / EVAL_DIR / self.split / f"{name}.json"

    @property
    def report_dir(self) -> Path:
        """``<output>/report`` for the test split; ``report-<split>`` for another one (e.g.
        ``genrecal run --split validation`` while tuning hyper-parameters)."""
        return self.root / (REPORT_DIR if self.split == "test" else f"{REPORT_DIR}-{self.split}")

    def _derive(self, suffix: str, **changes: Any) -> Pipeline:
        data = {**self.pipeline.to_dict(), "teacher_finetune": None, **changes}
        data["name"] = f"{self.pipeline.name}.{suffix}" if suffix else self.pipeline.name
        return Pipeline.from_dict(data, source=f"genrecal run {self.pipeline.name} ({suffix or 'cache'})")

    def teacher_pipeline(self) -> Pipeline | None:
        """The teacher fine-tuning as a one-stage pipeline whose student is the teacher."""
        tf = self.pipeline.teacher_finetune
        if tf is None:
            return None
        stage = {k: v for k, v in tf.to_dict().items() if k not in ("data", "output")}
        teacher = _pinned_model(self.pipeline.teacher.to_dict(), self.base_teacher_dir)
        data = tf.data.to_dict() if tf.data is not None else materialised_data(self.pipeline)
        return self._derive("teacher", student=teacher, teacher=teacher, data=data,
                            stages=[stage], evaluation=None,
                            output=tf.output or str(self.root / "teacher"))

    @property
    def base_teacher_dir(self) -> str:
        """The teacher as configured (tiny: where the kit builds it)."""
        location = self.pipeline.model_location("teacher")
        return str(Path(location).resolve()) if self.pipeline.teacher.tiny is not None else location

    @property
    def teacher_dir(self) -> str:
        """The teacher the cache is extracted from: the fine-tuned one, else as configured."""
        tp = self.teacher_pipeline()
        if tp is None:
            return self.base_teacher_dir
        from genrecal.train.export import STUDENT_DIR

        return str(Path(tp.stage_dir("finetune")).resolve() / STUDENT_DIR)

    def _teacher_spec(self) -> dict:
        spec = self.pipeline.teacher.to_dict()
        if self.pipeline.teacher_finetune is None:
            return spec
        spec.pop("revision", None)  # a local checkpoint: no hub revision
        return {**spec, "tiny": None, "source": self.teacher_dir}

    def cache_pipeline(self) -> Pipeline:
        """The pipeline with the (fine-tuned) teacher: what the cache is extracted from (the
        teacher's answers, with ``cache.generate_answers``)."""
        if self.uses_answers:
            return self._derive("", teacher=self._teacher_spec(), data=self._answers_data())
        return self._derive("", teacher=self._teacher_spec())

    def student_dir(self, seed: int) -> str:
        """The initial student of seed ``seed``."""
        if self.pipeline.student.tiny is None:
            return self.pipeline.model_location("student")
        return str(self.root / f"seed-{seed}" / "models" / "student")

    def _seed_changes(self, seed: int, data: dict | None = None) -> dict:
        student = self.pipeline.student.to_dict()
        if student.get("tiny") is not None:
            student["tiny"] = {**student["tiny"], "seed": seed, "path": self.student_dir(seed)}
        return {"teacher": self._teacher_spec(), "student": student,
                "data": data or materialised_data(self.pipeline)}

    def _teacher_data(self) -> dict:
        """What the rows that learn from the teacher read: its answers, else the data."""
        return self._answers_data() if self.uses_answers else materialised_data(self.pipeline)

    def seed_pipeline(self, seed: int) -> Pipeline:
        """The pipeline's stages for seed ``seed``, under ``<output>/seed-<seed>``."""
        stages = [{**s.to_dict(), "seed": seed, "output": None} for s in self.pipeline.stages]
        return self._derive(f"seed-{seed}", **self._seed_changes(seed, self._teacher_data()),
                            stages=stages, output=str(self.root / f"seed-{seed}"))

    def sft_pipeline(self, seed: int) -> Pipeline:
        """The SFT-only baseline of seed ``seed`` on the labels (module docstring)."""
        return self._derive(f"seed-{seed}.sft", **self._seed_changes(seed, self._labelled_data()),
                            stages=[{**sft_stage(self.pipeline), "seed": seed}],
                            output=str(self.root / f"seed-{seed}" / "sft"))

    def sft_answers_pipeline(self, seed: int) -> Pipeline:
        """SFT on the teacher's answers (sequence-level KD), seed ``seed``: the SFT baseline's
        stage on the data the GenRecal stages read."""
        return self._derive(f"seed-{seed}.sft-answers", **self._seed_changes(seed, self._answers_data()),
                            stages=[{**sft_stage(self.pipeline), "seed": seed}],
                            output=str(self.root / f"seed-{seed}" / "sft-answers"))

    @property
    def is_grace(self) -> bool:
        """A GRACE run: the pipeline's one stage is grace (else: GenRecal stages + SFT)."""
        return [s.name for s in self.pipeline.stages] == ["grace"]

    @property
    def rows(self) -> tuple[str, ...]:
        if self.is_grace:
            return GRACE_ROWS
        rows = ANSWER_ROWS if self.uses_answers else ROWS
        return rows + (GRACE_VARIANTS if self.companion is not None else ()) + self.variant_rows

    def title(self, row: str) -> str:
        """The row's name in the table and in results.json."""
        if row in ROW_TITLES:
            return ROW_TITLES[row]
        return self.variant(row).name

    # -- run.variants: ablations of the GenRecal row ---------------------------------------
    @cached_property
    def variant_rows(self) -> tuple[str, ...]:
        """One row id per ``run.variants`` entry: ``variant-<slug of its name>``."""
        if self.is_grace:
            return ()
        rows: list[str] = []
        for variant in self.pipeline.run.variants:
            slug = re.sub(r"[^a-z0-9]+", "-", variant.name.lower()).strip("-") or "x"
            row = f"variant-{slug}"
            rows.append(row if row not in rows else f"{row}-{len(rows)}")
        return tuple(rows)

    def variant(self, row: str):
        """The ``run.variants`` entry (StudyVariant) of row ``row``."""
        return self.pipeline.run.variants[self.variant_rows.index(row)]

    def variant_cache_step(self, row: str) -> str:
        """The id of the cache step a variant reads: ``cache-<row>`` when it has its own
        (:meth:`variant_cache`), else the run's ``cache``."""
        own = self.variant_cache(row)["location"] != self.pipeline.cache.location
        return f"cache-{row}" if own else "cache"

    def variant_cache(self, row: str) -> dict:
        """The cache a variant's stages read: the run's, unless the variant stores z_ql with
        another codec or reads the teacher's token embeddings (then ``<output>/<row>/cache``)."""
        variant = self.variant(row)
        base = self.pipeline.cache.to_dict()
        cache = {**base, "codecs": dict(base["codecs"]), "features": dict(base["features"])}
        if variant.question_hidden_codec is not None:
            cache["codecs"]["question_hidden"] = variant.question_hidden_codec
        if variant.answer_input == "embedding":
            cache["features"]["input_embeddings"] = True
        if cache != base:
            cache["location"] = str(self.root / row / "cache")
        return cache

    def variant_cache_pipeline(self, row: str) -> Pipeline:
        """What a variant's own cache is extracted from: :meth:`cache_pipeline` with its cache."""
        return self._derive("", teacher=self._teacher_spec(), data=self._teacher_data(),
                            cache=self.variant_cache(row))

    def variant_pipeline(self, seed: int, row: str) -> Pipeline:
        """The GenRecal stages of seed ``seed`` with the variant's changes
        (:class:`genrecal.common.config.StudyVariant`), under ``<output>/seed-<seed>/<row>``."""
        variant = self.variant(row)
        recalibrator = {**self.pipeline.recalibrator.to_dict(),
                        **{k: getattr(variant, k) for k in ("answer_input", "reassign_positions", "blocks")
                           if getattr(variant, k) is not None}}
        stages = []
        for stage in self.pipeline.stages:
            data = {**stage.to_dict(), "seed": seed, "output": None}
            if variant.reg_terms is not None and stage.name in GENRECAL_STAGES:
                losses = dict(data["losses"])
                if variant.reg_terms == "off":
                    losses["reg"] = 0.0
                else:
                    losses["reg_terms"] = variant.reg_terms
                data["losses"] = losses
            if variant.quantize is not None and stage.trains.student_parts():
                data["quantize"] = variant.quantize.to_dict()
            stages.append(data)
        return self._derive(f"seed-{seed}.{row}", **self._seed_changes(seed, self._teacher_data()),
                            stages=stages, recalibrator=recalibrator, cache=self.variant_cache(row),
                            output=str(self.root / f"seed-{seed}" / row))

    def variant_quantize(self, row: str):
        """The variant's QuantConfig (its row is then evaluated as its export), else None."""
        return self.variant(row).quantize

    @property
    def uses_answers(self) -> bool:
        """The rows that learn from the teacher read its answers (``cache.generate_answers``)."""
        return self.pipeline.cache.generate_answers is not None and not self.is_grace

    @property
    def answers_path(self) -> Path:
        """The teacher's answers to the whole train split (a LLaVA JSONL dataset)."""
        return self.root / "data" / "teacher_answers" / "train.jsonl"

    @property
    def answers_image_root(self) -> str:
        """The image root the answers file names its images under: the train sources' common one."""
        import os

        roots = [s["image_root"] or str(Path(s["path"]).parent)
                 for s in materialised_data(self.pipeline)["sources"] if s["split"] == "train"]
        return os.path.commonpath(roots)

    def _answers_data(self) -> dict:
        """The materialised data with the train split read from the teacher's answers."""
        data = materialised_data(self.pipeline)
        answers = {"path": str(self.answers_path), "format": "llava", "split": "train",
                   "image_root": self.answers_image_root, "limit": None}
        return {**data, "sources": [answers, *(s for s in data["sources"] if s["split"] != "train")]}

    def _labelled_data(self) -> dict:
        """The materialised data with the train split cut to its first ``run.labelled`` samples."""
        data, limit = materialised_data(self.pipeline), self.pipeline.run.labelled
        if limit is None:
            return data
        train = [s for s in data["sources"] if s["split"] == "train"]
        if len(train) != 1:
            raise RunError(f"pipeline {self.pipeline.name!r}: run.labelled needs one train source "
                           f"(it has {len(train)}); merge them or leave run.labelled out")
        return {**data, "sources": [{**s, "limit": limit} if s["split"] == "train" else s
                                    for s in data["sources"]]}

    def grace_pipeline(self, seed: int, variant: str) -> Pipeline:
        """One GRACE variant of seed ``seed`` (docs/method.md §2): ``grace_int4`` the grace stage
        as configured (with its ``quantize``), ``grace_bf16`` the same without QAT,
        ``qat_int4`` a finetune stage with the grace stage's schedule, trainables and
        ``quantize``: CE only, no teacher."""
        stage = {**self.pipeline.stages[0].to_dict(), "seed": seed, "output": None}
        if variant == "grace_bf16":
            stage["quantize"] = None
        elif variant == "qat_int4":
            keep = set(FinetuneStage.model_fields) - {"name"}
            stage = {"name": "finetune", **{k: v for k, v in stage.items() if k in keep}}
        return self._derive(f"seed-{seed}.{variant}", **self._seed_changes(seed), stages=[stage],
                            output=str(self.root / f"seed-{seed}" / variant))

    def export_dir(self, seed: int, variant: str) -> str:
        """Where the INT4 export of a QAT variant is written (what its row evaluates)."""
        return str(self.root / f"seed-{seed}" / EXPORTS_DIR / variant)

    def model_dirs(self, seed: int) -> dict[str, str]:
        """Row -> the model directory evaluated for it (seed ``seed``)."""
        from genrecal.train.export import STUDENT_DIR

        if self.is_grace:
            bf16 = self.grace_pipeline(seed, "grace_bf16")
            return {"teacher": self.teacher_dir, "student_init": self.student_dir(seed),
                    "grace_bf16": str(Path(bf16.stage_dir("grace")) / STUDENT_DIR),
                    "grace_int4": self.export_dir(seed, "grace_int4"),
                    "qat_int4": self.export_dir(seed, "qat_int4")}
        seed_pipe, last = self.seed_pipeline(seed), self.pipeline.stages[-1].name
        dirs = {"teacher": self.teacher_dir, "student_init": self.student_dir(seed),
                "student_sft": str(Path(self.sft_pipeline(seed).stage_dir("finetune")) / STUDENT_DIR),
                "student_genrecal": str(Path(seed_pipe.stage_dir(last)) / STUDENT_DIR)}
        if self.uses_answers:
            dirs["student_sft_answers"] = str(Path(self.sft_answers_pipeline(seed).stage_dir("finetune"))
                                              / STUDENT_DIR)
        if self.companion is not None:
            grace = self.grace_plan.model_dirs(seed)
            dirs.update({row: grace[row] for row in GRACE_VARIANTS})
        for row in self.variant_rows:
            pipe = self.variant_pipeline(seed, row)
            dirs[row] = self.export_dir(seed, row) if self.variant_quantize(row) is not None \
                else str(Path(pipe.stage_dir(pipe.stages[-1].name)) / STUDENT_DIR)
        return dirs


def _check_runnable(pipe: Pipeline, seeds: tuple[int, ...]) -> None:
    names = [s.name for s in pipe.stages]
    problems = []
    if "grace" in names:
        if names != ["grace"]:
            problems.append(f"a GRACE run has one stage, grace; got {names}")
        elif pipe.stages[0].quantize is None:
            problems.append("its grace stage needs quantize: the run compares that QAT student "
                            "with BF16 GRACE and QAT alone")
        if pipe.run.labelled is not None or pipe.run.grace is not None:
            problems.append("run.labelled and run.grace apply to a GenRecal run (a GRACE run has "
                            "no label-only row and is itself the GRACE rows); leave them out")
    elif "finetune" not in names:
        problems.append("it needs a finetune stage: its settings define the SFT-only baseline")
    if pipe.evaluation is None:
        problems.append("it needs an evaluation block: the run ends with the results table")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        problems.append(f"seeds must be distinct integers >= 0; got {list(seeds)}")
    if problems:
        raise RunError(f"pipeline {pipe.name!r} cannot be run end to end: " + "; ".join(problems))


def _pinned_model(spec: dict, location: str) -> dict:
    """A model spec whose tiny model is built at ``location`` (so derived pipelines share it)."""
    if spec.get("tiny") is None:
        return spec
    return {**spec, "tiny": {**spec["tiny"], "path": location}}


def materialised_data(pipe: Pipeline) -> dict:
    """The pipeline's data with its synthetic set given as the files it was generated into, so
    that derived pipelines (other output directories) read the same files, ids and hashes."""
    from genrecal.data.pipeline_data import split_sources

    data, root = pipe.data, Path(pipe.output_dir).resolve()
    splits = sorted(data.splits())
    sources = [_source_dict(s) for split in splits
               for s in split_sources(data, split, output_dir=root)]
    return {"sources": sources, "on_error": data.on_error}


def _source_dict(source: Any) -> dict:
    return {"path": str(source.path), "format": source.format, "image_root": source.image_root,
            "split": source.split, "limit": source.limit}


def student_training_stages(pipe: Pipeline) -> list:
    """The stages that change student parameters (every stage whose trains has a student part)."""
    return [s for s in pipe.stages if s.trains.student_parts()]


def sft_stage(pipe: Pipeline) -> dict:
    """The SFT-only baseline stage (module docstring) as a config dict."""
    finetune = pipe.stage("finetune").to_dict()
    training = student_training_stages(pipe)
    if all(s.steps is not None for s in training):
        length = {"steps": sum(s.steps for s in training), "epochs": None}
    elif all(s.epochs is not None for s in training):
        length = {"epochs": sum(s.epochs for s in training), "steps": None}
    else:
        raise RunError(f"pipeline {pipe.name!r}: the stages that train the student mix 'steps' "
                       "and 'epochs', so the SFT-only baseline's length is undefined; give them "
                       "all steps or all epochs")
    return {**finetune, **length, "output": None}


# ==============================================================================================
# Steps
# ==============================================================================================
