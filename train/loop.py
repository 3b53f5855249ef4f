"""The training loop: stages, AdamW, LR schedule, accumulation, DDP, checkpoints, metrics.

:func:`train_stage` runs one stage (a :class:`StageJob`: the stage config, a
:class:`~genrecal.train.step.StageModel` and a batch loader); :func:`run_stages` builds the jobs
of a pipeline (student, teacher head, Recalibrator, loader) and runs its stages in order, each
continuing from the previous stage's output (method.md section 1, "Stages").

Optimisation (method.md: AdamW, LR linear lr_start -> lr_end within each stage). One optimizer
step takes ``n_micro = grad_accum`` micro-batches per rank (fewer for the very last step of an
epoch-based stage). Global batch = batch_size * grad_accum * world_size samples. The loss is
normalised token-correctly over the global batch: the token counts of every micro-batch of the
step are summed over ranks first, each micro-batch back-propagates
``world_size * sum_t w_t * (its per-token loss sum of term t) / N_t(global)``, and DDP averages
the gradients over ranks, so the gradient is that of the per-token mean over the whole global
batch: 2 ranks x batch b give the same update as 1 rank x 2 micro-batches of b.

Teacher features come from the teacher cache, or, with ``LoopOptions(teacher_source="online")``,
from the teacher run live on every batch (:mod:`genrecal.train.online`).

Resume. A checkpoint holds the trainable weights, the AdamW state, the step (the LR is a pure
function of it), the counters, every rank's sampler position and RNG states. ``resume=True``
restores them and continues; on CPU the result is bitwise identical to an uninterrupted run
(tests/test_train_loop.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.distributed as torch_dist

from genrecal.store.distributed import RankInfo
from genrecal.train.checkpoint import (CheckpointData, RngState, latest_checkpoint,
                                       load_checkpoint, prune_checkpoints, restore_weights,
                                       save_checkpoint)
from genrecal.train.errors import StageSetupError
from genrecal.train.export import (RECALIBRATOR_DIR, STUDENT_DIR, export_recalibrator,
                                   export_student, read_done, write_done)
from genrecal.train.metrics import MetricsLog, Progress, plot_losses
from genrecal.train.step import (TERMS, StageModel, TokenCounts, batch_to,
                                 configure_trainables, run_step)

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"


# ==============================================================================================
# Distributed
# ==============================================================================================

def all_reduce_sum(dist: RankInfo, t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` (any shape and dtype) over the ranks of ``dist``: a new tensor on t's device
    (``t`` itself for a single process). NCCL reduces on this rank's GPU, gloo on the CPU."""
    if not dist.distributed:
        return t
    comm = torch.device("cuda", dist.local_rank) \
        if torch_dist.get_backend() == "nccl" else torch.device("cpu")
    out = t.to(comm).clone()
    torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
    return out.to(t.device)


def init_distributed() -> RankInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    env = RankInfo.from_env()
    if env.distributed and not torch_dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(env.local_rank)
        torch_dist.init_process_group(backend=backend)
    return RankInfo.current()


# ==============================================================================================
# Schedule, options, loader protocol
# ==============================================================================================

@dataclass(frozen=True)
class LinearSchedule:
    """LR of optimizer step ``i`` (0-based) of a stage (method.md: linear within each stage).

    Warm-up (``warmup`` steps): ``lr_start * (i + 1) / (warmup + 1)``, rising from near 0;
    then linear from ``lr_start`` (step ``warmup``) to ``lr_end`` (the last step).
    """

    lr_start: float
    lr_end: float
    warmup: int
    total_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.lr_start * (step + 1) / (self.warmup + 1)
        span = self.total_steps - self.warmup - 1
        frac = min((step - self.warmup) / span, 1.0) if span > 0 else 0.0
        return self.lr_start + (self.lr_end - self.lr_start) * frac


@dataclass(frozen=True)
class LoopOptions:
    """Run settings that are not part of the pipeline config.

    save_every: optimizer steps between checkpoints (None: only at the end and at stop_after);
    keep_checkpoints: newest checkpoints kept (<= 0: all); stop_after: stop after this global
    step, with a checkpoint (preemption drills, tests); num_workers: data loader worker
    processes; progress: show a tqdm bar (rank 0); teacher_source: where the align / distill
    stages get teacher features: "cache" (the extracted cache) or "online" (the teacher runs live
    on the training device, :mod:`genrecal.train.online`); online_round_to: online only, round
    the live features through this cache codec ("bf16", "fp8_e4m3", "int8") as a cache would.
    """

    save_every: int | None = 100
    keep_checkpoints: int = 2
    stop_after: int | None = None
    num_workers: int = 2
    progress: bool = True
    teacher_source: Literal["cache", "online"] = "cache"
    online_round_to: str | None = None
    allow_teacher_mismatch: bool = False

    def __post_init__(self) -> None:
        for name in ("save_every", "stop_after"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise StageSetupError(f"LoopOptions.{name}={value!r}: use None or an int >= 1.")
        if self.teacher_source not in ("cache", "online"):
            raise StageSetupError(f"LoopOptions.teacher_source={self.teacher_source!r}: use 'cache' "
                                  "or 'online'.")
        if self.online_round_to is not None and self.teacher_source != "online":
            raise StageSetupError("LoopOptions.online_round_to applies to teacher_source='online' only.")


class BatchLoader(Protocol):
    """What the loop reads batches from (genrecal.train.data.TrainLoader satisfies it).

    ``iter(loader)`` yields the rest of the current epoch; ``state`` is the sampler position
    after the last batch handed out (saved with checkpoints) and ``load_state`` resumes there;
    ``steps_per_epoch`` is the number of batches per epoch on this rank.
    """

    steps_per_epoch: int
    state: Any

    def load_state(self, state: Any) -> None: ...

    def __iter__(self) -> Iterator[Any]: ...


def _stream(loader: BatchLoader) -> Iterator[Any]:
    """Batches across epochs without end."""
    empty = 0
    while True:
        produced = False
        for batch in loader:
            produced = True
            yield batch
        empty = 0 if produced else empty + 1
        if empty > 1:
            raise StageSetupError("the data loader produced no batch in two consecutive epochs; "
                                  "check the training data and the cache join.")


# ==============================================================================================
# One stage
# ==============================================================================================

@dataclass
class StageJob:
    """Everything one stage needs.

    stage: AlignStage / DistillStage / FinetuneStage config; model: the StageModel (student,
    Recalibrator, teacher side); loader: this rank's batches; out_dir: the stage's output
    directory; processor: the student processor, exported with the student; export_dtype:
    dtype of the exported student (None: as trained); inputs: where the student / Recalibrator
    came from (recorded in stage_done.json).
    """

    stage: Any
    model: StageModel
    loader: BatchLoader
    out_dir: Path
    processor: Any
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    export_dtype: torch.dtype | None = None
    dist: RankInfo = field(default_factory=RankInfo)
    inputs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageResult:
    """Outcome of :func:`train_stage`. finished: False when stopped early (stop_after)."""

    stage: str
    step: int
    total_steps: int
    finished: bool
    records: list[dict[str, Any]]
    out_dir: Path
    skipped: bool = False


def _json_roundtrip(data: Any) -> Any:
    return json.loads(json.dumps(data))


def _seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def _enable_checkpointing(student: torch.nn.Module) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(student, "activation_checkpointing_enable"):
        student.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _take(stream: Iterator[Any], n: int) -> tuple[list[Any], float]:
    """n batches and the seconds spent waiting for them."""
    started = time.perf_counter()
    batches = [next(stream) for _ in range(n)]
    return batches, time.perf_counter() - started


class _Trainer:
    """State of one running stage; see :func:`train_stage`."""

    def __init__(self, job: StageJob, options: LoopOptions, resume: bool):
        self.job, self.options, self.stage, self.dist = job, options, job.stage, job.dist
        self.spec = job.model.spec
        if self.stage.trains.recalibrator and self.spec.genrecal is None:
            raise StageSetupError(f"stage {self.stage.name}: trains.recalibrator is on but every "
                                  "GenRecal loss weight (ar, kl, reg) is 0, so nothing trains it; "
                                  "set a loss weight or switch trains.recalibrator off.")
        self.params = configure_trainables(job.model.student, job.model.family,
                                           job.model.recalibrator, job.stage.trains)
        self.total_micro = self._total_micro_batches()
        self.total_steps = -(-self.total_micro // self.stage.grad_accum)
        self.schedule = LinearSchedule(self.stage.lr_start, self.stage.lr_end, self.stage.warmup,
                                       self.total_steps)
        self.step, self.counters = 0, {"samples": 0, "tokens_teacher": 0, "tokens_student": 0}
        self._prepare_modules()
        saved = self._load_checkpoint() if resume else None
        self.module = self._wrap()
        self.optimizer = torch.optim.AdamW([p for _, p in self.params], lr=self.schedule(0),
                                           weight_decay=self.stage.weight_decay)
        if saved is not None:
            self.optimizer.load_state_dict(saved.optimizer)
        self.metrics = MetricsLog(job.out_dir / METRICS, None if saved is None else self.step,
                                  enabled=self.dist.is_main)
        self.rng = saved.rng if saved is not None else None

    # -- setup -----------------------------------------------------------------------------

    def _total_micro_batches(self) -> int:
        stage, loader = self.stage, self.job.loader
        plan = getattr(loader, "plan", None)
        if self.dist.distributed and getattr(plan, "uneven", False):
            raise StageSetupError(
                f"stage {stage.name}: batch_size 1 with a sample count not divisible by the "
                f"{self.dist.world} processes gives the ranks different step counts; use "
                "batch_size >= 2 or a world size that divides the number of samples.")
        if stage.steps is not None:
            return stage.steps * stage.grad_accum
        return stage.epochs * loader.steps_per_epoch

    def _prepare_modules(self) -> None:
        model = self.job.model
        student_trains = any(n.startswith("student.") for n, _ in self.params)
        model.student.train(student_trains)
        if model.recalibrator is not None:
            model.recalibrator.train(bool(self.stage.trains.recalibrator))
        if self.stage.gradient_checkpointing and student_trains:
            _enable_checkpointing(model.student)

    def _wrap(self) -> torch.nn.Module:
        if not self.dist.distributed:
            return self.job.model
        from torch.nn.parallel import DistributedDataParallel

        trains = self.stage.trains
        unused = trains.vision_encoder or trains.projector or trains.student_head
        return DistributedDataParallel(self.job.model, find_unused_parameters=bool(unused),
                                       broadcast_buffers=False)

    def _trainer_state(self) -> dict[str, Any]:
        return {"stage": self.stage.name, "stage_config": _json_roundtrip(self.stage.to_dict()),
                "step": self.step, "total_steps": self.total_steps,
                "schedule": dataclasses.asdict(self.schedule), "world_size": self.dist.world,
                "counters": dict(self.counters)}

    def _load_checkpoint(self) -> CheckpointData | None:
        where = latest_checkpoint(self.job.out_dir / CHECKPOINTS)
        if where is None:
            return None
        saved = load_checkpoint(where, rank=self.dist.rank, world_size=self.dist.world)
        mine, theirs = self._trainer_state(), saved.trainer
        for key in ("stage", "stage_config", "total_steps", "schedule"):
            if mine[key] != theirs.get(key):
                raise StageSetupError(
                    f"checkpoint {where} was written with another {key} ({theirs.get(key)!r}, now "
                    f"{mine[key]!r}); resume with the config it was written with, or delete "
                    f"{self.job.out_dir / CHECKPOINTS} to start the stage over.")
        restore_weights(self.params, saved.weights, where)
        self.job.loader.load_state(_sampler_state(self.job.loader, saved.sampler))
        self.step, self.counters = int(theirs["step"]), dict(theirs["counters"])
        log.info("resuming stage %s at step %d from %s", self.stage.name, self.step, where)
        return saved

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> StageResult:
        if self.rng is not None:
            self.rng.restore()
        else:
            _seed_everything(self.stage.seed, self.dist.rank)
        stream = _stream(self.job.loader)
        progress = Progress(self.total_steps, self.step, f"{self.stage.name}",
                            enabled=self.options.progress and self.dist.is_main)
        try:
            while self.step < self.total_steps:
                record = self._train_step(stream)
                self.metrics.log(record)
                progress.update(record)
                if self._should_save():
                    self._save()
                if self.options.stop_after is not None and self.step >= self.options.stop_after \
                        and self.step < self.total_steps:
                    return self._result(finished=False)
        finally:
            progress.close()
        self._finish()
        return self._result(finished=True)

    def _should_save(self) -> bool:
        every, stop = self.options.save_every, self.options.stop_after
        return self.step == self.total_steps or self.step == stop \
            or (every is not None and self.step % every == 0)

    def _train_step(self, stream: Iterator[Any]) -> dict[str, Any]:
        started = time.perf_counter()
        n_micro = min(self.stage.grad_accum, self.total_micro - self.step * self.stage.grad_accum)
        batches, wait = _take(stream, n_micro)
        counts = self._global_counts(batches)
        n_terms = len(TERMS)  # slots: per-term loss sums, then samples, then skipped samples
        sums = torch.zeros(n_terms + 2, dtype=torch.float64, device=self.job.device)
        sums[n_terms] = sum(len(b.ids) for b in batches)
        sums[n_terms + 1] = sum(len(getattr(b, "skipped", ())) for b in batches)
        for i, batch in enumerate(batches):
            sums[:n_terms] += self._micro_step(batch, counts, last=i == n_micro - 1)
        grad_norm = self._clip()
        lr = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums = all_reduce_sum(self.dist, sums).cpu()
        self.step += 1
        record = self._record(sums[:n_terms], counts, int(sums[n_terms]), lr, grad_norm, wait,
                              time.perf_counter() - started)
        return {**record, "skipped": int(sums[n_terms + 1])}

    def _global_counts(self, batches: Sequence[Any]) -> TokenCounts:
        local = sum((TokenCounts.of_batch(b) for b in batches), TokenCounts())
        return TokenCounts.from_tensor(all_reduce_sum(self.dist, local.to_tensor()))

    def _micro_step(self, batch: Any, counts: TokenCounts, last: bool) -> torch.Tensor:
        """Forward + backward of one micro-batch; its per-term loss sums, float64 [len(TERMS)]
        on the device (no host sync)."""
        batch = batch_to(batch, self.job.device, self._input_dtype())
        sync = contextlib.nullcontext() if last or not self.dist.distributed \
            else self.module.no_sync()
        with sync:
            with self._autocast():
                out = run_step(self.module, batch, counts)
            (out.total * self.dist.world).backward()
        zero = torch.zeros((), device=self.job.device)
        return torch.stack([out.sums.get(t, zero) for t in TERMS]).double()

    def _input_dtype(self) -> torch.dtype:
        return next(self.job.model.student.parameters()).dtype

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.stage.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.job.device.type, dtype=torch.bfloat16)

    def _clip(self) -> float:
        params = [p for _, p in self.params if p.grad is not None]
        if not params:
            return 0.0
        if self.stage.grad_clip is None:
            return float(torch.nn.utils.get_total_norm([p.grad for p in params]))
        return float(torch.nn.utils.clip_grad_norm_(params, self.stage.grad_clip))

    def _record(self, sums: torch.Tensor, counts: TokenCounts, n_samples: int, lr: float,
                grad_norm: float, wait: float, seconds: float) -> dict[str, Any]:
        means = {t: float(sums[i]) / max(counts.of_term(t), 1)
                 for i, t in enumerate(TERMS) if self.spec.weight(t) > 0}
        self.counters["samples"] += n_samples
        self.counters["tokens_teacher"] += counts.teacher
        self.counters["tokens_student"] += counts.student
        epoch = getattr(getattr(self.job.loader, "state", None), "epoch", None)
        return {"stage": self.stage.name, "step": self.step, "epoch": epoch,
                "loss": self.spec.total(means), **means, "lr": lr, "grad_norm": grad_norm,
                "samples": n_samples, "tokens_teacher": counts.teacher,
                "tokens_student": counts.student, "samples_per_s": n_samples / max(seconds, 1e-9),
                "data_wait_s": wait, "step_time_s": seconds}

    # -- checkpoints and outputs -----------------------------------------------------------

    def _save(self) -> None:
        data = CheckpointData(weights={n: p for n, p in self.params},
                              optimizer=self.optimizer.state_dict(),
                              names=[n for n, _ in self.params], trainer=self._trainer_state(),
                              sampler=self.job.loader.state.to_dict(), rng=RngState.capture())
        root = self.job.out_dir / CHECKPOINTS
        save_checkpoint(root, self.step, data, rank=self.dist.rank,
                        world_size=self.dist.world, barrier=self.dist.barrier)
        if self.dist.is_main and self.options.keep_checkpoints > 0:
            prune_checkpoints(root, self.options.keep_checkpoints)

    def _finish(self) -> None:
        if self.dist.is_main:
            out, model = self.job.out_dir, self.job.model
            plot_losses(self.metrics.records, out / LOSS_PLOT, f"{self.stage.name} losses")
            student = str(self.job.inputs.get("student", ""))
            if any(n.startswith("student.") for n, _ in self.params):
                student = str(export_student(model.student, self.job.processor, model.family,
                                             out / STUDENT_DIR, self.job.export_dtype))
            recalibrator = None
            if model.recalibrator is not None:
                recalibrator = str(export_recalibrator(model.recalibrator, out / RECALIBRATOR_DIR))
            write_done(out, {"stage": self.stage.name, "steps": self.step, "student": student,
                             "recalibrator": recalibrator, "inputs": self.job.inputs,
                             "final": self.metrics.records[-1] if self.metrics.records else None})
        self.dist.barrier()

    def _result(self, finished: bool) -> StageResult:
        return StageResult(stage=self.stage.name, step=self.step, total_steps=self.total_steps,
                           finished=finished, records=list(self.metrics.records),
                           out_dir=self.job.out_dir)


def _sampler_state(loader: BatchLoader, saved: dict[str, Any]) -> Any:
    """The loader's state type rebuilt from its saved dict."""
    return type(loader.state).from_dict(saved)


def train_stage(job: StageJob, options: LoopOptions | None = None,
                resume: bool = False) -> StageResult:
    """Train one stage: configure trainables, optimise, checkpoint, export.

    resume: continue from the newest checkpoint under ``job.out_dir/checkpoints`` (none: start
    fresh). Outputs in ``job.out_dir``: metrics.jsonl, loss.png, checkpoints/, student/ (when
    the stage trains the student), recalibrator/, stage_done.json.
    """
    job.out_dir.mkdir(parents=True, exist_ok=True)
    return _Trainer(job, options or LoopOptions(), resume).run()


# ==============================================================================================
# Pipelines
# ==============================================================================================

GENRECAL_STAGES = ("align", "distill")
TRAINER_STAGES = ("align", "distill", "finetune")


def _select_stages(pipeline: Any, stages: Sequence[str] | None) -> list[str]:
    names = [s.name for s in pipeline.stages] if stages is None else list(stages)
    known = [s.name for s in pipeline.stages]
    for name in names:
        if name not in known:
            raise StageSetupError(f"pipeline {pipeline.name!r} has no stage {name!r}; it has "
                                  f"{known}.")
        if name not in TRAINER_STAGES:
            raise StageSetupError(f"stage {name!r} of pipeline {pipeline.name!r} is not run by "
                                  f"`genrecal train` (it runs {list(TRAINER_STAGES)}).")
    return [n for n in known if n in names]


def _previous_outputs(pipeline: Any, name: str) -> dict[str, Any]:
    """Where stage ``name`` starts from: the previous stage's recorded outputs, or the
    pipeline's student (first stage)."""
    names = [s.name for s in pipeline.stages]
    index = names.index(name)
    if index == 0:
        return {"student": pipeline.model_location("student"), "recalibrator": None}
    previous = names[index - 1]
    done = read_done(pipeline.stage_dir(previous))
    if done is None:
        raise StageSetupError(
            f"stage {name!r} continues from stage {previous!r}, which has not finished (no "
            f"{pipeline.stage_dir(previous)}/stage_done.json); run `genrecal train "
            f"{pipeline.name} --stage {previous}` first.")
    return {"student": done["student"], "recalibrator": done.get("recalibrator")}


def _device(pipeline: Any, dist: RankInfo) -> torch.device:
    spec = pipeline.student
    if spec.device_map is not None:
        raise StageSetupError("student.device_map is not supported for training (one device per "
                              "process); set student.device instead, and use torchrun for "
                              "several GPUs.")
    name = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
    return device


def prepare_inputs(pipeline: Any, dist: RankInfo, roles: Sequence[str] = ("student",)) -> None:
    """Build what a tiny / synthetic pipeline generates (the tiny models of ``roles``, the
    synthetic data set) if missing, once (rank 0) while the other ranks wait."""
    syn = pipeline.data.synthetic
    for role in roles:
        if dist.is_main:
            from genrecal.store.vlm.tiny import model_dir_for

            model_dir_for(getattr(pipeline, role), pipeline.model_location(role))
    if dist.is_main and syn is not None:
        from genrecal.store.data import ensure_synthetic, synthetic_dir

        ensure_synthetic(syn, synthetic_dir(pipeline.output_dir))
    dist.barrier()


def pipeline_train_data(pipeline: Any) -> Any:
    """The ``train`` split of a pipeline's data as one DatasetRead (sources, then synthetic;
    :func:`genrecal.store.data.read_split`; run :func:`prepare_inputs` first under torchrun)."""
    from genrecal.store.data import read_split

    return read_split(pipeline.data, "train", output_dir=pipeline.output_dir)


def _recalibrator(pipeline: Any, student_model: torch.nn.Module, d_teacher: int,
                  saved: str | None, seed: int) -> Any:
    from genrecal.train.recalibrator import Recalibrator, RecalibratorConfig

    if saved is not None:
        return Recalibrator.load(saved, student_model)
    cfg = pipeline.recalibrator
    return Recalibrator.from_student(student_model, d_teacher,
                                     RecalibratorConfig(num_blocks=cfg.blocks, init=cfg.init,
                                                        answer_input=cfg.answer_input,
                                                        reset_positions=cfg.reassign_positions),
                                     seed=seed)


def build_stage_job(pipeline: Any, name: str, dist: RankInfo, options: LoopOptions) -> StageJob:
    """Load everything stage ``name`` of ``pipeline`` needs (student, teacher head, loader);
    with ``options.teacher_source == "online"`` the teacher itself, whose head and live
    features replace the cache's (:mod:`genrecal.train.online`)."""
    from genrecal.store.artifacts import load_teacher_embeddings, load_teacher_head
    from genrecal.store.vlm.loading import load_vlm
    from genrecal.train.data import LoaderConfig, check_cache_teacher, make_loader
    from genrecal.train.step import LossSpec, TeacherSide

    stage, spec = pipeline.stage(name), pipeline.student
    inputs = _previous_outputs(pipeline, name)
    device = _device(pipeline, dist)
    trains_student = bool(stage.trains.student_parts())
    student = load_vlm(inputs["student"], family=spec.family, device=str(device),
                       dtype="float32" if trains_student else spec.dtype,
                       trust_remote_code=spec.trust_remote_code, revision=spec.revision)
    answer_input = pipeline.recalibrator.answer_input
    loss_spec = LossSpec.for_stage(stage, answer_input)
    rec = teacher = cache = online = expect = None
    if name in GENRECAL_STAGES and options.teacher_source == "online":
        from genrecal.train.online import load_online_teacher

        online = load_online_teacher(pipeline, device, question=loss_spec.uses_reg,
                                     round_to=options.online_round_to)
        teacher = online.teacher_side(answer_input, device)
    elif name in GENRECAL_STAGES:
        cache = pipeline.cache.location
        if not options.allow_teacher_mismatch:
            expect = check_cache_teacher(cache, pipeline.model_location("teacher"), pipeline.teacher.revision)
        embeddings = load_teacher_embeddings(cache) if answer_input == "embedding" else None
        teacher = TeacherSide.from_artifacts(load_teacher_head(cache), embeddings, device)
    if teacher is not None:
        rec = _recalibrator(pipeline, student.model, teacher.hidden_size,
                            inputs["recalibrator"], stage.seed)
    model = StageModel(student.model, student.family, loss_spec, rec, teacher)
    config = LoaderConfig(batch_size=stage.batch_size, seed=stage.seed,
                          num_workers=options.num_workers, max_length=pipeline.cache.max_length,
                          load_question=loss_spec.uses_reg, on_error=pipeline.data.on_error,
                          pin_memory=device.type == "cuda")
    if online is None:
        loader = make_loader(pipeline_train_data(pipeline), student, cache=cache, config=config,
                             world_size=dist.world, rank=dist.rank, expect_teacher=expect)
    else:
        from genrecal.train.online import make_online_loader

        loader = make_online_loader(pipeline_train_data(pipeline), student, online, config=config,
                                    world_size=dist.world, rank=dist.rank)
    return StageJob(stage=stage, model=model, loader=loader, out_dir=Path(pipeline.stage_dir(name)),
                    processor=student.processor, device=device, dist=dist, inputs=inputs,
                    export_dtype=getattr(torch, spec.dtype))


def run_stage(pipeline: Any, name: str, *, resume: bool = False,
              options: LoopOptions | None = None, dist: RankInfo | None = None) -> StageResult:
    """Run (or, with ``resume``, continue or skip when finished) one stage of ``pipeline``."""
    options, dist = options or LoopOptions(), dist or RankInfo.current()
    out_dir = Path(pipeline.stage_dir(name))
    if read_done(out_dir) is not None:
        if resume:
            log.info("stage %s already finished (%s); skipping", name, out_dir)
            return StageResult(name, 0, 0, True, [], out_dir, skipped=True)
        raise StageSetupError(f"stage {name!r} already finished in {out_dir}; pass --resume to "
                              "keep it, or delete the directory to train it again.")
    if not resume and latest_checkpoint(out_dir / CHECKPOINTS) is not None:
        raise StageSetupError(f"{out_dir / CHECKPOINTS} holds checkpoints of an earlier run of "
                              f"stage {name!r}; pass --resume to continue it, or delete the "
                              "directory to start over.")
    online = options.teacher_source == "online" and name in GENRECAL_STAGES
    prepare_inputs(pipeline, dist, ("student", "teacher") if online else ("student",))
    job = build_stage_job(pipeline, name, dist, options)
    try:
        return train_stage(job, options, resume)
    finally:
        close = getattr(job.loader, "close", None)
        if close is not None:
            close()


def run_stages(pipeline: Any, stages: Sequence[str] | None = None, resume: bool = False,
               options: LoopOptions | None = None) -> list[StageResult]:
    """Run the trainer stages of ``pipeline`` in order (all of them, or those named).

    Under torchrun (WORLD_SIZE > 1) every process calls this; the process group is initialised
    here (gloo on CPU, nccl on CUDA). Stage finetune needs no teacher cache.
    """
    dist = init_distributed()
    results = []
    for name in _select_stages(pipeline, stages):
        results.append(run_stage(pipeline, name, resume=resume, options=options, dist=dist))
    return results
