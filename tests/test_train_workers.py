"""Loader worker processes die with the trainer that started them (Linux).

A child process builds a TrainLoader with 2 worker processes, takes one batch, then makes every
later sample take an hour (a worker busy on a huge image or a stalled read: torch's watchdog only
checks the parent between samples). The child is SIGKILLed; its workers must be gone soon after
(the kernel's parent-death signal), where before they ran on as orphans. The 60 s below is a
guard against hanging the suite, not a timing assertion.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from genrecal.data import make_synthetic_vqa

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")

CHILD = textwrap.dedent("""
    import os, sys, time
    from genrecal.data import read_dataset
    from genrecal.model.loading import load_vlm
    from genrecal.train import data as train_data
    from genrecal.train.data import LoaderConfig, make_loader

    data, student_dir, stall = sys.argv[1:4]
    real = train_data.JoinedDataset.__getitem__

    def stalling(self, index):  # once `stall` exists, every sample takes an hour
        if os.path.exists(stall):
            time.sleep(3600)
        return real(self, index)

    train_data.JoinedDataset.__getitem__ = stalling
    loader = make_loader(read_dataset(data, format="llava"), load_vlm(student_dir), config=LoaderConfig(
        batch_size=1, num_workers=2, prefetch_factor=1, multiprocessing_context="fork"))
    stream = iter(loader)
    next(stream)
    open(stall, "w").close()
    next(stream)  # a batch prefetched before the stall; the workers are now stuck in samples
    print("ready", flush=True)
    time.sleep(3600)
""")


def _children(pid: int) -> set[int]:
    out = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        out |= {int(x) for x in (task / "children").read_text().split()}
    return out


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has exited


def test_workers_exit_when_the_trainer_is_killed(tmp_path, tiny_student_dir):
    make_synthetic_vqa(tmp_path / "data", n_train=8, n_test=0, image_size=32, seed=0)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen([sys.executable, str(script), str(tmp_path / "data" / "train.jsonl"),
                              str(tiny_student_dir), str(tmp_path / "stall")], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        workers = _children(child.pid)  # the loader's worker processes
        assert len(workers) == 2 and all(_alive(p) for p in workers)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    deadline = time.monotonic() + 60
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    orphans = [p for p in workers if _alive(p)]
    for pid in orphans:  # do not leave them behind whatever the outcome
        os.kill(pid, signal.SIGKILL)
    assert not orphans, f"loader workers {orphans} outlived their SIGKILLed trainer"
