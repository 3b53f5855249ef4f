"""`genrecal run` end to end through the CLI on a shrunken copy of the shipped demo pipeline
(its data regime: a pool answered by the teacher, a labelled part, the GRACE companion): every
phase runs on parallel jobs, the report holds the 8 rows and the comparisons, a rerun reuses
every phase without touching the cache, a changed stage redoes only what depends on it; the
study's ablation rows; evaluation on the validation split."""

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
ROW_TITLES = ["teacher", "student before training", "SFT on labels", "SFT on teacher answers",
              "GenRecal", "GRACE bf16", "GRACE int4", "QAT-only int4"]
COMPARISONS = [("GenRecal", "SFT on teacher answers"), ("GenRecal", "SFT on labels"),
               ("GRACE int4", "QAT-only int4"), ("GRACE int4", "GRACE bf16"),
               ("GRACE int4", "SFT on teacher answers")]


def _shrink(pipe: dict, tmp_path: Path, finetune_steps: int) -> dict:
    pipe.pop("name")
    pipe["teacher"]["tiny"].update(hidden_size=64, vocab_size=700)
    pipe["teacher_finetune"].update(steps=3, warmup=0, batch_size=4)
    pipe["teacher_finetune"]["data"]["synthetic"].update(n_train=8, n_test=0)
    pipe["data"]["synthetic"].update(n_train=6, n_test=4, n_validation=4)
    pipe["run"]["labelled"] = 3
    pipe["cache"]["location"] = str(tmp_path / "out" / "cache")
    pipe["cache"]["generate_answers"].update(max_new_tokens=3)
    for stage in pipe["stages"]:
        stage.update(steps=finetune_steps if stage["name"] == "finetune" else 2, warmup=0,
                     batch_size=3)
    pipe["evaluation"].update(max_new_tokens=3, batch_size=8)
    pipe["output"] = str(tmp_path / "out")
    return pipe


def shrunken_demo(tmp_path: Path, finetune_steps: int = 2, name: str = "demo") -> Path:
    """The shipped pipeline ``name`` (demo or demo-study) with tiny sizes and a few steps, and
    the shipped GRACE companion shrunken alike, writing under ``tmp_path``."""
    from test_run_demo_grace import shrink as shrink_grace

    demo = _shrink(config.get_pipeline(name, REPO / "pipelines.yaml").to_dict(), tmp_path,
                   finetune_steps)
    demo["student"]["tiny"].update(hidden_size=32, vocab_size=500)
    pipelines = {name: demo}
    if demo["run"].get("grace"):
        grace = shrink_grace(config.get_pipeline("demo-grace", REPO / "pipelines.yaml").to_dict(),
                             tmp_path / "g")
        grace["teacher"] = demo["teacher"]  # the companion's tokenizer = the teacher's
        pipelines["demo-grace"] = grace
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump({"pipelines": pipelines}, sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """`genrecal run` sets the process's torch thread count; keep it from leaking into other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(path: Path, *args: str, name: str = "demo") -> str:
    result = CliRunner().invoke(cli.app, ["--file", str(path), "run", name, "--seeds", "0,1",
                                          "--jobs", "2", *args])
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
    assert [row["name"] for row in results["rows"]] == ROW_TITLES
    assert results["seeds"] == [0, 1] and results["split"] == "test"
    assert results["cache"]["problems"] == 0 and results["cache"]["samples"] == 6
    assert results["cache"]["bytes_per_input_token"] > 0
    for row in results["rows"][1:]:  # the results.json contract
        assert row["name"] == row["title"] and len(row["per_seed"]) == 2 and row["std"] is not None
        assert 0.0 <= row["mean"] <= 1.0 and set(row["per_type"]) <= set(results["types"])
    assert results["teacher"]["accuracy"] == results["rows"][0]["mean"]
    assert [(c["a"], c["b"]) for c in results["comparisons"]] == COMPARISONS
    for c in results["comparisons"]:
        assert c["n_seeds"] == 2 and c["ci_low"] <= c["mean_diff"] <= c["ci_high"]
        assert f"{c['a']} - {c['b']}: {c['mean_diff']:+.3f}" in output  # said in words
    assert all({"name", "seconds"} <= set(p) for p in results["phases"])
    table = [line for line in output.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert [line.split(" | ")[0][2:] for line in table[:len(ROW_TITLES)]] == ROW_TITLES
    assert "| " + ROW_TITLES[0] in (report / "results.md").read_text()
    steps = {s["step"]: s["action"] for p in results["phases"] for s in p["steps"]}
    assert set(steps.values()) == {"run"} and list(steps).count("teacher-finetune") == 1
    assert "grace.cache" in steps and not (tmp_path / "out" / "grace" / "teacher").exists()
    assert (tmp_path / "out" / "logs" / "teacher-finetune.log").is_file()  # parallel jobs' logs

    # The data regime: the teacher answered the whole pool; SFT on labels reads the first
    # run.labelled samples' labels, the teacher-learning rows the answers to the same images.
    from genrecal.data import read_dataset, read_split
    from genrecal.plan import RunPlan
    from genrecal.store.reader import CacheReader

    answers_file = tmp_path / "out" / "data" / "teacher_answers" / "train.jsonl"
    answered = read_dataset(answers_file, format="llava",
                            image_root=next((tmp_path / "out").rglob("images")).parent)
    cached = {s.sample_id: s.content_hash for s in CacheReader(tmp_path / "out" / "cache")}
    assert {s.id: s.content_hash for s in answered.samples} == cached  # cache = the teacher's answers
    plan = RunPlan(config.get_pipeline("demo", path), (0, 1), config.get_pipeline("demo-grace", path))
    labelled = read_split(plan.sft_pipeline(0).data, "train", output_dir=plan.root).samples
    pool = read_split(plan.sft_answers_pipeline(0).data, "train", output_dir=plan.root).samples
    assert len(labelled) == 3 and len(pool) == 6
    assert [s.id for s in labelled] == [s.id for s in pool][:3]  # the same images, fewer labels

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
                      ("genrecal", "sft", "sft-answers", "eval-student_genrecal", "eval-student_sft",
                       "eval-student_sft_answers")}
    assert manifest_state(tmp_path) == cache_before


def test_study_variants_and_the_validation_split(tmp_path, monkeypatch):
    """demo-study's ablation rows (three of them: one with its own cache codec, one INT4) join
    the table, each compared with GenRecal, with the bytes per token of the cache it read; and
    `--split validation` evaluates on the validation split into report-validation/."""
    monkeypatch.chdir(tmp_path)
    path = shrunken_demo(tmp_path, name="demo-study")
    data = yaml.safe_load(path.read_text())
    study = data["pipelines"]["demo-study"]
    keep = ("L_reg off", "z_ql codec int8", "GenRecal int4")
    study["run"]["variants"] = [v for v in study["run"]["variants"] if v["name"] in keep]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    output = run(path, name="demo-study")
    results = json.loads((tmp_path / "out" / "report" / "results.json").read_text())
    assert [r["name"] for r in results["rows"]] == ROW_TITLES[:5] + list(keep)
    variants = {v["name"]: v for v in results["variants"]}
    assert variants["z_ql codec int8"]["question_hidden_codec"] == "int8"
    assert variants["L_reg off"]["question_hidden_codec"] == "fp8_e4m3"
    assert all(v["cache_bytes_per_input_token"] > 0 for v in variants.values())
    assert (tmp_path / "out" / "variant-z-ql-codec-int8" / "cache" / "manifest.json").is_file()
    assert not (tmp_path / "out" / "variant-l-reg-off").exists()  # it reads the run's cache
    assert [(c["a"], c["b"]) for c in results["comparisons"]][2:] == [(k, "GenRecal") for k in keep]
    exported = json.loads((tmp_path / "out" / "seed-0" / "exports" / "variant-genrecal-int4"
                           / "config.json").read_text())
    assert exported["quantization_config"]["format"] == "pack-quantized"
    assert "| z_ql codec int8 |" in output

    run(path, "--split", "validation", name="demo-study")
    validation = json.loads((tmp_path / "out" / "report-validation" / "results.json").read_text())
    assert validation["split"] == "validation"
    assert all(r["name"] == t for r, t in zip(validation["rows"], ROW_TITLES[:5] + list(keep)))
    steps = {s["step"]: s["action"] for p in validation["phases"] for s in p["steps"]}
    # only the evaluations ran again (on the other split); every model was reused
    assert {k for k, v in steps.items() if v != "reuse"} == {k for k in steps if k.startswith("eval-")}
    first = json.loads((tmp_path / "out" / "report" / "results.json").read_text())
    assert first["split"] == "test"  # the test report is kept
    run(path, name="demo-study")  # back to the test split: its evaluations are still valid
    again = json.loads((tmp_path / "out" / "report" / "results.json").read_text())
    assert {s["action"] for p in again["phases"] for s in p["steps"]} == {"reuse"}
