"""The training loop (genrecal.train.loop): LR schedule, bitwise resume (also after SIGKILL),
DDP equivalence (2 gloo ranks == 1 rank at the same global batch), outputs, run_stages + CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_batches import D_TEACHER, ListLoader, encode, make_samples, teacher_head

from genrecal.common.config import AlignStage, DistillStage, FinetuneStage, Losses
from genrecal.model.loading import load_vlm
from genrecal.train.errors import StageSetupError
from genrecal.train.loop import (LinearSchedule, LoopOptions, StageJob, _select_stages,
                                 train_stage)
from genrecal.train.metrics import TIMING_FIELDS, read_metrics
from genrecal.common.config import RecalibratorConfig
from genrecal.train.recalibrator import Recalibrator
from genrecal.train.step import LossSpec, StageModel, TeacherSide

TESTS = Path(__file__).parent
QUIET = dict(progress=False, num_workers=0)
DISTILL = DistillStage(name="distill", steps=4, grad_accum=2, batch_size=2, precision="fp32",
                       warmup=1, lr_start=1e-3, lr_end=1e-4)


def make_job(student_dir, encoded, out_dir, stage, world_size=1, rank=0, dist=None):
    """A fresh job (new student, new Recalibrator) over the hand-built loader."""
    from genrecal.common.distributed import RankInfo

    vlm = load_vlm(student_dir)
    rec = teacher = None
    if stage.name != "finetune":
        rec = Recalibrator.from_student(vlm.model, D_TEACHER, RecalibratorConfig(blocks=1),
                                        seed=1)
        teacher = TeacherSide.from_artifacts(teacher_head())
    model = StageModel(vlm.model, vlm.family, LossSpec.for_stage(stage), rec, teacher)
    loader = ListLoader(encoded, vlm.tokenizer.pad_token_id, stage.batch_size,
                        seed=stage.seed, world_size=world_size, rank=rank,
                        teacher=stage.name != "finetune")
    return StageJob(stage=stage, model=model, loader=loader, out_dir=Path(out_dir),
                    processor=vlm.processor, dist=dist or RankInfo(),
                    inputs={"student": str(student_dir)})


def state_of(job) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in job.model.state_dict().items()}


def reproducible(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


@pytest.fixture(scope="module")
def encoded(tiny_student_dir, tmp_path_factory):
    return encode(load_vlm(tiny_student_dir), make_samples(8, tmp_path_factory.mktemp("images")))


# ---------------------------------------------------------------------------------------------

def test_linear_schedule_warmup_and_endpoints():
    s = LinearSchedule(lr_start=1e-3, lr_end=1e-4, warmup=3, total_steps=10)
    lrs = [s(i) for i in range(10)]
    assert lrs[:3] == pytest.approx([2.5e-4, 5e-4, 7.5e-4])
    assert lrs[3] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:]))  # strictly decreasing after warm-up
    assert LinearSchedule(1e-3, 1e-5, 0, 1)(0) == 1e-3


def test_resume_after_stop_is_bitwise_identical(tiny_student_dir, encoded, tmp_path):
    full_job = make_job(tiny_student_dir, encoded, tmp_path / "full", DISTILL)
    full = train_stage(full_job, LoopOptions(save_every=None, **QUIET))
    assert full.finished and full.step == 4
    part = train_stage(make_job(tiny_student_dir, encoded, tmp_path / "part", DISTILL),
                       LoopOptions(save_every=None, stop_after=3, **QUIET))
    assert not part.finished and part.step == 3  # mid-epoch: 2 steps of 2 micro-batches each
    assert not (tmp_path / "part" / "stage_done.json").exists()
    job = make_job(tiny_student_dir, encoded, tmp_path / "part", DISTILL)
    resumed = train_stage(job, LoopOptions(save_every=None, **QUIET), resume=True)
    assert resumed.finished and resumed.step == 4
    assert reproducible(resumed.records) == reproducible(full.records)
    assert reproducible(read_metrics(tmp_path / "part" / "metrics.jsonl")) == \
        reproducible(full.records)
    expected, got = state_of(full_job), state_of(job)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert resumed.records[0]["lr"] < resumed.records[1]["lr"]  # warm-up, then decay
    assert resumed.records[-1]["lr"] == pytest.approx(DISTILL.lr_end)


_KILLED_CHILD = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import genrecal.train.loop as loop
from test_train_loop import DISTILL, make_job, QUIET
from train_batches import encode, make_samples
from genrecal.model.loading import load_vlm
import torch
torch.set_num_threads({threads})  # float reductions depend on the thread count: match the parent

original = loop.save_checkpoint
def save_then_die(root, step, data, **kw):
    out = original(root, step, data, **kw)
    if step == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
loop.save_checkpoint = save_then_die
encoded = encode(load_vlm({student!r}), make_samples(8, Path({images!r})))
job = make_job({student!r}, encoded, {out!r}, DISTILL)
loop.train_stage(job, loop.LoopOptions(save_every=1, **QUIET))
"""


@pytest.mark.slow  # a child interpreter: 6 s alone, 25 s+ on a busy machine
def test_resume_after_sigkill_is_bitwise_identical(tiny_student_dir, encoded, tmp_path):
    """Killed right after the checkpoint of step 2, the end of epoch 0."""
    out, images = tmp_path / "killed", tmp_path / "child-images"
    script = _KILLED_CHILD.format(tests=str(TESTS), student=str(tiny_student_dir),
                                  images=str(images), out=str(out), threads=torch.get_num_threads())
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(TESTS)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    child_encoded = encode(load_vlm(tiny_student_dir), make_samples(8, images))
    job = make_job(tiny_student_dir, child_encoded, out, DISTILL)
    resumed = train_stage(job, LoopOptions(save_every=1, **QUIET), resume=True)
    full_job = make_job(tiny_student_dir, encoded, tmp_path / "full", DISTILL)
    full = train_stage(full_job, LoopOptions(save_every=None, **QUIET))
    assert reproducible(resumed.records) == reproducible(full.records)
    expected, got = state_of(full_job), state_of(job)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_resume_refuses_another_config(tiny_student_dir, encoded, tmp_path):
    train_stage(make_job(tiny_student_dir, encoded, tmp_path, DISTILL),
                LoopOptions(stop_after=1, **QUIET))
    other = DISTILL.model_copy(update={"lr_start": 5e-4})
    with pytest.raises(StageSetupError, match="stage_config"):
        train_stage(make_job(tiny_student_dir, encoded, tmp_path, other), LoopOptions(**QUIET),
                    resume=True)


def test_recalibrator_without_a_genrecal_loss_is_refused(tiny_student_dir, encoded, tmp_path):
    stage = DISTILL.model_copy(update={"losses": Losses(ar=0, kl=0, reg=0, ce_student=1)})
    with pytest.raises(StageSetupError, match="nothing trains it"):
        train_stage(make_job(tiny_student_dir, encoded, tmp_path, stage), LoopOptions(**QUIET))


# ---------------------------------------------------------------------------------------------
# DDP
# ---------------------------------------------------------------------------------------------

DDP_STAGE = AlignStage(name="align", steps=3, batch_size=2, grad_accum=1, precision="fp32",
                       lr_start=1e-3, lr_end=1e-4, seed=5)


def _ddp_worker(rank: int, world: int, student_dir: str, images: str, out: str, init: str):
    import torch.distributed as dist

    from genrecal.common.distributed import RankInfo

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        encoded = encode(load_vlm(student_dir), make_samples(8, Path(images)))
        job = make_job(student_dir, encoded, out, DDP_STAGE, world_size=world, rank=rank,
                       dist=RankInfo(rank, world, rank))
        train_stage(job, LoopOptions(save_every=None, **QUIET))
        if rank == 0:
            save_file(state_of(job), str(Path(out) / "final.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~13 s alone, 30 s+ on a busy 2-core machine (two spawned interpreters)
def test_two_gloo_ranks_equal_one_rank_at_the_same_global_batch(tiny_student_dir, tmp_path):
    import torch.multiprocessing as mp

    images = tmp_path / "images"
    ddp_out = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(2, str(tiny_student_dir), str(images), str(ddp_out),
                                f"file://{tmp_path / 'rendezvous'}"), nprocs=2, join=True)
    encoded = encode(load_vlm(tiny_student_dir), make_samples(8, images))
    single_stage = DDP_STAGE.model_copy(update={"grad_accum": 2})
    job = make_job(tiny_student_dir, encoded, tmp_path / "single", single_stage)
    single = train_stage(job, LoopOptions(save_every=None, **QUIET))
    ddp_records = read_metrics(ddp_out / "metrics.jsonl")
    for a, b in zip(reproducible(single.records), reproducible(ddp_records)):
        assert a["samples"] == b["samples"] == 4
        assert (a["tokens_teacher"], a["tokens_student"]) == (b["tokens_teacher"],
                                                             b["tokens_student"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    ddp_state, single_state = load_file(str(ddp_out / "final.safetensors")), state_of(job)
    for key, value in single_state.items():
        torch.testing.assert_close(ddp_state[key], value, rtol=0, atol=1e-5, msg=key)
    assert any(not torch.equal(v, state_of(make_job(tiny_student_dir, encoded, tmp_path / "x",
                                                    single_stage))[k])
               for k, v in single_state.items())  # training moved the weights


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------

def test_finetune_exports_a_plain_transformers_student(tiny_student_dir, encoded, tmp_path):
    from transformers import AutoModelForImageTextToText

    stage = FinetuneStage(name="finetune", steps=2, batch_size=4, precision="bf16",
                          gradient_checkpointing=True, lr_start=1e-3)
    job = make_job(tiny_student_dir, encoded, tmp_path, stage)
    result = train_stage(job, LoopOptions(**QUIET))
    done = json.loads((tmp_path / "stage_done.json").read_text())
    assert done["student"] == str(tmp_path / "student") and done["recalibrator"] is None
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert set(result.records[0]) >= {"loss", "ce_student", "lr", "samples_per_s",
                                      "tokens_student", "data_wait_s"}
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "student")
    trained = job.model.student.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items())
    vlm = load_vlm(tmp_path / "student")
    inputs = {k: v for k, v in encoded[0].inputs.items()}
    generated = vlm.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3


def test_align_keeps_the_student_and_saves_the_recalibrator(tiny_student_dir, encoded,
                                                            tmp_path):
    stage = AlignStage(name="align", steps=1, batch_size=2, precision="fp32")
    job = make_job(tiny_student_dir, encoded, tmp_path, stage)
    train_stage(job, LoopOptions(**QUIET))
    done = json.loads((tmp_path / "stage_done.json").read_text())
    assert done["student"] == str(tiny_student_dir) and not (tmp_path / "student").exists()
    rec = Recalibrator.load(done["recalibrator"], job.model.student)
    assert all(torch.equal(v, job.model.recalibrator.state_dict()[k])
               for k, v in rec.state_dict().items())


def test_video_slot_processor_is_exported_loadable(tiny_vlm_dir, tmp_path):
    from genrecal.train.export import export_student

    vlm = load_vlm(tiny_vlm_dir("qwen2_vl"))
    export_student(vlm.model, vlm.processor, vlm.family, tmp_path / "qwen", torch.bfloat16)
    again = load_vlm(tmp_path / "qwen", dtype="auto")
    assert type(again.processor) is type(vlm.processor)
    assert again.processor.chat_template == vlm.processor.chat_template
    assert next(again.model.parameters()).dtype == torch.bfloat16
    ids = again.tokenizer("hello there", return_tensors="pt")
    out = again.model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 2


# ---------------------------------------------------------------------------------------------
# Pipelines and the CLI
# ---------------------------------------------------------------------------------------------

_PIPELINE = """
pipelines:
  ft:
    teacher: {{tiny: {{kind: qwen2_vl}}, dtype: float32}}
    student: {{tiny: {{kind: llava_qwen2}}, dtype: float32, device: cpu}}
    data: {{synthetic: {{n_train: 6, n_test: 2, image_size: 32}}}}
    cache: {{location: {root}/cache}}
    stages:
      - {{name: finetune, steps: 2, batch_size: 3, precision: fp32}}
    output: {root}/run
"""


def test_select_stages(tmp_path):
    from genrecal.common import config

    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(_PIPELINE.format(root=tmp_path)))
    pipeline = config.get_pipeline("ft", path)
    assert _select_stages(pipeline, None) == ["finetune"]
    with pytest.raises(StageSetupError, match="no stage 'align'"):
        _select_stages(pipeline, ["align"])


def test_cli_trains_a_finetune_pipeline_and_resume_skips_it(tiny_student_dir, tmp_path,
                                                            monkeypatch):
    import shutil

    from typer.testing import CliRunner

    from genrecal.cli import app

    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(_PIPELINE.format(root=tmp_path)))
    shutil.copytree(tiny_student_dir, tmp_path / "run" / "models" / "student")  # skip the build
    runner = CliRunner()
    args = ["train", "ft", "--file", str(path), "--workers", "0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "finetune: 2 steps" in result.output
    assert load_vlm(tmp_path / "run" / "finetune" / "student").family.model_type == "llava"
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already finished" in again.output
    resumed = runner.invoke(app, args + ["--resume"])
    assert resumed.exit_code == 0 and "already finished" in resumed.output
    (tmp_path / "run" / "finetune" / "stage_done.json").unlink()
    fresh = runner.invoke(app, args)
    assert fresh.exit_code == 2 and "holds checkpoints of an earlier run" in fresh.output
    missing = runner.invoke(app, args + ["--stage", "align"])
    assert missing.exit_code == 2 and "no stage 'align'" in missing.output
