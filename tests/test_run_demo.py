"""`genrecal run` end to end through the CLI on a shrunken copy of the shipped demo pipeline:
every phase runs, the report holds the 4 rows, a rerun reuses every phase without touching the
cache, and a changed stage redoes only what depends on it."""

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
ROW_TITLES = ["teacher", "student before training", "SFT on labels", "GenRecal"]


def shrunken_demo(tmp_path: Path, finetune_steps: int = 2) -> Path:
    """The shipped demo with tiny sizes and a few steps, writing under ``tmp_path``."""
    demo = config.get_pipeline("demo", REPO / "pipelines.yaml").to_dict()
    demo.pop("name")
    demo["teacher"]["tiny"].update(hidden_size=64, vocab_size=700)
    demo["student"]["tiny"].update(hidden_size=32, vocab_size=500)
    demo["teacher_finetune"].update(steps=3, warmup=0, batch_size=4)
    demo["teacher_finetune"]["data"]["synthetic"].update(n_train=8, n_test=0)
    demo["data"]["synthetic"].update(n_train=6, n_test=4)
    demo["cache"]["location"] = str(tmp_path / "out" / "cache")
    for stage in demo["stages"]:
        stage.update(steps=finetune_steps if stage["name"] == "finetune" else 2, warmup=0,
                     batch_size=3)
    demo["evaluation"].update(max_new_tokens=3, batch_size=8)
    demo["output"] = str(tmp_path / "out")
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump({"pipelines": {"demo": demo}}, sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """`genrecal run` sets the process's torch thread count; keep it from leaking into other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(path: Path) -> str:
    result = CliRunner().invoke(cli.app, ["--file", str(path), "run", "demo", "--seeds", "0,1"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def manifest_state(tmp_path: Path) -> tuple[int, bytes]:
    manifest = tmp_path / "out" / "cache" / "manifest.json"
    return manifest.stat().st_mtime_ns, manifest.read_bytes()


def test_demo_runs_end_to_end_and_reuses_its_phases(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = shrunken_demo(tmp_path)
    output = run(path)
    report = tmp_path / "out" / "report"
    for name in ("results.md", "results.json", "loss_curves.png", "accuracy.png"):
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
    results = json.loads((report / "results.json").read_text())
    assert [row["title"] for row in results["rows"]] == ROW_TITLES
    assert results["seeds"] == [0, 1] and results["cache"]["problems"] == 0
    assert results["cache"]["samples"] == 6 and results["cache"]["bytes_per_input_token"] > 0
    for row in results["rows"][1:]:  # the results.json contract
        assert row["name"] == row["title"] and len(row["per_seed"]) == 2 and row["std"] is not None
        assert 0.0 <= row["mean"] <= 1.0 and set(row["per_type"]) <= set(results["types"])
    assert results["teacher"]["accuracy"] == results["rows"][0]["mean"]
    (comparison,) = results["comparisons"]
    assert (comparison["a"], comparison["b"], comparison["n_seeds"]) == ("GenRecal", "SFT on labels", 2)
    assert comparison["ci_low"] <= comparison["mean_diff"] <= comparison["ci_high"]
    assert all({"name", "seconds"} <= set(p) for p in results["phases"])
    table = [line for line in output.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert [line.split(" | ")[0][2:] for line in table[:len(ROW_TITLES)]] == ROW_TITLES
    assert "| " + ROW_TITLES[0] in (report / "results.md").read_text()
    steps = {s["step"]: s["action"] for p in results["phases"] for s in p["steps"]}
    assert set(steps.values()) == {"run"} and "teacher-finetune" in steps

    cache_before = manifest_state(tmp_path)
    run(path)
    again = json.loads((report / "results.json").read_text())
    assert all(p["reused"] for p in again["phases"] if p["steps"])
    assert {s["action"] for p in again["phases"] for s in p["steps"]} == {"reuse"}  # nothing re-ran
    assert manifest_state(tmp_path) == cache_before  # the cache was not recomputed
    assert again["rows"] == results["rows"]

    run(shrunken_demo(tmp_path, finetune_steps=3))  # a changed finetune stage
    changed = json.loads((report / "results.json").read_text())
    actions = {s["step"]: s["action"] for p in changed["phases"] for s in p["steps"]}
    redone = {step for step, action in actions.items() if action != "reuse"}
    assert redone == {f"{kind}-seed-{seed}" for seed in (0, 1) for kind in
                      ("genrecal", "sft", "eval-student_genrecal", "eval-student_sft")}
    assert manifest_state(tmp_path) == cache_before


def test_teacher_answers_rows(tmp_path, monkeypatch):
    """With cache.generate_answers and run.labelled: the teacher answers the whole train split;
    SFT on labels reads the first `labelled` samples' labels, SFT on teacher answers and GenRecal
    the answers (the cache is extracted from them); the table has five rows and two comparisons."""
    monkeypatch.chdir(tmp_path)
    path = shrunken_demo(tmp_path)
    data = yaml.safe_load(path.read_text())
    demo = data["pipelines"]["demo"]
    demo["cache"]["generate_answers"] = {"max_new_tokens": 3, "replace": "always"}
    demo["run"] = {"labelled": 3}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    run(path)
    results = json.loads((tmp_path / "out" / "report" / "results.json").read_text())
    assert [r["name"] for r in results["rows"]] == ["teacher", "student before training", "SFT on labels",
                                                    "SFT on teacher answers", "GenRecal"]
    assert [(c["a"], c["b"]) for c in results["comparisons"]] == [("GenRecal", "SFT on teacher answers"),
                                                                   ("GenRecal", "SFT on labels")]
    answers = [json.loads(line) for line in (tmp_path / "out" / "data" / "teacher_answers" / "train.jsonl")
               .read_text().splitlines()]
    assert len(answers) == 6  # the whole train split: the pool
    from genrecal.data import read_dataset
    from genrecal.store.reader import CacheReader

    reader = CacheReader(tmp_path / "out" / "cache")
    cached = {s.sample_id: s.content_hash for s in reader}
    answered = read_dataset(tmp_path / "out" / "data" / "teacher_answers" / "train.jsonl", format="llava",
                            image_root=next((tmp_path / "out").rglob("images")).parent)
    assert {s.id: s.content_hash for s in answered.samples} == cached  # cache = the teacher's answers
    from genrecal.data import read_split
    from genrecal.plan import RunPlan

    plan = RunPlan(config.get_pipeline("demo", path), (0, 1))
    labelled = read_split(plan.sft_pipeline(0).data, "train", output_dir=plan.root).samples
    pool = read_split(plan.sft_answers_pipeline(0).data, "train", output_dir=plan.root).samples
    assert len(labelled) == 3 and len(pool) == 6
    assert [s.id for s in labelled] == [s.id for s in pool][:3]  # the same images, fewer labels


def test_grace_companion_rows_join_the_table(tmp_path, monkeypatch):
    """run.grace: the GRACE companion runs on this run's fine-tuned teacher and teacher answers
    (no second teacher fine-tuning) and its three rows join the table and the comparisons."""
    from test_run_demo_grace import shrunken as shrunken_grace

    monkeypatch.chdir(tmp_path)
    path = shrunken_demo(tmp_path)
    data = yaml.safe_load(path.read_text())
    (tmp_path / "g").mkdir()
    grace = yaml.safe_load(shrunken_grace(tmp_path / "g").read_text())["pipelines"]["demo-grace"]
    grace["teacher"] = data["pipelines"]["demo"]["teacher"]  # the companion's tokenizer = the teacher's
    grace["student"]["tiny"].update(vocab_size=700)
    demo = data["pipelines"]["demo"]
    demo["cache"]["generate_answers"] = {"max_new_tokens": 3, "replace": "always"}
    demo["run"] = {"labelled": 3, "grace": "demo-grace"}
    data["pipelines"]["demo-grace"] = grace
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    output = run(path)
    results = json.loads((tmp_path / "out" / "report" / "results.json").read_text())
    assert [r["name"] for r in results["rows"]] == [
        "teacher", "student before training", "SFT on labels", "SFT on teacher answers", "GenRecal",
        "GRACE bf16", "GRACE int4", "QAT-only int4"]
    assert ("GRACE int4", "QAT-only int4") in [(c["a"], c["b"]) for c in results["comparisons"]]
    steps = [s["step"] for p in results["phases"] for s in p["steps"]]
    assert steps.count("teacher-finetune") == 1 and "grace.cache" in steps
    assert not (tmp_path / "out" / "grace" / "teacher").exists()  # no second teacher fine-tuning
    assert "GRACE int4" in output
