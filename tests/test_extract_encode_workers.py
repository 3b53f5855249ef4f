"""Sample encoding in worker processes (``cache.encode_workers``) gives the very cache that
encoding on a thread gives: same encodings, same batches, so the same bytes of every feature;
bad samples fail (or are skipped) with the same reasons."""

from __future__ import annotations

import pytest

from extract_support import assert_same_content, cache_content, make_pipeline, pipeline_dict
from genrecal.extract.job import job_from_pipeline
from genrecal.extract.pipeline import run_extract
from test_extract_pipeline import _bad_data_pipeline


def _extract(pipe, workers: int, out: str, window: int):
    job = job_from_pipeline(pipe, out=out, window=window).with_overrides(progress=False)
    return run_extract(job.with_overrides(encode_workers=workers))


def test_encoding_workers_write_the_same_cache_as_a_thread(tiny_vlm_dir, tmp_path):
    pipe = make_pipeline("w", pipeline_dict(tiny_vlm_dir("qwen2_vl"), "qwen2_vl", tmp_path / "p"))
    assert pipe.cache.encode_workers == 0  # the default: a thread
    # window 2: four windows, so that the workers encode windows 2..4 while the forward runs
    thread = _extract(pipe, 0, str(tmp_path / "thread"), window=2)
    workers = _extract(pipe, 2, str(tmp_path / "workers"), window=2)
    assert thread.written == workers.written == 8
    assert_same_content(cache_content(thread.out), cache_content(workers.out))  # bit for bit


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_samples_are_skipped_with_the_same_reasons(tiny_vlm_dir, tmp_path, workers):
    pipe = _bad_data_pipeline(tiny_vlm_dir, tmp_path, on_error="skip")
    result = _extract(pipe, workers, str(tmp_path / f"out-{workers}"), window=1)
    content = cache_content(result.out)
    assert sorted(content["samples"]) == ["good-0", "good-1", "truncated"]
    reasons = dict(content["skipped"])
    assert sorted(reasons) == ["control-token", "missing-image", "too-long"]
    assert "control token" in reasons["control-token"] and "max_length" in reasons["too-long"]
