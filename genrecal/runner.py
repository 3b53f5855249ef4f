"""``genrecal run PIPELINE``: the whole method end to end, reusing what a rerun may reuse.

Phases, each a group of steps with done markers (:mod:`genrecal.phases`); with ``jobs`` > 1
the steps of all phases run as one dependency graph on parallel processes
(:mod:`genrecal.scheduler`), each as soon as the steps it reads from are done:

1. **data**: the synthetic VQA sets (the pipeline's; the teacher's own when
   ``teacher_finetune.data`` declares one), :mod:`genrecal.data.pipeline_data`;
2. **models**: the tiny teacher and one tiny student per seed (the seed is the kit's init seed);
3. **teacher**: ``teacher_finetune``: the trainer's finetune stage with the teacher in the
   student's seat, so that the teacher is competent on the task (tiny / local teachers only);
4. **cache**: the teacher pass over the pipeline's train split into the teacher cache, then
   ``validate_cache``, which must find no problem;
5. **train**: per seed, the pipeline's stages (align -> distill -> finetune) and the SFT-only
   baseline (with teacher answers also SFT on them; ``run.grace``: the GRACE companion's rows;
   ``run.variants``: one GenRecal ablation each);
6. **evaluate**: the teacher, and per seed the student before training, after SFT only and
   after GenRecal; then the report (:mod:`genrecal.report`).

Seeds. Seed k is the tiny student's init seed and every stage's seed (data order, Recalibrator
init); the teacher, its fine-tuning, the data and the cache are shared by all seeds. Seed k's
outputs live in ``<output>/seed-<k>/`` (stage directories as in ``genrecal train``, the SFT
baseline in ``seed-<k>/sft/``); a stage's own ``output`` key is not used by ``genrecal run``.

SFT-only baseline, precisely: ONE finetune stage with the settings of the pipeline's finetune
stage (LR schedule, warm-up, batch size, accumulation, trainable parts, precision), run for the
sum of the ``steps`` (or ``epochs``) of every stage that trains student parameters (distill and
finetune; align trains the Recalibrator alone and leaves the student unchanged), on the same
train split, from the same initial student, with the same seed. It takes as many student
optimizer steps as GenRecal's student and, when those stages share one batch size, sees as many
labelled samples; it never reads the teacher.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from genrecal.common.config import Pipeline
from genrecal.common.vocabulary import TINY_KINDS
from genrecal.errors import RunError
from genrecal.phases import MarkerBook, Step, StepOutcome, config_hash, run_step
from genrecal.plan import GRACE_VARIANTS, RunPlan
from genrecal.report import build_report, write_report
from genrecal.scheduler import LOGS_DIR, Timed, run_graph
from genrecal.common.atomic import write_text_atomic

@dataclass(frozen=True)
class RunOptions:
    """How steps run: the trainer's loop options and progress bars; ``jobs`` steps at a time
    (1: in this process, phase after phase), each with ``threads`` torch threads."""

    progress: bool = True
    save_every: int | None = None
    jobs: int = 1
    threads: int = 1
    memo_bytes: int = 1 << 30  # the trainer keeps each step's encoded examples (small sets, many epochs)

    def loop_options(self):
        from genrecal.train.loop import LoopOptions

        return LoopOptions(save_every=self.save_every, num_workers=0, progress=self.progress,
                           memo_bytes=self.memo_bytes)


@dataclass(frozen=True)
class Phase:
    """A numbered group of steps shown with one progress bar."""

    name: str
    title: str
    steps: tuple[Step, ...]


def _dir_check(*dirs: str) -> Callable[[dict], bool]:
    return lambda _details: all((Path(d) / "config.json").is_file() for d in dirs)


class StepBuilder:
    """Builds the steps of a plan; ``hashes`` maps every step id to its config hash.

    A companion run (``run.grace``) is built by a child builder whose step ids carry the
    prefix ``grace.``; an upstream id it does not have is the parent's (the data, the
    fine-tuned teacher, its answers), and its evaluations write into the parent's ``eval/``.
    """

    def __init__(self, plan: RunPlan, options: RunOptions, *, parent: StepBuilder | None = None):
        self.plan, self.options, self.parent = plan, options, parent
        self.pipe = plan.pipeline
        self.prefix = "grace." if parent is not None else ""
        self.eval_root = parent.eval_root if parent is not None else plan.root
        self.hashes: dict[str, str] = {}

    def _hash_of(self, step_id: str) -> str:
        if self.prefix + step_id in self.hashes:
            return self.hashes[self.prefix + step_id]
        return self.parent._hash_of(step_id)

    def _inherited(self) -> list[str]:
        """The parent's steps a companion's teacher-side steps depend on."""
        if self.parent is None:
            return []
        return [u for u in ("teacher-finetune", "teacher-answers") if u in self.parent.hashes]

    def _step(self, step_id: str, title: str, config: Any, upstream: list[str],
              outputs: list[str], run, check, adopts: bool | Callable[[], bool] = False) -> Step:
        digest = config_hash(config, [self._hash_of(u) for u in upstream])
        self.hashes[self.prefix + step_id] = digest
        title = f"{title} (GRACE companion)" if self.parent is not None else title
        return Step(self.prefix + step_id, title, digest, tuple(outputs), run, check, adopts,
                    after=tuple(self._id_of(u) for u in upstream))

    def _id_of(self, step_id: str) -> str:
        """The full id of an upstream step: this builder's (prefixed) or its parent's."""
        if self.prefix + step_id in self.hashes:
            return self.prefix + step_id
        return self.parent._id_of(step_id)

    # -- phase 1: data ----------------------------------------------------------------------
    def _synthetic_sets(self) -> list[tuple[Any, Path]]:
        from genrecal.data import synthetic_dir

        sets = []
        if self.pipe.data.synthetic is not None:
            sets.append((self.pipe.data.synthetic, synthetic_dir(self.plan.root)))
        tp = self.plan.teacher_pipeline()
        if tp is not None and tp.data.synthetic is not None:
            sets.append((tp.data.synthetic, synthetic_dir(Path(tp.output_dir).resolve())))
        return sets

    def data_step(self) -> Step:
        from genrecal.data.pipeline_data import ensure_synthetic, synthetic_is_current

        sets = self._synthetic_sets()
        tp = self.plan.teacher_pipeline()
        config = {"data": self.pipe.data.to_dict(), "teacher_data": tp.data.to_dict() if tp else None}

        def run(_resume: bool) -> dict:
            for spec, root in sets:
                ensure_synthetic(spec, root)
            return self._data_counts(tp)

        return self._step("data", "synthetic data", config, [], [str(r) for _, r in sets], run,
                          lambda _d: all(synthetic_is_current(s, r) for s, r in sets), adopts=True)

    def _data_counts(self, tp: Pipeline | None) -> dict:
        from genrecal.data import read_split

        counts = {split: len(read_split(self.pipe.data, split, output_dir=self.plan.root).samples)
                  for split in sorted(self.pipe.data.splits())}
        if tp is not None:
            counts["teacher_train"] = len(read_split(tp.data, "train",
                                                     output_dir=Path(tp.output_dir).resolve()).samples)
        return counts

    # -- phase 2: models --------------------------------------------------------------------
    def model_step(self, step_id: str, spec: Any, location: str, title: str) -> Step:
        def run(_resume: bool) -> dict:
            from genrecal.model.tiny import ensure_tiny_vlm

            ensure_tiny_vlm(spec.kind, location, **spec.build_kwargs())
            return {"path": location}

        def same_model() -> bool:  # e.g. built by `genrecal extract` from this very spec
            from genrecal.model.tiny import tiny_spec, tiny_vlm_is_complete

            return tiny_vlm_is_complete(location, tiny_spec(spec.kind, **spec.build_kwargs()))

        config = {"tiny": spec.model_dump(exclude={"path"}), "path": location}
        return self._step(step_id, title, config, [], [location], run, lambda _d: same_model(),
                          adopts=same_model)

    def model_steps(self) -> list[Step]:
        steps = []
        if self.pipe.teacher.tiny is not None:
            steps.append(self.model_step("model-teacher", self.pipe.teacher.tiny,
                                         self.plan.base_teacher_dir, "tiny teacher"))
        if self.pipe.student.tiny is not None:
            for seed in self.plan.seeds:
                spec = self.pipe.student.tiny.model_copy(update={"seed": seed})
                steps.append(self.model_step(f"model-student-seed-{seed}", spec,
                                             self.plan.student_dir(seed), f"tiny student, seed {seed}"))
        return steps

    def _teacher_upstream(self) -> list[str]:
        return ["model-teacher"] if self.prefix + "model-teacher" in self.hashes else []

    # -- phase 3: teacher fine-tuning ----------------------------------------------------------
    def teacher_step(self) -> Step | None:
        tp = self.plan.teacher_pipeline()
        if tp is None:
            return None
        stage_dir = str(Path(tp.stage_dir("finetune")).resolve())

        def run(resume: bool) -> dict:
            from genrecal.train.loop import run_stages

            result = run_stages(tp, resume=resume, options=self.options.loop_options())[-1]
            return {"steps": result.step, "stage_dir": stage_dir}

        config = {"teacher": self.pipe.teacher.to_dict(),
                  "teacher_finetune": self.pipe.teacher_finetune.to_dict()}
        return self._step("teacher-finetune", "teacher fine-tuning", config,
                          ["data", *self._teacher_upstream()], [stage_dir], run,
                          _stage_check(stage_dir))

    def answers_step(self) -> Step | None:
        """The teacher answers the whole train split (``cache.generate_answers``): the data of
        the rows that learn from the teacher (:attr:`RunPlan.uses_answers`)."""
        if not self.plan.uses_answers:
            return None
        out, options = str(self.plan.answers_path), self.pipe.cache.generate_answers
        upstream = ["data", *(["teacher-finetune"] if self.pipe.teacher_finetune else []),
                    *self._teacher_upstream()]

        def run(_resume: bool) -> dict:
            from genrecal.data import read_split
            from genrecal.extract.answers import write_teacher_answers
            from genrecal.train.evaluate import load_pipeline_model

            pipe = self.plan.cache_pipeline()
            engine = _answers_engine(pipe)  # teacher_engine.backend: vllm (issue 13)
            read = read_split(self.pipe.data, "train", output_dir=self.plan.root)
            teacher = load_pipeline_model(pipe, "teacher", source=self.plan.teacher_dir,
                                          device="cpu" if engine else None)
            report = write_teacher_answers(teacher, read, out, options,
                                           batch_size=pipe.cache.batch_size,
                                           image_root=self.plan.answers_image_root,
                                           progress=self.options.progress, engine=engine)
            return {"path": report.path, "samples": report.samples, "replaced": report.replaced,
                    "kept": report.kept, "matched": report.matched}

        config = {"generate_answers": options.to_dict(), "teacher": self.plan.teacher_dir}
        return self._step("teacher-answers", "teacher answers", config, upstream, [out], run,
                          lambda _d: Path(out).is_file())

    # -- phase 4: cache ---------------------------------------------------------------------
    def cache_step(self, row: str | None = None) -> Step:
        """The teacher cache (``row``: a ``run.variants`` row's own cache, step ``cache-<row>``)."""
        pipe = self.plan.cache_pipeline() if row is None else self.plan.variant_cache_pipeline(row)
        location = _location(pipe.cache.location)
        upstream = ["data", *(["teacher-finetune"] if self.pipe.teacher_finetune else []),
                    *self._teacher_upstream(), *(["teacher-answers"] if self.plan.uses_answers else []),
                    *self._inherited()]

        def run(resume: bool) -> dict:
            from genrecal.extract.job import job_from_pipeline
            from genrecal.extract.pipeline import run_extract

            run_extract(job_from_pipeline(pipe, resume=resume))
            return _validated_cache(location)

        # encode_workers only changes how fast the same cache is written (bit for bit): not hashed
        cache = {k: v for k, v in pipe.cache.to_dict().items() if k != "encode_workers"}
        config = {"teacher": self.pipe.teacher.to_dict(), "cache": cache, "location": location}
        return self._step("cache" if row is None else f"cache-{row}",
                          "teacher cache" if row is None else f"teacher cache of {self.plan.title(row)!r}",
                          config, upstream, [location], run, lambda d: _cache_unchanged(location, d))

    def variant_cache_steps(self) -> list[Step]:
        """The caches of the ``run.variants`` that need their own (another codec, embeddings)."""
        return [self.cache_step(row) for row in self.plan.variant_rows
                if self.plan.variant_cache_step(row) != "cache"]

    # -- phase 5: training ------------------------------------------------------------------
    def _student_upstream(self, seed: int) -> list[str]:
        return ["data", *([f"model-student-seed-{seed}"] if self.pipe.student.tiny else [])]

    def grace_steps(self, seed: int) -> list[Step]:
        """GRACE run (docs/method.md §2): per variant, its stage; the QAT variants' INT4 export
        (compressed-tensors pack-quantized, what their rows evaluate)."""
        steps = []
        for variant in GRACE_VARIANTS:
            pipe = self.plan.grace_pipeline(seed, variant)
            stage_dir = str(Path(pipe.stage_dir(pipe.stages[0].name)).resolve())
            uses_cache = pipe.stages[0].name == "grace"
            steps.append(self._step(
                f"{variant}-seed-{seed}", f"{self.plan.title(variant)}, seed {seed}",
                {"stages": [s.to_dict() for s in pipe.stages], "student": pipe.student.to_dict()},
                # a companion's rows read the parent's teacher answers (QAT-only: without a cache)
                [*self._student_upstream(seed), *(["cache"] if uses_cache else []),
                 *self._inherited()], [stage_dir],
                self._trainer(pipe, stage_dir), _stage_check(stage_dir)))
            if pipe.stages[0].quantize is not None:
                steps.append(self._export_step(seed, variant, stage_dir))
        return steps

    def _export_step(self, seed: int, variant: str, stage_dir: str, bits: int = 4) -> Step:
        out, fmt = self.plan.export_dir(seed, variant), f"int{bits}"

        def run(_resume: bool) -> dict:
            from genrecal.train.export import STUDENT_DIR, export_checkpoint

            report = export_checkpoint(Path(stage_dir) / STUDENT_DIR, out, fmt)
            return {"path": str(report.path), "quantized": report.quantized, "dtype": report.dtype}

        return self._step(f"export-{variant}-seed-{seed}", f"{fmt.upper()} export of "
                          f"{self.plan.title(variant)}, seed {seed}", {"format": fmt, "source": stage_dir},
                          [f"{variant}-seed-{seed}"], [out], run,
                          lambda _d: (Path(out) / "config.json").is_file())

    def variant_steps(self, seed: int) -> list[Step]:
        """Per ``run.variants`` row: its GenRecal stages (and its export when it quantises)."""
        steps = []
        for row in self.plan.variant_rows:
            pipe = self.plan.variant_pipeline(seed, row)
            dirs = [str(Path(pipe.stage_dir(s.name)).resolve()) for s in pipe.stages]
            steps.append(self._step(
                f"{row}-seed-{seed}", f"{self.plan.title(row)}, seed {seed}",
                {"stages": [s.to_dict() for s in pipe.stages], "student": pipe.student.to_dict(),
                 "recalibrator": pipe.recalibrator.to_dict(), "cache": pipe.cache.location},
                [*self._student_upstream(seed), self.plan.variant_cache_step(row)], dirs,
                self._trainer(pipe, dirs[-1]), _stage_check(dirs[-1])))
            quantize = self.plan.variant_quantize(row)
            if quantize is not None:
                steps.append(self._export_step(seed, row, dirs[-1], quantize.bits))
        return steps

    def train_steps(self, seed: int) -> list[Step]:
        if self.plan.is_grace:
            return self.grace_steps(seed)
        gen, sft = self.plan.seed_pipeline(seed), self.plan.sft_pipeline(seed)
        gen_dirs = [str(Path(gen.stage_dir(s.name)).resolve()) for s in gen.stages]
        sft_dir = str(Path(sft.stage_dir("finetune")).resolve())
        uses_cache = any(s.name in ("align", "distill") for s in gen.stages)
        return [
            self._step(f"genrecal-seed-{seed}", f"GenRecal stages, seed {seed}",
                       {"stages": [s.to_dict() for s in gen.stages], "student": gen.student.to_dict(),
                        "recalibrator": gen.recalibrator.to_dict()},
                       [*self._student_upstream(seed), *(["cache"] if uses_cache else [])],
                       gen_dirs, self._trainer(gen, gen_dirs[-1]), _stage_check(gen_dirs[-1])),
            self._step(f"sft-seed-{seed}", f"SFT on labels, seed {seed}",
                       {"stages": [s.to_dict() for s in sft.stages], "student": sft.student.to_dict(),
                        "data": sft.data.to_dict()},
                       self._student_upstream(seed), [sft_dir], self._trainer(sft, sft_dir),
                       _stage_check(sft_dir)),
            *([self._sft_answers_step(seed)] if self.plan.uses_answers else []),
            *self.variant_steps(seed),
        ]

    def _sft_answers_step(self, seed: int) -> Step:
        pipe = self.plan.sft_answers_pipeline(seed)
        stage_dir = str(Path(pipe.stage_dir("finetune")).resolve())
        return self._step(f"sft-answers-seed-{seed}", f"SFT on teacher answers, seed {seed}",
                          {"stages": [s.to_dict() for s in pipe.stages], "student": pipe.student.to_dict()},
                          [*self._student_upstream(seed), "teacher-answers"], [stage_dir],
                          self._trainer(pipe, stage_dir), _stage_check(stage_dir))

    def _trainer(self, pipe: Pipeline, last_dir: str):
        def run(resume: bool) -> dict:
            from genrecal.train.loop import run_stages

            results = run_stages(pipe, resume=resume, options=self.options.loop_options())
            return {"steps": {r.stage: r.step for r in results}, "stage_dir": last_dir}

        return run

    # -- phase 6: evaluation ----------------------------------------------------------------
    def eval_step(self, row: str, seed: int | None, model_dir: str, pipe: Pipeline,
                  upstream: list[str]) -> Step:
        name = row if seed is None else f"{row}-seed-{seed}"
        out = str(self.plan.eval_file(name, self.eval_root))

        def run(_resume: bool) -> dict:
            return _evaluate(model_dir, pipe, out, progress=self.options.progress)

        config = {"evaluation": pipe.evaluation.to_dict(), "model": model_dir, "row": row}
        split = "" if self.plan.split == "test" else f"{self.plan.split}-"  # one marker per split
        return self._step(f"eval-{split}{name}", f"evaluate {self.plan.title(row)}"
                          + ("" if seed is None else f", seed {seed}"), config,
                          ["data", *upstream], [out], run, lambda _d: _eval_ok(out))

    def eval_steps(self) -> list[Step]:
        """The evaluations of this plan's rows (a companion's: its GRACE rows only; the parent's
        rows leave those to the companion's builder)."""
        cache_pipe = self.plan.cache_pipeline()
        teacher_up = ["teacher-finetune"] if self.pipe.teacher_finetune else self._teacher_upstream()
        steps = [] if self.parent is not None else \
            [self.eval_step("teacher", None, self.plan.teacher_dir, cache_pipe, teacher_up)]
        if self.parent is not None:
            mine = [row for row in self.plan.rows if row in GRACE_VARIANTS]
        else:  # a companion's GRACE rows are evaluated by its builder
            mine = [row for row in self.plan.rows if row != "teacher"
                    and not (self.plan.companion is not None and row in GRACE_VARIANTS)]
        for seed in self.plan.seeds:
            dirs, pipe = self.plan.model_dirs(seed), self.plan.seed_pipeline(seed)
            made_by = {"student_init": self._student_upstream(seed)[1:],
                       "student_sft": [f"sft-seed-{seed}"], "student_genrecal": [f"genrecal-seed-{seed}"],
                       "student_sft_answers": [f"sft-answers-seed-{seed}"],
                       "grace_bf16": [f"grace_bf16-seed-{seed}"],
                       "grace_int4": [f"export-grace_int4-seed-{seed}"],
                       "qat_int4": [f"export-qat_int4-seed-{seed}"],
                       **{row: [f"export-{row}-seed-{seed}" if self.plan.variant_quantize(row)
                                else f"{row}-seed-{seed}"] for row in self.plan.variant_rows}}
            steps += [self.eval_step(row, seed, dirs[row], pipe, made_by[row]) for row in mine]
        return steps

    def phases(self) -> list[Phase]:
        """Every phase of the run, in order (steps are built upstream first, for the hashes);
        a ``run.grace`` companion's steps join each phase after this run's."""
        data, models = self.data_step(), tuple(self.model_steps())
        teacher = tuple(step for step in (self.teacher_step(), self.answers_step()) if step)
        cache = (self.cache_step(), *self.variant_cache_steps())
        train = tuple(s for seed in self.plan.seeds for s in self.train_steps(seed))
        child = StepBuilder(self.plan.grace_plan, self.options, parent=self) \
            if self.plan.companion is not None else None
        if child is not None:
            models += tuple(child.model_steps())
            cache += (child.cache_step(),)
            train += tuple(s for seed in self.plan.seeds for s in child.train_steps(seed))
        evaluate = tuple(self.eval_steps()) + (tuple(child.eval_steps()) if child else ())
        what = ("GenRecal stages, the baselines" + (", GRACE bf16 / int4 and QAT-only int4"
                                                    if child else "")) if not self.plan.is_grace \
            else "GRACE bf16 / int4 and QAT-only int4 (then their INT4 exports)"
        return [Phase("data", "build the synthetic QA data", (data,)),
                Phase("models", "build the tiny teacher and students", models),
                Phase("teacher", "fine-tune the teacher on the task; its answers", teacher),
                Phase("cache", "extract and validate the teacher cache", cache),
                Phase("train", f"train: {what}", train),
                Phase("evaluate", "evaluate every model", evaluate)]


def _answers_engine(pipe: Pipeline):
    """The (not yet started) vLLM engine of the teacher-answers step when the pipeline's
    ``teacher_engine.backend`` is vllm, else None (transformers)."""
    from genrecal.extract.vllm_engine import answers_engine

    return answers_engine(pipe.teacher_engine, pipe, pipe.cache.generate_answers)


def _location(location: str) -> str:
    return location if "://" in location or "::" in location else str(Path(location).resolve())


def _stage_check(stage_dir: str) -> Callable[[dict], bool]:
    def check(_details: dict) -> bool:
        from genrecal.train.errors import StageSetupError
        from genrecal.train.export import read_done

        try:
            done = read_done(stage_dir)
        except StageSetupError:
            return False
        return done is not None and (Path(done["student"]) / "config.json").is_file()

    return check


def manifest_digest(location: str) -> str | None:
    """SHA-256 of the cache's manifest.json (None if it has none)."""
    import hashlib

    from genrecal.store.schema import MANIFEST
    from genrecal.store.storage import CacheStorage

    storage = CacheStorage(location)
    if not storage.exists(MANIFEST):
        return None
    return hashlib.sha256(storage.read_bytes(MANIFEST)).hexdigest()


def _validated_cache(location: str) -> dict:
    """Validate the cache (RunError listing every problem) and summarise it."""
    from genrecal.store.inspect import inspect_cache
    from genrecal.store.validate import validate_cache

    problems = validate_cache(location)
    if problems:
        raise RunError(f"the teacher cache {location} has {len(problems)} problem(s) after "
                       "extraction:\n" + "\n".join(f"  {p}" for p in problems))
    summary = inspect_cache(location, scan=False)
    return {"manifest_sha256": manifest_digest(location), "problems": 0,
            "samples": summary["samples"], "tokens": summary["tokens"],
            "skipped": summary["skipped"]["count"], "bytes": summary["bytes"],
            "bytes_per_input_token": summary["bytes_per_input_token"],
            "features": {k: {f: v.get(f) for f in ("codec", "bytes", "bytes_per_row", "ratio_to_raw")}
                         for k, v in summary["features"].items()}}


def _cache_unchanged(location: str, details: dict) -> bool:
    """The cache's manifest is the one recorded and the cache validates."""
    from genrecal.store.validate import validate_cache

    digest = details.get("manifest_sha256")
    return digest is not None and manifest_digest(location) == digest \
        and not validate_cache(location)


def _evaluate(model_dir: str, pipe: Pipeline, out: str, *, progress: bool) -> dict:
    from genrecal.train.evaluate import EvalSettings, evaluate_model_dir

    result = evaluate_model_dir(model_dir, pipeline=pipe, progress=progress,
                                settings=EvalSettings.resolve(pipe.evaluation))
    _write_json(Path(out), result.to_dict())
    return {"path": out, "accuracy": result.accuracy, "n": result.n}


def _eval_ok(out: str) -> bool:
    try:
        data = json.loads(Path(out).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "per_type" in data and "accuracy" in data


def _write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


# ==============================================================================================
# Running
# ==============================================================================================

@dataclass(frozen=True)
class PhaseOutcome:
    """A phase's steps' outcomes and the seconds the phase took in this run."""

    name: str
    title: str
    seconds: float
    steps: tuple[StepOutcome, ...]

    @property
    def compute_seconds(self) -> float:
        return sum(s.compute_seconds for s in self.steps)

    @property
    def reused(self) -> bool:
        return bool(self.steps) and all(s.reused for s in self.steps)


@dataclass(frozen=True)
class RunResult:
    """Everything a run produced: the plan, the phases' outcomes, the report's files."""

    plan: RunPlan
    phases: tuple[PhaseOutcome, ...]
    seconds: float
    report: dict = field(repr=False)
    files: tuple[Path, ...] = ()


def run_phases(plan: RunPlan, options: RunOptions = RunOptions(),
               echo: Callable[[str], None] = print) -> list[PhaseOutcome]:
    """Run (or reuse) every phase of ``plan``: one phase after the other (``options.jobs``
    1), or every step as soon as the steps it reads from are done, ``options.jobs`` at a time
    (:mod:`genrecal.scheduler`); the phases' outcomes, in order."""
    book = MarkerBook(plan.root)
    parallel = options.jobs > 1
    phases = StepBuilder(plan, replace(options, progress=options.progress and not parallel)).phases()
    if not parallel:
        outcomes = []
        for number, phase in enumerate(phases, 1):
            echo(f"[{number}/{len(phases)}] {phase.title}")
            outcomes.append(_run_phase(book, phase, options, echo))
        return outcomes
    steps = [step for phase in phases for step in phase.steps]
    _preload(plan)
    log_dir = plan.root / LOGS_DIR
    echo(f"{len(steps)} steps in {len(phases)} phases, up to {options.jobs} at a time with "
         f"{options.threads} thread(s) each; each step's output: {log_dir}/<step>.log")
    timed = run_graph(steps, book, jobs=options.jobs, threads=options.threads, log_dir=log_dir,
                      echo=echo, progress=options.progress)
    outcomes = [_phase_outcome(phase, [timed[s.id] for s in phase.steps]) for phase in phases]
    for number, (phase, outcome) in enumerate(zip(phases, outcomes), 1):
        reused = sum(s.reused for s in outcome.steps)
        echo(f"[{number}/{len(phases)}] {phase.title}: {outcome.seconds:.1f} s wall"
             + (f", {reused} of {len(outcome.steps)} step(s) reused" if reused else ""))
    return outcomes


def _preload(plan: RunPlan) -> None:
    """Import what the steps run (the trainer, the teacher pass, the models' classes) once, here,
    so that every forked step inherits it instead of importing it anew (seconds per step)."""
    import transformers

    import genrecal.extract.answers  # noqa: F401
    import genrecal.extract.pipeline  # noqa: F401
    import genrecal.train.evaluate  # noqa: F401
    import genrecal.train.loop  # noqa: F401
    from genrecal.model.families import get_family

    pipes = [plan.pipeline] + ([plan.companion] if plan.companion is not None else [])
    for spec in (s for p in pipes for s in (p.teacher, p.student)):
        family = spec.family or (TINY_KINDS[spec.tiny.kind] if spec.tiny is not None else None)
        if family is not None:
            for name in (get_family(family).model_class, get_family(family).processor_class):
                getattr(transformers, name, None)


def _phase_outcome(phase: Phase, timed: list[Timed]) -> PhaseOutcome:
    """A phase of a parallel run: its steps' outcomes; its seconds are the wall time from its
    first step's start to its last step's end (phases overlap)."""
    seconds = max(t.ended for t in timed) - min(t.started for t in timed) if timed else 0.0
    return PhaseOutcome(phase.name, phase.title, seconds, tuple(t.outcome for t in timed))


def _run_phase(book: MarkerBook, phase: Phase, options: RunOptions,
               echo: Callable[[str], None]) -> PhaseOutcome:
    from tqdm.auto import tqdm

    started, outcomes = time.perf_counter(), []
    with tqdm(total=len(phase.steps), desc=phase.name, unit="step", disable=not options.progress,
              dynamic_ncols=True) as bar:
        for step in phase.steps:
            bar.set_postfix_str(step.title, refresh=True)
            outcome = run_step(book, step)
            outcomes.append(outcome)
            bar.update(1)
    for outcome in outcomes:
        echo(f"    {outcome.title}: {_describe(outcome)}")
    if not phase.steps:
        echo("    nothing to do (not configured)")
    return PhaseOutcome(phase.name, phase.title, time.perf_counter() - started, tuple(outcomes))


def _describe(outcome: StepOutcome) -> str:
    if outcome.reused:
        return f"reused (computed in {outcome.compute_seconds:.1f} s)"
    verb = {"run": "done", "redo": "redone (config or outputs changed)", "resume": "resumed"}
    return f"{verb[outcome.action]} in {outcome.seconds:.1f} s"


def run_pipeline(pipe: Pipeline, seeds: tuple[int, ...], options: RunOptions = RunOptions(),
                 echo: Callable[[str], None] = print, companion: Pipeline | None = None) -> RunResult:
    """``genrecal run``: every phase, then the report under ``<output>/report``; ``companion``:
    the pipeline ``run.grace`` names (its rows join the table)."""
    started = time.perf_counter()
    plan = RunPlan(pipe, tuple(seeds), companion)
    phases = tuple(run_phases(plan, options, echo))
    seconds = time.perf_counter() - started
    report = build_report(plan, phases, seconds)
    files = write_report(report, plan.report_dir, plan)
    return RunResult(plan, phases, seconds, report, tuple(files))
