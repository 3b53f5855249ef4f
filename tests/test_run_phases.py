"""Done markers of `genrecal run` (genrecal.phases): hashing, decisions, reuse / resume / redo."""

from __future__ import annotations

import json

import pytest

from genrecal.errors import RunError
from genrecal.phases import (Marker, MarkerBook, Step, config_hash, decide, output_exists,
                             remove_outputs, run_step)


def test_config_hash_is_canonical_and_covers_config_and_upstream():
    base = config_hash({"a": 1, "b": [1, 2]}, ["u1"])
    assert base == config_hash({"b": [1, 2], "a": 1}, ["u1"])  # key order does not matter
    assert len(base) == 16 and int(base, 16) >= 0
    assert base != config_hash({"a": 2, "b": [1, 2]}, ["u1"])
    assert base != config_hash({"a": 1, "b": [2, 1]}, ["u1"])
    assert base != config_hash({"a": 1, "b": [1, 2]}, ["u2"])
    assert base != config_hash({"a": 1, "b": [1, 2]}, [])


@pytest.mark.parametrize("marker, check, expected", [
    (None, True, "run"),
    (Marker("s", "other", "done"), True, "redo"),
    (Marker("s", "other", "running"), True, "redo"),
    (Marker("s", "h", "running"), True, "resume"),
    (Marker("s", "h", "done"), True, "reuse"),
    (Marker("s", "h", "done"), False, "redo"),
])
def test_decide(marker, check, expected):
    assert decide(marker, "h", lambda _details: check) == expected


def test_marker_round_trip_and_damaged_or_foreign_markers(tmp_path):
    book = MarkerBook(tmp_path)
    marker = Marker("cache", "abc", "done", 1.5, {"samples": 3})
    book.write(marker)
    assert book.read("cache") == marker
    assert book.read("missing") is None
    book.path("cache").write_text("{not json")
    assert book.read("cache").config_hash == ""  # damaged: redone, never reused
    book.path("cache").write_text(json.dumps({**marker.to_dict(), "format": 999}))
    assert book.read("cache").config_hash == ""
    with pytest.raises(RunError, match="invalid step id"):
        book.path("../escape")


class Recorder:
    """A step's run/check that records calls and writes one output file."""

    def __init__(self, out, details=None, valid=True):
        self.out, self.calls, self.valid = out, [], valid
        self.details = details or {"n": 1}

    def run(self, resume: bool) -> dict:
        self.calls.append(resume)
        self.out.write_text("made")
        return self.details

    def check(self, details: dict) -> bool:
        return self.valid and self.out.is_file() and details == self.details

    def step(self, digest: str = "h1", adopts: bool = False) -> Step:
        return Step("s", "a step", digest, (str(self.out),), self.run, self.check, adopts)


def test_run_then_reuse_without_running_again(tmp_path):
    book, rec = MarkerBook(tmp_path), Recorder(tmp_path / "out.txt")
    first = run_step(book, rec.step())
    assert (first.action, rec.calls) == ("run", [False])
    assert book.read("s").state == "done" and book.read("s").details == {"n": 1}
    again = run_step(book, rec.step())
    assert (again.action, again.reused, rec.calls) == ("reuse", True, [False])
    assert again.compute_seconds == first.compute_seconds and again.details == {"n": 1}


def test_changed_config_deletes_the_old_outputs_and_redoes(tmp_path):
    book, out = MarkerBook(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "old.bin").write_text("stale")
    book.write(Marker("s", "h-old", "done"))
    rec = Recorder(tmp_path / "out" / "new.txt")

    def run(resume):
        assert not (out / "old.bin").exists()  # removed before the step runs again
        out.mkdir(exist_ok=True)
        return rec.run(resume)

    step = Step("s", "a step", "h-new", (str(out),), run, rec.check)
    assert run_step(book, step).action == "redo"
    assert book.read("s").config_hash == "h-new"


def test_interrupted_step_resumes(tmp_path):
    book, rec = MarkerBook(tmp_path), Recorder(tmp_path / "out.txt")
    book.write(Marker("s", "h1", "running"))
    assert run_step(book, rec.step()).action == "resume"
    assert rec.calls == [True]


def test_done_step_whose_outputs_vanished_is_redone(tmp_path):
    book, rec = MarkerBook(tmp_path), Recorder(tmp_path / "out.txt")
    run_step(book, rec.step())
    (tmp_path / "out.txt").unlink()
    assert run_step(book, rec.step()).action == "redo"
    assert rec.calls == [False, False]


def test_a_failing_check_after_running_stops_and_keeps_the_running_marker(tmp_path):
    book, rec = MarkerBook(tmp_path), Recorder(tmp_path / "out.txt", valid=False)
    with pytest.raises(RunError, match="do not pass their check"):
        run_step(book, rec.step())
    assert book.read("s").state == "running"


def test_foreign_outputs_stop_the_run_unless_the_step_adopts_them(tmp_path):
    book, rec = MarkerBook(tmp_path), Recorder(tmp_path / "out.txt")
    (tmp_path / "out.txt").write_text("not ours")
    with pytest.raises(RunError, match="not made by `genrecal run`"):
        run_step(book, rec.step())
    assert (tmp_path / "out.txt").read_text() == "not ours" and rec.calls == []
    assert run_step(book, rec.step(adopts=True)).action == "run"


def test_remove_outputs_handles_files_dirs_urls_and_missing(tmp_path):
    import fsspec

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("1")
    (tmp_path / "f").write_text("2")
    with fsspec.open("memory://run-phases-test/a.txt", "w") as fh:
        fh.write("3")
    targets = [str(tmp_path / "d"), str(tmp_path / "f"), "memory://run-phases-test",
               str(tmp_path / "missing")]
    assert [output_exists(t) for t in targets] == [True, True, True, False]
    remove_outputs(targets)
    assert not any(output_exists(t) for t in targets)


def test_a_step_adopts_foreign_outputs_only_when_its_predicate_proves_them(tmp_path):
    book, rec = MarkerBook(tmp_path), Recorder(tmp_path / "out.txt")
    (tmp_path / "out.txt").write_text("not ours")
    with pytest.raises(RunError, match=r"remove them \(rm -r .*out.txt\)"):
        run_step(book, rec.step(adopts=lambda: False))
    assert rec.calls == []
    assert run_step(book, rec.step(adopts=lambda: True)).action == "run"
