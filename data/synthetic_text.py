"""The synthetic VQA task without images: each scene described in words, for text-only pairs.

The scenes, questions and answers are those of :mod:`genrecal.data.synthetic` (same generator,
same question types, same one-word canonical answers); the image is replaced by a sentence that
lists the scene's objects in the order the generator drew them, each with its place:

    Scene: a red circle at the top left, a blue square at the bottom right.
    What colour is the circle? Answer with one word.          -> red

Multi-object scenes sit on the generator's 2x2 grid (``top left`` ... ``bottom right``);
single-object position scenes at ``left`` / ``right`` / ``top`` / ``bottom``
(:func:`genrecal.data.synthetic.position_of`). Every question is answered by reading the
description: colour / shape / position questions by looking one object up, count questions by
counting the objects of one shape.

Train and test are disjoint by construction, exactly as for the image set: a row's split is
that of its scene (:func:`genrecal.data.synthetic.is_test_scene`, a fixed hash of the scene's
objects), and the description is a one-to-one function of the scene's objects (shape, colour,
place) up to their order, so no test description shows a scene any training row shows.

The set is written in the LLaVA conversation format without an ``image`` key
(``train.jsonl`` / ``test.jsonl``), which :func:`genrecal.data.readers.read_dataset` reads as
text-only samples; rows carry ``type``, ``types`` and ``scene`` like the image set's.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict
from pathlib import Path

from genrecal.data.synthetic import (COLOURS, INSTRUCTION, QUESTION_TYPES, SHAPES, ShapeSpec,
                                     SyntheticVQA, _draw_scene, _questions, position_of)

#: The scene geometry the text set draws its scenes at (only the place names reach the text).
SCENE_SIZE = 64
#: Changes whenever the same arguments start giving other files.
TEXT_GENERATOR_REVISION = 1
PLACES: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right",
                           "left", "right", "top", "bottom")


def place_of(obj: ShapeSpec, size: int = SCENE_SIZE) -> str:
    """Where an object is, in words: its side (single-object position scenes) or its grid cell."""
    side = position_of(obj, size)
    if side is not None:
        return side
    vertical = "top" if obj.y < size / 2 else "bottom"
    horizontal = "left" if obj.x < size / 2 else "right"
    return f"{vertical} {horizontal}"


def describe(scene: tuple[ShapeSpec, ...], size: int = SCENE_SIZE) -> str:
    """The scene as one sentence: ``Scene: a red circle at the top left, ...``."""
    parts = [f"a {o.colour} {o.shape} at the {place_of(o, size)}" for o in scene]
    return "Scene: " + ", ".join(parts) + "."


def text_corpus_lines(seed: int = 0) -> list[str]:
    """Lines of the text task's vocabulary (descriptions of every object in every place), for
    training the tiny text tokenizers. Deterministic for a ``seed`` (which only changes the order)."""
    rng = random.Random(f"genrecal-text-corpus-{seed}")
    lines = [f"Scene: a {colour} {shape} at the {place}."
             for shape in SHAPES for colour in COLOURS for place in PLACES]
    rng.shuffle(lines)
    return lines


def _row(rng: random.Random, split: str, index: int, multi_turn_fraction: float) -> dict:
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    # revision 1 of the text set: the counted copies share one colour (the image set gives
    # each its own since revision 5; the text set keeps its measured revision)
    scene = _draw_scene(rng, qtype, SCENE_SIZE, split, one_colour_counts=True)
    multi_turn = rng.random() < multi_turn_fraction
    questions = _questions(rng, qtype, scene, SCENE_SIZE, multi_turn)
    turns = []
    for i, qa in enumerate(questions):
        prefix = describe(scene) + "\n" if i == 0 else ""
        turns.append({"from": "human", "value": f"{prefix}{qa.question} {INSTRUCTION}"})
        turns.append({"from": "gpt", "value": qa.answer})
    return {"id": f"{split}-{index:06d}", "conversations": turns, "type": qtype,
            "types": [qa.type for qa in questions], "scene": [asdict(o) for o in scene]}


def _write_split(root: Path, split: str, n: int, seed: int, multi_turn_fraction: float) -> Path:
    rng = random.Random(f"genrecal-synthetic-text-{seed}-{split}")
    target = root / f"{split}.jsonl"
    tmp = target.with_suffix(".jsonl.part")
    with tmp.open("w", encoding="utf-8") as fh:
        for index in range(n):
            fh.write(json.dumps(_row(rng, split, index, multi_turn_fraction)) + "\n")
    os.replace(tmp, target)
    return target


def make_synthetic_text(out_dir: str | Path, *, n_train: int = 1000, n_test: int = 200,
                        seed: int = 0, multi_turn_fraction: float = 0.2) -> SyntheticVQA:
    """Write the text-only synthetic QA set (see module docstring) under ``out_dir``.

    Question types cycle colour, shape, count, position; a ``multi_turn_fraction`` of the rows
    ask 1-2 follow-up questions about the same scene. Deterministic: the same arguments always
    give byte-identical files. Returns a :class:`SyntheticVQA` whose ``image_size`` is 0 (no
    images)."""
    if min(n_train, n_test) < 0:
        raise ValueError(f"n_train={n_train}, n_test={n_test}: sizes must be >= 0")
    if not 0.0 <= multi_turn_fraction <= 1.0:
        raise ValueError(f"multi_turn_fraction={multi_turn_fraction}: must be within [0, 1]")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    train = _write_split(root, "train", n_train, seed, multi_turn_fraction)
    test = _write_split(root, "test", n_test, seed, multi_turn_fraction)
    return SyntheticVQA(root=root, train=train, test=test, n_train=n_train, n_test=n_test,
                        image_size=0, seed=seed)
