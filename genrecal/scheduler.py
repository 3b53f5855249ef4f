"""Run the steps of ``genrecal run`` as a dependency graph on ``jobs`` parallel processes.

Each step names the steps whose outputs it reads (:attr:`genrecal.phases.Step.after`); a step
starts as soon as all of them are done, whatever its phase, so that independent work overlaps
(the SFT baselines train while the teacher is fine-tuned; the seeds train side by side).

A step that a rerun may reuse is settled in this process; every other one runs in a forked
child process (POSIX ``fork``: the step's closures need no pickling) that sets ``threads`` torch
threads, writes its output to ``<root>/logs/<step id>.log`` and sends its outcome back as JSON
through a pipe (nothing is unpickled). A step's markers are its own files, so children never
write the same file. (``genrecal run --jobs 1`` runs the phases in its own process instead,
:func:`genrecal.runner.run_phases`.)

A failed step: no new step starts, the running ones finish (nothing that is done is lost;
their markers let a rerun reuse them), then :class:`RunError` names the step, its error and
the tail of its log. Ctrl-C terminates the children; a rerun resumes what they committed.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from multiprocessing import connection, get_context
from pathlib import Path

from genrecal.errors import RunError
from genrecal.phases import MarkerBook, Step, StepOutcome, reused_outcome, run_step

LOGS_DIR = "logs"
#: The most parallel steps ``genrecal run`` starts by itself: each holds its models in memory.
MAX_DEFAULT_JOBS = 8
_LOG_TAIL_LINES = 30


@dataclass(frozen=True)
class Timed:
    """A step's outcome and when it ran (``time.perf_counter`` seconds of this process)."""

    outcome: StepOutcome
    started: float
    ended: float


def default_jobs(threads: int, all_on_cpu: bool) -> int:
    """Parallel steps when the user gives none: as many as the CPUs this process may use hold
    ``threads`` each (at most :data:`MAX_DEFAULT_JOBS`), when every model of the run is on the
    CPU (tiny or CPU pipelines); else 1 (accelerators and big models are not shared between
    processes)."""
    if not all_on_cpu:
        return 1
    return max(1, min(MAX_DEFAULT_JOBS, len(os.sched_getaffinity(0)) // max(1, threads)))


def run_graph(steps: Sequence[Step], book: MarkerBook, *, jobs: int, threads: int,
              log_dir: Path, echo: Callable[[str], None] = print,
              progress: bool = True) -> dict[str, Timed]:
    """Run (or reuse) every step, each after the steps it reads from, at most ``jobs`` at a
    time; the outcomes by step id."""
    _check_graph(steps)
    return _Scheduler(steps, book, jobs, threads, log_dir, echo, progress).run()


def _check_graph(steps: Sequence[Step]) -> None:
    """Every upstream id is a step given before the step that reads it (a graph in order)."""
    seen: set[str] = set()
    for step in steps:
        missing = [a for a in step.after if a not in seen]
        if missing:
            raise RunError(f"step {step.id!r} reads from {missing}, which are not steps run before "
                           "it; this is a bug in genrecal's run plan, please report it")
        seen.add(step.id)


class _Scheduler:
    """The parent's loop: start ready steps up to ``jobs``, collect finished children."""

    def __init__(self, steps, book, jobs, threads, log_dir, echo, progress):
        self.pending, self.book, self.jobs, self.threads = list(steps), book, jobs, threads
        self.log_dir, self.echo, self.progress = Path(log_dir), echo, progress
        self.done: dict[str, Timed] = {}
        self.running: dict[connection.Connection, tuple[Step, object, float]] = {}
        self.failures: list[str] = []

    def run(self) -> dict[str, Timed]:
        from tqdm.auto import tqdm

        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.bar = tqdm(total=len(self.pending), desc="steps", unit="step", dynamic_ncols=True,
                        disable=not self.progress)
        try:
            while self.pending or self.running:
                if not self.failures:
                    self._start_ready()
                if not self.running:
                    break
                self._collect(connection.wait(list(self.running)))
        except BaseException:
            self._terminate()
            raise
        finally:
            self.bar.close()
        if self.failures:
            raise RunError("\n\n".join(self.failures) + "\n\nThe steps that finished are kept; "
                           "fix the cause and rerun to go on from them.")
        return self.done

    def _start_ready(self) -> None:
        settled = True
        while settled:  # a reused step may make others ready: look again
            settled = False
            for step in list(self.pending):
                if len(self.running) >= self.jobs:
                    return
                if not all(a in self.done for a in step.after):
                    continue
                self.pending.remove(step)
                started = time.perf_counter()
                reused = reused_outcome(self.book, step)
                if reused is not None:
                    self._finish(step, reused, started)
                    settled = True
                else:
                    self._fork(step, started)

    def _fork(self, step: Step, started: float) -> None:
        receive, send = get_context("fork").Pipe(duplex=False)
        log = self.log_dir / f"{step.id}.log"
        sys.stdout.flush()  # the child inherits the buffers: flush them first, or they print twice
        sys.stderr.flush()
        process = get_context("fork").Process(target=_child, args=(step, self.book, send, log,
                                                                   self.threads),
                                              name=f"genrecal-step-{step.id}", daemon=False)
        process.start()
        send.close()
        self.running[receive] = (step, process, started)
        self.bar.set_postfix_str(f"running: {', '.join(s.id for s, _, _ in self.running.values())}")

    def _collect(self, ready: list) -> None:
        for conn in ready:
            step, process, started = self.running.pop(conn)
            try:
                message = json.loads(conn.recv_bytes().decode("utf-8"))
            except (EOFError, OSError, ValueError):
                message = {"ok": False, "error": "the step's process died without a result "
                           "(killed? out of memory?)"}
            conn.close()
            process.join()
            if message.get("ok"):
                self._finish(step, StepOutcome(**message["outcome"]), started)
            else:
                self.bar.update(1)
                log = self.log_dir / f"{step.id}.log"
                self.failures.append(f"step {step.id!r} ({step.title}) failed: {message['error']}"
                                     f"\n--- last lines of {log} ---\n{_tail(log)}")
                self.echo(f"    {step.title}: FAILED (log: {log})")

    def _finish(self, step: Step, outcome: StepOutcome, started: float) -> None:
        self.done[step.id] = Timed(outcome, started, time.perf_counter())
        self.bar.update(1)
        if not outcome.reused:
            self.echo(f"    {step.title}: {outcome.action} in {outcome.seconds:.1f} s")

    def _terminate(self) -> None:
        for conn, (_step, process, _started) in self.running.items():
            process.terminate()
            process.join()
            conn.close()
        self.running.clear()


def _child(step: Step, book: MarkerBook, send, log: Path, threads: int) -> None:
    """A forked child: run one step with its output in ``log``; send the outcome as JSON."""
    import torch

    with open(log, "w", encoding="utf-8") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
    # Python-level streams too (the parent's may be replaced, e.g. captured by a test runner).
    sys.stdout = open(1, "w", encoding="utf-8", buffering=1, closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", buffering=1, closefd=False)
    torch.set_num_threads(threads)
    try:
        message = {"ok": True, "outcome": asdict(run_step(book, step))}
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        traceback.print_exc()
        message = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.flush()
    sys.stderr.flush()
    send.send_bytes(json.dumps(message, default=str).encode("utf-8"))
    send.close()


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-_LOG_TAIL_LINES:])
