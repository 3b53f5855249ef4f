"""Online mode (genrecal.train.online) against a cache written by the REAL extract job, and the
loader's RNG discipline (genrecal.train.data.TrainLoader).

The cache is built once per module by ``genrecal.extract`` (job_from_pipeline + run_extract) from
tiny kit models (teacher qwen2_vl, student llava_qwen2) on synthetic VQA data with multi-turn rows.
With ``round_to="bf16"`` (the cache's codec) the live teacher must give bit-identical
TeacherTurns, and training align + distill online must equal cache-fed training step by step.

Exact by construction. Both paths run the same code (:mod:`genrecal.model.teacher_forward`),
but float32 results depend on the batch a sample shares: the padded length and the batch size
change the matmul shapes, hence the CPU kernel (AVX2, AVX-512 or none) and its summation order,
and a last-bit difference can move a value across a bf16 rounding boundary. So the bit-for-bit
comparisons run every sample ALONE on both sides: the cache is extracted with
``cache.batch_size: 1`` and the live teacher runs micro-batches of 1 (the pipeline's
``cache.batch_size``, which :func:`load_online_teacher` follows). Comparisons across different
batchings (:func:`test_micro_batches_and_question_switches`) allow one bf16 step instead
(:func:`within_one_bf16_step`).
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genrecal.common.config import Pipeline
from genrecal.store.artifacts import load_teacher_embeddings, load_teacher_head
from genrecal.data import make_synthetic_vqa, read_dataset
from genrecal.model.encoding import encode_sample
from genrecal.model.loading import load_vlm
from genrecal.train.data import Collator, LoaderConfig, make_loader
from genrecal.train.errors import DataJoinError, StageSetupError
from genrecal.train.loop import LoopOptions, run_stages
from genrecal.train.online import (OnlineLoader, OnlineSettings, OnlineTeacher,
                                   make_online_loader)

FEATURES = {"answer_hidden": True, "question_hidden": "all", "visual_gram": False,
            "logit_stats": None, "input_embeddings": True}
STAGE = {"batch_size": 2, "precision": "fp32", "lr_start": 1e-3, "lr_end": 1e-4, "warmup": 1}


def pipeline(root: Path, teacher_dir, student_dir, out: str, stages: list[dict]) -> Pipeline:
    """A pipeline over the module's data and cache, writing its stages under ``root/out``."""
    return Pipeline.from_dict({
        "name": "online-eq",
        "teacher": {"tiny": {"kind": "qwen2_vl", "path": str(teacher_dir)}, "dtype": "float32",
                    "device": "cpu"},
        "student": {"tiny": {"kind": "llava_qwen2", "path": str(student_dir)}, "dtype": "float32",
                    "device": "cpu"},
        "data": {"sources": [{"path": str(root / "data" / "train.jsonl"), "format": "llava"}]},
        # batch_size 1: each sample alone in its teacher forward, on both paths (module docstring)
        "cache": {"location": str(root / "cache"), "features": FEATURES, "max_length": 256, "batch_size": 1},
        "recalibrator": {"blocks": 1, "init": "copy"},
        "stages": stages, "evaluation": None, "output": str(root / out)})


@pytest.fixture(scope="module")
def world(tiny_teacher_dir, tiny_student_dir, tmp_path_factory):
    """(root, teacher dir, student dir): synthetic data and a cache extracted by genrecal.extract."""
    from genrecal.extract.job import job_from_pipeline
    from genrecal.extract.pipeline import run_extract

    root = tmp_path_factory.mktemp("online")
    make_synthetic_vqa(root / "data", n_train=8, n_test=0, image_size=32, seed=0, multi_turn_fraction=0.5)
    pipe = pipeline(root, tiny_teacher_dir, tiny_student_dir, "unused", [{"name": "align", "steps": 2, **STAGE}])
    run_extract(dataclasses.replace(job_from_pipeline(pipe), progress=False))
    return root, tiny_teacher_dir, tiny_student_dir


@pytest.fixture(scope="module")
def data(world):
    return read_dataset(world[0] / "data" / "train.jsonl", format="llava")


@pytest.fixture(scope="module")
def few(data):
    """Four samples, two of them multi-turn (for the tests that build many loaders)."""
    multi = [s for s in data.samples if sum(t.role == "assistant" for t in s.turns) > 1]
    single = [s for s in data.samples if s not in multi]
    assert len(multi) >= 2 and len(single) >= 2
    return multi[:2] + single[:2]


@pytest.fixture(scope="module")
def teacher_vlm(tiny_teacher_dir):
    return load_vlm(tiny_teacher_dir)


@pytest.fixture(scope="module")
def student(tiny_student_dir):
    return load_vlm(tiny_student_dir)


def online(teacher_vlm, **settings) -> OnlineTeacher:
    """A live teacher; micro-batches of 1 as the module's cache was extracted (module docstring)."""
    return OnlineTeacher(teacher_vlm, OnlineSettings(**{"max_length": 256, "micro_batch": 1, **settings}))


def within_one_bf16_step(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two bf16-rounded float32 tensors differ by at most one bf16 step (2^-7 relative to the
    larger magnitude's power of two, i.e. 8 mantissa bits): what float32 rounding noise of
    another batch composition can do to a value near a bf16 rounding boundary."""
    scale = torch.maximum(a.abs(), b.abs())
    step = torch.exp2(torch.floor(torch.log2(scale.clamp_min(torch.finfo(torch.float32).tiny))) - 7)
    return bool(((a - b).abs() <= step).all())


def config(**kwargs) -> LoaderConfig:
    return LoaderConfig(**{"batch_size": 3, "seed": 1, "num_workers": 0, **kwargs})


def all_turns(batches):
    return {sid: turns for batch in batches for sid, turns in zip(batch.ids, batch.teacher)}


# ----------------------------------------------------------------------------- batches


def test_online_batches_equal_cache_batches_bit_for_bit(world, data, teacher_vlm, student):
    cached = list(make_loader(data, student, cache=world[0] / "cache", config=config()))
    loader = make_online_loader(data, student, online(teacher_vlm, round_to="bf16"),
                                config=config(num_workers=1, multiprocessing_context="fork"))
    live = list(loader)
    loader.close()
    assert [b.ids for b in live] == [b.ids for b in cached]
    for a, b in zip(cached, live):
        assert b.teacher_requests is None
        assert a.student_inputs.keys() == b.student_inputs.keys()
        assert all(torch.equal(a.student_inputs[k], b.student_inputs[k]) for k in a.student_inputs)
        assert torch.equal(a.student_labels, b.student_labels)
        assert a.student_answer_starts == b.student_answer_starts
    want, got = all_turns(cached), all_turns(live)
    assert any(len(turns) > 1 for turns in want.values())  # multi-turn: question holds earlier windows
    for sid, turns in want.items():
        assert len(got[sid]) == len(turns)
        for t, u in zip(turns, got[sid]):
            assert u.window.dtype == torch.float32 and u.question is not None
            assert torch.equal(t.window, u.window) and torch.equal(t.question, u.question)
            assert torch.equal(t.answer_ids, u.answer_ids)


def test_without_rounding_features_are_full_precision(world, data, teacher_vlm, student):
    """Not rounded: within one bf16 step of the cache, but not equal to it (the rounding matters)."""
    cached = all_turns(make_loader(data, student, cache=world[0] / "cache", config=config()))
    live = all_turns(make_online_loader(data, student, online(teacher_vlm), config=config()))
    windows = [(t.window, u.window) for sid in cached for t, u in zip(cached[sid], live[sid])]
    assert all(torch.allclose(t, u, rtol=2 ** -8, atol=0) for t, u in windows)
    assert not all(torch.equal(t, u) for t, u in windows)
    assert all(torch.equal(u.to(torch.bfloat16).float(), t) for t, u in windows)


def test_micro_batches_and_question_switches(few, teacher_vlm, student):
    data = few
    whole = all_turns(make_online_loader(data, student, online(teacher_vlm, round_to="bf16", micro_batch=None),
                                         config=config()))
    micro = all_turns(make_online_loader(data, student, online(teacher_vlm, round_to="bf16"), config=config()))
    for sid in whole:  # right padding changes no more than float32 noise: one bf16 step at most
        assert all(within_one_bf16_step(a.window, b.window) for a, b in zip(whole[sid], micro[sid]))
    off = all_turns(make_online_loader(data, student, online(teacher_vlm), config=config(load_question=False)))
    none = all_turns(make_online_loader(data, student, online(teacher_vlm, question=None), config=config()))
    assert all(t.question is None for turns in [*off.values(), *none.values()] for t in turns)
    text = all_turns(make_online_loader(data, student, online(teacher_vlm, question="text"), config=config()))
    full = all_turns(make_online_loader(data, student, online(teacher_vlm), config=config()))
    for sid in full:  # "text" drops the image-token rows of the question
        assert all(a.question.shape[0] < b.question.shape[0] for a, b in zip(text[sid], full[sid]))


def test_teacher_max_length_limits_the_turns_of_both_sides(data, teacher_vlm, student):
    multi = next(s for s in data.samples if sum(t.role == "assistant" for t in s.turns) > 1)
    encoded = encode_sample(teacher_vlm, multi)
    first_end = encoded.spans.answers[0][1]
    limit = encoded.spans.answers[1][1] - 1  # the teacher keeps the first turn only
    loader = make_online_loader([multi], student, online(teacher_vlm, max_length=limit), config=config())
    (batch,) = list(loader)
    assert len(batch.teacher[0]) == 1 and len(batch.student_answer_starts[0]) == 1
    student_spans = encode_sample(student, multi).spans.answers
    s, e = student_spans[0]
    labels = batch.student_labels[0]
    assert (labels[s - 1:e - 1] != -100).all() and (labels[e - 1:] == -100).all()
    window = batch.teacher[0][0]
    assert window.answer_ids.tolist() == encoded.input_ids[encoded.spans.answers[0][0]:first_end]


def test_samples_the_teacher_cannot_take_raise_or_are_skipped(data, teacher_vlm, student):
    tiny = online(teacher_vlm, max_length=8)  # shorter than any first answer
    with pytest.raises(DataJoinError, match="cannot be encoded for the teacher"):
        list(make_online_loader(data, student, tiny, config=config()))
    loader = make_online_loader(data, student, tiny, config=config(on_error="skip"))
    batches = list(loader)
    assert all(len(b) == 0 and b.teacher == [] for b in batches)
    assert len(loader.skips) == len(data.samples)
    assert all(s.reason.startswith("teacher side:") and "max_length" in s.reason for s in loader.skips)


def test_online_loader_resumes_like_the_train_loader(few, teacher_vlm, student):
    data, teacher = few, online(teacher_vlm, round_to="bf16")
    full = make_online_loader(data, student, teacher, config=config(batch_size=2))
    first = list(full) + list(full)  # two epochs
    again = make_online_loader(data, student, teacher, config=config(batch_size=2))
    next(iter(again))
    state = again.state
    resumed = make_online_loader(data, student, teacher, config=config(batch_size=2), state=state)
    assert isinstance(resumed, OnlineLoader) and resumed.state == state and len(resumed) == 1
    rest = list(resumed) + list(resumed)
    assert [b.ids for b in rest] == [b.ids for b in first[1:]]
    assert all(torch.equal(a.teacher[0][0].window, b.teacher[0][0].window) for a, b in zip(rest, first[1:]))
    assert full.teacher_wait.batches == 4 and full.steps_per_epoch == 2 and full.wait.batches == 4


# ----------------------------------------------------------------------------- teacher parts


def test_head_and_embeddings_equal_the_cache_artifacts(world, teacher_vlm):
    teacher = online(teacher_vlm)
    head, cached = teacher.head(), load_teacher_head(world[0] / "cache")
    assert torch.equal(head.weight, cached.weight) and head.transform == cached.transform
    assert (head.bias is None and cached.bias is None) or torch.equal(head.bias, cached.bias)
    rows = load_teacher_embeddings(world[0] / "cache")
    assert torch.equal(teacher.embeddings().lookup(rows.ids), rows.rows)
    side = teacher.teacher_side("embedding")
    assert side.hidden_size == head.hidden_size and side.embeddings is not None
    assert teacher.teacher_side("hidden").embeddings is None


def test_settings_validate_and_round_trip():
    settings = OnlineSettings(max_length=64, question="text", round_to="int8", micro_batch=2)
    assert OnlineSettings.from_dict(settings.to_dict()) == settings
    with pytest.raises(ValueError) as bad:
        OnlineSettings(max_length=1, question="some", round_to="fp16", micro_batch=0)
    for name in ("max_length", "question", "round_to", "micro_batch"):
        assert name in str(bad.value)
    with pytest.raises(ValueError, match="unknown keys"):
        OnlineSettings.from_dict({"dtype": "float32"})
    with pytest.raises(StageSetupError, match="teacher_source"):
        LoopOptions(teacher_source="live")
    with pytest.raises(StageSetupError, match="online_round_to applies"):
        LoopOptions(online_round_to="bf16")
    with pytest.raises(ValueError, match="not both"):
        make_loader([], None, cache="x", source=object())


# ----------------------------------------------------------------------------- training


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return {f"{p.name}:{k}": v for p in sorted(directory.rglob("*.safetensors")) for k, v in load_file(p).items()}


def test_online_training_equals_cache_fed_training(world):
    """Align then distill, 5 optimizer steps each (crossing an epoch): per-step losses and the
    final Recalibrator and student weights agree."""
    root, teacher_dir, student_dir = world
    stages = [{"name": "align", "steps": 5, **STAGE},
              {"name": "distill", "steps": 5, "grad_accum": 2, **STAGE}]
    quiet = dict(progress=False, num_workers=0, save_every=None)
    runs = {}
    for mode, options in (("cache", LoopOptions(**quiet)),
                          ("online", LoopOptions(**quiet, teacher_source="online", online_round_to="bf16"))):
        runs[mode] = run_stages(pipeline(root, teacher_dir, student_dir, mode, stages), options=options)
    for cache_stage, online_stage in zip(runs["cache"], runs["online"]):
        assert cache_stage.finished and online_stage.finished and cache_stage.step == 5
        for a, b in zip(cache_stage.records, online_stage.records, strict=True):
            for key in ("loss", "ar", "kl", "reg_ce", "reg_kl", "grad_norm", "tokens_teacher"):
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=0), (a["stage"], a["step"], key)
        for part in ("recalibrator", "student"):
            left = _weights(cache_stage.out_dir / part) if (cache_stage.out_dir / part).is_dir() else {}
            right = _weights(online_stage.out_dir / part) if left else {}
            assert left.keys() == right.keys()
            assert all(torch.allclose(left[k], right[k], rtol=0, atol=1e-6) for k in left)
    trained = _weights(runs["online"][1].out_dir / "student")
    initial = _weights(Path(student_dir))
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)  # the student did move


def test_cli_trains_online_without_a_cache(tiny_student_dir, tmp_path):
    from typer.testing import CliRunner

    from genrecal.cli import app

    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(f"""
        pipelines:
          live:
            teacher: {{tiny: {{kind: qwen2_vl, path: {tmp_path}/teacher}}, dtype: float32}}
            student: {{tiny: {{kind: llava_qwen2, path: {tiny_student_dir}}}, dtype: float32, device: cpu}}
            data: {{synthetic: {{n_train: 4, n_test: 0, image_size: 32}}}}
            cache: {{location: {tmp_path}/cache}}
            recalibrator: {{blocks: 1}}
            stages:
              - {{name: align, steps: 2, batch_size: 2, precision: fp32}}
            evaluation: null
            output: {tmp_path}/run
        """))
    args = ["train", "live", "--file", str(path), "--workers", "0"]
    refused = CliRunner().invoke(app, args)  # cache-fed: there is no cache
    assert refused.exit_code == 2 and "no teacher artifacts" in refused.output
    result = CliRunner().invoke(app, args + ["--online"])
    assert result.exit_code == 0, result.output
    assert "align: 2 steps" in result.output
    assert (tmp_path / "teacher" / "config.json").is_file()  # the tiny teacher was built
    assert not (tmp_path / "cache" / "manifest.json").exists()
    assert (tmp_path / "run" / "align" / "recalibrator").is_dir()


# ----------------------------------------------------------------------------- loader RNG


def test_reading_batches_leaves_the_global_rng_alone(data, student):
    loader = make_loader(data, student, config=config(num_workers=0))
    before = torch.get_rng_state()
    list(loader), list(loader)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("persistent", [True, False])
def test_worker_seeds_are_the_same_after_a_resume(data, student, monkeypatch, persistent):
    """Each batch is tagged, in its worker, with the worker's seed; a run resumed mid-epoch 1
    gets the seeds the uninterrupted run had for the same batches."""
    collate = Collator.__call__

    def tagged(self, items):
        batch = collate(self, items)
        batch.worker_seed = torch.utils.data.get_worker_info().seed
        return batch

    monkeypatch.setattr(Collator, "__call__", tagged)
    cfg = config(batch_size=2, num_workers=1, persistent_workers=persistent, multiprocessing_context="fork")
    full = make_loader(data, student, config=cfg)
    before = torch.get_rng_state()
    seeds = [[b.worker_seed for b in full] for _ in range(2)]
    full.close()
    assert torch.equal(torch.get_rng_state(), before)
    assert (seeds[0][0] == seeds[1][0]) == persistent  # new workers each epoch get new seeds
    resumed = make_loader(data, student, config=cfg, state=full.plan.state(epoch=1, position=2))
    assert [b.worker_seed for b in resumed] == seeds[1][1:]
    resumed.close()
    other = make_loader(data, student, config=dataclasses.replace(cfg, seed=2))
    assert [b.worker_seed for b in other][0] != seeds[0][0]
    other.close()
