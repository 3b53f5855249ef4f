"""The teacher pass on bad input, end to end with a tiny real teacher: nothing valid is lost,
and whatever stops a run says what, where and how to fix it, in one line with exit status 2.

- a duplicated sample id: the later row is a recorded skip, the first row's sample is cached,
  also after a crash and a resume;
- ``--out`` naming a file: refused before the teacher is built or loaded;
- every sample skipped: an error naming the reasons, no manifest, and a rerun is not blocked.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from extract_support import make_pipeline, pipeline_dict, write_pipelines
from genrecal.cli import EXIT_USER_ERROR, app
from genrecal.extract.errors import NothingExtractedError
from genrecal.extract.job import job_from_pipeline
from genrecal.data.sample import content_hash
from genrecal.store.reader import CacheReader
from genrecal.store.validate import validate_cache

KIND = "qwen2_vl"


def _png(path: Path, colour: tuple[int, int, int]) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def _row(sample_id: str, image: str, answer: str) -> dict:
    return {"id": sample_id, "image": image,
            "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"},
                              {"from": "gpt", "value": answer}]}


def _dataset(root: Path, rows: list[dict]) -> Path:
    """A LLaVA JSONL file under ``root/data`` with red / green / blue images beside it."""
    (root / "data" / "img").mkdir(parents=True, exist_ok=True)
    for name, colour in [("red", (255, 0, 0)), ("green", (0, 255, 0)), ("blue", (0, 0, 255))]:
        _png(root / "data" / "img" / f"{name}.png", colour)
    path = root / "data" / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pipeline(teacher_dir: Path, root: Path, data_file: Path, **cache) -> dict:
    data = {"sources": [{"path": str(data_file), "format": "llava"}], "on_error": "skip"}
    return pipeline_dict(teacher_dir, KIND, root, data=data, on_error="skip", **cache)


def _invoke(pipes: Path, *args: str):
    return CliRunner().invoke(app, ["extract", "t", "--file", str(pipes), *args])


def _one_line_error(result) -> str:
    assert result.exit_code == EXIT_USER_ERROR, result.output
    assert "Traceback" not in result.output
    last = result.stderr.rstrip("\n").rsplit("\n", 1)[-1].rsplit("\r", 1)[-1]  # after progress bars
    assert last.startswith("genrecal: error: ") and result.stderr.endswith(last + "\n")
    return last


DUPLICATED = [_row("a", "img/red.png", "red"), _row("x", "img/green.png", "green"),
              _row("x", "img/blue.png", "blue"), _row("b", "img/blue.png", "blue")]


def _first_x_hash(root: Path) -> str:
    from genrecal.data.sample import Turn

    turns = (Turn("user", (0, "What colour is it?")), Turn("assistant", ("green",)))
    return content_hash(turns, [(root / "data" / "img" / "green.png").read_bytes()])


# ----------------------------------------------------------------------------- duplicate ids


def test_duplicate_sample_id_is_a_recorded_skip_and_the_first_row_is_cached(tiny_vlm_dir,
                                                                            tmp_path):
    data = _dataset(tmp_path, DUPLICATED)
    pipes = write_pipelines(tmp_path / "pipelines.yaml",
                            {"t": _pipeline(tiny_vlm_dir(KIND), tmp_path, data)})
    result = _invoke(pipes)
    assert result.exit_code == 0, result.output
    assert "extracted 3 samples" in result.output and "cache holds 3 samples, 1 skipped" in result.output
    reader = CacheReader(tmp_path / "cache")
    assert sorted(reader.sample_ids()) == ["a", "b", "x"]
    assert reader.get("x").content_hash == _first_x_hash(tmp_path)
    (skip,) = reader.manifest.skipped
    assert skip.sample_id == "x#row2" and skip.file == str(data)
    assert "duplicate id 'x'" in skip.reason and "row 2" in skip.reason
    assert validate_cache(str(tmp_path / "cache")) == []
    again = _invoke(pipes, "--resume")
    assert again.exit_code == 0, again.output
    assert "extracted 0 samples (0 skipped, 3 already cached)" in again.output
    assert sorted(CacheReader(tmp_path / "cache").sample_ids()) == ["a", "b", "x"]


def test_resume_after_a_crash_keeps_the_first_sample_of_a_duplicated_id(tiny_vlm_dir, tmp_path,
                                                                        monkeypatch):
    import genrecal.extract.pipeline as pipeline

    data = _dataset(tmp_path, DUPLICATED)
    pipe = make_pipeline("t", _pipeline(tiny_vlm_dir(KIND), tmp_path, data))
    job = job_from_pipeline(pipe, window=1).with_overrides(progress=False)
    real = pipeline.batch_sample_features

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash in the first forward")

    monkeypatch.setattr(pipeline, "batch_sample_features", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.run_extract(job)
    assert not (tmp_path / "cache" / "manifest.json").exists()
    monkeypatch.setattr(pipeline, "batch_sample_features", real)
    result = pipeline.run_extract(job.with_overrides(resume=True))
    assert (result.written, result.already) == (3, 0)
    reader = CacheReader(result.out)
    assert sorted(reader.sample_ids()) == ["a", "b", "x"]
    assert reader.get("x").content_hash == _first_x_hash(tmp_path)
    assert [s.sample_id for s in reader.manifest.skipped] == ["x#row2"]
    assert validate_cache(result.out) == []


# ----------------------------------------------------------------------------- output location


@pytest.mark.parametrize("under", ["", "sub/cache"])
def test_out_naming_a_file_is_refused_before_the_teacher_is_built(tmp_path, under):
    data = _dataset(tmp_path, DUPLICATED[:1])
    teacher_dir = tmp_path / "never-built-teacher"
    pipes = write_pipelines(tmp_path / "pipelines.yaml",
                            {"t": _pipeline(teacher_dir, tmp_path, data)})
    blocker = tmp_path / "a-file"
    blocker.write_text("not a cache")
    out = blocker / under if under else blocker
    message = _one_line_error(_invoke(pipes, "--out", str(out)))
    assert str(out) in message
    assert ("is a file" in message) if not under else (f"is under {blocker}, a file" in message)
    assert "directory" in message and "Fix:" in message
    assert not teacher_dir.exists()
    assert blocker.read_text() == "not a cache"


# ----------------------------------------------------------------------------- all skipped


def test_a_run_that_skips_every_sample_fails_and_commits_nothing(tiny_vlm_dir, tmp_path):
    rows = [_row("m1", "img/missing.png", "red"), _row("m2", "img/missing.png", "red"),
            _row("e1", "img/red.png", " ")]
    data = _dataset(tmp_path, rows)
    pipes = write_pipelines(tmp_path / "pipelines.yaml",
                            {"t": _pipeline(tiny_vlm_dir(KIND), tmp_path, data)})
    message = _one_line_error(_invoke(pipes))
    assert "all 3 sample(s) were skipped" in message and "Nothing was committed" in message
    assert "'m1'" in message and "not found" in message and str(data) in message
    assert "Fix:" in message
    cache = tmp_path / "cache"
    assert not (cache / "manifest.json").exists() and not (cache / "ranks").exists()

    # the data fixed, a plain rerun (no --resume) extracts everything
    _dataset(tmp_path, [_row("m1", "img/red.png", "red"), _row("m2", "img/green.png", "green"),
                        _row("e1", "img/red.png", "red")])
    ok = _invoke(pipes)
    assert ok.exit_code == 0, ok.output
    assert sorted(CacheReader(cache).sample_ids()) == ["e1", "m1", "m2"]


def test_all_skipped_by_the_teacher_pass_is_an_error_with_the_skips(tiny_vlm_dir, tmp_path):
    import genrecal.extract.pipeline as pipeline

    data = _dataset(tmp_path, DUPLICATED)
    pipe = make_pipeline("t", _pipeline(tiny_vlm_dir(KIND), tmp_path, data, max_length=8))
    job = job_from_pipeline(pipe).with_overrides(progress=False)
    with pytest.raises(NothingExtractedError, match="all 4 sample") as info:
        pipeline.run_extract(job)
    assert sorted(s.sample_id for s in info.value.skipped) == ["a", "b", "x", "x#row2"]
    assert not (tmp_path / "cache" / "manifest.json").exists()
