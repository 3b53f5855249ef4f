"""The HF ``datasets`` messages + images format, from local json/jsonl/parquet/arrow files.

A row::

    {"id": "000001",                                          # optional
     "messages": [{"role": "user", "content": [{"type": "image"},
                                               {"type": "text", "text": "What colour ...?"}]},
                  {"role": "assistant", "content": "red"}],   # a list of parts, or a string
     "images": ["images/000001.png"]}                         # paths or {"bytes", "path"} structs

Each ``{"type": "image"}`` part takes the next image of ``images``. Files are loaded with
``datasets.load_dataset`` (``save_to_disk`` folders with ``datasets.load_from_disk``);
image columns are read undecoded, so embedded images arrive as their encoded bytes and
are never decoded twice. Columns other than ``id``/``messages``/``images`` go to
``Sample.meta`` (``None`` values left out).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

from genrecal.data.images import ImageRef
from genrecal.data.normalise import Draft, clean_parts, normalise_role
from genrecal.data.problems import RowProblem
from genrecal.data.sample import Part, Turn

BUILDERS: dict[str, str] = {".json": "json", ".jsonl": "json", ".parquet": "parquet",
                            ".arrow": "arrow"}
_STRUCTURAL_KEYS = frozenset({"id", "messages", "images"})


def _no_image_decoding(feature):
    """A copy of a ``datasets`` feature tree with every ``Image`` set to ``decode=False``."""
    from datasets import Image, LargeList, List

    if isinstance(feature, Image):
        return Image(mode=feature.mode, decode=False)
    if isinstance(feature, dict):
        return {key: _no_image_decoding(value) for key, value in feature.items()}
    if isinstance(feature, (List, LargeList)):
        return dataclasses.replace(feature, feature=_no_image_decoding(feature.feature))
    if isinstance(feature, (list, tuple)):
        return [_no_image_decoding(feature[0])]
    return feature


def iter_dataset_rows(dataset, batch_size: int = 256) -> Iterator[dict]:
    """The rows of a ``datasets.Dataset`` as python dicts, images left as ``{bytes, path}``."""
    from datasets import Features

    features = Features(_no_image_decoding(dataset.features))
    for table in dataset.with_format("arrow").iter(batch_size=batch_size):
        batch = features.decode_batch(table.to_pydict())
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            yield dict(zip(columns, values))


def load_files(files: list[Path], split_name: str):
    """``datasets.load_dataset`` on local data files of one kind (json / parquet / arrow)."""
    import datasets

    builder = BUILDERS[files[0].suffix.lower()]
    return datasets.load_dataset(builder, data_files={split_name: [str(f) for f in files]},
                                 split=split_name)


def image_ref(item: object) -> ImageRef:
    """One entry of ``images``: a path string, or an ``{"bytes", "path"}`` struct."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        if item.get("bytes"):
            return bytes(item["bytes"])
        if isinstance(item.get("path"), str):
            return item["path"]
    raise RowProblem(f"an 'images' entry is {type(item).__name__} without bytes or a path",
                     'give each image as a path or as {"bytes": ..., "path": ...}')


def content_parts(content: object, next_index: int) -> tuple[list[Part], int]:
    """A message's content (string or list of typed parts) -> parts, and the next image index."""
    if content is None:
        return [], next_index
    if isinstance(content, str):
        return [content], next_index
    if not isinstance(content, list):
        raise RowProblem(f"message content is {type(content).__name__}",
                         "write content as a string or a list of {'type': ...} parts")
    parts: list[Part] = []
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "image":
            parts.append(next_index)
            next_index += 1
        elif kind == "text" and isinstance(item.get("text"), str):
            parts.append(item["text"])
        else:
            raise RowProblem(f"unsupported content part {item!r}",
                             'use {"type": "image"} or {"type": "text", "text": "..."} parts')
    return parts, next_index


def _turn(message: object, next_index: int) -> tuple[Turn, int]:
    if not isinstance(message, dict):
        raise RowProblem(f"a message is a {type(message).__name__}, not an object",
                         'write each message as {"role": ..., "content": ...}')
    role = normalise_role(message.get("role"))
    parts, next_index = content_parts(message.get("content"), next_index)
    return Turn(role, clean_parts(parts)), next_index


def messages_draft(row: dict) -> Draft:
    """Parse one messages row (see module docstring) into a :class:`Draft`."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RowProblem("missing or empty 'messages' list",
                         'add "messages": [{"role": "user", ...}, {"role": "assistant", ...}]')
    raw_images = row.get("images") or []
    if not isinstance(raw_images, list):
        raise RowProblem("'images' is not a list", "write 'images' as a list (one entry per image)")
    images = tuple(image_ref(item) for item in raw_images)
    turns: list[Turn] = []
    next_index = 0
    for message in messages:
        turn, next_index = _turn(message, next_index)
        turns.append(turn)
    meta = {k: v for k, v in row.items() if k not in _STRUCTURAL_KEYS and v is not None}
    return Draft(turns=tuple(turns), images=images, meta=meta)
