"""`genrecal train` refuses a teacher cache written by another teacher than the pipeline's.

A cache is extracted with tiny teacher A (seed 0); pipelines then name teacher A, teacher B (the
same kind with seed 1: same config and tokenizer, other weights) or a teacher whose weights are
not on this machine (a hub id never downloaded: only the recorded location can be compared).
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from extract_support import make_pipeline, pipeline_dict, write_pipelines
from genrecal.cli import app
from genrecal.extract.job import job_from_pipeline
from genrecal.extract.pipeline import run_extract
from genrecal.store.errors import FingerprintMismatchError
from genrecal.store.reader import CacheReader
from genrecal.model.tiny import build_tiny_vlm
from genrecal.train.data import check_cache_teacher


@pytest.fixture(scope="module")
def cache(tiny_vlm_dir, tmp_path_factory):
    """(root, teacher A dir, cache url) of a cache extracted with teacher A."""
    root = tmp_path_factory.mktemp("teacher-check")
    teacher_a = tiny_vlm_dir("qwen2_vl")
    pipe = make_pipeline("a", pipeline_dict(teacher_a, "qwen2_vl", root,
                                            features={"answer_hidden": True, "question_hidden": "all"}))
    result = run_extract(job_from_pipeline(pipe).with_overrides(progress=False))
    return root, teacher_a, result.out


def test_same_teacher_passes_and_the_expectation_is_its_weights(cache):
    root, teacher_a, url = cache
    expect = check_cache_teacher(url, str(teacher_a))
    assert expect == {"weights": CacheReader(url).manifest.teacher.weights}


def test_another_teacher_is_refused_naming_both_fingerprints(cache, tmp_path):
    root, teacher_a, url = cache
    teacher_b = build_tiny_vlm("qwen2_vl", tmp_path / "b", seed=1)
    with pytest.raises(FingerprintMismatchError) as info:
        check_cache_teacher(url, str(teacher_b))
    message = str(info.value)
    assert CacheReader(url).manifest.teacher.weights in message and str(teacher_b) in message
    assert "--allow-teacher-mismatch" in message


def test_a_teacher_not_on_this_machine_is_compared_by_its_recorded_location(cache):
    root, teacher_a, url = cache
    with pytest.raises(FingerprintMismatchError, match="not on this machine"):
        check_cache_teacher(url, "some-org/never-downloaded-72b")


def test_cli_train_refuses_another_teachers_cache_unless_allowed(cache, tmp_path, tiny_vlm_dir):
    root, teacher_a, url = cache
    teacher_b = build_tiny_vlm("qwen2_vl", tmp_path / "b", seed=1)
    spec = pipeline_dict(teacher_b, "qwen2_vl", tmp_path, features={"answer_hidden": True,
                                                                   "question_hidden": "all"})
    spec["cache"]["location"] = url
    spec["student"]["tiny"]["path"] = str(tiny_vlm_dir("llava_qwen2"))
    path = write_pipelines(tmp_path / "p.yaml", {"b": {**spec, "output": str(root)}})  # root: A's data
    args = ["train", "b", "--file", str(path), "--workers", "0"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2, refused.output
    assert "another teacher" in refused.output and CacheReader(url).manifest.teacher.weights in refused.output
    allowed = CliRunner().invoke(app, args + ["--allow-teacher-mismatch"])
    assert allowed.exit_code == 0, allowed.output
    assert "align: 1 steps" in allowed.output
