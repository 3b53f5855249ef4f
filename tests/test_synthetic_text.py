"""The text-only synthetic QA set (genrecal.data.synthetic_text) and text-only datasets through
the readers and the pipeline data (issue 13)."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from genrecal.data.pipeline_data import SYNTHETIC_SPEC, ensure_synthetic, read_split
from genrecal.data.readers import read_dataset
from genrecal.data.synthetic import ShapeSpec, is_test_scene, questions_for, scene_key
from genrecal.data.synthetic_text import (PLACES, SCENE_SIZE, describe, make_synthetic_text, place_of,
                                          text_corpus_lines)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_arguments_give_identical_files(tmp_path):
    a = make_synthetic_text(tmp_path / "a", n_train=40, n_test=12, seed=3)
    b = make_synthetic_text(tmp_path / "b", n_train=40, n_test=12, seed=3)
    assert a.train.read_bytes() == b.train.read_bytes() and a.test.read_bytes() == b.test.read_bytes()
    other = make_synthetic_text(tmp_path / "c", n_train=40, n_test=12, seed=4)
    assert other.train.read_bytes() != a.train.read_bytes()
    assert not (tmp_path / "a" / "images").exists()


def test_train_and_test_scenes_are_disjoint(tmp_path):
    made = make_synthetic_text(tmp_path, n_train=400, n_test=100, seed=0)
    train, test = _rows(made.train), _rows(made.test)
    assert all(not is_test_scene(r["scene"]) for r in train)
    assert all(is_test_scene(r["scene"]) for r in test)
    train_keys = {scene_key(r["scene"]) for r in train}
    assert not train_keys & {scene_key(r["scene"]) for r in test}
    # the description is a function of the scene (up to object order): no test description
    # lists the same objects in the same places as a training one
    def objects(row):
        return frozenset(re.findall(r"a (\w+ \w+) at the ([a-z ]+?)[,.]",
                                    row["conversations"][0]["value"].split("\n")[0]))
    assert not {objects(r) for r in train} & {objects(r) for r in test}


def test_every_answer_follows_from_the_description(tmp_path):
    made = make_synthetic_text(tmp_path, n_train=200, n_test=0, seed=1, multi_turn_fraction=0.5)
    types = set()
    for row in _rows(made.train):
        scene = tuple(ShapeSpec(**o) for o in row["scene"])
        first = row["conversations"][0]["value"]
        assert first.startswith(describe(scene) + "\n") and "<image>" not in first
        expected = {qa.question: qa.answer for qa in questions_for(scene, SCENE_SIZE)}
        turns = row["conversations"]
        assert len(turns) == 2 * len(row["types"])
        for human, gpt in zip(turns[::2], turns[1::2]):
            question = human["value"].split("\n")[-1].removesuffix(" Answer with one word.")
            assert expected[question] == gpt["value"]
        types |= set(row["types"])
    assert types == {"colour", "shape", "count", "position"}


def test_places_and_corpus():
    assert place_of(ShapeSpec("circle", "red", 16, 16, 10)) == "top left"
    assert place_of(ShapeSpec("circle", "red", 48, 48, 10)) == "bottom right"
    assert place_of(ShapeSpec("square", "blue", 16, 32, 11)) == "left"
    assert place_of(ShapeSpec("square", "blue", 32, 48, 11)) == "bottom"
    lines = text_corpus_lines(0)
    assert sorted(lines) == sorted(text_corpus_lines(5)) and len(lines) == 3 * 4 * len(PLACES)


def test_text_rows_read_as_samples_without_images(tmp_path):
    made = make_synthetic_text(tmp_path, n_train=8, n_test=4, seed=0)
    read = read_dataset(made.train, format="llava")
    assert len(read.samples) == 8 and not read.skips
    assert all(s.images == () for s in read.samples)
    assert read.samples[0].turns[0].text.startswith("Scene: ")
    # the same rows in the messages format read the same turns
    messages = tmp_path / "messages.jsonl"
    with messages.open("w") as fh:
        for row in _rows(made.train):
            msgs = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                    for t in row["conversations"]]
            fh.write(json.dumps({"id": row["id"], "messages": msgs}) + "\n")
    again = read_dataset(messages, format="messages")
    assert [s.turns for s in again.samples] == [s.turns for s in read.samples]
    assert all(s.images == () for s in again.samples)


def test_pipeline_data_generates_the_text_set(tmp_path):
    spec = SimpleNamespace(n_train=10, n_test=5, image_size=32, seed=0, modality="text")
    made = ensure_synthetic(spec, tmp_path / "syn")
    record = json.loads((tmp_path / "syn" / SYNTHETIC_SPEC).read_text())
    assert record["modality"] == "text" and made.n_train == 10
    before = made.train.stat().st_mtime_ns
    ensure_synthetic(spec, tmp_path / "syn")  # current: kept
    assert made.train.stat().st_mtime_ns == before
    data = SimpleNamespace(sources=[], synthetic=spec, on_error="raise")
    test = read_split(data, "test", output_dir=tmp_path / "out")
    assert len(test.samples) == 5 and all(not s.images for s in test.samples)
    # the image set of the same numbers is another set: asking for it regenerates
    image_spec = SimpleNamespace(n_train=10, n_test=5, image_size=32, seed=0, modality="image")
    ensure_synthetic(image_spec, tmp_path / "syn")
    assert "modality" not in json.loads((tmp_path / "syn" / SYNTHETIC_SPEC).read_text())
    assert (tmp_path / "syn" / "images").is_dir()


@pytest.mark.parametrize("bad", [dict(n_train=-1), dict(multi_turn_fraction=2.0)])
def test_bad_arguments(tmp_path, bad):
    with pytest.raises(ValueError):
        make_synthetic_text(tmp_path, **{"n_train": 4, "n_test": 2, **bad})
