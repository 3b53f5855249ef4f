"""`genrecal run demo-text` and `demo-text-grace` end to end through the CLI on shrunken copies
of the shipped pipelines: text-only teacher and students (issue 13), a cache without images or
visual Grams, GenRecal's stages and GRACE's variants, evaluation, the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from genrecal import cli
from genrecal.common import config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def shrunken(tmp_path: Path, name: str) -> Path:
    """The shipped pipeline ``name`` with few samples and steps, writing under ``tmp_path``."""
    pipe = config.get_pipeline(name, REPO / "pipelines.yaml").to_dict()
    pipe.pop("name")
    pipe["teacher_finetune"].update(steps=3, warmup=0, batch_size=4)
    pipe["teacher_finetune"]["data"]["synthetic"].update(n_train=8, n_test=0)
    pipe["data"]["synthetic"].update(n_train=6, n_test=4)
    pipe["cache"]["location"] = str(tmp_path / "out" / "cache")
    for stage in pipe["stages"]:
        stage.update(steps=2, warmup=0, batch_size=3)
    pipe["evaluation"].update(max_new_tokens=3, batch_size=8)
    pipe["output"] = str(tmp_path / "out")
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump({"pipelines": {name: pipe}}, sort_keys=False))
    return path


def _run(path: Path, name: str) -> dict:
    result = CliRunner().invoke(cli.app, ["--file", str(path), "run", name, "--seeds", "0,1"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads((path.parent / "out" / "report" / "results.json").read_text())


def _check_text_data_and_cache(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in
            (tmp_path / "out" / "data" / "synthetic" / "train.jsonl").read_text().splitlines()]
    assert rows and all("image" not in row and "Scene: " in row["conversations"][0]["value"]
                        for row in rows)
    assert not (tmp_path / "out" / "data" / "synthetic" / "images").exists()
    manifest = json.loads((tmp_path / "out" / "cache" / "manifest.json").read_text())
    assert "visual_gram" not in json.dumps(manifest["header"]["features"])
    teacher_config = json.loads((tmp_path / "out" / "teacher" / "finetune" / "student" / "config.json")
                                .read_text())
    assert teacher_config["architectures"] == ["Qwen2ForCausalLM"]


def test_demo_text_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = shrunken(tmp_path, "demo-text")
    results = _run(path, "demo-text")
    assert [row["title"] for row in results["rows"]] == ["teacher", "student before training",
                                                        "SFT on labels", "GenRecal"]
    assert results["cache"]["samples"] == 6 and results["cache"]["problems"] == 0
    for row in results["rows"][1:]:
        assert len(row["per_seed"]) == 2 and 0.0 <= row["mean"] <= 1.0
        assert set(row["per_type"]) <= {"colour", "shape", "count", "position"}
    _check_text_data_and_cache(tmp_path)
    student = json.loads((tmp_path / "out" / "seed-0" / "finetune" / "student" / "config.json").read_text())
    assert student["architectures"] == ["LlamaForCausalLM"]


def test_demo_text_grace_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = shrunken(tmp_path, "demo-text-grace")
    results = _run(path, "demo-text-grace")
    assert [row["title"] for row in results["rows"]] == [
        "teacher", "student before training", "GRACE bf16", "GRACE int4", "QAT-only int4"]
    _check_text_data_and_cache(tmp_path)
    exported = json.loads((tmp_path / "out" / "seed-0" / "exports" / "grace_int4" / "config.json").read_text())
    assert exported["quantization_config"]["format"] == "pack-quantized"
    assert exported["architectures"] == ["Qwen2ForCausalLM"]
