"""Done markers of ``genrecal run``: which steps of a run a rerun may reuse.

A run is a sequence of steps (generate the data, build a model, fine-tune the teacher, extract
the cache, train one seed, evaluate one model...). Each step has an id, the *config hash* of
everything that determines its outputs, the outputs it writes, a ``run`` function and a
``check`` of its outputs. Its marker ``<pipeline output>/phases/<step id>.json`` records::

    {"format": 1, "step": "cache", "config_hash": "3f0c...", "state": "done",
     "seconds": 12.3, "details": {...}}

The config hash (:func:`config_hash`) covers the step's own config and the hashes of the steps
it reads from, so a change anywhere upstream invalidates every step downstream of it.

What a step does on a (re)run (:func:`decide`):

* no marker: ``run``. Outputs that exist already were not made by a run of this pipeline: the
  run stops, names them and says how to go on (nothing is deleted that genrecal run did not
  make), unless the step ``adopts`` them: always, because its own ``run`` verifies them (the
  synthetic data), or when a predicate proves them to be what the step would write (a tiny
  model that ``genrecal extract`` built from the same spec);
* a marker with another config hash: ``redo``: the old outputs are deleted, the step runs anew;
* a ``running`` marker with the same hash (an interrupted run): ``resume`` (the trainer and the
  teacher pass continue from what they committed);
* a ``done`` marker with the same hash whose outputs pass ``check``: ``reuse``, nothing runs;
* a ``done`` marker whose outputs fail ``check`` (deleted, damaged): ``redo``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from genrecal.errors import RunError
from genrecal.common.atomic import write_text_atomic

#: Version of the marker format and of the run's step semantics; bumping it redoes every step.
RUN_FORMAT = 1
MARKERS_DIR = "phases"
_STEP_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

Action = Literal["run", "redo", "resume", "reuse"]
State = Literal["running", "done"]


def config_hash(config: Any, upstream: Sequence[str] = ()) -> str:
    """SHA-256 (hex, 16 digits) of ``config`` (JSON-serialisable) and the upstream hashes."""
    payload = {"format": RUN_FORMAT, "config": config, "upstream": list(upstream)}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Marker:
    """The record of one step: its config hash, whether it finished, its time and results."""

    step: str
    config_hash: str
    state: State
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": RUN_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Marker":
        if data.get("format") != RUN_FORMAT or data.get("state") not in ("running", "done"):
            raise ValueError(f"format {data.get('format')!r}, state {data.get('state')!r}")
        return cls(step=str(data["step"]), config_hash=str(data["config_hash"]),
                   state=data["state"], seconds=float(data.get("seconds", 0.0)),
                   details=dict(data.get("details") or {}))


class MarkerBook:
    """The markers of one pipeline output directory (``<root>/phases/``)."""

    def __init__(self, root: str | Path):
        self.dir = Path(root) / MARKERS_DIR

    def path(self, step: str) -> Path:
        if not _STEP_ID.fullmatch(step):
            raise RunError(f"invalid step id {step!r}: use letters, digits, '.', '_' and '-'")
        return self.dir / f"{step}.json"

    def read(self, step: str) -> Marker | None:
        """The step's marker; None if it has none. A damaged marker reads as a marker with no
        config hash (the step is redone: the run made its outputs)."""
        path = self.path(step)
        if not path.is_file():
            return None
        try:
            return Marker.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError):
            return Marker(step=step, config_hash="", state="running")

    def write(self, marker: Marker) -> Path:
        """Write atomically (a killed write leaves the previous marker)."""
        return write_text_atomic(self.path(marker.step),
                                 json.dumps(marker.to_dict(), indent=1, sort_keys=True) + "\n")


def decide(marker: Marker | None, wanted_hash: str, check: Callable[[dict], bool]) -> Action:
    """What to do with a step whose current config hash is ``wanted_hash`` (module docstring)."""
    if marker is None:
        return "run"
    if marker.config_hash != wanted_hash:
        return "redo"
    if marker.state == "running":
        return "resume"
    return "reuse" if check(marker.details) else "redo"


@dataclass(frozen=True)
class Step:
    """One step of a run.

    outputs: paths or fsspec URLs the step writes (deleted before a redo); run(resume) does
    the work and returns the details to record; check(details) tells whether the recorded
    outputs are still complete and valid; adopts: existing outputs without a marker are left
    to ``run`` instead of stopping the run: True (``run`` verifies them) or a predicate that
    tells whether they are exactly what the step would write; after: the ids of the steps
    whose outputs it reads (they must be done before it starts; :mod:`genrecal.scheduler`).
    """

    id: str
    title: str
    config_hash: str
    outputs: tuple[str, ...]
    run: Callable[[bool], dict[str, Any]]
    check: Callable[[dict[str, Any]], bool]
    adopts: bool | Callable[[], bool] = False
    after: tuple[str, ...] = ()

    def adopts_existing(self) -> bool:
        return self.adopts() if callable(self.adopts) else bool(self.adopts)


@dataclass(frozen=True)
class StepOutcome:
    """What happened to a step in this run: the action, the seconds it took in this run, the
    seconds it took when it was computed (this run or an earlier one) and its details."""

    step: str
    title: str
    action: Action
    seconds: float
    compute_seconds: float
    details: dict[str, Any]

    @property
    def reused(self) -> bool:
        return self.action == "reuse"


def reused_outcome(book: MarkerBook, step: Step) -> StepOutcome | None:
    """The outcome of ``step`` if a rerun may reuse it as it is (:func:`decide`), else None."""
    started = time.perf_counter()
    marker = book.read(step.id)
    if decide(marker, step.config_hash, step.check) != "reuse":
        return None
    return StepOutcome(step.id, step.title, "reuse", time.perf_counter() - started,
                       marker.seconds, marker.details)


def run_step(book: MarkerBook, step: Step) -> StepOutcome:
    """Reuse, resume, redo or run ``step`` (see :func:`decide`) and record its marker."""
    started = time.perf_counter()
    marker = book.read(step.id)
    action = decide(marker, step.config_hash, step.check)
    if action == "reuse":
        return StepOutcome(step.id, step.title, action, time.perf_counter() - started,
                           marker.seconds, marker.details)
    if action == "redo":
        remove_outputs(step.outputs)
    elif action == "run" and not step.adopts_existing():
        _refuse_foreign(step)
    book.write(Marker(step.id, step.config_hash, "running"))
    details = step.run(action == "resume")
    if not step.check(details):
        raise RunError(f"step {step.id!r} ({step.title}) finished but its outputs "
                       f"{list(step.outputs)} do not pass their check; see the messages above")
    seconds = time.perf_counter() - started
    book.write(Marker(step.id, step.config_hash, "done", seconds, details))
    return StepOutcome(step.id, step.title, action, seconds, seconds, details)


def _refuse_foreign(step: Step) -> None:
    found = [out for out in step.outputs if output_exists(out)]
    if found:
        commands = "; ".join(f"rm -r {out}" for out in found if "://" not in out and "::" not in out)
        raise RunError(f"step {step.id!r} ({step.title}) would write {found}, which already "
                       "exist(s) but were not made by `genrecal run` of this pipeline (no marker "
                       "in its phases/ directory), e.g. by `genrecal extract` or `genrecal train` "
                       "of the same pipeline, and are not provably what this step would write. "
                       "genrecal run deletes nothing it did not make. To go on, remove them"
                       f"{f' ({commands})' if commands else ''} and rerun, or point the pipeline's "
                       "`output` (and cache.location) at another directory")


def output_exists(location: str) -> bool:
    """Whether a local path or fsspec URL exists."""
    if "://" not in location and "::" not in location:
        return os.path.lexists(location)
    import fsspec

    fs, path = fsspec.core.url_to_fs(location)
    return fs.exists(path)


def remove_outputs(locations: Sequence[str]) -> None:
    """Delete local paths (files or directories) or fsspec URLs, if they exist."""
    for location in locations:
        if "://" in location or "::" in location:
            import fsspec

            fs, path = fsspec.core.url_to_fs(location)
            if fs.exists(path):
                fs.rm(path, recursive=True)
        elif os.path.isdir(location) and not os.path.islink(location):
            shutil.rmtree(location)
        elif os.path.lexists(location):
            os.unlink(location)
