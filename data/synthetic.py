"""A deterministic synthetic visual-QA set for the demo and the tests.

Every image is a white canvas with a few big, flat, pure-colour shapes (no anti-aliasing),
so a tiny model can tell them apart. A scene's *layout* puts its objects at fixed places: the
cells of a 2x2 grid (multi-object scenes) or one side (position scenes); with ``jitter`` > 0
the image moves each object from its place by a random offset of up to that many pixels per
axis (:func:`max_jitter`; off by default). The copies a count question counts each take their
own colour: were they one colour, the layouts with four copies of one shape would be 12 in all
(a quarter of the count questions), and a held-out split would ask about a shape-colour pair
never seen four-fold, which a small model answers from memory rather than by counting.

Every question needs the image to be answered, and every answer is one canonical word or
digit, so exact match scores it:

* ``colour``: "What colour is the circle?" (or "What colour are the circles?") -> ``red``,
  ``green``, ``blue`` or ``yellow``;
* ``shape``: "What shape is red?" -> ``circle``, ``square`` or ``triangle``;
* ``count``: "How many triangles are there?" -> ``1`` ... ``4`` (other shapes may be present);
* ``position``: "Where is the square?" -> ``left``, ``right``, ``top`` or ``bottom``.

Every human turn ends with "Answer with one word." (:data:`INSTRUCTION`), so real VLM
teachers answer in the same canonical form.

The set is written in the LLaVA conversation format (``train.jsonl`` / ``test.jsonl`` next
to ``images/<split>/<index>.png``) and reads back with
:func:`genrecal.data.readers.read_dataset`. Each row also records

* ``type`` - the question type of its first question, and ``types`` - one type per
  question, in order (multi-turn rows ask 1-2 follow-ups, of any type, about the same image);
* ``scene`` - the generation spec (shape, colour, centre, size of every object, as drawn),
  from which tests and evaluation can re-derive each answer, and ``layout`` - the same objects
  at their places, before the jitter.

Train, validation and test come from disjoint layouts. A layout (the set of its objects: shape,
colour, place, size; :func:`scene_key`) belongs to one side of the scene space by a fixed hash
of that set (:func:`scene_side`: :data:`TEST_SCENE_FRACTION` of it is test,
:data:`VALIDATION_SCENE_FRACTION` validation, the rest train), the same for every seed, split
size and pipeline; the jitter is drawn after that. Each split only draws layouts of its own
side, so no test or validation image is a training image nor a moved copy of one, and
hyper-parameters tuned on validation never saw a test layout, whichever sets are compared (the
demo's teacher trains on a large train split of the generator seed whose test split it is
evaluated on; the students on a part of another one).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
MAX_COUNT = 4
QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "count", "position")

COLOUR_QUESTION = "What colour is the {shape}?"
COLOUR_PLURAL_QUESTION = "What colour are the {plural}?"
SHAPE_QUESTION = "What shape is {colour}?"
COUNT_QUESTION = "How many {plural} are there?"
POSITION_QUESTION = "Where is the {shape}?"
INSTRUCTION = "Answer with one word."

_GENERIC_LINES: tuple[str, ...] = (
    "Look at the image and answer the question.",
    "The picture shows simple shapes on a white background.",
    "Each shape has one colour.",
    "Answer with one word.",
    "Answer with a single number.",
    "Describe the image.",
    "There is a shape in the image.",
    "The shapes do not overlap.",
    "I can see the image.",
    "Yes.",
    "No.",
    "Thank you!",
    "You are a helpful assistant.",
)


def _question_lines() -> list[str]:
    lines = []
    for shape in SHAPES:
        plural = PLURALS[shape]
        lines += [COLOUR_QUESTION.format(shape=shape), COLOUR_PLURAL_QUESTION.format(plural=plural),
                  COUNT_QUESTION.format(plural=plural), POSITION_QUESTION.format(shape=shape)]
    lines += [SHAPE_QUESTION.format(colour=colour) for colour in COLOURS]
    return lines


def _answer_words() -> list[str]:
    return [*COLOURS, *SHAPES, *POSITIONS, *(str(n) for n in range(1, MAX_COUNT + 1))]


def _description_lines(rng: random.Random) -> list[str]:
    lines = []
    for shape in SHAPES:
        for colour in COLOURS:
            position = rng.choice(POSITIONS)
            count = rng.randint(1, MAX_COUNT)
            noun = shape if count == 1 else PLURALS[shape]
            lines.append(f"There {'is' if count == 1 else 'are'} {count} {colour} {noun}.")
            lines.append(f"The {colour} {shape} is on the {position}.")
            lines.append(f"{INSTRUCTION} {COLOUR_QUESTION.format(shape=shape)} {colour}")
    return lines


def corpus_lines(seed: int = 0) -> list[str]:
    """Varied text lines of the synthetic-QA vocabulary, for training tiny BPE tokenizers.

    Contains every question template filled with every shape / colour, every answer word,
    some descriptive sentences and some generic chat text. Deterministic for a ``seed``
    (which only changes the order and the random descriptive details) and cheap.
    """
    rng = random.Random(seed)
    lines = _question_lines() + _answer_words() + list(_GENERIC_LINES) + _description_lines(rng)
    rng.shuffle(lines)
    return lines


# ---------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class ShapeSpec:
    """One object of a scene: its shape, colour name, centre ``(x, y)`` and half-extent ``r``.

    Circles are the disc of radius ``r``; squares fill the box ``[x-r, x+r] x [y-r, y+r]``;
    triangles have apex ``(x, y-r)`` and base corners ``(x-r, y+r)``, ``(x+r, y+r)``. The
    centre pixel is inside every shape.
    """

    shape: str
    colour: str
    x: int
    y: int
    r: int


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    type: str


def _grid_cells(size: int) -> list[tuple[int, int]]:
    """Centres of the 2x2 grid cells (multi-object scenes)."""
    lo, hi = size // 4, (3 * size) // 4
    return [(lo, lo), (hi, lo), (lo, hi), (hi, hi)]


def position_centre(position: str, size: int) -> tuple[int, int]:
    """Where a single object sits for each position answer."""
    lo, mid, hi = size // 4, size // 2, (3 * size) // 4
    return {"left": (lo, mid), "right": (hi, mid), "top": (mid, lo), "bottom": (mid, hi)}[position]


def _grid_radius(size: int) -> int:
    return max(4, int(size * 0.17))


def _position_radius(size: int) -> int:
    return max(4, int(size * 0.18))


def max_jitter(size: int) -> int:
    """The largest ``jitter`` (see :func:`make_synthetic_vqa`) at image size ``size``. Moved by
    up to that much, every object stays inside the image, objects in neighbouring grid cells
    keep at least one white pixel between them, and a lone object's side (or corner) stays the
    one its place gives (:func:`position_of`: ``size // 16`` at most, under ``size / 8``)."""
    grid = size // 4 - 1 - _grid_radius(size)
    side = min(size // 4, size - 1 - (3 * size) // 4) - _position_radius(size)
    return max(0, min(grid, side, size // 16))


def _jittered(rng: random.Random, layout: tuple[ShapeSpec, ...],
              jitter: int) -> tuple[ShapeSpec, ...]:
    """``layout`` with every object's centre moved by up to ``jitter`` pixels along each axis
    (uniform, independent); ``jitter`` 0 draws nothing and returns ``layout``."""
    if not jitter:
        return layout
    return tuple(replace(o, x=o.x + rng.randint(-jitter, jitter),
                         y=o.y + rng.randint(-jitter, jitter)) for o in layout)


def _distinct_scene(rng: random.Random, size: int) -> tuple[ShapeSpec, ...]:
    """2-3 objects, all shapes different and all colours different (colour / shape questions)."""
    k = rng.randint(2, len(SHAPES))
    cells = rng.sample(_grid_cells(size), k)
    shapes, colours = rng.sample(SHAPES, k), rng.sample(list(COLOURS), k)
    r = _grid_radius(size)
    return tuple(ShapeSpec(s, c, x, y, r) for s, c, (x, y) in zip(shapes, colours, cells))


def _count_scene(rng: random.Random, size: int, one_colour: bool = False) -> tuple[ShapeSpec, ...]:
    """1-4 copies of one shape, each in its own random colour (``one_colour``: all in one),
    plus distractors of other shapes in free cells."""
    target = rng.choice(SHAPES)
    colour = rng.choice(list(COLOURS)) if one_colour else None
    n = rng.randint(1, MAX_COUNT)
    n_distractors = rng.randint(0, MAX_COUNT - n)
    cells = rng.sample(_grid_cells(size), n + n_distractors)
    others = [s for s in SHAPES if s != target]
    r = _grid_radius(size)
    objects = [ShapeSpec(target, colour or rng.choice(list(COLOURS)), x, y, r)
               for x, y in cells[:n]]
    objects += [ShapeSpec(rng.choice(others), rng.choice(list(COLOURS)), x, y, r)
                for x, y in cells[n:]]
    return tuple(objects)


def _position_scene(rng: random.Random, size: int) -> tuple[ShapeSpec, ...]:
    """One object on the left / right / top / bottom."""
    x, y = position_centre(rng.choice(POSITIONS), size)
    return (ShapeSpec(rng.choice(SHAPES), rng.choice(list(COLOURS)), x, y, _position_radius(size)),)


_SCENES = {"colour": _distinct_scene, "shape": _distinct_scene, "count": _count_scene,
           "position": _position_scene}

#: Share of the scene space that only the test split draws from (see :func:`is_test_scene`).
TEST_SCENE_FRACTION = 0.25
VALIDATION_SCENE_FRACTION = 0.15
#: Changes whenever the same arguments start giving other files (2: disjoint train / test
#: scenes), so that a record of generated sets can tell an older set from a current one.
GENERATOR_REVISION = 5  # 3: a validation side; 5: counted copies in their own colours,
# rows record their layout, optional jitter after the layout's split
_MAX_DRAWS = 10_000  # a split generator that finds no scene of its side in this many is a bug


def scene_key(scene: Iterable[ShapeSpec | dict]) -> tuple[tuple[str, str, int, int, int], ...]:
    """What a scene's image shows: its objects as sorted ``(shape, colour, x, y, r)`` tuples
    (objects never overlap, so two scenes render the same image iff their keys are equal).
    Takes :class:`ShapeSpec` objects or the dicts a row's ``scene`` holds."""
    objects = (o if isinstance(o, ShapeSpec) else ShapeSpec(**o) for o in scene)
    return tuple(sorted((o.shape, o.colour, o.x, o.y, o.r) for o in objects))


def scene_side(scene: Iterable[ShapeSpec | dict]) -> str:
    """The split whose side of the scene space a layout is on (``train``, ``validation`` or
    ``test``): a fixed hash of its :func:`scene_key` (not Python's salted ``hash``), so the
    answer never depends on the seed, the split sizes or the process. Pass a row's ``layout``
    (its ``scene`` holds the jittered objects; the two are equal when ``jitter`` is 0)."""
    digest = hashlib.blake2b(repr(scene_key(scene)).encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2 ** 64
    if u < TEST_SCENE_FRACTION:
        return "test"
    return "validation" if u < TEST_SCENE_FRACTION + VALIDATION_SCENE_FRACTION else "train"


def is_test_scene(scene: Iterable[ShapeSpec | dict]) -> bool:
    """Whether a scene belongs to the held-out test side of the scene space (:func:`scene_side`)."""
    return scene_side(scene) == "test"


def _draw_scene(rng: random.Random, qtype: str, size: int, split: str,
                one_colour_counts: bool = False) -> tuple[ShapeSpec, ...]:
    """A layout for a ``qtype`` question (objects at their places) from ``split``'s side of
    the scene space (``one_colour_counts``: the counted copies share one colour)."""
    for _ in range(_MAX_DRAWS):
        scene = (_count_scene(rng, size, one_colour_counts) if qtype == "count"
                 else _SCENES[qtype](rng, size))
        if scene_side(scene) == split:
            return scene
    raise RuntimeError(f"no {split} scene for a {qtype} question at image size {size} in "
                       f"{_MAX_DRAWS} draws; TEST_SCENE_FRACTION={TEST_SCENE_FRACTION} and "
                       f"VALIDATION_SCENE_FRACTION={VALIDATION_SCENE_FRACTION} leave that side "
                       "of the scene space empty")


# ---------------------------------------------------------------------------- questions


def position_of(obj: ShapeSpec, size: int) -> str | None:
    """The side of the image an object's centre is on; ``None`` in a corner (ambiguous)."""
    dx, dy = obj.x - size / 2, obj.y - size / 2
    if min(abs(dx), abs(dy)) > size / 8:
        return None
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def questions_for(scene: tuple[ShapeSpec, ...], size: int) -> list[QA]:
    """Every question the scene answers unambiguously, with its canonical answer."""
    out: list[QA] = []
    for shape in sorted({o.shape for o in scene}, key=SHAPES.index):
        same = [o for o in scene if o.shape == shape]
        if len({o.colour for o in same}) == 1:
            template = COLOUR_QUESTION if len(same) == 1 else COLOUR_PLURAL_QUESTION
            out.append(QA(template.format(shape=shape, plural=PLURALS[shape]), same[0].colour,
                          "colour"))
        out.append(QA(COUNT_QUESTION.format(plural=PLURALS[shape]), str(len(same)), "count"))
    for colour in sorted({o.colour for o in scene}, key=list(COLOURS).index):
        shapes = {o.shape for o in scene if o.colour == colour}
        if len(shapes) == 1:
            out.append(QA(SHAPE_QUESTION.format(colour=colour), shapes.pop(), "shape"))
    position = position_of(scene[0], size) if len(scene) == 1 else None
    if position is not None:
        out.append(QA(POSITION_QUESTION.format(shape=scene[0].shape), position, "position"))
    return out


def _primary_question(rng: random.Random, qtype: str, scene, size: int) -> QA:
    candidates = [qa for qa in questions_for(scene, size) if qa.type == qtype]
    if qtype == "count":  # ask about the counted shape, not a distractor
        candidates = [qa for qa in candidates if PLURALS[scene[0].shape] in qa.question]
    return rng.choice(candidates)


def _questions(rng: random.Random, qtype: str, scene, size: int, multi_turn: bool) -> list[QA]:
    first = _primary_question(rng, qtype, scene, size)
    if not multi_turn:
        return [first]
    rest = [qa for qa in questions_for(scene, size) if qa.question != first.question]
    return [first, *rng.sample(rest, min(len(rest), rng.randint(1, 2)))]


# ---------------------------------------------------------------------------- rendering


def render(scene: tuple[ShapeSpec, ...], size: int):
    """The scene as an RGB PIL image: flat pure colours on white, no anti-aliasing."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in scene:
        fill = COLOURS[o.colour]
        box = (o.x - o.r, o.y - o.r, o.x + o.r, o.y + o.r)
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(o.x, o.y - o.r), (o.x - o.r, o.y + o.r), (o.x + o.r, o.y + o.r)],
                         fill=fill)
    return image


def _conversations(questions: list[QA]) -> list[dict]:
    turns = []
    for i, qa in enumerate(questions):
        prefix = "<image>\n" if i == 0 else ""
        turns.append({"from": "human", "value": f"{prefix}{qa.question} {INSTRUCTION}"})
        turns.append({"from": "gpt", "value": qa.answer})
    return turns


# ---------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class SyntheticVQA:
    """Where :func:`make_synthetic_vqa` wrote the set, and how it was made."""

    root: Path
    train: Path
    test: Path
    n_train: int
    n_test: int
    image_size: int
    seed: int
    n_validation: int = 0
    jitter: int = 0

    @property
    def validation(self) -> Path:
        return self.root / "validation.jsonl"

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "SyntheticVQA":
        paths = {k: Path(data[k]) for k in ("root", "train", "test")}
        numbers = {k: int(data[k]) for k in ("n_train", "n_test", "image_size", "seed")}
        numbers["n_validation"] = int(data.get("n_validation", 0))
        numbers["jitter"] = int(data.get("jitter", 0))
        return cls(**paths, **numbers)


def _row(rng: random.Random, split: str, index: int, size: int, jitter: int,
         multi_turn_fraction: float, image_dir: Path, root: Path) -> dict:
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    layout = _draw_scene(rng, qtype, size, split)
    scene = _jittered(rng, layout, jitter)  # after the split: a layout belongs to one split
    multi_turn = rng.random() < multi_turn_fraction
    questions = _questions(rng, qtype, scene, size, multi_turn)
    image_path = image_dir / f"{index:06d}.png"
    render(scene, size).save(image_path, format="PNG", compress_level=1)
    return {"id": f"{split}-{index:06d}", "image": image_path.relative_to(root).as_posix(),
            "conversations": _conversations(questions), "type": qtype,
            "types": [qa.type for qa in questions], "scene": [asdict(o) for o in scene],
            "layout": [asdict(o) for o in layout]}


def _write_split(root: Path, split: str, n: int, size: int, jitter: int, seed: int,
                 multi_turn_fraction: float) -> Path:
    rng = random.Random(f"genrecal-synthetic-{seed}-{split}")
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    target = root / f"{split}.jsonl"
    tmp = target.with_suffix(".jsonl.part")
    with tmp.open("w", encoding="utf-8") as fh:
        for index in range(n):
            row = _row(rng, split, index, size, jitter, multi_turn_fraction, image_dir, root)
            fh.write(json.dumps(row) + "\n")
    os.replace(tmp, target)
    return target


def _check_args(n_train: int, n_test: int, image_size: int, multi_turn_fraction: float,
                n_validation: int = 0, jitter: int = 0) -> None:
    if min(n_train, n_test, n_validation) < 0:
        raise ValueError(f"n_train={n_train}, n_test={n_test}, n_validation={n_validation}: "
                         "sizes must be >= 0")
    if image_size < 32:
        raise ValueError(f"image_size={image_size}: use at least 32 pixels so shapes stay legible")
    if not 0.0 <= multi_turn_fraction <= 1.0:
        raise ValueError(f"multi_turn_fraction={multi_turn_fraction}: must be within [0, 1]")
    if not 0 <= jitter <= max_jitter(image_size):
        raise ValueError(f"jitter={jitter}: must be within [0, {max_jitter(image_size)}] at "
                         f"image_size={image_size} (objects stay apart and in place); use a "
                         "larger image or a smaller jitter")


def make_synthetic_vqa(out_dir: str | Path, *, n_train: int = 1000, n_test: int = 200,
                       image_size: int = 64, seed: int = 0,
                       multi_turn_fraction: float = 0.2, n_validation: int = 0,
                       jitter: int = 0) -> SyntheticVQA:
    """Write the synthetic VQA set (see module docstring) under ``out_dir``.

    Writes ``train.jsonl`` / ``test.jsonl`` (LLaVA format, image paths relative to
    ``out_dir``) and ``images/<split>/<index>.png``; ``validation.jsonl`` too when
    ``n_validation`` > 0 (the split to tune hyper-parameters on). Question types cycle
    colour, shape, count, position so each is a quarter of every split; a
    ``multi_turn_fraction`` of the rows ask 1-2 follow-up questions about the same image.
    The splits draw from disjoint scenes (:func:`is_test_scene`), for any sizes and seeds.
    With ``jitter`` > 0 every object's centre is moved from its place (grid cell or side) by
    up to that many pixels along each axis (at most :func:`max_jitter`; 0, the default, keeps
    the fixed places).
    Deterministic: the same arguments always give byte-identical files.
    """
    _check_args(n_train, n_test, image_size, multi_turn_fraction, n_validation, jitter)
    root = Path(out_dir)
    splits = {"train": n_train, "test": n_test, "validation": n_validation}
    for split, n in splits.items():
        if n or split != "validation":
            _write_split(root, split, n, image_size, jitter, seed, multi_turn_fraction)
    return SyntheticVQA(root=root, train=root / "train.jsonl", test=root / "test.jsonl",
                        n_train=n_train, n_test=n_test, image_size=image_size, seed=seed,
                        n_validation=n_validation, jitter=jitter)
