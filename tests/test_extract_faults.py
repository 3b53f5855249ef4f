"""The teacher pass in real processes: SIGKILL + resume, and 2 torchrun ranks (gloo, CPU).

Every run is a subprocess with one thread per process (OMP_NUM_THREADS=1), so that results
are bit-reproducible between processes; the caches are then compared exactly (same sample
ids, same records, same tensors, same skip list).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from extract_support import assert_same_content, cache_content, committed_shards, pipeline_dict, write_pipelines

pytestmark = pytest.mark.slow

N_SAMPLES = 16
WINDOW = "4"
_SUMMARY = re.compile(r"rank (\d+)/(\d+): extracted (\d+) samples \((\d+) skipped, (\d+) already cached\)")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _extract_args(pipes: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "genrecal.cli", "extract", "t", "--file", str(pipes), "--out", str(out),
            "--window", WINDOW, *extra]


def _run(args: list[str], cwd: Path) -> str:
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _torchrun(nproc: int, args: list[str]) -> list[str]:
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]


def _summaries(stdout: str) -> dict[int, tuple[int, int]]:
    """rank -> (written, already cached) from the runs' summary lines."""
    return {int(m[1]): (int(m[3]), int(m[5])) for m in _SUMMARY.finditer(stdout)}


@pytest.fixture(scope="module")
def setup(tiny_vlm_dir, tmp_path_factory):
    """The pipelines file and an uninterrupted single-process reference cache."""
    root = tmp_path_factory.mktemp("faults")
    data = {"synthetic": {"n_train": N_SAMPLES, "n_test": 0, "image_size": 32, "seed": 0}}
    pipes = write_pipelines(root / "pipelines.yaml", {
        "t": pipeline_dict(tiny_vlm_dir("qwen2_vl"), "qwen2_vl", root, data=data, batch_size=2,
                           shard={"max_tokens": 100})})
    stdout = _run(_extract_args(pipes, root / "reference"), root)
    assert _summaries(stdout) == {0: (N_SAMPLES, 0)}
    return root, pipes, cache_content(root / "reference")


def _kill_when(proc: subprocess.Popen, ready, what: str) -> None:
    deadline = time.monotonic() + 240
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f"the run finished before it could be killed ({what})"


def test_sigkill_at_several_points_then_resume_equals_an_uninterrupted_run(setup):
    root, pipes, reference = setup
    out = root / "killed"
    points = [("the writer is open", lambda: (out / "ranks" / "rank-00000.json").exists()),
              ("2 shards are committed", lambda: committed_shards(out) >= 2),
              ("4 shards are committed", lambda: committed_shards(out) >= 4)]
    for what, ready in points:
        proc = subprocess.Popen([sys.executable, *_extract_args(pipes, out, "--resume")], cwd=root,
                                env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _kill_when(proc, ready, what)
    assert not (out / "manifest.json").exists()
    committed = cache_content_ids(out)
    assert 0 < len(committed) < N_SAMPLES
    written, already = _summaries(_run(_extract_args(pipes, out, "--resume"), root))[0]
    assert (written, already) == (N_SAMPLES - len(committed), len(committed))
    assert_same_content(reference, cache_content(out))


def cache_content_ids(url: Path) -> set[str]:
    """Sample ids committed so far (rank shard lists), without a manifest."""
    from genrecal.store.index import read_sample_ids
    from genrecal.store.storage import CacheStorage
    from genrecal.store.writer import read_rank_logs

    storage = CacheStorage(url)
    return {i for log in read_rank_logs(storage).values() for entry in log.shards
            for i in read_sample_ids(storage, entry).to_pylist()}


def test_two_ranks_write_the_same_cache_as_one(setup):
    root, pipes, reference = setup
    stdout = _run(_torchrun(2, _extract_args(pipes, root / "two")), root)
    summaries = _summaries(stdout)
    assert sorted(summaries) == [0, 1] and all(w > 0 for w, _ in summaries.values())
    assert sum(w for w, _ in summaries.values()) == N_SAMPLES
    content = cache_content(root / "two")
    assert_same_content(reference, content)


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun worker ``rank`` under the launcher process, if it has started."""
    for task in Path(f"/proc/{launcher}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(child)
    return None


def test_after_a_rank_crashes_a_rerun_does_only_the_missing_work(setup):
    root, pipes, reference = setup
    out = root / "crash"
    launcher = subprocess.Popen([sys.executable, *_torchrun(2, _extract_args(pipes, out))],
                                cwd=root, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while committed_shards(out) < 2:
        assert launcher.poll() is None and time.monotonic() < deadline, "no shard was committed"
        time.sleep(0.01)
    os.kill(_rank_pid(launcher.pid, 1), signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0  # torchrun reports the failed rank
    assert not (out / "manifest.json").exists()
    before = cache_content_ids(out)
    assert 0 < len(before) < N_SAMPLES
    summaries = _summaries(_run(_torchrun(2, _extract_args(pipes, out, "--resume")), root))
    assert sum(w for w, _ in summaries.values()) == N_SAMPLES - len(before)
    assert sum(a for _, a in summaries.values()) == len(before)
    assert_same_content(reference, cache_content(out))
