"""A pipeline's data (genrecal.data.pipeline_data): the one implementation that extract,
train, evaluation and `genrecal run` use to generate and read a pipeline's samples."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from genrecal.data import make_synthetic_vqa, read_dataset
from genrecal.data.synthetic import GENERATOR_REVISION
from genrecal.data.pipeline_data import (SYNTHETIC_SPEC, SourceRef, ensure_synthetic,
                                               read_sources, read_split, synthetic_dir,
                                               synthetic_is_current)
from genrecal.store.errors import DatasetError, DuplicateSampleError


def spec(**changes):
    return SimpleNamespace(**{"n_train": 4, "n_test": 3, "image_size": 32, "seed": 0, **changes})


def data_config(sources=(), synthetic=None, on_error="raise"):
    return SimpleNamespace(sources=list(sources), synthetic=synthetic, on_error=on_error)


def test_synthetic_dir_is_under_the_output():
    assert synthetic_dir("runs/x").as_posix() == "runs/x/data/synthetic"


def test_ensure_synthetic_generates_once_and_again_for_another_spec(tmp_path):
    made = ensure_synthetic(spec(), tmp_path)
    assert (made.n_train, made.n_test, made.train) == (4, 3, tmp_path / "train.jsonl")
    assert json.loads((tmp_path / SYNTHETIC_SPEC).read_text()) == {
        **vars(spec()), "n_validation": 0, "jitter": 0,
        "generator_revision": GENERATOR_REVISION}
    first = made.train.stat().st_mtime_ns
    ensure_synthetic(spec(), tmp_path)
    assert made.train.stat().st_mtime_ns == first  # same spec: not regenerated
    assert synthetic_is_current(spec(), tmp_path) and not synthetic_is_current(spec(seed=1), tmp_path)
    ensure_synthetic(spec(n_train=6, seed=1), tmp_path)
    assert len(made.train.read_text().splitlines()) == 6
    assert synthetic_is_current(spec(n_train=6, seed=1), tmp_path)


def test_an_interrupted_generation_is_redone(tmp_path):
    ensure_synthetic(spec(), tmp_path)
    (tmp_path / "test.jsonl").unlink()
    assert not synthetic_is_current(spec(), tmp_path)
    ensure_synthetic(spec(), tmp_path)
    assert len((tmp_path / "test.jsonl").read_text().splitlines()) == 3


def test_an_unusable_spec_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="data.synthetic: image_size=16"):
        ensure_synthetic(spec(image_size=16), tmp_path)
    with pytest.raises(DatasetError, match=r"data.synthetic: jitter=3: must be within \[0, 2\] at "
                                           r"image_size=32 .* use a larger image or a smaller jitter"):
        ensure_synthetic(spec(jitter=3), tmp_path)
    assert not (tmp_path / SYNTHETIC_SPEC).exists()


def test_read_split_reads_sources_then_the_synthetic_set_with_folder_ids(tmp_path):
    extra = make_synthetic_vqa(tmp_path / "extra", n_train=2, n_test=0, image_size=32, seed=5)
    rows = [json.loads(line) for line in extra.train.read_text().splitlines()]
    renamed = tmp_path / "extra" / "renamed.jsonl"
    renamed.write_text("".join(json.dumps({**r, "id": f"x-{i}"}) + "\n" for i, r in enumerate(rows)))
    data = data_config([SourceRef(str(renamed), format="llava")], spec())
    read = read_split(data, "train", output_dir=tmp_path / "out")
    folder = read_dataset(synthetic_dir(tmp_path / "out"), split="train")
    assert [s.id for s in read.samples] == ["x-0", "x-1", *(s.id for s in folder.samples)]
    assert [s.content_hash for s in read.samples[2:]] == [s.content_hash for s in folder.samples]
    assert [s.id for s in read_split(data, "train", output_dir=tmp_path / "out", limit=3).samples] \
        == ["x-0", "x-1", "train-000000"]
    assert len(read_split(data, "test", output_dir=tmp_path / "out").samples) == 3


def test_read_split_without_a_source_for_the_split(tmp_path):
    with pytest.raises(DatasetError, match="no data source gives the split 'val'"):
        read_split(data_config(synthetic=spec()), "val", output_dir=tmp_path)
    with pytest.raises(DatasetError, match="split 'test'"):
        read_split(data_config(synthetic=spec(n_test=0)), "test", output_dir=tmp_path)


def test_read_sources_limits_and_refuses_duplicate_ids(tmp_path):
    made = make_synthetic_vqa(tmp_path, n_train=4, n_test=3, image_size=32)
    sources = [SourceRef(str(made.train), format="llava"),
               SourceRef(str(made.test), format="llava", split="test", limit=2)]
    assert [s.id for s in read_sources(sources).samples] == [
        "train-000000", "train-000001", "train-000002", "train-000003", "test-000000", "test-000001"]
    assert len(read_sources(sources, limit=5).samples) == 5
    with pytest.raises(DuplicateSampleError, match="'train-000000' occurs in"):
        read_sources([sources[0], sources[0]])


def test_a_set_from_an_older_generator_is_regenerated(tmp_path):
    """The record names the generator's revision: data from an older generator (say, test scenes
    that overlapped the training scenes) is not reused."""
    ensure_synthetic(spec(), tmp_path)
    record = json.loads((tmp_path / SYNTHETIC_SPEC).read_text())
    (tmp_path / SYNTHETIC_SPEC).write_text(json.dumps({**record, "generator_revision": GENERATOR_REVISION - 1}))
    assert not synthetic_is_current(spec(), tmp_path)
    ensure_synthetic(spec(), tmp_path)
    assert synthetic_is_current(spec(), tmp_path)
