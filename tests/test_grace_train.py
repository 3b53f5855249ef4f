"""The GRACE stage end to end from a real extracted cache (docs/method.md §2).

A same-tokenizer pair of tiny Qwen2-VLs (teacher hidden 64, student hidden 32; one tokenizer:
same kind, vocabulary size and tokenizer seed) on synthetic VQA. The cache holds the teacher's
answer rows (the exact GDKD source), its logit statistics (the approximate source) and visual
Grams (RCKA). The stage trains with each source; beta follows the controller fed the logged
L_GDKD; a resume mid-stage is bitwise equal to the uninterrupted run, beta included; a
mismatched tokenizer pair and a cache without what the chosen source needs are refused before
any work.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from extract_support import make_pipeline, pipeline_dict
from genrecal.common.config import ControllerConfig, Pipeline
from genrecal.common.errors import ConfigError
from genrecal.extract.job import job_from_pipeline
from genrecal.extract.pipeline import run_extract
from genrecal.model.tiny import build_tiny_vlm
from genrecal.train.controller import LagrangianController
from genrecal.train.errors import StageSetupError
from genrecal.train.loop import LoopOptions, run_stages

FEATURES = {"answer_hidden": True, "question_hidden": "none", "visual_gram": True,
            "logit_stats": {"top_k": 8, "temperature": 2.0}}
CONTROLLER = {"beta_init": 0.5, "beta_min": 0.1, "beta_max": 1.0, "tau": 0.0, "eta": 0.05, "ema": 0.5}
QUIET = dict(progress=False, num_workers=0, save_every=None)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(root, teacher dir, student dir, pipeline dict) with the cache extracted."""
    root = tmp_path_factory.mktemp("grace")
    teacher = build_tiny_vlm("qwen2_vl", root / "teacher", seed=0, vocab_size=700, hidden_size=64)
    student = build_tiny_vlm("qwen2_vl", root / "student", seed=1, tokenizer_seed=0, vocab_size=700,
                             hidden_size=32)
    spec = pipeline_dict(teacher, "qwen2_vl", root, features=FEATURES)
    spec["teacher"]["tiny"].update(seed=0, vocab_size=700, hidden_size=64)  # as built above
    spec["student"] = {"tiny": {"kind": "qwen2_vl", "seed": 1, "tokenizer_seed": 0, "vocab_size": 700,
                                "hidden_size": 32, "path": str(student)}, "dtype": "float32", "device": "cpu"}
    spec["stages"] = [{"name": "grace", "steps": 4, "batch_size": 2, "precision": "fp32", "lr_start": 1e-3,
                       "lr_end": 1e-4, "gdkd": {"temperature": 2.0, "source": "logit_stats"},
                       "rcka": {"omega": 3.0, "warmup_steps": 2, "min_tokens": 2}, "controller": CONTROLLER}]
    run_extract(job_from_pipeline(make_pipeline("x", spec)).with_overrides(progress=False))
    return root, teacher, student, spec


def _pipeline(world, out: str, **stage) -> Pipeline:
    root, _, _, spec = world
    stages = [{**spec["stages"][0], **stage}]
    return make_pipeline(out, {**spec, "stages": stages, "output": str(root / out)})


@pytest.mark.parametrize("source", ["logit_stats", "exact"])
def test_grace_trains_with_each_teacher_source(world, source):
    pipe = _pipeline(world, f"run-{source}", gdkd={"temperature": 2.0, "source": source})
    (result,) = run_stages(pipe, options=LoopOptions(**QUIET))
    assert result.finished and result.step == 4
    records = result.records
    for r in records:
        assert all(math.isfinite(r[k]) for k in ("loss", "ce_student", "gdkd", "rcka", "beta"))
        assert r["gdkd"] > 0 and 0 <= r["rcka"] <= 2
        assert r["loss"] == pytest.approx(r["ce_student"] + r["w_gdkd"] * r["gdkd"] + r["w_rcka"] * r["rcka"])
    # w_r: linear warm-up over 2 steps of omega = 3 (steps are 1-based); w_d: no warm-up
    assert [r["w_rcka"] for r in records] == [1.5, 3.0, 3.0, 3.0]
    # beta: the controller fed the logged global L_GDKD of each step, exactly
    controller = LagrangianController(ControllerConfig(**CONTROLLER))
    for r in records:
        assert r["beta"] == controller.beta == r["w_gdkd"]
        controller.update(r["gdkd"])
    assert len({r["beta"] for r in records}) > 1  # tau = 0: beta climbs
    assert (result.out_dir / "student" / "config.json").is_file()


def test_grace_resumes_bitwise_with_beta(world):
    whole = run_stages(_pipeline(world, "whole"), options=LoopOptions(**QUIET))[0]
    first = run_stages(_pipeline(world, "parts"), options=LoopOptions(**{**QUIET, "stop_after": 2}))[0]
    assert not first.finished and first.step == 2
    rest = run_stages(_pipeline(world, "parts"), resume=True, options=LoopOptions(**QUIET))[0]
    assert rest.finished
    keys = ("loss", "ce_student", "gdkd", "rcka", "beta", "w_gdkd", "grad_norm")
    assert [[r[k] for k in keys] for r in whole.records] == [[r[k] for k in keys] for r in rest.records]
    a = load_file(str(next((whole.out_dir / "student").glob("*.safetensors"))))
    b = load_file(str(next((rest.out_dir / "student").glob("*.safetensors"))))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_student_with_another_tokenizer_is_refused_before_training(world, tmp_path):
    root, _, _, spec = world
    other = build_tiny_vlm("qwen2_vl", tmp_path / "other", seed=1, tokenizer_seed=5, vocab_size=700,
                           hidden_size=32)
    bad = {**spec, "student": {**spec["student"], "tiny": {**spec["student"]["tiny"], "tokenizer_seed": 5,
                                                          "path": str(other)}},
           "output": str(tmp_path / "out")}
    with pytest.raises(StageSetupError, match="share the tokenizer"):
        run_stages(make_pipeline("bad", bad), options=LoopOptions(**QUIET))
    assert not (tmp_path / "out" / "grace" / "metrics.jsonl").exists()


def test_online_mode_is_refused_for_grace(world):
    with pytest.raises(StageSetupError, match="--online"):
        run_stages(_pipeline(world, "online"), options=LoopOptions(**QUIET, teacher_source="online"))


def test_a_cache_without_what_the_gdkd_source_needs_is_refused(world):
    root, _, _, spec = world
    no_rows = {**spec, "cache": {**spec["cache"], "features": {**FEATURES, "answer_hidden": False}}}
    no_rows["stages"] = [{**spec["stages"][0], "gdkd": {"source": "exact"}}]
    with pytest.raises(ConfigError, match=r"cache.features.answer_hidden: must be true"):
        Pipeline.from_dict({**no_rows, "name": "n"})
    no_stats = {**spec, "cache": {**spec["cache"], "features": {**FEATURES, "logit_stats": None}}}
    with pytest.raises(ConfigError, match=r"cache.features.logit_stats: must be set"):
        Pipeline.from_dict({**no_stats, "name": "n"})


# ----------------------------------------------------------------------------- QAT


def test_int4_grace_and_qat_only_train_scales_and_export_a_real_int4_student(world, tmp_path):
    from transformers import AutoModelForImageTextToText

    from genrecal.train.export import check_export, export_checkpoint
    from genrecal.train.quant import is_qat_dir, load_qat_student, qat_modules

    quantize = {"bits": 4, "group_size": 32, "scale_lr_mult": 10.0}
    grace = run_stages(_pipeline(world, "int4", quantize=quantize), options=LoopOptions(**QUIET))[0]
    root, _, _, spec = world
    qat_only = {**spec, "output": str(root / "qat"), "stages": [
        {"name": "finetune", "steps": 4, "batch_size": 2, "precision": "fp32", "lr_start": 1e-3,
         "lr_end": 1e-4, "trains": {"student_body": True}, "quantize": quantize}]}
    finetune = run_stages(make_pipeline("qat", qat_only), options=LoopOptions(**QUIET))[0]
    for result in (grace, finetune):
        student_dir = result.out_dir / "student"
        assert is_qat_dir(student_dir)
        trained = load_qat_student(student_dir).model
        modules = qat_modules(trained)
        assert modules and all(name.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj") for name in modules)
        fresh = load_qat_student(student_dir).model  # the saved scales come back exactly
        assert all(torch.equal(m.log_scale, qat_modules(fresh)[n].log_scale) for n, m in modules.items())
    report = export_checkpoint(grace.out_dir / "student", tmp_path / "int4", "int4", dtype="float32")
    assert report.quantized == len(qat_modules(load_qat_student(grace.out_dir / "student").model))
    check_export(report.path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "int4")
    assert getattr(loaded.config, "quantization_config", None) is not None


def test_genrecal_distill_with_quantize_gives_a_cross_tokenizer_qat_student(tiny_vlm_dir, tmp_path):
    """GenRecal's distill stage with QAT: the student (another tokenizer than the teacher's)
    trains its fake-quantised decoder with the teacher never in memory."""
    from genrecal.train.quant import is_qat_dir

    teacher = tiny_vlm_dir("qwen2_vl")
    spec = pipeline_dict(teacher, "qwen2_vl", tmp_path, features={"answer_hidden": True, "question_hidden": "all"})
    spec["student"]["tiny"]["path"] = str(tiny_vlm_dir("llava_qwen2"))
    run_extract(job_from_pipeline(make_pipeline("x", spec)).with_overrides(progress=False))
    spec["stages"] = [{"name": "distill", "steps": 2, "batch_size": 2, "precision": "fp32", "lr_start": 1e-3,
                       "lr_end": 1e-4, "quantize": {"bits": 4, "group_size": 32}}]
    (result,) = run_stages(make_pipeline("d", spec), options=LoopOptions(**QUIET))
    assert result.finished and is_qat_dir(result.out_dir / "student")
    assert all(math.isfinite(r["loss"]) for r in result.records)
