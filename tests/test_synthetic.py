"""Tests for genrecal.data.synthetic: determinism, sizes, and answers checked from pixels."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genrecal.data.readers import read_dataset
from genrecal.data.synthetic import (
    COLOURS, INSTRUCTION, MAX_COUNT, PLURALS, POSITIONS, QUESTION_TYPES, SHAPES, ShapeSpec,
    TEST_SCENE_FRACTION, SyntheticVQA, corpus_lines, is_test_scene, make_synthetic_vqa, max_jitter,
    position_centre, questions_for, scene_key, scene_side)

SIZE = 48


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> SyntheticVQA:
    out = tmp_path_factory.mktemp("synth")
    return make_synthetic_vqa(out, n_train=40, n_test=12, image_size=SIZE, seed=3,
                              multi_turn_fraction=0.5)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------ corpus lines


def test_corpus_lines_deterministic_and_cover_vocabulary():
    lines = corpus_lines()
    assert lines == corpus_lines(0) and all(isinstance(x, str) and x for x in lines)
    assert corpus_lines(1) != lines
    text = " ".join(lines)
    for word in [*SHAPES, *PLURALS.values(), *COLOURS, *POSITIONS, "How many", "Answer"]:
        assert word in text
    for n in range(1, MAX_COUNT + 1):
        assert str(n) in lines


def test_corpus_lines_cover_every_generated_question(synth):
    lines = set(corpus_lines())
    for r in rows(synth.train):
        for turn in r["conversations"]:
            text = turn["value"].replace("<image>\n", "").replace(f" {INSTRUCTION}", "")
            assert text in lines


# ------------------------------------------------------------------ files, sizes, determinism


def test_split_sizes_and_balanced_types(synth):
    train, test = rows(synth.train), rows(synth.test)
    assert (len(train), len(test)) == (synth.n_train, synth.n_test) == (40, 12)
    assert Counter(r["type"] for r in train) == {t: 10 for t in QUESTION_TYPES}
    assert len({r["id"] for r in train + test}) == 52
    for r in train + test:
        assert r["types"][0] == r["type"]
        assert len(r["types"]) == sum(t["from"] == "gpt" for t in r["conversations"])
        assert (synth.root / r["image"]).is_file()


def _file_bytes(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_deterministic_for_a_seed(tmp_path):
    a = make_synthetic_vqa(tmp_path / "a", n_train=8, n_test=4, image_size=32, seed=5)
    b = make_synthetic_vqa(tmp_path / "b", n_train=8, n_test=4, image_size=32, seed=5)
    c = make_synthetic_vqa(tmp_path / "c", n_train=8, n_test=4, image_size=32, seed=6)
    assert _file_bytes(a.root) == _file_bytes(b.root)
    assert _file_bytes(a.root) != _file_bytes(c.root)
    assert rows(a.train) != rows(a.test)


# ------------------------------------------------------------------ disjoint scenes


def test_demo_splits_are_disjoint_scenes(tmp_path):
    """The demo's sets (teacher: 1024 train; student: first 128 + 200 test; one generator seed):
    no test image shows a scene of any train image, and the shared prefix stays shared."""
    teacher = make_synthetic_vqa(tmp_path / "t", n_train=1024, n_test=0, image_size=32, seed=0)
    student = make_synthetic_vqa(tmp_path / "s", n_train=128, n_test=200, image_size=32, seed=0)
    train = rows(teacher.train)
    test = rows(student.test)
    assert rows(student.train) == train[:128]
    train_keys = {scene_key(r["layout"]) for r in train}
    assert not train_keys & {scene_key(r["layout"]) for r in test}  # nor moved copies of one
    assert not {scene_key(r["scene"]) for r in train} & {scene_key(r["scene"]) for r in test}
    assert not any(is_test_scene(r["layout"]) for r in train)
    assert all(is_test_scene(r["layout"]) for r in test)
    # every question type (and, for position, every answer) is still asked on unseen scenes
    assert Counter(r["type"] for r in test) == {t: 50 for t in QUESTION_TYPES}
    positions = {r["conversations"][1]["value"] for r in test if r["type"] == "position"}
    assert positions == set(POSITIONS)


def test_scene_split_ignores_seed_sizes_and_object_order(tmp_path):
    a = make_synthetic_vqa(tmp_path / "a", n_train=4, n_test=30, image_size=32, seed=1)
    b = make_synthetic_vqa(tmp_path / "b", n_train=60, n_test=10, image_size=32, seed=1)
    assert rows(b.test) == rows(a.test)[:10]  # the test split does not depend on n_train
    other_seed = make_synthetic_vqa(tmp_path / "c", n_train=60, n_test=0, image_size=32, seed=2)
    assert not any(is_test_scene(r["layout"]) for r in rows(other_seed.train))
    scene = (ShapeSpec("circle", "red", 8, 8, 5), ShapeSpec("square", "blue", 24, 8, 5))
    assert scene_key(scene) == scene_key(scene[::-1])
    assert scene_key(scene) == scene_key([vars(o) for o in scene])
    assert is_test_scene(scene) == is_test_scene(scene[::-1])
    # the held-out share of the whole 2-3 object scene space is about TEST_SCENE_FRACTION
    cells = [(8, 8), (24, 8), (8, 24), (24, 24)]
    scenes = [(ShapeSpec(s1, c1, *cells[0], 5), ShapeSpec(s2, c2, *cells[1], 5))
              for s1 in SHAPES for s2 in SHAPES if s1 != s2
              for c1 in COLOURS for c2 in COLOURS if c1 != c2]
    share = sum(map(is_test_scene, scenes)) / len(scenes)
    assert abs(share - TEST_SCENE_FRACTION) < 0.1


def test_validation_split_draws_its_own_scenes(tmp_path):
    """n_validation > 0 writes validation.jsonl from the validation side of the scene space:
    no validation scene is a train or test scene, for any seed; without it there is no file and
    the train and test splits are unchanged."""
    made = make_synthetic_vqa(tmp_path / "v", n_train=40, n_test=20, n_validation=20,
                              image_size=32, seed=3)
    plain = make_synthetic_vqa(tmp_path / "p", n_train=40, n_test=20, image_size=32, seed=3)
    assert not (tmp_path / "p" / "validation.jsonl").exists() and made.n_validation == 20
    assert rows(made.train) == rows(plain.train) and rows(made.test) == rows(plain.test)
    validation = rows(made.validation)
    assert len(validation) == 20 and all(r["id"].startswith("validation-") for r in validation)
    assert {scene_side(r["layout"]) for r in validation} == {"validation"}
    keys = {split: {scene_key(r["layout"]) for r in rows(path)}
            for split, path in (("train", made.train), ("validation", made.validation),
                                ("test", made.test))}
    assert not keys["validation"] & keys["train"] and not keys["validation"] & keys["test"]
    assert SyntheticVQA.from_dict(made.to_dict()) == made


def test_multi_turn_fraction_extremes(tmp_path):
    single = make_synthetic_vqa(tmp_path / "s", n_train=12, n_test=0, image_size=32,
                                multi_turn_fraction=0.0)
    multi = make_synthetic_vqa(tmp_path / "m", n_train=12, n_test=0, image_size=32,
                               multi_turn_fraction=1.0)
    assert all(len(r["types"]) == 1 for r in rows(single.train))
    assert all(len(r["types"]) >= 2 for r in rows(multi.train))
    assert rows(single.test) == []


def test_to_dict_round_trip(synth):
    assert SyntheticVQA.from_dict(json.loads(json.dumps(synth.to_dict()))) == synth


# ------------------------------------------------------------------ jitter


def test_max_jitter_keeps_every_object_in_place_at_every_size():
    """max_jitter's promise, at the extreme offsets, for every image size the config accepts
    from 32 px: objects inside the image, one white pixel at least between neighbouring grid
    cells' objects, a lone object's side (or corner) unchanged."""
    from genrecal.data.synthetic import _grid_radius, _position_radius, position_of

    for size in range(32, 1025):
        j = max_jitter(size)
        assert j >= 2, size
        r, rp = _grid_radius(size), _position_radius(size)
        lo, hi = size // 4, (3 * size) // 4
        assert lo - j - r >= 0 and hi + j + r <= size - 1, size
        assert (hi - j - r) - (lo + j + r) >= 2, size  # a white pixel between neighbours
        for place in POSITIONS:
            x, y = position_centre(place, size)
            for dx in (-j, j):
                for dy in (-j, j):
                    obj = ShapeSpec("circle", "red", x + dx, y + dy, rp)
                    assert 0 <= obj.x - rp and obj.x + rp <= size - 1, (size, place)
                    assert 0 <= obj.y - rp and obj.y + rp <= size - 1, (size, place)
                    assert position_of(obj, size) == place, (size, place, dx, dy)
                    corner = ShapeSpec("circle", "red", lo + dx, lo + dy, r)
                    assert position_of(corner, size) is None, (size, dx, dy)


def test_jitter_comes_after_the_split(tmp_path):
    """Each row records its layout (objects at their places) and its scene (as drawn): the
    same objects, each moved by at most the jitter; the split is the layout's, so the test
    split holds no moved copy of a training layout."""
    made = make_synthetic_vqa(tmp_path, n_train=300, n_test=100, image_size=32, seed=4, jitter=2)
    for r in rows(made.train) + rows(made.test):
        assert len(r["scene"]) == len(r["layout"])
        for o, p in zip(r["scene"], r["layout"]):
            assert (o["shape"], o["colour"], o["r"]) == (p["shape"], p["colour"], p["r"])
            assert abs(o["x"] - p["x"]) <= made.jitter and abs(o["y"] - p["y"]) <= made.jitter
    assert scene_side(rows(made.test)[0]["layout"]) == "test"
    train = {scene_key(r["layout"]) for r in rows(made.train)}
    assert not train & {scene_key(r["layout"]) for r in rows(made.test)}
    assert sum(r["scene"] != r["layout"] for r in rows(made.train)) > 250  # jitter is used


@pytest.mark.parametrize("size", [32, 48, 64])
def test_jittered_objects_stay_apart_and_inside(tmp_path, size):
    """With jitter = max_jitter every object moves by up to that many pixels per axis: objects
    of a scene never touch (at least one white pixel between their boxes), every object stays in
    the image, and the jitter is really used (both extremes occur)."""
    made = make_synthetic_vqa(tmp_path, n_train=200, n_test=40, image_size=size, seed=2,
                              jitter=max_jitter(size))
    assert made.jitter == max_jitter(size) >= 2
    centres = {*((x, y) for x in (size // 4, 3 * size // 4) for y in (size // 4, 3 * size // 4)),
               *(position_centre(p, size) for p in POSITIONS)}
    offsets = set()
    for r in rows(made.train) + rows(made.test):
        objects = [ShapeSpec(**o) for o in r["scene"]]
        for o in objects:
            assert 0 <= o.x - o.r and o.x + o.r < size and 0 <= o.y - o.r and o.y + o.r < size
            home = min(centres, key=lambda c: abs(c[0] - o.x) + abs(c[1] - o.y))
            offsets.add((o.x - home[0], o.y - home[1]))
        for i, a in enumerate(objects):
            for b in objects[i + 1:]:
                gap = max(abs(a.x - b.x), abs(a.y - b.y)) - a.r - b.r
                assert gap >= 2, f"objects {a} and {b} touch"
    j = max_jitter(size)
    assert {dx for dx, _ in offsets} == {dy for _, dy in offsets} == set(range(-j, j + 1))


def test_by_default_objects_sit_on_their_places(tmp_path):
    """jitter 0 (the default) puts every object on its cell or side centre: scene == layout."""
    fixed = make_synthetic_vqa(tmp_path / "f", n_train=200, n_test=0, image_size=32)
    assert fixed.jitter == 0
    grid = {8, 24, 16}
    assert all(o["x"] in grid and o["y"] in grid for r in rows(fixed.train) for o in r["scene"])
    assert all(r["scene"] == r["layout"] for r in rows(fixed.train))


def test_counted_copies_take_their_own_colours(tmp_path):
    """The copies a count question counts are coloured one by one: four-copy layouts are not
    12 images (3 shapes x 4 colours) but hundreds, so a held-out split asks to count copies in
    colour mixes the training split has not shown, not shape-colour pairs it never saw
    four-fold. Colour questions are then asked only where a shape's copies share a colour."""
    made = make_synthetic_vqa(tmp_path, n_train=800, n_test=0, image_size=32, seed=5)
    count_rows = [r for r in rows(made.train) if r["type"] == "count"]
    copies = [[o["colour"] for o in r["layout"] if o["shape"] == r["layout"][0]["shape"]]
              for r in count_rows]
    assert sum(len(set(c)) > 1 for c in copies if len(c) >= 2) > 0.5 * sum(len(c) >= 2 for c in copies)
    four = {scene_key(r["layout"]) for r, c in zip(count_rows, copies) if len(c) == 4}
    assert len(four) > 12
    for r in rows(made.train):
        for qa in questions_for(tuple(ShapeSpec(**o) for o in r["scene"]), 32):
            if qa.type == "colour":
                shape = next(s for s in SHAPES if s in qa.question)
                assert {o["colour"] for o in r["scene"] if o["shape"] == shape} == {qa.answer}


@pytest.mark.parametrize("kwargs", [{"n_train": -1}, {"image_size": 16},
                                    {"multi_turn_fraction": 1.5}, {"jitter": -1},
                                    {"image_size": 32, "jitter": 3}])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_synthetic_vqa(tmp_path, **kwargs)


# ------------------------------------------------------------------ answers from the pixels


def components(image: np.ndarray) -> list[dict]:
    """Connected non-white regions (4-connectivity): colour name, shape guess, centroid."""
    background = np.all(image == 255, axis=-1)
    seen = np.zeros_like(background)
    found = []
    for y0, x0 in zip(*np.nonzero(~background)):
        if seen[y0, x0]:
            continue
        stack, pixels = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if (0 <= ny < image.shape[0] and 0 <= nx < image.shape[1]
                        and not background[ny, nx] and not seen[ny, nx]):
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        found.append(describe(image, np.array(pixels)))
    return found


def describe(image: np.ndarray, pixels: np.ndarray) -> dict:
    colours = {tuple(int(v) for v in image[y, x]) for y, x in pixels}
    assert len(colours) == 1, "every object is one flat colour"
    (rgb,) = colours
    (name,) = [n for n, value in COLOURS.items() if value == rgb]
    height, width = np.ptp(pixels, axis=0) + 1
    fill = len(pixels) / (height * width)  # square ~1, circle ~pi/4, triangle ~1/2
    shape = "square" if fill > 0.92 else "circle" if fill > 0.68 else "triangle"
    cy, cx = pixels.mean(axis=0)
    return {"colour": name, "shape": shape, "x": cx, "y": cy}


def side(obj: dict, size: int) -> str:
    dx, dy = obj["x"] - size / 2, obj["y"] - size / 2
    assert min(abs(dx), abs(dy)) < size / 8, "a position question about a corner object"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def answer_from_pixels(question: str, objects: list[dict], size: int) -> str:
    """Answer a synthetic question from the objects found in the image (not from the spec)."""
    if m := re.match(r"What colour (?:is the|are the) (\w+?)s?\?", question):
        (colour,) = {o["colour"] for o in objects if o["shape"] == m[1]}
        return colour
    if m := re.match(r"How many (\w+?)s are there\?", question):
        return str(sum(o["shape"] == m[1] for o in objects))
    if m := re.match(r"What shape is (\w+)\?", question):
        (shape,) = {o["shape"] for o in objects if o["colour"] == m[1]}
        return shape
    if m := re.match(r"Where is the (\w+)\?", question):
        (obj,) = objects
        assert obj["shape"] == m[1]
        return side(obj, size)
    raise AssertionError(f"unexpected question {question!r}")


def test_answers_match_the_pixels(synth):
    checked = Counter()
    for r in rows(synth.train) + rows(synth.test):
        image = np.asarray(Image.open(synth.root / r["image"]).convert("RGB"))
        assert image.shape == (SIZE, SIZE, 3)
        objects = components(image)
        assert len(objects) == len(r["scene"])
        turns = r["conversations"]
        for (human, gpt), qtype in zip(zip(turns[::2], turns[1::2]), r["types"]):
            question = human["value"].removeprefix("<image>\n").removesuffix(f" {INSTRUCTION}")
            assert answer_from_pixels(question, objects, SIZE) == gpt["value"]
            checked[qtype] += 1
    assert set(checked) == set(QUESTION_TYPES)


def test_no_position_question_for_a_corner_object():
    corner = (ShapeSpec("circle", "red", 12, 12, 5),)
    assert "position" not in {qa.type for qa in questions_for(corner, 48)}
    side_object = (ShapeSpec("circle", "red", 12, 24, 5),)
    (qa,) = [qa for qa in questions_for(side_object, 48) if qa.type == "position"]
    assert (qa.question, qa.answer) == ("Where is the circle?", "left")


def test_answers_are_canonical_words(synth):
    vocabulary = {*COLOURS, *SHAPES, *POSITIONS, *(str(n) for n in range(1, MAX_COUNT + 1))}
    for r in rows(synth.train):
        assert {t["value"] for t in r["conversations"][1::2]} <= vocabulary


# ------------------------------------------------------------------ reading back


def test_reads_back_through_read_dataset(synth):
    train = read_dataset(synth.train)
    test = read_dataset(synth.test)
    assert train.skips == [] and test.skips == []
    assert len(train.samples) == synth.n_train and len(test.samples) == synth.n_test
    sample = train.samples[0]
    assert sample.id == "train-000000" and sample.meta["type"] == "colour"
    assert sample.turns[0].parts[0] == 0 and len(sample.images) == 1
    assert sample.load_images()[0].size == (SIZE, SIZE)
    assert len(read_dataset(synth.root, split="test").samples) == synth.n_test
