"""FSDP2 training (stage setting ``parallel: fsdp``, genrecal.train.loop): equivalence with DDP
and one process, sharded DCP checkpoints (bitwise resume at the same world size, resume at
another one with exactly the unseen samples), export from a sharded run, per-rank memory, GRACE
with QAT, and the refusals before training.

Multi-process tests run 2 gloo ranks on the CPU (torch.multiprocessing.spawn, file://
rendezvous); each spawn runs a list of jobs in one process group, so the interpreters start
once. FSDP2 runs on CPU with gloo in torch 2.13 (all-gather, reduce-scatter, DTensor clip).

Tolerance (FSDP == DDP == one process, float32). The three runs see the same global batch and
the same per-token normalisation, so they differ only in the order of float32 sums: a rank's
micro-batch gradients accumulate locally and are then reduced over ranks (FSDP: reduce-scatter
of fp32 shards; DDP: all-reduce of buckets; one process: 4 local micro-batches). A reordering
moves a gradient element by about one ulp of the largest terms summed (~1e-7 relative to them).
AdamW's update lr * m / (sqrt(v) + eps) turns that into ~lr * 1e-7 for an element whose gradient
is well above eps = 1e-8, but into up to lr * dg / (|g| + eps) for an element whose gradient is a
near-cancellation of larger terms. Measured here after 3 steps at lr 1e-3: FSDP vs DDP 6e-8,
either vs one process 2.4e-6 (max over all weights); losses (per-token means of O(1) values)
2e-8 relative. A real defect (a wrong world-size scaling, a dropped or doubled micro-batch, a
missing gradient sync, a shard updated twice) changes whole Adam steps, ~lr = 1e-3 per element.
ATOL = lr_start / 50 = 2e-5 on weights sits between (~10x the measured noise, 50x below one
wrong step); RTOL_LOSS = 1e-5 on the logged losses. Resuming at another world size re-associates
the same sums, so the same bounds apply.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_batches import D_TEACHER, ListLoader, encode, make_samples, teacher_head

from genrecal.common.config import (AlignStage, DistillStage, FinetuneStage, RecalibratorConfig)
from genrecal.common.distributed import RankInfo
from genrecal.model.loading import load_vlm
from genrecal.train.errors import StageSetupError
from genrecal.train.loop import LoopOptions, StageJob, micro_batches_per_step, train_stage
from genrecal.train.metrics import TIMING_FIELDS
from genrecal.train.recalibrator import Recalibrator
from genrecal.train.step import LossSpec, StageModel, TeacherSide

N_SAMPLES = 8
QUIET = dict(progress=False, num_workers=0)
ATOL, RTOL_LOSS = 2e-5, 1e-5  # derivation in the module docstring
# 2 ranks x 2 micro-batches x 2 samples = 8 samples per step (one epoch); one process: 4 x 2.
# Activation checkpointing on: under FSDP the recomputation runs inside the block's unit.
FSDP = DistillStage(name="distill", steps=3, grad_accum=2, batch_size=2, precision="fp32", warmup=1,
                    lr_start=1e-3, lr_end=1e-4, parallel="fsdp", seed=3, gradient_checkpointing=True)
ALIGN_BF16 = AlignStage(name="align", steps=2, batch_size=2, precision="bf16", lr_start=1e-3,
                        lr_end=1e-4, parallel="fsdp", seed=3)


# ---------------------------------------------------------------------------------------------
# jobs (the same in the test process and in the spawned ranks)
# ---------------------------------------------------------------------------------------------

class RecordingLoader:
    """A BatchLoader that remembers the sample ids of every batch it hands out."""

    def __init__(self, inner: ListLoader):
        self.inner, self.ids = inner, []

    plan = property(lambda self: self.inner.plan)
    steps_per_epoch = property(lambda self: self.inner.steps_per_epoch)
    state = property(lambda self: self.inner.state)

    def load_state(self, state) -> None:
        self.inner.load_state(state)

    def __iter__(self):
        for batch in self.inner:
            self.ids.append(list(batch.ids))
            yield batch

    def close(self) -> None:
        pass


def make_job(student_dir, encoded, out_dir, stage, dist: RankInfo = RankInfo()) -> StageJob:
    vlm = load_vlm(student_dir)
    rec = teacher = None
    if stage.name != "finetune":
        rec = Recalibrator.from_student(vlm.model, D_TEACHER, RecalibratorConfig(blocks=1), seed=1)
        teacher = TeacherSide.from_artifacts(teacher_head())
    model = StageModel(vlm.model, vlm.family, LossSpec.for_stage(stage), rec, teacher)
    loader = RecordingLoader(ListLoader(encoded, vlm.tokenizer.pad_token_id, stage.batch_size,
                                        seed=stage.seed, world_size=dist.world, rank=dist.rank,
                                        teacher=stage.name != "finetune"))
    return StageJob(stage=stage, model=model, loader=loader, out_dir=Path(out_dir),
                    processor=vlm.processor, dist=dist, inputs={"student": str(student_dir)})


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, unsharded (a collective under FSDP)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in model.state_dict().items()}


def local_bytes(job: StageJob) -> dict[str, int]:
    """This rank's bytes of trainable parameters (local shards) and their global element count."""
    from torch.distributed.tensor import DTensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    trainable = [p for p in job.model.parameters() if p.requires_grad]
    return {"params": sum(local(p).numel() * p.element_size() for p in trainable),
            "numel": sum(p.numel() for p in trainable)}


def run_job(job_spec: dict, student_dir: str, encoded, dist: RankInfo) -> dict:
    """Run one job; rank 0 writes its records, the ids every rank read, the final weights."""
    job = make_job(student_dir, encoded, job_spec["out"], job_spec["stage"], dist)
    result = train_stage(job, LoopOptions(**{**QUIET, "save_every": None, **job_spec.get("options", {})}),
                         resume=job_spec.get("resume", False))
    state = full_state(job.model)
    out = Path(job_spec["out"])
    (out / f"ids-{dist.rank}.json").write_text(json.dumps(job.loader.ids))
    (out / f"bytes-{dist.rank}.json").write_text(json.dumps(local_bytes(job)))
    if dist.is_main:
        save_file(state, str(out / f"final-{result.step}.safetensors"))
        (out / f"records-{result.step}.json").write_text(json.dumps(result.records))
    return {"step": result.step, "finished": result.finished}


def _worker(rank: int, world: int, student_dir: str, images: str, init: str, jobs: list[dict]):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        encoded = encode(load_vlm(student_dir), make_samples(N_SAMPLES, Path(images)))
        for spec in jobs:
            run_job(spec, student_dir, encoded, RankInfo(rank, world, rank))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def spawn(tmp_path: Path, student_dir, jobs: list[dict], world: int = 2, name: str = "rdv") -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(world, str(student_dir), str(tmp_path / "images"),
                            f"file://{tmp_path / name}", jobs), nprocs=world, join=True)


def reproducible(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def records(out: Path, step: int) -> list[dict]:
    return json.loads((out / f"records-{step}.json").read_text())


def ids(out: Path, world: int) -> list[list[list[str]]]:
    return [json.loads((out / f"ids-{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def encoded(tiny_student_dir, tmp_path_factory):
    return encode(load_vlm(tiny_student_dir), make_samples(N_SAMPLES, tmp_path_factory.mktemp("images")))


def single(tmp_path, student_dir, stage, out: str, **spec) -> dict:
    """A job in this process (world 1), images as the ranks make them."""
    encoded = encode(load_vlm(student_dir), make_samples(N_SAMPLES, tmp_path / "images"))
    return run_job({"out": str(tmp_path / out), "stage": stage, **spec}, str(student_dir), encoded,
                   RankInfo())


def assert_close_states(a: dict, b: dict, atol: float = ATOL) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def assert_close_records(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(reproducible(a), reproducible(b)):
        assert (x["samples"], x["tokens_teacher"], x["tokens_student"]) == \
            (y["samples"], y["tokens_teacher"], y["tokens_student"])
        for key in ("loss", "ar", "kl", "reg_ce", "reg_kl", "ce_student"):
            assert x[key] == pytest.approx(y[key], rel=RTOL_LOSS), key


# ---------------------------------------------------------------------------------------------
# Bad input: refused before training (one process, no process group needed)
# ---------------------------------------------------------------------------------------------

def test_micro_batches_per_step_defines_what_divides_means():
    assert micro_batches_per_step(16, 2, 1) == 8 and micro_batches_per_step(16, 2, 4) == 2
    assert micro_batches_per_step(16, 2, 8) == 1
    for world in (3, 16):  # 16 / 3 is no integer; 16 / 16 = 1 sample < one micro-batch of 2
        with pytest.raises(StageSetupError, match=r"world size must divide 8.*\[1, 2, 4, 8\]"):
            micro_batches_per_step(16, 2, world, "distill")


def test_a_world_size_that_does_not_divide_the_global_batch_is_refused(tiny_student_dir, encoded,
                                                                        tmp_path):
    """A one-process FSDP run (global batch 2 x 1 x 1 = 2) resumed by 2 processes (each would
    need 1 sample: half a micro-batch of 2) is refused before anything is wrapped or trained;
    rank 0's check needs no other rank."""
    stage = FSDP.model_copy(update={"grad_accum": 1})
    train_stage(make_job(tiny_student_dir, encoded, tmp_path, stage), LoopOptions(**QUIET, stop_after=1))
    job = make_job(tiny_student_dir, encoded, tmp_path, stage, RankInfo(0, 2, 0))
    with pytest.raises(StageSetupError, match="2 processes do not divide the global batch of 2"):
        train_stage(job, LoopOptions(**QUIET), resume=True)
    from torch.distributed.tensor import DTensor

    assert not any(isinstance(p, DTensor) for p in job.model.parameters())  # nothing wrapped


def test_fsdp_with_a_family_without_a_block_list_is_refused(tiny_student_dir, encoded, tmp_path,
                                                           monkeypatch):
    import genrecal.model.families as families

    real = families.get_family
    monkeypatch.setattr(families, "get_family", lambda config: dataclasses.replace(
        real(config), text_model_path="model.multi_modal_projector"))  # a module without .layers
    job = make_job(tiny_student_dir, encoded, tmp_path, FSDP)
    with pytest.raises(StageSetupError, match="gives no decoder block list.*use parallel: ddp"):
        train_stage(job, LoopOptions(**QUIET))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_ddp_checkpoint_is_not_resumed_as_fsdp(tiny_student_dir, encoded, tmp_path):
    ddp = FSDP.model_copy(update={"parallel": "ddp"})
    train_stage(make_job(tiny_student_dir, encoded, tmp_path, ddp), LoopOptions(**QUIET, stop_after=1))
    with pytest.raises(Exception, match="not sharded"):
        train_stage(make_job(tiny_student_dir, encoded, tmp_path, FSDP), LoopOptions(**QUIET), resume=True)


# ---------------------------------------------------------------------------------------------
# One process: the sharded checkpoint format resumes bitwise
# ---------------------------------------------------------------------------------------------

def test_one_process_fsdp_stage_resumes_bitwise_from_its_sharded_checkpoint(tiny_student_dir, tmp_path):
    whole = single(tmp_path, tiny_student_dir, FSDP, "whole")
    single(tmp_path, tiny_student_dir, FSDP, "parts", options={"stop_after": 2})
    checkpoint = tmp_path / "parts" / "checkpoints" / "step-00000002"
    files = sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file())
    assert files == ["rank-00000.json", "rank-00000.safetensors",
                     "sharded/shard-00001-model-00001-of-00001.safetensors", "trainer.json"]
    rest = single(tmp_path, tiny_student_dir, FSDP, "parts", resume=True)
    assert whole == rest == {"step": 3, "finished": True}
    assert reproducible(records(tmp_path / "whole", 3)) == reproducible(records(tmp_path / "parts", 3))
    a, b = (load_file(str(tmp_path / d / "final-3.safetensors")) for d in ("whole", "parts"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Two ranks
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow  # a spawn of 2 ranks running 4 jobs + 1 local: 10 s alone, 40 s on 2 busy cores
def test_fsdp_equals_ddp_equals_one_process_and_resumes_bitwise(tiny_student_dir, encoded, tmp_path):
    """Same global batch (8 samples per step): 2 FSDP ranks == 2 DDP ranks == 1 process within
    ATOL; an FSDP run stopped after step 1 and resumed by 2 ranks is bitwise the uninterrupted
    one; per-rank parameter bytes are about half; the student exported from the sharded run is
    the gathered full student."""
    out = {k: tmp_path / k for k in ("fsdp", "ddp", "parts", "align-fsdp", "align-ddp")}
    ddp = FSDP.model_copy(update={"parallel": "ddp"})
    spawn(tmp_path, tiny_student_dir, [
        {"out": str(out["fsdp"]), "stage": FSDP},
        {"out": str(out["ddp"]), "stage": ddp},
        {"out": str(out["parts"]), "stage": FSDP, "options": {"stop_after": 1}},
        {"out": str(out["parts"]), "stage": FSDP, "resume": True},
        {"out": str(out["align-fsdp"]), "stage": ALIGN_BF16},
        {"out": str(out["align-ddp"]), "stage": ALIGN_BF16.model_copy(update={"parallel": "ddp"})},
    ])
    one = FSDP.model_copy(update={"grad_accum": 4})
    single(tmp_path, tiny_student_dir, one, "one")
    fsdp, ddp_state, one_state = (load_file(str(tmp_path / d / "final-3.safetensors"))
                                  for d in ("fsdp", "ddp", "one"))
    assert_close_states(fsdp, ddp_state)
    assert_close_states(fsdp, one_state)
    assert any(not torch.equal(v, full_state(make_job(tiny_student_dir, encoded, tmp_path / "x", one).model)[k])
               for k, v in one_state.items())  # training moved the weights
    assert_close_records(records(out["fsdp"], 3), records(out["ddp"], 3))
    assert_close_records(records(out["fsdp"], 3), records(tmp_path / "one", 3))
    # bitwise resume at the same world size (sharded checkpoint, DCP)
    resumed = load_file(str(out["parts"] / "final-3.safetensors"))
    assert all(torch.equal(fsdp[k], resumed[k]) for k in fsdp)
    assert reproducible(records(out["fsdp"], 3)) == reproducible(records(out["parts"], 3))
    # every step reads the whole epoch, each sample once, split over the ranks
    for step in range(3):
        read = [i for rank in ids(out["fsdp"], 2) for batch in rank[2 * step:2 * step + 2] for i in batch]
        assert Counter(read) == Counter(f"s{i}" for i in range(N_SAMPLES))
    # memory: each rank holds about half of the trainable parameters (whole rows per shard)
    whole = json.loads((tmp_path / "one" / "bytes-0.json").read_text())
    for rank in range(2):
        mine = json.loads((out["fsdp"] / f"bytes-{rank}.json").read_text())
        assert mine["numel"] == whole["numel"]
        assert 0.45 < mine["params"] / whole["params"] < 0.55
        ddp_bytes = json.loads((out["ddp"] / f"bytes-{rank}.json").read_text())
        assert ddp_bytes["params"] == whole["params"]
    # the student exported from the sharded run: the gathered weights, a loadable student
    exported = load_vlm(out["fsdp"] / "student").model.state_dict()
    for key, value in exported.items():
        torch.testing.assert_close(value, fsdp[f"student.{key}"], rtol=0, atol=0, msg=key)
    rec = load_file(str(out["fsdp"] / "recalibrator" / "recalibrator.safetensors"))
    assert all(torch.equal(v, fsdp[f"recalibrator.{k}"]) for k, v in rec.items())
    # align in bf16 (frozen student without a graph, Recalibrator trained): the first step's loss
    # is DDP's within bf16 rounding (FSDP computes with bf16 copies of the root's weights, DDP
    # with fp32 weights under autocast: 2^-9 relative per rounding, a few dozen deep); only the
    # Recalibrator is exported
    a, d = records(out["align-fsdp"], 2), records(out["align-ddp"], 2)
    assert a[0]["loss"] == pytest.approx(d[0]["loss"], rel=2e-2) and math.isfinite(a[1]["loss"])
    done = json.loads((out["align-fsdp"] / "stage_done.json").read_text())
    assert done["student"] == str(tiny_student_dir) and not (out["align-fsdp"] / "student").exists()
    rec = load_file(str(out["align-fsdp"] / "recalibrator" / "recalibrator.safetensors"))
    final = load_file(str(out["align-fsdp"] / "final-2.safetensors"))
    assert all(torch.equal(v, final[f"recalibrator.{k}"]) for k, v in rec.items())


@pytest.mark.slow  # two spawns of 2 ranks + 3 local jobs: 15 s alone, 40 s on 2 busy cores
def test_resume_at_another_world_size_continues_with_the_unseen_samples(tiny_student_dir, tmp_path):
    """2 -> 1: an epoch-based FSDP stage (2 epochs, 4 samples per step at 2 x 1 x 2) stops after
    step 1 on 2 ranks; one process continues with 2 micro-batches per step (the same global
    batch). 1 -> 2: a steps-based stage stops after step 1 in one process (2 micro-batches per
    step); 2 ranks continue with 1 each. Either way the rest of the epoch is exactly the samples
    not yet seen, and the run matches the uninterrupted one within ATOL."""
    two = FSDP.model_copy(update={"steps": None, "epochs": 2, "grad_accum": 1})  # 4 steps
    one = FSDP.model_copy(update={"grad_accum": 2})  # 3 steps of 4 samples
    spawn(tmp_path, tiny_student_dir, [
        {"out": str(tmp_path / "two-whole"), "stage": two},
        {"out": str(tmp_path / "2to1"), "stage": two, "options": {"stop_after": 1}},
    ], name="rdv1")
    single(tmp_path, tiny_student_dir, one, "1to2", options={"stop_after": 1})
    single(tmp_path, tiny_student_dir, one, "one-whole")
    seen = [i for rank in ids(tmp_path / "2to1", 2) for batch in rank for i in batch]
    single(tmp_path, tiny_student_dir, two, "2to1", resume=True)
    rest = json.loads((tmp_path / "2to1" / "ids-0.json").read_text())  # the one process's batches
    assert [len(b) for b in rest] == [2, 2, 2, 2, 2, 2]  # 3 steps x 2 micro-batches
    assert Counter(seen + [i for b in rest[:2] for i in b]) == Counter(f"s{i}" for i in range(N_SAMPLES))
    assert Counter(i for b in rest[2:] for i in b) == Counter(f"s{i}" for i in range(N_SAMPLES))
    assert_close_records(records(tmp_path / "two-whole", 4), records(tmp_path / "2to1", 4))
    assert_close_states(load_file(str(tmp_path / "two-whole" / "final-4.safetensors")),
                        load_file(str(tmp_path / "2to1" / "final-4.safetensors")))

    seen = json.loads((tmp_path / "1to2" / "ids-0.json").read_text())
    spawn(tmp_path, tiny_student_dir, [{"out": str(tmp_path / "1to2"), "stage": one, "resume": True}],
          name="rdv2")
    rest = [i for rank in ids(tmp_path / "1to2", 2) for batch in rank[:1] for i in batch]
    assert Counter(i for b in seen for i in b) + Counter(rest) == Counter(f"s{i}" for i in range(N_SAMPLES))
    assert_close_records(records(tmp_path / "one-whole", 3), records(tmp_path / "1to2", 3))
    assert_close_states(load_file(str(tmp_path / "one-whole" / "final-3.safetensors")),
                        load_file(str(tmp_path / "1to2" / "final-3.safetensors")))


# ---------------------------------------------------------------------------------------------
# GRACE with QAT, bf16, activation checkpointing: the real pipeline path (run_stages)
# ---------------------------------------------------------------------------------------------

GRACE_FEATURES = {"answer_hidden": True, "question_hidden": "none", "visual_gram": True,
                  "logit_stats": {"top_k": 8, "temperature": 2.0}}


def _pipeline_worker(rank: int, world: int, init: str, spec: dict):
    import torch.distributed as dist

    from extract_support import make_pipeline
    from genrecal.train.loop import run_stages

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        run_stages(make_pipeline("fsdp", spec), options=LoopOptions(**QUIET, save_every=None))
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.slow  # a cache extraction and two spawns of 2 ranks: 15 s alone, 60 s busy
def test_int4_grace_under_fsdp_bf16_with_checkpointing_exports_a_real_int4_student(tmp_path):
    """GRACE (GDKD from logit stats, RCKA) with 4-bit QAT, bf16, activation checkpointing, grad
    accumulation and a trainable projector / head (reduce-scatter of unused parameters), on 2
    FSDP ranks: it trains, its first step's loss is DDP's within bf16 precision, and the QAT
    student gathered from the shards exports to a compressed-tensors INT4 checkpoint whose
    codes the export verifies bit for bit."""
    import torch.multiprocessing as mp

    from extract_support import make_pipeline, pipeline_dict
    from genrecal.extract.job import job_from_pipeline
    from genrecal.extract.pipeline import run_extract
    from genrecal.model.tiny import build_tiny_vlm
    from genrecal.train.export import check_export, export_checkpoint
    from genrecal.train.quant import is_qat_dir, load_qat_student, qat_modules

    teacher = build_tiny_vlm("qwen2_vl", tmp_path / "teacher", seed=0, vocab_size=700, hidden_size=64)
    student = build_tiny_vlm("qwen2_vl", tmp_path / "student", seed=1, tokenizer_seed=0, vocab_size=700,
                             hidden_size=32)
    spec = pipeline_dict(teacher, "qwen2_vl", tmp_path, features=GRACE_FEATURES)
    spec["teacher"]["tiny"].update(seed=0, vocab_size=700, hidden_size=64)
    spec["student"] = {"tiny": {"kind": "qwen2_vl", "seed": 1, "tokenizer_seed": 0, "vocab_size": 700,
                                "hidden_size": 32, "path": str(student)}, "dtype": "float32", "device": "cpu"}
    grace = {"name": "grace", "steps": 3, "batch_size": 2, "grad_accum": 2, "precision": "bf16",
             "gradient_checkpointing": True, "lr_start": 1e-3, "lr_end": 1e-4, "parallel": "fsdp",
             "gdkd": {"temperature": 2.0, "source": "logit_stats"},
             "rcka": {"omega": 3.0, "warmup_steps": 2, "min_tokens": 2},
             "quantize": {"bits": 4, "group_size": 32, "scale_lr_mult": 10.0}}
    spec["stages"] = [grace]
    run_extract(job_from_pipeline(make_pipeline("x", spec)).with_overrides(progress=False))
    runs = {}
    for parallel in ("fsdp", "ddp"):
        run = {**spec, "output": str(tmp_path / parallel), "stages": [{**grace, "parallel": parallel}]}
        mp.spawn(_pipeline_worker, args=(2, f"file://{tmp_path / ('rdv-' + parallel)}", run), nprocs=2)
        runs[parallel] = [json.loads(line) for line in
                          (tmp_path / parallel / "grace" / "metrics.jsonl").read_text().splitlines()]
    fsdp, ddp = runs["fsdp"], runs["ddp"]
    assert [r["step"] for r in fsdp] == [1, 2, 3] and all(r["samples"] == 8 for r in fsdp)
    for r in fsdp:
        assert all(math.isfinite(r[k]) for k in ("loss", "ce_student", "gdkd", "rcka", "grad_norm"))
    # before any update the runs differ only by bf16 rounding of the forward: FSDP computes with
    # bf16 copies of the root's weights, DDP with fp32 weights under autocast (2^-9 relative per
    # rounding, a few dozen roundings deep): 2e-2
    assert fsdp[0]["loss"] == pytest.approx(ddp[0]["loss"], rel=2e-2)
    assert fsdp[0]["samples"] == ddp[0]["samples"] and fsdp[0]["tokens_student"] == ddp[0]["tokens_student"]
    student_dir = tmp_path / "fsdp" / "grace" / "student"
    assert is_qat_dir(student_dir)
    modules = qat_modules(load_qat_student(student_dir).model)
    assert len(modules) == 7 * 2  # every decoder linear of both tiny blocks
    report = export_checkpoint(student_dir, tmp_path / "int4", "int4", dtype="float32")
    assert report.quantized == len(modules)
    check_export(report.path)


@pytest.mark.slow  # 4 rank processes after a cache extraction: 16 s alone
def test_bench_train_compares_ddp_and_fsdp_on_two_ranks(tmp_path):
    """benchmarks/bench_train.py --smoke --world 2: both parallel modes side by side; FSDP
    holds half the parameter and AdamW bytes per rank."""
    import os
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
    out = tmp_path / "result.json"
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(bench), "--smoke", "--world", "2", "--threads", "1",
                           "--json", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "fsdp / ddp:" in done.stdout
    data = json.loads(out.read_text())
    for mode in ("ddp", "fsdp"):
        assert data[mode]["steps"] > 0 and data[mode]["step_ms"] > 0
        assert [r["rank"] for r in data[mode]["ranks"]] == [0, 1]
        assert all(r["train_rss_mib"] > 0 and r["params_mib"] > 0 for r in data[mode]["ranks"])
    assert data["fsdp"]["max_adamw_mib"] == pytest.approx(data["ddp"]["max_adamw_mib"] / 2, rel=0.05)
    assert data["fsdp"]["max_params_mib"] == pytest.approx(data["ddp"]["max_params_mib"] / 2, rel=0.05)
