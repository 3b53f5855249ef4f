"""Reading visual-instruction datasets into :class:`~genrecal.data.sample.Sample`.

Two formats (see :mod:`~genrecal.data.llava` and :mod:`~genrecal.data.messages`):

* ``"llava"``: LLaVA conversation rows in ``.json`` (a list) or ``.jsonl`` files;
* ``"messages"``: HF ``datasets`` messages + images rows in local ``.json``/``.jsonl``/
  ``.parquet``/``.arrow`` files, or a folder written by ``Dataset.save_to_disk``.

``format="auto"`` picks ``messages`` for parquet/arrow/``save_to_disk`` sources and, for
JSON, looks at the first row: ``conversations`` -> llava, ``messages`` -> messages.

``path`` is a file, or a folder holding split files (``<split>.jsonl``,
``<split>-00000-of-00002.parquet``...: the split is the file name up to its first ``-`` or
``.``) or a ``save_to_disk`` folder. ``split`` picks one split of a folder; it must be left
``None`` for a single file (the file *is* the split).

Sample ids: the row's ``id`` (a string or an integer) when present and non-empty, else
``"<name>:<row index>"`` where ``<name>`` is the file stem for a single file and the split
name (or folder name) for a folder source, and the row index counts rows from 0 in file
order (blank JSONL lines are not rows). So the same rows in ``data.json``, ``data.jsonl``
and ``data.parquet`` get the same ids.

Image paths are relative to ``image_root`` (default: the folder of the dataset file, or the
dataset folder) and may never escape it. Embedded image bytes are written once to the
content-addressed folder ``image_cache`` (default
:func:`~genrecal.data.images.default_image_cache`), so samples always refer to image
files.

Bad rows (missing / corrupt / escaping image, no or empty answer, unknown role, duplicate
id, placeholder count not matching the images, malformed row) raise
:class:`~genrecal.store.errors.DatasetError` naming the sample id and the file, with a fix;
under ``on_error="skip"`` they become :class:`Skip` records instead. A skipped row whose id
another row of the source already holds (the later row of a duplicated id) is recorded as
``"<id>#row<index>"``, so that every sample and skip of a source has its own id and a skip
never hides the valid sample of that id. Problems with the source as a whole (path not found,
unreadable file, unknown format) always raise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from genrecal.data.images import ImageResolver, default_image_cache
from genrecal.data.llava import iter_llava_rows, llava_draft
from genrecal.data.messages import BUILDERS, iter_dataset_rows, load_files, messages_draft
from genrecal.data.normalise import Draft, build_sample
from genrecal.data.problems import RowProblem, Skip
from genrecal.data.sample import Sample
from genrecal.store.errors import DatasetError

__all__ = ["DatasetRead", "Skip", "detect_format", "iter_dataset", "read_dataset"]

Format = Literal["auto", "llava", "messages"]
OnError = Literal["raise", "skip"]
_SAVED_MARKERS = ("state.json", "dataset_dict.json")
_JSON_SUFFIXES = (".json", ".jsonl")


@dataclass(frozen=True)
class DatasetRead:
    """The result of :func:`read_dataset`: the valid samples and the skipped rows, in order."""

    samples: list[Sample]
    skips: list[Skip]
    source: str


@dataclass(frozen=True)
class Source:
    """A located dataset: its data files (none for a ``save_to_disk`` folder)."""

    path: Path
    files: tuple[Path, ...]
    name: str  # prefix of derived sample ids
    split: str | None = None
    saved: bool = False

    @property
    def default_image_root(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent


# ---------------------------------------------------------------------------- locating


def _split_of(file: Path) -> str:
    return file.name.split("-")[0].split(".")[0]


def _locate_file(path: Path, split: str | None) -> Source:
    if path.suffix.lower() not in BUILDERS:
        raise DatasetError(f"{path}: unsupported file type {path.suffix!r}. Fix: use one of "
                           f"{', '.join(BUILDERS)}.", file=str(path))
    if split is not None:
        raise DatasetError(f"{path} is a single file, so split={split!r} cannot select anything. "
                           "Fix: leave split unset, or point path at a folder of split files.",
                           file=str(path))
    return Source(path=path, files=(path,), name=path.stem)


def _choose_split(path: Path, available: list[str], split: str | None) -> str:
    if split is None and len(available) == 1:
        return available[0]
    if split in available:
        return split
    wanted = "several splits" if split is None else f"no split {split!r}"
    raise DatasetError(f"{path} has {wanted}; available: {', '.join(available) or 'none'}. "
                       "Fix: pass split= one of these.", file=str(path))


def _locate_folder(path: Path, split: str | None) -> Source:
    if any((path / marker).is_file() for marker in _SAVED_MARKERS):
        return Source(path=path, files=(), name=split or path.name, split=split, saved=True)
    files = sorted(f for f in path.iterdir()
                   if f.is_file() and f.suffix.lower() in BUILDERS and not f.name.startswith("."))
    groups: dict[str, list[Path]] = {}
    for file in files:
        groups.setdefault(_split_of(file), []).append(file)
    chosen = _choose_split(path, sorted(groups), split)
    kinds = {BUILDERS[f.suffix.lower()] for f in groups[chosen]}
    if len(kinds) > 1:
        raise DatasetError(f"{path}: split {chosen!r} mixes file types "
                           f"({', '.join(sorted(kinds))}). Fix: keep one file type per split.",
                           file=str(path))
    return Source(path=path, files=tuple(groups[chosen]), name=chosen, split=chosen)


def locate(path: str | Path, split: str | None = None) -> Source:
    """Find the data files of ``path`` (a file or a folder), for ``split`` in a folder."""
    path = Path(path)
    if path.is_file():
        return _locate_file(path, split)
    if path.is_dir():
        return _locate_folder(path, split)
    raise DatasetError(f"dataset path {path} does not exist. Fix: check the path (relative paths "
                       f"are relative to {Path.cwd()}).", file=str(path))


# ---------------------------------------------------------------------------- formats


def _first_row(file: Path) -> object:
    for row in iter_llava_rows(file):
        if isinstance(row, RowProblem):
            raise DatasetError(f"{file}: cannot detect the format, the first row is bad "
                               f"({row.reason}). Fix: {row.fix}, or pass format=.", file=str(file))
        return row
    raise DatasetError(f"{file} holds no rows. Fix: point at a non-empty dataset.", file=str(file))


def detect_format(source: Source) -> Literal["llava", "messages"]:
    """``messages`` for parquet/arrow/saved sources; for JSON, decided by the first row's keys."""
    if source.saved or source.files[0].suffix.lower() not in _JSON_SUFFIXES:
        return "messages"
    row = _first_row(source.files[0])
    keys = sorted(row) if isinstance(row, dict) else []
    if "conversations" in keys:
        return "llava"
    if "messages" in keys:
        return "messages"
    raise DatasetError(f"{source.files[0]}: cannot tell the format; the first row has keys {keys}, "
                       "expected 'conversations' (LLaVA) or 'messages' (HF messages). Fix: pass "
                       "format='llava' or format='messages', or fix the rows.",
                       file=str(source.files[0]))


def _llava_rows(source: Source) -> Iterator[tuple[str, object]]:
    for file in source.files:
        if file.suffix.lower() not in _JSON_SUFFIXES:
            raise DatasetError(f"{file}: the LLaVA format is read from .json/.jsonl files only. "
                               "Fix: convert the file, or use format='messages'.", file=str(file))
        for row in iter_llava_rows(file):
            yield str(file), row


def _open_saved(source: Source):
    import datasets

    loaded = datasets.load_from_disk(str(source.path))
    if isinstance(loaded, datasets.DatasetDict):
        return loaded[_choose_split(source.path, sorted(loaded), source.split)]
    if source.split is not None:
        raise DatasetError(f"{source.path} holds one dataset without splits, so split="
                           f"{source.split!r} cannot select anything. Fix: leave split unset.",
                           file=str(source.path))
    return loaded


def _open_messages(source: Source):
    try:
        if source.saved:
            return _open_saved(source)
        return load_files(list(source.files), source.split or "train")
    except DatasetError:
        raise
    except Exception as exc:  # datasets raises many types (ArrowInvalid, DatasetGenerationError...)
        raise DatasetError(f"{source.path}: `datasets` could not load it ({type(exc).__name__}: "
                           f"{exc}). Fix: check that every row has the same columns and types.",
                           file=str(source.path)) from exc


def _messages_rows(source: Source) -> Iterator[tuple[str, object]]:
    label = str(source.files[0] if len(source.files) == 1 else source.path)
    for row in iter_dataset_rows(_open_messages(source)):
        yield label, row


# ---------------------------------------------------------------------------- rows -> samples


def _row_id(row: object, name: str, index: int) -> str:
    value = row.get("id") if isinstance(row, dict) else None
    if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
        return str(value)
    return f"{name}:{index}"


def _check_id(row: object, sample_id: str, index: int, seen: dict[str, int]) -> None:
    value = row.get("id") if isinstance(row, dict) else None
    if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
        raise RowProblem(f"id {value!r} is a {type(value).__name__}",
                         "use a string or an integer id")
    if sample_id in seen:
        raise RowProblem(f"duplicate id {sample_id!r} (row {index}; row {seen[sample_id]} has "
                         "the same id)", "give every row a unique id")
    seen[sample_id] = index


def _skip_id(sample_id: str, index: int, seen: dict[str, int]) -> str:
    """The id a skipped row is recorded under: its own id, unless another row of the source
    already holds that id (a duplicate row, a derived id that a real one also uses); then
    ``"<id>#row<index>"`` (made unique), so that the skip never stands for another row's sample.

    The id is reserved in ``seen``: every sample and skip of one source has a distinct id, so
    a cache writer can record each of them (a skip marks its id done on resume).
    """
    key = sample_id
    if seen.get(key, index) != index:
        key, n = f"{sample_id}#row{index}", 1
        while key in seen:
            key, n = f"{sample_id}#row{index}.{n}", n + 1
    seen[key] = index
    return key


def _validate_args(format: str, on_error: str, limit: int | None) -> None:
    if format not in ("auto", "llava", "messages"):
        raise ValueError(f"format={format!r}; expected 'auto', 'llava' or 'messages'")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r}; expected 'raise' or 'skip'")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit={limit!r}; expected None or an integer >= 0")


def _resolver(source: Source, image_root, image_cache) -> ImageResolver:
    root = Path(image_root) if image_root is not None else source.default_image_root
    if not root.is_dir():
        raise DatasetError(f"image root {root} is not a folder. Fix: pass image_root= the folder "
                           "the image paths are relative to.", file=str(source.path))
    cache = Path(image_cache) if image_cache is not None else default_image_cache()
    return ImageResolver(root=root, cache_dir=cache)


def iter_dataset(path: str | Path, *, format: Format = "auto", image_root: str | Path | None = None,
                 on_error: OnError = "raise", limit: int | None = None,
                 split: str | None = None,
                 image_cache: str | Path | None = None) -> Iterator[Sample | Skip]:
    """Stream the samples of a dataset (see the module docstring), in file order.

    Yields :class:`Sample` for each valid row and, under ``on_error="skip"``, a :class:`Skip`
    for each bad one. ``limit`` stops after that many samples (skips do not count).
    """
    _validate_args(format, on_error, limit)
    source = locate(path, split)
    fmt = detect_format(source) if format == "auto" else format
    parse: Callable[[object], Draft] = llava_draft if fmt == "llava" else messages_draft
    rows = _llava_rows(source) if fmt == "llava" else _messages_rows(source)
    resolver = _resolver(source, image_root, image_cache)
    seen: dict[str, int] = {}
    produced = 0
    for index, (file, row) in enumerate(rows):
        if limit is not None and produced >= limit:
            return
        sample_id = _row_id(row, source.name, index)
        try:
            sample = _sample(row, parse, sample_id, index, file, resolver, seen)
        except RowProblem as problem:
            if on_error == "raise":
                raise problem.to_error(sample_id, file) from None
            yield Skip(sample_id=_skip_id(sample_id, index, seen), file=file,
                       reason=problem.reason)
            continue
        produced += 1
        yield sample


def _sample(row: object, parse: Callable[[object], Draft], sample_id: str, index: int, file: str,
            resolver: ImageResolver, seen: dict[str, int]) -> Sample:
    if isinstance(row, RowProblem):
        raise row
    _check_id(row, sample_id, index, seen)
    if not isinstance(row, dict):
        raise RowProblem(f"row is a {type(row).__name__}, not an object",
                         "write every row as a JSON object")
    return build_sample(parse(row), sample_id, file, resolver)


def read_dataset(path: str | Path, *, format: Format = "auto", image_root: str | Path | None = None,
                 on_error: OnError = "raise", limit: int | None = None, split: str | None = None,
                 image_cache: str | Path | None = None) -> DatasetRead:
    """Read a whole dataset (see :func:`iter_dataset`) into a :class:`DatasetRead`."""
    samples: list[Sample] = []
    skips: list[Skip] = []
    for item in iter_dataset(path, format=format, image_root=image_root, on_error=on_error,
                             limit=limit, split=split, image_cache=image_cache):
        (skips if isinstance(item, Skip) else samples).append(item)
    return DatasetRead(samples=samples, skips=skips, source=str(path))
