"""The teacher pass's plumbing: job and settings, feature specs, ranks, windows, prefetch, inputs."""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import pytest

from extract_support import make_pipeline, pipeline_dict
from genrecal.common.config import Codecs, Features
from genrecal.extract.distributed import owned
from genrecal.extract.errors import ExtractSetupError
from genrecal.extract.inputs import ensure_synthetic, read_inputs, sample_windows
from genrecal.extract.job import ExtractSettings, feature_specs, job_from_pipeline
from genrecal.extract.pipeline import prefetched
from genrecal.common.distributed import RankInfo


def _pipe(tmp_path, **kw):
    return make_pipeline("t", pipeline_dict(tmp_path / "teacher", "qwen2_vl", tmp_path, **kw))


def test_job_from_pipeline_resolves_paths_and_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pipe = make_pipeline("t", {**pipeline_dict(tmp_path / "teacher", "qwen2_vl", tmp_path),
                               "output": "rel-out"})
    job = job_from_pipeline(pipe, out="rel-cache", limit=5, resume=True, window=3)
    assert job.out == str(tmp_path / "rel-cache")
    assert (job.limit, job.resume, job.plan_window, job.batch_size) == (5, True, 3, 1)
    assert job.settings.sources[0].path == str(tmp_path / "rel-out/data/synthetic/train.jsonl")
    assert job.settings.teacher.location == str(tmp_path / "teacher")
    assert job_from_pipeline(pipe, out="memory://c").out == "memory://c"  # URLs stay as given
    assert job_from_pipeline(pipe, batch_size=4).plan_window == 64  # 16 batches per window


def test_settings_round_trip_and_refuse_foreign_keys(tmp_path):
    settings = job_from_pipeline(_pipe(tmp_path)).settings
    data = json.loads(json.dumps(settings.to_dict()))
    assert ExtractSettings.from_dict(data) == settings
    with pytest.raises(ExtractSetupError, match="unknown keys.*'extra'"):
        ExtractSettings.from_dict({**data, "extra": 1})
    with pytest.raises(ExtractSetupError, match="missing keys.*'max_length'"):
        ExtractSettings.from_dict({k: v for k, v in data.items() if k != "max_length"})
    # caches from before the backend was recorded were all written by transformers
    assert ExtractSettings.from_dict({k: v for k, v in data.items() if k != "backend"}).backend == "hf"


def test_the_recorded_backend_is_the_engine_s(tmp_path):
    job = job_from_pipeline(_pipe(tmp_path), backend="vllm")
    assert job.settings.backend == job.engine.backend == "vllm"
    assert job_from_pipeline(_pipe(tmp_path)).settings.backend == "hf"
    with pytest.raises(ExtractSetupError, match="recorded backend 'hf' is not its engine's 'vllm'"):
        replace(job, settings=replace(job.settings, backend="hf"))
    back = job.with_backend("hf")  # engine and record change together
    assert back.settings.backend == back.engine.backend == "hf" and back.out == job.out


def test_feature_specs_follow_the_config_and_reject_impossible_ones():
    features = Features(question_hidden="text", visual_gram=True,
                        logit_stats={"top_k": 4, "temperature": 2.0})
    specs = {s.name: s for s in feature_specs(features, Codecs(question_hidden="int8"),
                                              hidden_size=32, vocab_size=10)}
    assert specs["answer_hidden"].width == 32 and specs["question_hidden"].codec == "int8"
    assert specs["question_hidden"].select == "text" and specs["visual_gram"].codec == "bf16"
    assert (specs["logit_stats"].width, specs["logit_stats"].temperature) == (4, 2.0)
    assert [s.name for s in feature_specs(Features(question_hidden="none"), Codecs(),
                                          hidden_size=8, vocab_size=8)] == ["answer_hidden"]
    with pytest.raises(ExtractSetupError, match="top_k = 4 exceeds.*3 tokens"):
        feature_specs(features, Codecs(), hidden_size=32, vocab_size=3)
    f32 = {s.name: s.codec for s in feature_specs(features, Codecs(visual_gram="f32", logit_stats="f32"),
                                                  hidden_size=32, vocab_size=10)}
    assert (f32["visual_gram"], f32["logit_stats"]) == ("f32", "f32")


def test_windows_are_dealt_to_ranks_disjointly_and_completely():
    windows = sample_windows(list(range(23)), 4)
    assert [len(w) for w in windows] == [4, 4, 4, 4, 4, 3]
    for world in (1, 2, 3, 7):
        parts = [owned(windows, RankInfo(r, world)) for r in range(world)]
        flat = sorted(i for part in parts for w in part for i in w)
        assert flat == list(range(23))
    with pytest.raises(ExtractSetupError):
        sample_windows([1], 0)


def test_prefetched_keeps_order_runs_ahead_and_propagates_errors():
    seen, main = [], threading.get_ident()

    def work(x):
        seen.append(threading.get_ident())
        if x == 3:
            raise ValueError("bad item 3")
        return x * 10

    gen = prefetched(work, range(6))
    assert [next(gen) for _ in range(3)] == [0, 10, 20]
    with pytest.raises(ValueError, match="bad item 3"):
        next(gen)
    assert main not in seen


def test_read_inputs_limits_across_sources_and_refuses_duplicate_ids(tmp_path):
    from genrecal.data import make_synthetic_vqa

    made = make_synthetic_vqa(tmp_path / "syn", n_train=4, n_test=3, image_size=32)
    sources = [{"path": str(made.train), "format": "llava"},
               {"path": str(made.test), "format": "llava", "limit": 2}]
    pipe = _pipe(tmp_path, data={"sources": sources})
    settings = job_from_pipeline(pipe).settings
    assert [s.id for s in read_inputs(settings).samples] == [
        "train-000000", "train-000001", "train-000002", "train-000003", "test-000000", "test-000001"]
    assert len(read_inputs(settings, limit=5).samples) == 5
    twice = _pipe(tmp_path, data={"sources": [sources[0], sources[0]]})
    with pytest.raises(ExtractSetupError, match="'train-000000' occurs in"):
        read_inputs(job_from_pipeline(twice).settings)


def test_synthetic_data_is_generated_once_and_again_when_its_spec_changes(tmp_path):
    job = job_from_pipeline(_pipe(tmp_path))
    ensure_synthetic(job)
    train = tmp_path / "data" / "synthetic" / "train.jsonl"
    first = train.stat().st_mtime_ns
    ensure_synthetic(job)
    assert train.stat().st_mtime_ns == first
    bigger = job_from_pipeline(_pipe(tmp_path, data={"synthetic": {"n_train": 10, "n_test": 0}}))
    ensure_synthetic(bigger)
    assert len(train.read_text().splitlines()) == 10
    tiny = job_from_pipeline(_pipe(tmp_path, data={"synthetic": {"n_train": 2, "image_size": 16}}))
    with pytest.raises(ExtractSetupError, match="data.synthetic"):
        ensure_synthetic(tiny)
