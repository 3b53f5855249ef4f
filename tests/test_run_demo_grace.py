"""`genrecal run demo-grace` end to end through the CLI on a shrunken copy of the shipped
pipeline: teacher fine-tuning, the cache, GRACE bf16 / int4 and QAT-only int4 per seed, the INT4
exports (compressed-tensors, loaded back by transformers for the evaluation), and the table."""

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
TITLES = ["teacher", "student before training", "GRACE bf16", "GRACE int4", "QAT-only int4"]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def shrunken(tmp_path: Path) -> Path:
    demo = shrink(config.get_pipeline("demo-grace", REPO / "pipelines.yaml").to_dict(), tmp_path)
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump({"pipelines": {"demo-grace": demo}}, sort_keys=False))
    return path


def shrink(demo: dict, tmp_path: Path) -> dict:
    """The demo-grace pipeline dict with tiny sizes and a few steps, writing under ``tmp_path``."""
    demo.pop("name")
    demo["teacher"]["tiny"].update(hidden_size=64, vocab_size=700)
    demo["student"]["tiny"].update(hidden_size=32, vocab_size=700)
    demo["teacher_finetune"].update(steps=3, warmup=0, batch_size=4)
    demo["teacher_finetune"]["data"]["synthetic"].update(n_train=8, n_test=0)
    demo["data"]["synthetic"].update(n_train=6, n_test=4)
    demo["cache"]["location"] = str(tmp_path / "out" / "cache")
    demo["stages"][0].update(steps=2, warmup=0, batch_size=3)
    demo["evaluation"].update(max_new_tokens=3, batch_size=8)
    demo["output"] = str(tmp_path / "out")
    return demo


def test_demo_grace_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = shrunken(tmp_path)
    result = CliRunner().invoke(cli.app, ["--file", str(path), "run", "demo-grace", "--seeds", "0,1"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    results = json.loads((tmp_path / "out" / "report" / "results.json").read_text())
    assert [row["title"] for row in results["rows"]] == TITLES
    for row in results["rows"][1:]:
        assert len(row["per_seed"]) == 2 and 0.0 <= row["mean"] <= 1.0
    assert [(c["a"], c["b"]) for c in results["comparisons"]] == [("GRACE int4", "QAT-only int4"),
                                                                   ("GRACE int4", "GRACE bf16")]
    for seed in (0, 1):
        for variant in ("grace_int4", "qat_int4"):
            exported = json.loads((tmp_path / "out" / f"seed-{seed}" / "exports" / variant / "config.json").read_text())
            assert exported["quantization_config"]["format"] == "pack-quantized"
    again = CliRunner().invoke(cli.app, ["--file", str(path), "run", "demo-grace", "--seeds", "0,1"])
    assert again.exit_code == 0, again.output
    rerun = json.loads((tmp_path / "out" / "report" / "results.json").read_text())
    assert {s["action"] for p in rerun["phases"] for s in p["steps"]} == {"reuse"}
    assert rerun["rows"] == results["rows"]
