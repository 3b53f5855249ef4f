"""Teacher-answers mode: the teacher answers every question, written as a NEW dataset file.

The paper distils on the teacher's own answers (docs/method.md §1.4, "answers replaced beforehand by
the teacher's"). :func:`write_teacher_answers` asks the teacher every question of a dataset
(:func:`genrecal.model.generate.generate_answers`; in a multi-turn sample the history of
turn k holds the dataset's answers to the earlier questions) and writes a LLaVA JSONL file
with the same ids, the same images and the same user turns, in which each answer is

* ``replace="always"``: the teacher's answer;
* ``replace="if_correct"``: the teacher's answer when it matches the reference (exact match
  after :func:`~genrecal.model.generate.normalise_answer`), else the reference.

A generation that is empty (or holds an ``<image>`` placeholder, which the LLaVA format would
read as an image) is never used: the reference is kept. Each row records, per assistant turn,
which answer it holds (``answer_source``: ``"teacher"`` or ``"reference"``) and the dataset's
answers (``reference_answers``); the row's other metadata (``type``, ``types``...) is copied.

Images are referenced by paths relative to an image root: the output file's folder when every
image lies inside it, else the deepest folder holding every image (or ``image_root`` when
given). The report's :meth:`~TeacherAnswersReport.source_entry` is the ``data.sources`` entry
that reads the file back with valid image paths.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from genrecal.extract.errors import AnswersError
from genrecal.common.atomic import write_text_atomic
from genrecal.data.readers import DatasetRead
from genrecal.data.sample import Sample, Turn
from genrecal.model.generate import Generation, answers_match, generate_answers

if TYPE_CHECKING:
    from genrecal.common.config import GenerateAnswers

__all__ = ["ANSWER_SOURCE_KEY", "REFERENCE_KEY", "TeacherAnswersReport", "choose_answer",
           "teacher_answers_path", "write_teacher_answers"]

ANSWER_SOURCE_KEY = "answer_source"
REFERENCE_KEY = "reference_answers"
PLACEHOLDER = "<image>"
_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}
_STRUCTURAL = frozenset({"id", "image", "images", "conversations"})


@dataclass(frozen=True)
class TeacherAnswersReport:
    """What :func:`write_teacher_answers` wrote. Counts are per answer (assistant turn):
    ``replaced`` hold the teacher's answer, ``kept`` the reference, ``unusable`` of the kept
    ones had an empty / unusable generation, ``matched`` teacher answers equal the reference."""

    path: str
    image_root: str
    samples: int
    answers: int
    replaced: int
    kept: int
    unusable: int
    matched: int
    replace: str

    def to_dict(self) -> dict:
        return asdict(self)

    def source_entry(self, split: str = "train") -> dict:
        """The pipeline ``data.sources`` entry that reads the written file."""
        entry = {"path": self.path, "format": "llava", "split": split}
        if Path(self.image_root) != Path(self.path).parent:
            entry["image_root"] = self.image_root
        return entry


# ----- choosing an answer ----------------------------------------------------------------------
def _usable(generated: str) -> bool:
    return bool(generated.strip()) and PLACEHOLDER not in generated


def choose_answer(reference: str, generated: str, replace: str) -> tuple[str, str]:
    """``(answer, source)`` for one turn; source is ``"teacher"`` or ``"reference"``."""
    if replace not in ("always", "if_correct"):
        raise AnswersError(f"replace={replace!r}: use 'always' or 'if_correct' "
                           "(cache.generate_answers.replace)")
    if not _usable(generated):
        return reference, "reference"
    if replace == "always" or answers_match(generated, reference):
        return generated, "teacher"
    return reference, "reference"


# ----- rows ------------------------------------------------------------------------------------
def _turn_value(sample: Sample, turn: Turn) -> str:
    pieces = []
    for part in turn.parts:
        if isinstance(part, str) and PLACEHOLDER in part:
            raise AnswersError(f"sample '{sample.id}' ({sample.source}): its text contains "
                               f"'{PLACEHOLDER}', which the LLaVA format reads as an image; "
                               "remove it from the dataset or drop the sample")
        pieces.append(PLACEHOLDER if isinstance(part, int) else part)
    return "\n".join(pieces)


def _row(sample: Sample, answers: list[str], sources: list[str], image_root: Path) -> dict:
    conversations, k = [], 0
    for turn in sample.turns:
        value = _turn_value(sample, turn)
        if turn.role == "assistant":
            value, k = answers[k], k + 1
        conversations.append({"from": _ROLES[turn.role], "value": value})
    row = {key: v for key, v in sample.meta.items() if key not in _STRUCTURAL}
    row.update(id=sample.id, conversations=conversations,
               **{ANSWER_SOURCE_KEY: sources, REFERENCE_KEY: sample.answers})
    images = [Path(p).resolve().relative_to(image_root).as_posix() for p in sample.images]
    if images:
        row["image"] = images[0] if len(images) == 1 else images
    return row


def _image_root(samples: Sequence[Sample], out_dir: Path, image_root: str | Path | None) -> Path:
    paths = [Path(p).resolve() for s in samples for p in s.images]
    if image_root is not None:
        root = Path(image_root).resolve()
        outside = [str(p) for p in paths if not p.is_relative_to(root)]
        if outside:
            raise AnswersError(f"image {outside[0]} (and {len(outside) - 1} more) lies outside the "
                               f"image root {root}; pass an image_root that holds every image")
        return root
    if all(p.is_relative_to(out_dir) for p in paths):
        return out_dir
    return Path(os.path.commonpath([str(p.parent) for p in paths]))


def _check_out_path(out_path: Path) -> None:
    if out_path.suffix.lower() != ".jsonl":
        raise AnswersError(f"teacher answers go to a .jsonl file (LLaVA rows, one per line); "
                           f"got {out_path}. Fix: name the output like 'train.jsonl'")
    if out_path.is_dir():
        raise AnswersError(f"{out_path} is a folder; pass the path of the .jsonl file to write")


def _write_rows(rows: list[dict], out_path: Path) -> None:
    """Write ``rows`` as JSONL atomically (temporary file + rename)."""
    write_text_atomic(out_path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


# ----- entry point -----------------------------------------------------------------------------
def _by_sample(generations: Sequence[Generation]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for gen in generations:
        out.setdefault(gen.sample_id, []).append(gen.text)
    return out


def write_teacher_answers(loaded_teacher, read: DatasetRead, out_path: str | Path,
                          options: "GenerateAnswers", *, batch_size: int = 1,
                          image_root: str | Path | None = None, seed: int | None = 0,
                          progress: bool = True, engine=None) -> TeacherAnswersReport:
    """Answer every question of ``read`` with the teacher and write the new dataset file.

    ``options``: ``max_new_tokens``, ``temperature`` (0: greedy), ``top_p`` and ``replace``
    (see the module docstring); ``seed`` seeds sampling when temperature > 0. Everything that
    can be checked without the teacher is checked before it generates. ``engine``: a not yet
    started :class:`~genrecal.extract.vllm_engine.VllmEngine` (``--backend vllm``,
    :func:`~genrecal.extract.vllm_engine.answers_engine`), started here after those checks and
    stopped when the answers are in, generates instead of transformers, from the same prompts;
    the rest is the same.
    """
    out = Path(out_path)
    _check_inputs(out, read, options.replace)
    out.parent.mkdir(parents=True, exist_ok=True)
    root = _image_root(read.samples, out.parent.resolve(), image_root)
    with engine if engine is not None else contextlib.nullcontext():
        generations = _by_sample(generate_answers(
            loaded_teacher, read.samples, max_new_tokens=options.max_new_tokens,
            batch_size=batch_size, turn="all", temperature=options.temperature,
            top_p=options.top_p, seed=seed, progress=progress, engine=engine))
    rows, counts = [], {"teacher": 0, "reference": 0, "unusable": 0, "matched": 0}
    for sample in read.samples:
        generated = generations[sample.id]
        chosen = [choose_answer(ref, gen, options.replace)
                  for ref, gen in zip(sample.answers, generated)]
        _count(counts, sample.answers, generated, chosen)
        rows.append(_row(sample, [a for a, _ in chosen], [s for _, s in chosen], root))
    _write_rows(rows, out)
    return TeacherAnswersReport(
        path=str(out), image_root=str(root), samples=len(rows),
        answers=counts["teacher"] + counts["reference"], replaced=counts["teacher"],
        kept=counts["reference"], unusable=counts["unusable"], matched=counts["matched"],
        replace=options.replace)


def _check_inputs(out: Path, read: DatasetRead, replace: str) -> None:
    _check_out_path(out)
    choose_answer("reference", "", replace)  # validates ``replace``
    if not read.samples:
        raise AnswersError(f"{read.source} holds no valid sample to answer; check the data "
                           f"({len(read.skips)} row(s) were skipped)")
    for sample in read.samples:  # text the LLaVA format cannot hold
        for turn in sample.turns:
            _turn_value(sample, turn)


def _count(counts: dict[str, int], references: list[str], generated: list[str],
           chosen: list[tuple[str, str]]) -> None:
    for ref, gen, (_, source) in zip(references, generated, chosen):
        counts[source] += 1
        counts["unusable"] += int(not _usable(gen))
        counts["matched"] += int(_usable(gen) and answers_match(gen, ref))


def teacher_answers_path(pipeline, split: str = "train") -> Path:
    """Default output of ``genrecal answers``:
    ``<pipeline output>/data/teacher_answers/<split>.jsonl``."""
    return Path(pipeline.output_dir) / "data" / "teacher_answers" / f"{split}.jsonl"
