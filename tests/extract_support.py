"""Helpers of the teacher-pass tests (tests/test_extract_*.py): test pipelines, cache content."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from genrecal.common.config import Pipeline
from genrecal.store.errors import StoreError
from genrecal.store.reader import CacheReader
from genrecal.store.storage import CacheStorage
from genrecal.store.writer import read_rank_logs

FEATURES = {"answer_hidden": True, "question_hidden": "all", "visual_gram": True,
            "logit_stats": {"top_k": 8, "temperature": 2.0}, "input_embeddings": True}


def pipeline_dict(teacher_dir: Path, kind: str, out_dir: Path, *, data: dict | None = None,
                  features: dict | None = None, codecs: dict | None = None, **cache) -> dict:
    """A small extract-only pipeline: tiny ``kind`` teacher at ``teacher_dir``, synthetic data."""
    return {
        "teacher": {"tiny": {"kind": kind, "path": str(teacher_dir)}, "dtype": "float32",
                    "device": "cpu"},
        "student": {"tiny": {"kind": "llava_qwen2", "path": str(out_dir / "student")},
                    "dtype": "float32", "device": "cpu"},
        "data": data or {"synthetic": {"n_train": 8, "n_test": 0, "image_size": 32, "seed": 0}},
        "cache": {"location": str(out_dir / "cache"), "features": features or FEATURES,
                  "codecs": codecs or {}, "shard": {"max_tokens": 150},
                  "batch_size": 1, "max_length": 256, **cache},
        "recalibrator": {"blocks": 1, "init": "random", "answer_input": "hidden"},
        "stages": [{"name": "align", "steps": 1, "lr_start": 1e-3, "lr_end": 1e-4,
                    "batch_size": 2, "precision": "fp32"}],
        "evaluation": None,
        "output": str(out_dir),
    }


def make_pipeline(name: str, data: dict) -> Pipeline:
    return Pipeline.from_dict({**data, "name": name})


def write_pipelines(path: Path, pipelines: dict[str, dict]) -> Path:
    path.write_text(yaml.safe_dump({"pipelines": pipelines}, sort_keys=False))
    return path


def cache_content(url) -> dict:
    """Everything a cache holds per sample (records and decoded features) plus its skip list."""
    reader = CacheReader(url)
    samples = {}
    for sample in reader:
        samples[sample.sample_id] = {
            "content_hash": sample.content_hash, "status": sample.status,
            "input_ids": sample.input_ids.tolist(), "spans": sample.spans,
            **{name: getattr(sample, name) for name in reader.features}}
    skipped = sorted((s.sample_id, s.reason) for s in reader.manifest.skipped)
    return {"features": reader.manifest.header.features, "samples": samples, "skipped": skipped,
            "settings": reader.manifest.header.settings, "teacher": reader.manifest.teacher}


def assert_same_content(a: dict, b: dict) -> None:
    """Bit-exact equality of two :func:`cache_content` results."""
    assert a["features"] == b["features"] and a["settings"] == b["settings"]
    assert a["teacher"] == b["teacher"] and a["skipped"] == b["skipped"]
    assert sorted(a["samples"]) == sorted(b["samples"])
    for sample_id, left in a["samples"].items():
        right = b["samples"][sample_id]
        assert left.keys() == right.keys()
        for key, value in left.items():
            assert _equal(value, right[key]), f"sample {sample_id}: {key} differs"


def _equal(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return len(x) == len(y) and all(_equal(p, q) for p, q in zip(x, y))
    if hasattr(x, "to_dict") and not isinstance(x, dict):
        dx, dy = x.to_dict(), y.to_dict()
        return dx.keys() == dy.keys() and all(_equal(dx[k], dy[k]) for k in dx)
    return x == y


def committed_shards(url) -> int:
    """Shards committed so far by all ranks (read from the rank shard lists)."""
    try:
        return sum(len(log.shards) for log in read_rank_logs(CacheStorage(url)).values())
    except (OSError, StoreError):  # the cache directory is not there yet
        return 0
