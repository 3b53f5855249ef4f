"""Every benchmark in benchmarks/ still runs: its ``--smoke`` mode, in a subprocess.

Each benchmark runs the same code paths as its full measurement at the smallest sizes, prints
its table and writes its results with ``--json PATH``; the test checks the exit status, the
table and that the JSON has the expected keys with finite numbers (positive where a zero would
mean nothing was measured). No time or ratio is asserted: CI machines differ.

Torch threads are pinned the way the benchmarks pin them (``--threads``, i.e.
``torch.set_num_threads``), with the OpenMP / MKL pools set to the same count through the
environment. The subprocess runs in a temporary directory with TMPDIR inside it, so that the
benchmarks' temporary directories land there and must be gone afterwards (libraries' own
caches, such as torch's ``torchinductor_<user>``, excepted).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
THREADS = 1
LIBRARY_CACHES = ("torchinductor_",)
"""Names that libraries (not the benchmarks) keep in TMPDIR as caches."""


def run_smoke(name: str, tmp_path: Path) -> tuple[dict, str]:
    """Run ``benchmarks/<name> --smoke --json FILE``; (the JSON, stdout)."""
    out, tmpdir = tmp_path / "result.json", tmp_path / "tmp"
    tmpdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENRECAL_")}
    env.update(TMPDIR=str(tmpdir), OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    done = subprocess.run([sys.executable, str(BENCHMARKS / name), "--smoke", "--threads", str(THREADS),
                           "--json", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{name} --smoke failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert out.is_file(), f"{name} --json {out} wrote nothing"
    left = [p.name for p in tmpdir.iterdir() if not p.name.startswith(LIBRARY_CACHES)]
    assert left == [], f"{name} left temporary files behind: {left}"
    return json.loads(out.read_text()), done.stdout


def check_numbers(data: dict, positive: tuple[str, ...], non_negative: tuple[str, ...] = (), where: str = ""):
    for key in positive + non_negative:
        assert key in data, f"{where}: no key {key!r} in {sorted(data)}"
        value = data[key]
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}.{key} = {value!r}"
        assert math.isfinite(value), f"{where}.{key} = {value}"
        assert value > 0 if key in positive else value >= 0, f"{where}.{key} = {value}"


def test_bench_store_smoke(tmp_path):
    data, stdout = run_smoke("bench_store.py", tmp_path)
    check_numbers(data, ("tokens", "hidden", "threads", "forward_s"), where="bench_store")
    assert data["threads"] == THREADS
    layouts = ("safetensors/sample", "cache bf16", "cache fp8_e4m3", "cache int8")
    assert set(data["results"]) == set(layouts)
    for layout in layouts:
        check_numbers(data["results"][layout], ("bytes", "all_bytes", "write_s", "read_s", "random_ms"),
                      ("rel_err",), where=f"bench_store.results[{layout!r}]")
        assert layout in stdout
    assert data["results"]["cache bf16"]["rel_err"] == 0  # bf16 is lossless
    check_numbers(data["blosc"], ("chunk", "default"), where="bench_store.blosc")
    assert "B/token" in stdout
    # the cache path vs the raw codec, at 1 and 2 threads; headline keys at the top level
    ratios = ("write_vs_codec", "read_vs_codec", "loader_vs_codec", "read_unverified_vs_codec", "random_access_ms")
    check_numbers(data, ratios, where="bench_store")
    assert set(data["speed"]) == {"1", "2"}
    for n, r in data["speed"].items():
        check_numbers(r, ratios + ("codec_encode_mbs", "codec_decode_mbs", "write_mbs", "read_mbs", "loader_mbs",
                                   "read_unverified_mbs", "random_tokens"), where=f"bench_store.speed[{n}]")
        assert math.isfinite(r["random_overhead_ms"])
    assert "Cache path vs raw codec" in stdout


def test_bench_extract_smoke(tmp_path):
    data, stdout = run_smoke("bench_extract.py", tmp_path)
    check_numbers(data, ("samples", "batches", "tokens", "hidden", "vocab", "threads", "bare_s", "inner_s",
                         "loop_s", "end_to_end_s", "encode_s", "ratio"),
                  ("writer_wait", "writer_busy"), where="bench_extract")
    assert data["threads"] == THREADS or data["device"] != "cpu"
    for row in ("bare teacher forward", "forward+features+writes", "extraction loop", "overhead ratio"):
        assert row in stdout


def test_bench_train_smoke(tmp_path):
    data, stdout = run_smoke("bench_train.py", tmp_path)
    check_numbers(data["setup"], ("teacher_params", "student_params", "extract_s"), where="bench_train.setup")
    for mode in ("cache", "online"):
        assert data[mode]["mode"] == mode
        check_numbers(data[mode], ("steps", "step_ms", "rss_mib"),
                      ("data_wait", "worker_wait", "teacher_fwd", "own_mib", "workers_rss_mib"),
                      where=f"bench_train.{mode}")
    assert data["online"]["teacher_fwd"] > 0  # the online mode's teacher did run
    assert "online / cache" in stdout


def test_bench_grace_smoke(tmp_path):
    data, stdout = run_smoke("bench_grace.py", tmp_path)
    check_numbers(data["setup"], ("student_params", "decoder_params"), where="bench_grace.setup")
    for mode in ("none", "int4", "int8"):
        assert data[mode]["mode"] == mode
        check_numbers(data[mode], ("steps", "setup_s", "step_ms", "compute_ms", "rss_mib"),
                      ("own_mib", "quantized_linears"), where=f"bench_grace.{mode}")
    assert data["int4"]["quantized_linears"] > 0 and data["none"]["quantized_linears"] == 0
    export = data["export"]
    check_numbers(export, ("linears", "linear_weights"), where="bench_grace.export")
    for fmt in ("bf16", "int8", "int4"):
        check_numbers(export[fmt], ("linear_bytes", "total_bytes", "bits_per_weight", "linear_ratio",
                                    "total_ratio", "export_s"), where=f"bench_grace.export.{fmt}")
    nckd = data["nckd"]
    check_numbers(nckd["teacher"], ("entropy", "top1", "mass_top16", "mass_top64", "mass_top256"),
                  where="bench_grace.nckd.teacher")
    for student in ("peaks", "isotropic"):
        assert set(nckd[student]) == {"16", "64", "256"}
        for k, row in nckd[student].items():
            check_numbers(row, ("k", "mean_exact", "mean_topk"), ("mean_abs", "max_abs", "rel"),
                          where=f"bench_grace.nckd.{student}[{k}]")
    for row in ("QAT int4 / no QAT", "Export size", "NCKD top-k vs exact"):
        assert row in stdout


@pytest.mark.parametrize("name", sorted(p.name for p in BENCHMARKS.glob("bench_*.py")))
def test_every_benchmark_has_a_smoke_test(name):
    assert f"test_{name.removesuffix('.py')}_smoke" in globals(), f"add a smoke test for benchmarks/{name}"
