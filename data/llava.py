"""The LLaVA conversation format (JSON list or JSONL).

A row::

    {"id": "000001", "image": "images/000001.png",          # or a list of paths, or absent
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the circle?"},
                       {"from": "gpt", "value": "red"}, ...]}

``<image>`` placeholders mark where each image goes, in order over the whole conversation.
If a row has images but no placeholder, the images go at the start of the first human turn,
as LLaVA does. ``images`` is accepted as a synonym of ``image``. Every other key of the row
(e.g. the synthetic set's ``type``) is kept in ``Sample.meta``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from genrecal.data.normalise import Draft, clean_parts, normalise_role
from genrecal.data.problems import RowProblem
from genrecal.data.sample import Part, Turn
from genrecal.store.errors import DatasetError

PLACEHOLDER = "<image>"
_STRUCTURAL_KEYS = frozenset({"id", "image", "images", "conversations"})


def iter_llava_rows(path: Path) -> Iterator[object]:
    """The rows of a ``.json`` (a list) or ``.jsonl`` (one object per line) file, in order.

    A JSONL line that is not valid JSON is yielded as a :class:`RowProblem` (it is one bad
    row); a ``.json`` file that does not parse, or is not a list, is a :class:`DatasetError`.
    Blank JSONL lines are not rows.
    """
    if path.suffix.lower() == ".jsonl":
        yield from _jsonl_rows(path)
    else:
        yield from _json_rows(path)


def _jsonl_rows(path: Path) -> Iterator[object]:
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                yield RowProblem(f"line {line_no} is not valid JSON ({exc.msg})",
                                 "fix the line so that it holds one JSON object")


def _json_rows(path: Path) -> Iterator[object]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is not valid JSON ({exc}). Fix: repair the file, or use JSONL "
                           "(one object per line) so that one bad row cannot spoil the file.",
                           file=str(path)) from exc
    if not isinstance(rows, list):
        raise DatasetError(f"{path} holds a JSON {type(rows).__name__}, not a list of rows. Fix: "
                           "write the rows as a JSON list, or one per line in a .jsonl file.",
                           file=str(path))
    yield from rows


def llava_images(row: dict) -> tuple[str, ...]:
    if "image" in row and "images" in row:
        raise RowProblem("row has both 'image' and 'images'", "keep only one of the two keys")
    value = row.get("image", row.get("images"))
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise RowProblem(f"'image' must be a path or a list of paths, got {type(value).__name__}",
                     "write image paths as strings relative to the image root")


def split_placeholders(text: str, next_index: int) -> tuple[list[Part], int]:
    """``"a <image> b"`` -> ``["a ", next_index, " b"]``; returns the parts and the next index."""
    parts: list[Part] = []
    for i, piece in enumerate(text.split(PLACEHOLDER)):
        if i:
            parts.append(next_index)
            next_index += 1
        parts.append(piece)
    return parts, next_index


def _turn(message: object, next_index: int) -> tuple[Turn, int]:
    if not isinstance(message, dict):
        raise RowProblem(f"a conversation entry is a {type(message).__name__}, not an object",
                         'write each turn as {"from": ..., "value": ...}')
    value = message.get("value")
    if not isinstance(value, str):
        raise RowProblem(f"a turn's 'value' is {type(value).__name__}, not text",
                         "give every turn a 'value' string")
    role = normalise_role(message.get("from"))
    parts, next_index = split_placeholders(value, next_index)
    return Turn(role, clean_parts(parts)), next_index


def _images_at_first_user_turn(turns: list[Turn], n_images: int) -> list[Turn]:
    for i, turn in enumerate(turns):
        if turn.role == "user":
            turns[i] = Turn("user", (*range(n_images), *turn.parts))
            return turns
    raise RowProblem("the row has images but no human turn to put them in",
                     "add a human turn (with <image> placeholders) or remove the images")


def llava_draft(row: object) -> Draft:
    """Parse one LLaVA row (see module docstring) into a :class:`Draft`."""
    if not isinstance(row, dict):
        raise RowProblem(f"row is a JSON {type(row).__name__}, not an object",
                         'write each row as {"id", "image", "conversations"}')
    conversations = row.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise RowProblem("missing or empty 'conversations' list",
                         'add "conversations": [{"from": "human", ...}, {"from": "gpt", ...}]')
    images = llava_images(row)
    turns: list[Turn] = []
    next_index = 0
    for message in conversations:
        turn, next_index = _turn(message, next_index)
        turns.append(turn)
    if next_index == 0 and images:
        turns = _images_at_first_user_turn(turns, len(images))
    meta = {k: v for k, v in row.items() if k not in _STRUCTURAL_KEYS}
    return Draft(turns=tuple(turns), images=images, meta=meta)
