"""A writer killed with SIGKILL (a real subprocess) leaves a cache that resumes to exactly once.

The child process (this file run as a script) writes 12 synthetic samples in small shards and
stops itself at a kill point, printing ``READY``; the parent then SIGKILLs it, checks what was
left on disk, resumes the write in-process and compares with an uninterrupted write.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from genrecal.store.errors import CacheFormatError, CacheWriteError
from genrecal.store.reader import CacheReader
from synthetic_cache import sample_id, synthetic_features, synthetic_fingerprint, synthetic_sample
from genrecal.store.validate import validate_cache
from genrecal.store.writer import CacheWriter, read_rank_logs
from genrecal.store.storage import CacheStorage

N = 12
FEATURES = synthetic_features(width=16, codec="fp8_e4m3")
KWARGS = dict(teacher=synthetic_fingerprint(), features=FEATURES, settings={"crash": "test"}, shard_tokens=80)


def write_all(url: str) -> None:
    with CacheWriter(url, **KWARGS) as writer:
        for i in range(N):
            writer.add(sample_id(i), **synthetic_sample(i, FEATURES))
            if KILL_POINT == "buffered" and i == 6:
                stop_here()


# ----------------------------------------------------------------------------- child side

KILL_POINT = ""


def stop_here() -> None:
    print("READY", flush=True)
    time.sleep(600)


def install_kill_point(point: str) -> None:
    """Patch the storage layer so that the child stops at ``point`` in its third shard."""
    global KILL_POINT
    KILL_POINT = point
    write_bytes, write_new, rename = CacheStorage.write_bytes, CacheStorage.write_new, CacheStorage.rename
    state = {"tmp_files": 0, "logs": 0}

    def patched_new(self, rel, data, fsync=True):  # the files of a shard, inside its temporary directory
        path = write_new(self, rel, data, fsync)
        if "/.tmp-r00000-00002-" in rel:
            state["tmp_files"] += 1
            if point == "inside_files" and state["tmp_files"] == 3:
                stop_here()
        return path

    def patched_write(self, rel, data):
        write_bytes(self, rel, data)
        if rel.startswith("ranks/"):
            state["logs"] += 1
            if point == "between" and state["logs"] == 3:  # initial log + 2 shard commits
                stop_here()

    def patched_rename(self, src, dst):
        rename(self, src, dst)
        if point == "after_rename" and dst.endswith("r00000-00002"):
            stop_here()

    CacheStorage.write_bytes, CacheStorage.write_new, CacheStorage.rename = patched_write, patched_new, patched_rename


# ----------------------------------------------------------------------------- parent side


def run_and_kill(url: str, point: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, __file__, url, point], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "READY", f"child did not reach {point}: {line!r} {proc.stderr.read()}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def shard_dirs(url: str) -> list[str]:
    return CacheStorage(url).list_dir("shards")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("reference") / "cache")
    write_all(url)
    return CacheReader(url)


EXPECTED_LEFTOVERS = {  # kill point -> (shards listed as committed, leftovers on disk)
    "buffered": (2, lambda names: names == ["r00000-00000", "r00000-00001"]),
    "between": (2, lambda names: names == ["r00000-00000", "r00000-00001"]),
    "inside_files": (2, lambda names: len(names) == 3 and names[0].startswith(".tmp-r00000-00002-")),
    "after_rename": (2, lambda names: names == ["r00000-00000", "r00000-00001", "r00000-00002"]),
}


@pytest.mark.parametrize("point", list(EXPECTED_LEFTOVERS))
def test_killed_writer_resumes_exactly_once(tmp_path, reference, point):
    url = str(tmp_path / "cache")
    run_and_kill(url, point)
    committed, leftovers_ok = EXPECTED_LEFTOVERS[point]
    assert len(read_rank_logs(CacheStorage(url))[0].shards) == committed
    assert leftovers_ok(shard_dirs(url)), shard_dirs(url)
    with pytest.raises(CacheFormatError, match="never committed"):
        CacheReader(url)
    assert [p.code for p in validate_cache(url)] == ["manifest.missing"]

    write_all(url)  # resume: same call as the uninterrupted write
    assert not any(n.startswith(".tmp-") for n in shard_dirs(url))
    resumed = CacheReader(url)
    assert validate_cache(url) == []
    assert list(resumed.sample_ids()) == list(reference.sample_ids())
    assert resumed.manifest.counts == reference.manifest.counts
    for cached in reference:
        again = resumed[cached.sample_id]
        assert torch.equal(again.answer_hidden, cached.answer_hidden)
        assert torch.equal(again.question_hidden, cached.question_hidden)
        assert torch.equal(again.logit_stats.topk_logprobs, cached.logit_stats.topk_logprobs)
        assert all(torch.equal(a, b) for a, b in zip(again.visual_gram, cached.visual_gram))


def test_two_writers_cannot_share_a_rank(tmp_path):
    url = str(tmp_path / "cache")
    with CacheWriter(url, **KWARGS):
        with pytest.raises(CacheWriteError, match="rank 0 .* another process"):
            with CacheWriter(url, **KWARGS):
                pass
    with CacheWriter(url, rank=1, **KWARGS):  # the lock is released on close
        pass


if __name__ == "__main__":
    install_kill_point(sys.argv[2])
    write_all(sys.argv[1])  # reaching the end means the kill point was missed: the parent reports it
