"""The step graph of `genrecal run --jobs N` (genrecal.scheduler): order, overlap, failures,
reuse. Steps here are plain functions that write files; no wall-clock assertion: overlap is
proven by a rendezvous that only completes when two steps run at the same time."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from genrecal.errors import RunError
from genrecal.phases import MarkerBook, Step
from genrecal.scheduler import MAX_DEFAULT_JOBS, default_jobs, run_graph


def file_step(step_id: str, out: Path, after: tuple[str, ...] = (), work=None) -> Step:
    """A step that runs ``work()`` (if any), then writes ``out`` with its pid."""

    def run(_resume: bool) -> dict:
        if work is not None:
            work()
        out.write_text(str(os.getpid()))
        return {"path": str(out)}

    return Step(step_id, f"step {step_id}", f"hash-{step_id}", (str(out),), run,
                lambda _d: out.is_file(), after=after)


def rendezvous(mine: Path, other: Path, timeout: float = 60.0):
    """Work that announces ``mine`` and waits for ``other``: completes only if the step that
    writes ``other`` runs at the same time."""

    def work():
        mine.write_text("here")
        deadline = time.monotonic() + timeout
        while not other.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{other} never appeared: the steps did not run side by side")
            time.sleep(0.01)

    return work


def test_independent_steps_overlap_and_dependents_wait(tmp_path):
    a_flag, b_flag = tmp_path / "a.flag", tmp_path / "b.flag"
    a, b, c = (tmp_path / f"{n}.out" for n in "abc")

    def c_reads_a_and_b():
        assert a.is_file() and b.is_file(), "c started before the steps it reads from were done"

    steps = [file_step("a", a, work=rendezvous(a_flag, b_flag)),
             file_step("b", b, work=rendezvous(b_flag, a_flag)),
             file_step("c", c, after=("a", "b"), work=c_reads_a_and_b)]
    messages: list[str] = []
    done = run_graph(steps, MarkerBook(tmp_path), jobs=2, threads=1, log_dir=tmp_path / "logs",
                     echo=messages.append, progress=False)
    assert set(done) == {"a", "b", "c"} and all(t.outcome.action == "run" for t in done.values())
    assert done["c"].started >= max(done["a"].ended, done["b"].ended)
    pids = {p.read_text() for p in (a, b, c)}
    assert len(pids) == 3 and str(os.getpid()) not in pids  # each step ran in its own child
    assert (tmp_path / "logs" / "c.log").is_file()


def test_a_rerun_reuses_finished_steps_without_running_them(tmp_path):
    out = tmp_path / "a.out"
    book = MarkerBook(tmp_path)
    run_graph([file_step("a", out)], book, jobs=2, threads=1, log_dir=tmp_path / "logs",
              echo=lambda _m: None, progress=False)

    def must_not_run():
        raise AssertionError("a finished step ran again")

    done = run_graph([file_step("a", out, work=must_not_run)], book, jobs=2, threads=1,
                     log_dir=tmp_path / "logs", echo=lambda _m: None, progress=False)
    assert done["a"].outcome.action == "reuse"


def test_a_failed_step_stops_new_ones_lets_running_ones_finish_and_names_itself(tmp_path):
    go = tmp_path / "go"

    def fail():
        go.write_text("")  # let the sibling finish only after this step has failed
        print("something went wrong in the middle")
        raise ValueError("bad input in step x")

    def wait_for_failure():
        deadline = time.monotonic() + 60
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)

    book = MarkerBook(tmp_path)
    steps = [file_step("x", tmp_path / "x.out", work=fail),
             file_step("y", tmp_path / "y.out", work=wait_for_failure),
             file_step("z", tmp_path / "z.out", after=("y",))]
    with pytest.raises(RunError) as info:
        run_graph(steps, book, jobs=2, threads=1, log_dir=tmp_path / "logs",
                  echo=lambda _m: None, progress=False)
    message = str(info.value)
    assert "step 'x'" in message and "ValueError: bad input in step x" in message
    assert "something went wrong in the middle" in message  # the tail of the step's log
    assert book.read("y").state == "done"  # the running sibling finished and is kept
    assert book.read("z") is None and not (tmp_path / "z.out").exists()  # nothing new started
    assert book.read("x").state == "running"  # a rerun redoes it


def test_a_child_that_dies_without_a_result_is_reported(tmp_path):
    steps = [file_step("k", tmp_path / "k.out", work=lambda: os._exit(3))]
    with pytest.raises(RunError, match="died without a result"):
        run_graph(steps, MarkerBook(tmp_path), jobs=2, threads=1, log_dir=tmp_path / "logs",
                  echo=lambda _m: None, progress=False)


def test_an_upstream_that_is_not_a_step_before_it_is_refused(tmp_path):
    steps = [file_step("b", tmp_path / "b.out", after=("a",)), file_step("a", tmp_path / "a.out")]
    with pytest.raises(RunError, match="reads from \\['a'\\]"):
        run_graph(steps, MarkerBook(tmp_path), jobs=2, threads=1, log_dir=tmp_path / "logs",
                  echo=lambda _m: None, progress=False)


def test_default_jobs():
    cpus = len(os.sched_getaffinity(0))
    assert default_jobs(1, all_on_cpu=True) == min(cpus, MAX_DEFAULT_JOBS)
    assert default_jobs(cpus * 2, all_on_cpu=True) == 1
    assert default_jobs(1, all_on_cpu=False) == 1
