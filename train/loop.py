"""The training loop: stages, AdamW, LR schedule, accumulation, DDP / FSDP2, checkpoints, metrics.

:func:`train_stage` runs one stage (a :class:`StageJob`: the stage config, a
:class:`~genrecal.train.step.StageModel` and a :class:`BatchLoader`) as one function that reads
top to bottom: setup (trainables, resume, schedule, DDP / FSDP wrap, optimizer), the loop
(micro-batches, forward / backward with accumulation, clip, step, log, checkpoint, stop_after),
then the export. :func:`run_stages` builds the jobs of a pipeline (student, teacher head,
Recalibrator, loader) and runs its stages in order, each continuing from the previous stage's
output (docs/method.md §1.4).

Optimisation (docs/method.md §1.4: AdamW, LR linear lr_start -> lr_end within each stage). One
optimizer step takes ``n_micro = grad_accum`` micro-batches per rank (fewer for the very last
step of an epoch-based stage; another number after an FSDP resume at another world size, see
below). Global batch = batch_size * grad_accum * world_size samples. The
loss is normalised token-correctly over the global batch (docs/method.md §1.3, (1.5)): the
token counts of every micro-batch of the step are summed over ranks first, each micro-batch
back-propagates ``world_size * sum_t w_t * (its per-token loss sum of term t) / N_t(global)``,
and DDP averages the gradients over ranks, so the gradient is that of the per-token mean over
the whole global batch: 2 ranks x batch b give the same update as 1 rank x 2 micro-batches of b.

Teacher features come from the teacher cache, or, with ``LoopOptions(teacher_source="online")``,
from the teacher run live on every batch (:mod:`genrecal.train.online`).

Resume. A checkpoint holds the trainable weights, the AdamW state, the step (the LR is a pure
function of it), the counters, every rank's sampler position and RNG states. ``resume=True``
restores them and continues; on CPU the result is bitwise identical to an uninterrupted run
(tests/test_train_loop.py).

Parallelism (the stage setting ``parallel``, docs/memory.md). ``ddp``: DistributedDataParallel,
every rank holds the whole model and AdamW state; checkpoints hold the full weights once
(train/checkpoint.py). ``fsdp``: FSDP2 (``fully_shard``) per decoder block of the student
(found through the Family registry) and of the Recalibrator, then the StageModel as the root
(:func:`shard_stage_model`): parameters, gradients and AdamW states are sharded over the ranks;
bf16 stages gather bf16 and reduce fp32 (QAT blocks gather fp32, docs/method.md §2.3); the
frozen teacher head (not a module parameter) is replicated. Gradient accumulation: no gradient
sync before the last micro-batch (``set_requires_gradient_sync``); clipping: the total norm over
all shards (DTensor ``clip_grad_norm_``). Checkpoints are sharded (DCP, safetensors) and resume
at the same world size bitwise, or at another one: the global batch (batch_size x grad_accum x
the starting world size) and the optimizer steps stay, each rank runs global_batch /
(batch_size x world) micro-batches per step (:func:`micro_batches_per_step`; a world size that
does not divide the global batch that way is refused), and the sampler re-partitions the rest of
the epoch (exactly the samples not yet seen; train/sampler.py). RNG streams do not carry over to
another world size (each rank reseeds from (seed + step, rank)). The stage's student and
Recalibrator are exported from a full state dict gathered on rank 0 (:func:`gather_full_model`).
One process with ``fsdp`` trains unwrapped, as ``ddp``, but writes sharded checkpoints.
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
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

from genrecal.common.config import AlignStage, DistillStage, FinetuneStage, GraceStage, Pipeline
from genrecal.common.distributed import RankInfo
from genrecal.common.vocabulary import GENRECAL_STAGES, TRAINER_STAGES
from genrecal.store.errors import ModelLoadError
from genrecal.train.checkpoint import (LAYOUT_SHARDED, CheckpointData, RngState, CheckpointHeader,
                                       checkpoint_layout, latest_checkpoint, load_checkpoint,
                                       prune_checkpoints, read_sharded_checkpoint,
                                       restore_sharded_checkpoint, restore_weights,
                                       save_checkpoint, save_sharded_checkpoint)
from genrecal.train.controller import LagrangianController, linear_warmup
from genrecal.train.errors import StageSetupError
from genrecal.train.quant import (is_qat_dir, load_qat_scales, param_groups, qat_modules,
                                  quantize_model, read_qat_config, save_qat, set_lr)
from genrecal.train.export import (RECALIBRATOR_DIR, STUDENT_DIR, export_recalibrator,
                                   export_student, read_done, write_done)
from genrecal.train.metrics import MetricsLog, Progress, plot_losses
from genrecal.train.recalibrator import Recalibrator
from genrecal.train.sampler import BatchPlan, SamplerState
from genrecal.train.step import (TERMS, LossSpec, StageModel, TeacherSide, TokenCounts,
                                 batch_to, configure_trainables, run_step)

if TYPE_CHECKING:
    from genrecal.data.readers import DatasetRead
    from genrecal.train.data import TrainBatch

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"

#: The stage configs the trainer runs (:data:`~genrecal.common.vocabulary.TRAINER_STAGES`).
TrainerStage = AlignStage | DistillStage | FinetuneStage | GraceStage


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
# FSDP2 (stage setting `parallel: fsdp`)
# ==============================================================================================

def fsdp_blocks(model: StageModel) -> list[torch.nn.Module]:
    """The FSDP units below the root: the student's decoder blocks (found through the Family
    registry, ``get_family(config).decoder_layers``) and the Recalibrator's RecBody blocks.
    A student whose family gives no block list is refused (StageSetupError)."""
    from genrecal.model.families import get_family

    student = model.student
    try:
        family = get_family(student.config)
        layers = family.decoder_layers(student)
    except (ModelLoadError, AttributeError) as exc:
        family, layers, why = None, None, f" ({exc})"
    else:
        why = ""
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        title = family.title if family is not None else type(student).__name__
        raise StageSetupError(
            f"parallel: fsdp shards the student per decoder block, but the {title} family gives no "
            f"decoder block list for {type(student).__name__}{why}; use parallel: ddp for this "
            "student, or give its Family a decoder_layers path (genrecal.model.families).")
    blocks = list(layers)
    if model.recalibrator is not None:
        blocks += list(model.recalibrator.body.blocks)
    return blocks


def micro_batches_per_step(global_batch: int, batch_size: int, world: int, stage: str = "") -> int:
    """Micro-batches of ``batch_size`` each rank runs per optimizer step to keep the stage's
    global batch (``batch_size * grad_accum * the world size it started with``).

    "The world size divides the global batch" means here: every rank gets the same whole number
    of full micro-batches, i.e. ``world`` divides ``global_batch / batch_size``
    (= grad_accum x the starting world size). A fresh stage always qualifies; a stage resumed at
    another world size may not, and is refused before training (StageSetupError).
    """
    per_rank, rest = divmod(global_batch, world)
    if rest or per_rank % batch_size or per_rank == 0:
        micro = global_batch // batch_size
        fits = [w for w in range(1, micro + 1) if micro % w == 0]
        raise StageSetupError(
            f"stage {stage}: {world} processes do not divide the global batch of {global_batch} "
            f"samples per optimizer step (batch_size {batch_size} x grad_accum x the processes the "
            f"stage started with): every rank must run the same whole number of micro-batches of "
            f"batch_size {batch_size}, so the world size must divide {micro}. Resume with one of "
            f"{fits} processes, or start the stage over.")
    return per_rank // batch_size


def _micro_left(stage: TrainerStage, loader: BatchLoader, step: int, total_steps: int,
                accum: int, where: Path | None) -> int:
    """Micro-batches this rank still runs after a resume at another world size (the global
    batch and the number of optimizer steps are the checkpoint's)."""
    if stage.steps is not None:
        return (total_steps - step) * accum
    state, plan = loader.state, loader.plan
    left = len(plan.remaining(state)) + max(stage.epochs - 1 - state.epoch, 0) * plan.steps_per_epoch
    if step + -(-left // accum) != total_steps:
        raise StageSetupError(
            f"stage {stage.name}: the rest of its {stage.epochs} epoch(s) takes "
            f"{-(-left // accum)} optimizer steps at {plan.world_size} processes, but checkpoint "
            f"{where} has {total_steps - step} left (epochs split into steps per world size); "
            "resume with the number of processes it was written with, or use `steps:`.")
    return left


def shard_stage_model(model: StageModel, stage: TrainerStage, device: torch.device, world: int,
                      *, unused: bool = False) -> None:
    """FSDP2: ``fully_shard`` each student decoder block and Recalibrator block, then the
    StageModel as the root (embeddings, vision tower, projector, heads, P_pre / P_post, norms).

    Precision: bf16 stages gather parameters in bfloat16 and reduce gradients in float32
    (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``; the AdamW master weights
    and states stay float32 shards); fp32 stages gather float32. Blocks holding QAT
    fake-quantised linears gather float32 in every case: the fake quantiser must round the
    float32 master weights, whose codes the export writes (docs/method.md §2.3); their matmuls
    still run in bfloat16 under autocast. The frozen teacher head is no module parameter: it
    stays replicated on every rank. ``unused``: a trainable part may get no gradient on some
    rank (vision encoder, projector, student head), so the reduce-scatter includes zeros for it
    (DDP's find_unused_parameters).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from genrecal.train.quant import FakeQuantLinear

    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if stage.precision == "bf16" else MixedPrecisionPolicy()
    fp32 = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for block in fsdp_blocks(model):
        qat = any(isinstance(m, FakeQuantLinear) for m in block.modules())
        fully_shard(block, mesh=mesh, mp_policy=fp32 if qat else policy)
    # the root's input is the TrainBatch: leave it uncast (the blocks cast their own inputs)
    fully_shard(model, mesh=mesh, mp_policy=dataclasses.replace(policy, cast_forward_inputs=False))
    if unused:
        model.set_reduce_scatter_unused_params(True)


def _fsdp_batch(batch: TrainBatch, shadow: TrainBatch | None, stage: str
                ) -> tuple[TrainBatch, float, TrainBatch | None]:
    """(batch to run, loss weight, new shadow): a batch with samples runs with weight 1 and
    becomes the shadow; an empty one (every sample skipped, or a rank without a sample left in a
    resumed epoch segment) runs the shadow with weight 0, so that its collectives happen."""
    if batch.ids:
        return batch, 1.0, batch
    if shadow is None:
        raise StageSetupError(
            f"stage {stage}: under parallel: fsdp this rank got a micro-batch without samples "
            "before any with samples, and every rank must run every block; use fewer processes "
            "than samples left in the epoch, or parallel: ddp.")
    return shadow, 0.0, shadow


def _to_float(norm: torch.Tensor) -> float:
    """A (replicated DTensor under FSDP) scalar as a float."""
    from torch.distributed.tensor import DTensor

    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def gather_full_model(model: StageModel, is_main: bool, qat: Any = None, *, student: bool = True
                      ) -> tuple[torch.nn.Module | None, Recalibrator | None]:
    """Every rank: gather the full (unsharded) weights of the FSDP-wrapped ``model``'s student
    (unless ``student`` is False: it is not exported) and Recalibrator onto rank 0, on the CPU
    (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``). Rank 0: plain (not FSDP)
    copies holding them, built on the meta device and assigned the gathered tensors (the
    non-persistent buffers, never sharded, are the trained model's), ready for export_student /
    save_qat / export_recalibrator; the other ranks and the parts not gathered get None.
    ``qat``: the QuantConfig the student was fake-quantised with (None: not QAT)."""
    import copy

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from genrecal.train.quant import quantize_model

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full_student = get_model_state_dict(model.student, options=options) if student else None
    full_rec = None
    if model.recalibrator is not None:
        full_rec = get_model_state_dict(model.recalibrator, options=options)
    if not is_main:
        return None, None
    trained = model.student
    with torch.device("meta"):
        plain = type(trained)(copy.deepcopy(trained.config))
    if qat is not None:
        quantize_model(plain, qat, init=False)
    recalibrator = None
    if full_rec is not None:  # built from the (meta) plain student: its block class
        old = model.recalibrator
        with torch.device("meta"):
            recalibrator = Recalibrator.from_student(plain, old.d_teacher, old.cfg,
                                                     dtype=full_rec["p_pre.weight"].dtype)
        _assign(recalibrator, old, full_rec)
    if full_student is None:
        return None, recalibrator
    _assign(plain, trained, full_student)
    if getattr(trained, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(trained.generation_config)
    if getattr(plain.config, "tie_word_embeddings", False) or \
            getattr(plain.config.get_text_config(), "tie_word_embeddings", False):
        plain.tie_weights()
    return plain, recalibrator


def _assign(plain: torch.nn.Module, trained: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Load ``full`` into the meta-device module ``plain`` (by assignment), and the trained
    module's buffers that the state dict does not hold (non-persistent ones)."""
    plain.load_state_dict(full, strict=True, assign=True)
    for name, buffer in trained.named_buffers():
        owner, _, leaf = name.rpartition(".")
        module = plain.get_submodule(owner)
        if module._buffers.get(leaf) is not None and module._buffers[leaf].is_meta:
            module._buffers[leaf] = buffer.detach().cpu()
    left = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if left:
        raise StageSetupError(f"the gathered FSDP state dict lacks {left[:5]}; the module cannot "
                              "be exported (a bug: please report it).")


# ==============================================================================================
# Schedule, options, loader protocol
# ==============================================================================================

@dataclass(frozen=True)
class LinearSchedule:
    """LR of optimizer step ``i`` (0-based) of a stage (docs/method.md §1.4: linear within each
    stage).

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
    the live features through this cache codec ("bf16", "fp8_e4m3", "int8") as a cache would;
    memo_bytes: the loader keeps encoded examples in memory up to this many bytes per process
    (LoaderConfig.memo_bytes; 0: off), for small datasets trained over several epochs.
    """

    save_every: int | None = 100
    keep_checkpoints: int = 2
    stop_after: int | None = None
    num_workers: int = 2
    progress: bool = True
    teacher_source: Literal["cache", "online"] = "cache"
    online_round_to: str | None = None
    allow_teacher_mismatch: bool = False
    memo_bytes: int = 0

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
    """What the loop reads batches from: :class:`genrecal.train.data.TrainLoader` and
    :class:`genrecal.train.online.OnlineLoader` satisfy it.

    plan: this rank's batch plan (the loop refuses an ``uneven`` one under DDP);
    steps_per_epoch: batches per epoch on this rank (the length of an epoch-based stage);
    state: the sampler position after the last batch handed out (saved with checkpoints, its
    epoch logged); load_state: resume at a saved position (checked against the plan);
    ``iter(loader)``: the batches of the rest of the current epoch; close: stop the worker
    processes (:func:`run_stage`, once the stage is over).
    """

    @property
    def plan(self) -> BatchPlan: ...

    @property
    def steps_per_epoch(self) -> int: ...

    @property
    def state(self) -> SamplerState: ...

    def load_state(self, state: SamplerState) -> None: ...

    def __iter__(self) -> Iterator[TrainBatch]: ...

    def close(self) -> None: ...


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

    stage: TrainerStage
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


def train_stage(job: StageJob, options: LoopOptions | None = None,
                resume: bool = False) -> StageResult:
    """Train one stage: configure trainables, optimise, checkpoint, export.

    resume: continue from the newest checkpoint under ``job.out_dir/checkpoints`` (none: start
    fresh). Outputs in ``job.out_dir``: metrics.jsonl, loss.png, checkpoints/, student/ (when
    the stage trains the student), recalibrator/, stage_done.json.
    """
    options = options or LoopOptions()
    stage, model, loader, dist, device = job.stage, job.model, job.loader, job.dist, job.device
    spec = model.spec  # loss weights of the stage (docs/method.md §1.3)
    job.out_dir.mkdir(parents=True, exist_ok=True)

    # ---- Trainables (docs/method.md §1.4: the stage's `trains:` switches) --------------------
    if stage.trains.recalibrator and spec.genrecal is None:
        raise StageSetupError(f"stage {stage.name}: trains.recalibrator is on but every "
                              "GenRecal loss weight (ar, kl, reg) is 0, so nothing trains it; "
                              "set a loss weight or switch trains.recalibrator off.")
    fsdp = stage.parallel == "fsdp"
    if fsdp:  # before anything else: the FSDP units are the decoder blocks
        fsdp_blocks(model)
    # params: [(name, Parameter)] in optimizer order, named "student.*" / "recalibrator.*"
    params = configure_trainables(model.student, model.family, model.recalibrator, stage.trains)
    names = [name for name, _ in params]
    student_trains = any(name.startswith("student.") for name in names)

    # ---- Resume: the loop state of the newest checkpoint (its weights and optimizer state are
    # restored once the model is wrapped and the optimizer exists, below) ---------------------
    saved: CheckpointData | None = None  # a full (DDP / one process) checkpoint, tensors read
    header: CheckpointHeader | None = None  # the loop state of either layout
    where = latest_checkpoint(job.out_dir / CHECKPOINTS) if resume else None
    if where is not None:
        if checkpoint_layout(where) == LAYOUT_SHARDED or fsdp:
            header = read_sharded_checkpoint(where, rank=dist.rank, world_size=dist.world)
        else:
            saved = load_checkpoint(where, rank=dist.rank, world_size=dist.world)
            header = CheckpointHeader(saved.trainer, saved.sampler, saved.rng,
                                   int(saved.trainer.get("world_size", 1)))
    rescaled = header is not None and header.world_size != dist.world  # FSDP only

    # ---- Schedule: micro-batches -> optimizer steps -> LR ----------------------------------
    if dist.distributed and loader.plan.uneven:
        raise StageSetupError(
            f"stage {stage.name}: batch_size 1 with a sample count not divisible by the "
            f"{dist.world} processes gives the ranks different step counts; use "
            "batch_size >= 2 or a world size that divides the number of samples.")
    # The global batch: batch_size * grad_accum * world_size samples per optimizer step, fixed
    # when the stage starts; a run resumed at another world size keeps it (and the micro-batch
    # size) and runs `accum` micro-batches per rank per step instead of grad_accum.
    global_batch = stage.global_batch * dist.world
    if header is not None:
        global_batch = int(header.trainer.get("global_batch",
                                              stage.global_batch * header.world_size))
    # total_micro: micro-batches per rank over the stage; a step takes grad_accum of them
    if stage.steps is not None:
        total_micro = stage.steps * stage.grad_accum
    else:
        total_micro = stage.epochs * loader.steps_per_epoch
    total_steps = -(-total_micro // stage.grad_accum)  # ceil: an epoch may end mid-step
    if rescaled:  # the stage's length is the one it started with
        total_steps = int(header.trainer["total_steps"])
    schedule = LinearSchedule(stage.lr_start, stage.lr_end, stage.warmup, total_steps)
    step = 0  # optimizer steps done
    counters = {"samples": 0, "tokens_teacher": 0, "tokens_student": 0}  # global, whole stage
    micro_left = total_micro  # micro-batches this rank still runs

    if header is not None:
        mine = _trainer_state(stage, step, total_steps, schedule, dist.world, counters)
        for key in ("stage", "stage_config", "total_steps", "schedule"):
            theirs = header.trainer.get(key)
            if key == "stage_config" and isinstance(theirs, dict):  # written before `parallel`
                theirs = {"parallel": "ddp", **theirs}
            if mine[key] != theirs:
                raise StageSetupError(
                    f"checkpoint {where} was written with another {key} "
                    f"({theirs!r}, now {mine[key]!r}); resume with the config it "
                    f"was written with, or delete {job.out_dir / CHECKPOINTS} to start the stage "
                    "over.")
    accum = micro_batches_per_step(global_batch, stage.batch_size, dist.world, stage.name)
    if header is not None:
        # the same world size: this rank's own position; another: rank 0's, turned into the
        # global position and re-partitioned over this run's ranks (train/sampler.py)
        loader.load_state(loader.plan.resume(SamplerState.from_dict(header.sampler)))
        step, counters = int(header.trainer["step"]), dict(header.trainer["counters"])
        micro_left = total_micro - step * stage.grad_accum
        if rescaled:
            micro_left = _micro_left(stage, loader, step, total_steps, accum, where)
        log.info("resuming stage %s at step %d from %s%s", stage.name, step, where,
                 f" (written by {header.world_size} processes, now {dist.world}: {accum} "
                 "micro-batch(es) per step)" if rescaled else "")

    # ---- Module modes: train() what trains, activation checkpointing -----------------------
    model.student.train(student_trains)
    if model.recalibrator is not None:
        model.recalibrator.train(bool(stage.trains.recalibrator))
    if stage.gradient_checkpointing and student_trains:
        _enable_checkpointing(model.student)

    # ---- Wrap (DDP / FSDP2), optimizer, restore, metrics, RNG -------------------------------
    if saved is not None:
        restore_weights(params, saved.weights, where)
    trains = stage.trains
    unused = bool(trains.vision_encoder or trains.projector or trains.student_head)
    module: torch.nn.Module = model
    if dist.distributed and fsdp:
        shard_stage_model(model, stage, device, dist.world, unused=unused)
        by_name = dict(model.named_parameters())  # fully_shard swapped in DTensor parameters
        params = [(name, by_name[name]) for name in names]
    elif dist.distributed:
        # buffers (rotary inv_freq) are equal on every rank: no sync needed in the forward
        module = DistributedDataParallel(model, find_unused_parameters=unused,
                                         forward_sync_buffers=False)
    # QAT's log-scales train in their own group: no weight decay, LR x scale_lr_mult (§2.3)
    scale_lr_mult = stage.quantize.scale_lr_mult if stage.quantize is not None else 1.0
    optimizer = torch.optim.AdamW(param_groups(model.student, params, weight_decay=stage.weight_decay,
                                               scale_lr_mult=scale_lr_mult), lr=schedule(0))
    if saved is not None:
        optimizer.load_state_dict(saved.optimizer)
    elif header is not None:  # sharded: DCP reads (and reshards) weights and AdamW states
        restore_sharded_checkpoint(where, model=model, optimizer=optimizer, names=names)
    metrics = MetricsLog(job.out_dir / METRICS, None if header is None else step,
                         enabled=dist.is_main)
    if header is not None and header.rng is not None:
        header.rng.restore()
    elif header is not None:  # another world size: no rank's RNG stream carries over
        _seed_everything(stage.seed + step, dist.rank)
    else:
        _seed_everything(stage.seed, dist.rank)
    # GRACE: beta by the Lagrangian controller (docs/method.md §2.2), restored with the step
    controller = LagrangianController(stage.controller) if isinstance(stage, GraceStage) else None
    if controller is not None and header is not None:
        controller.load_state_dict(header.trainer["controller"])

    # ---- The loop: one iteration = one optimizer step ---------------------------------------
    input_dtype = next(model.student.parameters()).dtype  # floating student inputs cast to it
    n_terms = len(TERMS)
    stream = _stream(loader)
    shadow: TrainBatch | None = None  # FSDP: this rank's last batch with samples
    progress = Progress(total_steps, step, stage.name,
                        enabled=options.progress and dist.is_main)
    try:
        while step < total_steps:
            started = time.perf_counter()

            # This rank's micro-batches of the step (the last step of an epoch-based stage may
            # take fewer), and the seconds spent waiting for them.
            n_micro = min(accum, micro_left)
            micro_left -= n_micro
            batches = [next(stream) for _ in range(n_micro)]
            wait = time.perf_counter() - started

            # GRACE's weights of this step (1-based n): beta * w_d(n), omega * w_r(n), (2.1)
            if controller is not None:
                w_d = linear_warmup(step + 1, stage.gdkd.warmup_steps)
                w_r = linear_warmup(step + 1, stage.rcka.warmup_steps)
                model.set_grace_weights(gdkd=controller.beta * w_d, rcka=stage.rcka.omega * w_r)

            # Loss denominators of the GLOBAL batch: N_l teacher answer tokens, N_s student
            # target tokens (GRACE: the gate sum and the kept images too), summed over the
            # micro-batches, then over ranks (§1.3, (1.5); §2.1, (2.6), (2.9)).
            batches = [batch_to(b, device, input_dtype) for b in batches]
            local = sum((model.token_counts(b) for b in batches), TokenCounts())
            counts = TokenCounts.from_tensor(all_reduce_sum(dist, local.to_tensor()))
            # sums: float64 [n_terms + 2] on the device (no host sync until the step is done):
            # per-term loss sums over tokens, then samples, then samples the workers skipped
            sums = torch.zeros(n_terms + 2, dtype=torch.float64, device=device)
            sums[n_terms] = sum(len(b.ids) for b in batches)
            sums[n_terms + 1] = sum(len(b.skipped) for b in batches)

            # Forward / backward of each micro-batch; gradients accumulate in .grad.
            for i, batch in enumerate(batches):
                last = i == n_micro - 1
                # DDP all-reduces (FSDP reduce-scatters) the gradients in the backward of the
                # last micro-batch only; before it they accumulate unsynchronised on each rank
                sync = contextlib.nullcontext()
                if dist.distributed and fsdp:
                    module.set_requires_gradient_sync(last)
                elif dist.distributed and not last:
                    sync = module.no_sync()
                autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) \
                    if stage.precision == "bf16" else contextlib.nullcontext()
                # FSDP: every rank must run every block's forward and backward (their
                # all-gathers and reduce-scatters are collectives), so a rank without a sample
                # in this micro-batch runs its last real batch with weight 0 instead
                weight = 1.0
                if dist.distributed and fsdp:
                    batch, weight, shadow = _fsdp_batch(batch, shadow, stage.name)
                with sync:
                    with autocast:
                        out = run_step(module, batch, counts)
                        total = out.total
                    # out.total = sum_t w_t * S_t / N_t(global), S_t this micro-batch's sum;
                    # DDP / FSDP average gradients over ranks, so x world gives the gradient of
                    # the per-token mean over the global batch
                    (total * (weight * dist.world)).backward()
                if weight:
                    zero = torch.zeros((), device=device)
                    sums[:n_terms] += torch.stack([out.sums.get(t, zero) for t in TERMS]).double()

            # Clip: grad_norm is the total L2 norm of the gradients before clipping (0.0 when no
            # trainable parameter got one).
            # Under FSDP the gradients are DTensor shards: the norm is the total over all
            # shards of all ranks (DTensor-aware clip_grad_norm_ / get_total_norm).
            with_grad = [p for _, p in params if p.grad is not None]
            if not with_grad:
                grad_norm = 0.0
            elif stage.grad_clip is None:
                grad_norm = _to_float(torch.nn.utils.get_total_norm([p.grad for p in with_grad]))
            else:
                grad_norm = _to_float(torch.nn.utils.clip_grad_norm_(with_grad, stage.grad_clip))

            # Optimizer step at the LR of this step (a pure function of it, §1.4).
            lr = schedule(step)
            set_lr(optimizer, lr)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sums = all_reduce_sum(dist, sums).cpu()  # now global: all ranks' micro-batches
            step += 1

            # Log: loss terms as per-token means over the global batch (the terms of (1.5)
            # the stage weighs), the weighted total, LR, norm, throughput.
            means = {t: float(sums[i]) / (counts.of_term(t) or 1)
                     for i, t in enumerate(TERMS) if spec.weight(t) > 0}
            weights = model.term_weights()  # this step's (GRACE's beta * w_d, omega * w_r)
            grace = {}
            if controller is not None:  # the global L_GDKD of this step updates beta (2.10)-(2.11)
                grace = {"beta": controller.beta, "w_gdkd": weights["gdkd"], "w_rcka": weights["rcka"]}
                controller.update(means["gdkd"])
            n_samples = int(sums[n_terms])
            counters["samples"] += n_samples
            counters["tokens_teacher"] += counts.teacher
            counters["tokens_student"] += counts.student
            seconds = time.perf_counter() - started
            record = {"stage": stage.name, "step": step, "epoch": loader.state.epoch,
                      "loss": spec.total(means, weights), **means, **grace, "lr": lr,
                      "grad_norm": grad_norm,
                      "samples": n_samples, "tokens_teacher": counts.teacher,
                      "tokens_student": counts.student,
                      "samples_per_s": n_samples / max(seconds, 1e-9), "data_wait_s": wait,
                      "step_time_s": seconds, "skipped": int(sums[n_terms + 1])}
            metrics.log(record)
            progress.update(record)

            # Checkpoint: every save_every steps, at stop_after and at the end.
            every = options.save_every
            if step == total_steps or step == options.stop_after \
                    or (every is not None and step % every == 0):
                trainer = _trainer_state(stage, step, total_steps, schedule, dist.world, counters)
                if controller is not None:
                    trainer["controller"] = controller.state_dict()
                trainer["global_batch"] = global_batch
                if dist.is_main:  # for the record (resumes read the sampler states)
                    trainer["samples_seen_in_epoch"] = loader.plan.consumed(loader.state)
                _save_checkpoint(job, options, step, params, optimizer, trainer, module=model
                                 if fsdp else None)

            # stop_after: leave unfinished (the checkpoint above is where a resume continues).
            if options.stop_after is not None and options.stop_after <= step < total_steps:
                return StageResult(stage=stage.name, step=step, total_steps=total_steps,
                                   finished=False, records=list(metrics.records),
                                   out_dir=job.out_dir)
    finally:
        progress.close()

    # ---- Finish (rank 0): loss plot, exported student / Recalibrator, stage_done.json -----
    # FSDP: every rank takes part in gathering the full weights onto rank 0 (CPU), which
    # exports plain (unsharded) copies of the student and the Recalibrator
    qat_cfg = None
    if qat_modules(model.student):
        qat_cfg = stage.quantize or read_qat_config(job.inputs["student"])[0]
    student_model, recalibrator_model = model.student, model.recalibrator
    if dist.distributed and fsdp:
        student_model, recalibrator_model = gather_full_model(model, dist.is_main, qat_cfg,
                                                              student=student_trains)
    if dist.is_main:
        out = job.out_dir
        plot_losses(metrics.records, out / LOSS_PLOT, f"{stage.name} losses")
        student = str(job.inputs.get("student", ""))
        if student_trains and qat_cfg is not None:  # master weights + learned scales
            student = str(save_qat(student_model, out / STUDENT_DIR, processor=job.processor,
                                   cfg=qat_cfg))
        elif student_trains:
            student = str(export_student(student_model, job.processor, model.family,
                                         out / STUDENT_DIR, job.export_dtype))
        recalibrator = None
        if recalibrator_model is not None:
            recalibrator = str(export_recalibrator(recalibrator_model, out / RECALIBRATOR_DIR))
        write_done(out, {"stage": stage.name, "steps": step, "student": student,
                         "recalibrator": recalibrator, "inputs": job.inputs,
                         "final": metrics.records[-1] if metrics.records else None})
    dist.barrier()
    return StageResult(stage=stage.name, step=step, total_steps=total_steps, finished=True,
                       records=list(metrics.records), out_dir=job.out_dir)


def _stream(loader: BatchLoader) -> Iterator[TrainBatch]:
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


def _trainer_state(stage: TrainerStage, step: int, total_steps: int, schedule: LinearSchedule,
                   world: int, counters: dict[str, int]) -> dict[str, Any]:
    """The JSON-able loop state a checkpoint records (and a resume checks: stage,
    stage_config, total_steps, schedule)."""
    return {"stage": stage.name, "stage_config": json.loads(json.dumps(stage.to_dict())),
            "step": step, "total_steps": total_steps, "schedule": dataclasses.asdict(schedule),
            "world_size": world, "counters": dict(counters)}


def _save_checkpoint(job: StageJob, options: LoopOptions, step: int,
                     params: Sequence[tuple[str, torch.nn.Parameter]],
                     optimizer: torch.optim.Optimizer, trainer: dict[str, Any],
                     module: torch.nn.Module | None = None) -> None:
    """Checkpoint ``step`` (every rank writes its sampler and RNG states), then prune.
    ``module``: the StageModel of a ``parallel: fsdp`` stage, checkpointed sharded (DCP)."""
    root = job.out_dir / CHECKPOINTS
    names = [n for n, _ in params]
    if module is not None:
        save_sharded_checkpoint(root, step, model=module, optimizer=optimizer, names=names,
                                trainer=trainer, sampler=job.loader.state.to_dict(),
                                rng=RngState.capture(), rank=job.dist.rank,
                                world_size=job.dist.world, barrier=job.dist.barrier)
    else:
        data = CheckpointData(weights={n: p for n, p in params}, optimizer=optimizer.state_dict(),
                              names=names, trainer=trainer, sampler=job.loader.state.to_dict(),
                              rng=RngState.capture())
        save_checkpoint(root, step, data, rank=job.dist.rank, world_size=job.dist.world,
                        barrier=job.dist.barrier)
    if job.dist.is_main and options.keep_checkpoints > 0:
        prune_checkpoints(root, options.keep_checkpoints)


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


# ==============================================================================================
# Pipelines
# ==============================================================================================

def _select_stages(pipeline: Pipeline, stages: Sequence[str] | None) -> list[str]:
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


def _previous_outputs(pipeline: Pipeline, name: str) -> dict[str, Any]:
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


def _device(pipeline: Pipeline, dist: RankInfo) -> torch.device:
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


def prepare_inputs(pipeline: Pipeline, dist: RankInfo,
                   roles: Sequence[str] = ("student",)) -> None:
    """Build what a tiny / synthetic pipeline generates (the tiny models of ``roles``, the
    synthetic data set) if missing, once (rank 0) while the other ranks wait."""
    syn = pipeline.data.synthetic
    for role in roles:
        if dist.is_main:
            from genrecal.model.tiny import model_dir_for

            model_dir_for(getattr(pipeline, role), pipeline.model_location(role))
    if dist.is_main and syn is not None:
        from genrecal.data import ensure_synthetic, synthetic_dir

        ensure_synthetic(syn, synthetic_dir(pipeline.output_dir))
    dist.barrier()


def pipeline_train_data(pipeline: Pipeline) -> DatasetRead:
    """The ``train`` split of a pipeline's data as one DatasetRead (sources, then synthetic;
    :func:`genrecal.data.read_split`; run :func:`prepare_inputs` first under torchrun)."""
    from genrecal.data import read_split

    return read_split(pipeline.data, "train", output_dir=pipeline.output_dir)


def _recalibrator(pipeline: Pipeline, student_model: torch.nn.Module, d_teacher: int,
                  saved: str | None, seed: int) -> Recalibrator:
    """The previous stage's Recalibrator (``saved``), or a new one built from the student as
    the pipeline's ``recalibrator`` block says (docs/method.md §1.1)."""
    if saved is not None:
        return Recalibrator.load(saved, student_model)
    return Recalibrator.from_student(student_model, d_teacher, pipeline.recalibrator, seed=seed)


def _quantize_student(student: torch.nn.Module, stage: TrainerStage, source: str) -> None:
    """QAT (docs/method.md §2.3): fake-quantise the student's decoder linears as the stage's
    ``quantize`` says, or, for a student a QAT stage saved, as it was saved, with its learned
    scales (a QAT student stays one)."""
    if not is_qat_dir(source):
        if stage.quantize is not None:
            quantize_model(student, stage.quantize)
        return
    saved, wrapped = read_qat_config(source)
    if stage.quantize is not None and stage.quantize != saved:
        raise StageSetupError(f"stage {stage.name!r} sets quantize {stage.quantize.to_dict()} but its "
                              f"student {source} was trained with {saved.to_dict()}; use the same "
                              "settings, or leave quantize out to keep them.")
    quantize_model(student, saved, init=False)
    load_qat_scales(student, source, wrapped)


def build_stage_job(pipeline: Pipeline, name: str, dist: RankInfo,
                    options: LoopOptions) -> StageJob:
    """Load everything stage ``name`` of ``pipeline`` needs (student, teacher head, loader);
    with ``options.teacher_source == "online"`` the teacher itself, whose head and live
    features replace the cache's (:mod:`genrecal.train.online`)."""
    from genrecal.store.artifacts import load_teacher_embeddings, load_teacher_head
    from genrecal.model.loading import load_vlm
    from genrecal.train.data import (CacheSource, GraceFeed, LoaderConfig, check_cache_teacher,
                                     check_same_tokenizer, make_loader)

    stage, spec = pipeline.stage(name), pipeline.student
    if not isinstance(stage, TrainerStage):
        raise StageSetupError(f"stage {name!r} of pipeline {pipeline.name!r} is not run by "
                              f"`genrecal train` (it runs {list(TRAINER_STAGES)}).")
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
    elif isinstance(stage, GraceStage):
        if options.teacher_source == "online":
            raise StageSetupError(f"stage {name!r}: GRACE reads its teacher signal from the cache; "
                                  "--online (a live teacher) applies to align and distill only. "
                                  "Extract the cache (`genrecal extract`) and train without --online.")
        cache = pipeline.cache.location
        if not options.allow_teacher_mismatch:
            expect = check_cache_teacher(cache, pipeline.model_location("teacher"), pipeline.teacher.revision)
        check_same_tokenizer(cache, student.tokenizer)
        if stage.gdkd.source == "exact":
            teacher = TeacherSide.from_artifacts(load_teacher_head(cache), None, device)
    if teacher is not None and not isinstance(stage, GraceStage):
        rec = _recalibrator(pipeline, student.model, teacher.hidden_size,
                            inputs["recalibrator"], stage.seed)
    _quantize_student(student.model, stage, inputs["student"])  # after the Recalibrator's copy
    model = StageModel(student.model, student.family, loss_spec, rec, teacher)
    config = LoaderConfig(batch_size=stage.batch_size, seed=stage.seed,
                          num_workers=options.num_workers, max_length=pipeline.cache.max_length,
                          load_question=loss_spec.uses_reg, on_error=pipeline.data.on_error,
                          pin_memory=device.type == "cuda", memo_bytes=options.memo_bytes)
    if isinstance(stage, GraceStage):  # logit information (+ Grams for RCKA), docs/method.md §2.4
        read = ["answer_hidden" if stage.gdkd.source == "exact" else "logit_stats"]
        read += ["visual_gram"] if stage.rcka.omega > 0 else []
        feed = GraceFeed(CacheSource(cache, dtype=config.dtype, expect_teacher=expect, read=read))
        loader = make_loader(pipeline_train_data(pipeline), student, source=feed, config=config,
                             world_size=dist.world, rank=dist.rank)
    elif online is None:
        loader = make_loader(pipeline_train_data(pipeline), student, cache=cache, config=config,
                             world_size=dist.world, rank=dist.rank, expect_teacher=expect)
    else:
        from genrecal.train.online import make_online_loader

        loader = make_online_loader(pipeline_train_data(pipeline), student, online, config=config,
                                    world_size=dist.world, rank=dist.rank)
    return StageJob(stage=stage, model=model, loader=loader, out_dir=Path(pipeline.stage_dir(name)),
                    processor=student.processor, device=device, dist=dist, inputs=inputs,
                    export_dtype=getattr(torch, spec.dtype))


def run_stage(pipeline: Pipeline, name: str, *, resume: bool = False,
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
        job.loader.close()


def run_stages(pipeline: Pipeline, stages: Sequence[str] | None = None, resume: bool = False,
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
