"""A pipeline's input data: its declared sources and its generated synthetic VQA set.

The ONE implementation that the teacher pass (extract), the trainer, evaluation and the demo use
to find, generate and read a pipeline's samples, so they all see the same samples with the same
ids.

* :func:`synthetic_dir` - where a pipeline's synthetic set lives:
  ``<pipeline output>/data/synthetic``.
* :func:`ensure_synthetic` - generate it there unless it is already there with the same spec
  (``synthetic.json`` records the spec it was generated with; another spec regenerates it).
* :func:`read_sources` - read a list of sources in order into one :class:`DatasetRead`, with a
  global sample limit, refusing a sample id given by two sources, skipped rows included (caches
  and the trainer's join are keyed by sample id).
* :func:`read_split` - one split of a pipeline's data: its sources of that split, then the
  synthetic set (generated if needed).

Config objects are duck-typed so that genrecal.store does not import genrecal.common.config: a data
config has ``sources`` (items with ``path``, ``format``, ``image_root``, ``split``, ``limit``),
``synthetic`` (``n_train``, ``n_test``, ``image_size``, ``seed``, optionally ``modality``:
``image`` or ``text``, :mod:`genrecal.data.synthetic_text`; or None) and ``on_error``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genrecal.common.atomic import write_json_atomic
from genrecal.data.problems import Skip
from genrecal.data.readers import DatasetRead, read_dataset
from genrecal.data.sample import Sample
from genrecal.data.synthetic import GENERATOR_REVISION, SyntheticVQA, make_synthetic_vqa
from genrecal.data.synthetic_text import TEXT_GENERATOR_REVISION, make_synthetic_text
from genrecal.store.errors import DatasetError, DuplicateSampleError

__all__ = ["SYNTHETIC_SPEC", "SYNTHETIC_SPLITS", "SourceRef", "ensure_synthetic", "read_sources",
           "read_split", "split_sources", "synthetic_dir", "synthetic_is_current", "synthetic_source",
           "synthetic_spec"]

SYNTHETIC_SPEC = "synthetic.json"
SYNTHETIC_SPLITS: tuple[str, ...] = ("train", "validation", "test")
_SPEC_KEYS: tuple[str, ...] = ("n_train", "n_test", "image_size", "seed", "n_validation")
_SPLIT_SIZE: dict[str, str] = {"train": "n_train", "validation": "n_validation", "test": "n_test"}


@dataclass(frozen=True)
class SourceRef:
    """A data source in the duck-typed form :func:`read_sources` reads (the config's
    ``DataSource`` has the same attributes)."""

    path: str
    format: str = "auto"
    image_root: str | None = None
    split: str = "train"
    limit: int | None = None


# ---------------------------------------------------------------------------- synthetic set


def synthetic_dir(output_dir: str | Path) -> Path:
    """Where the synthetic set of a pipeline with output directory ``output_dir`` lives."""
    return Path(output_dir) / "data" / "synthetic"


def synthetic_spec(spec: Any) -> dict[str, int]:
    """The generation arguments of a synthetic spec (``n_train``, ``n_test``, ``image_size``,
    ``seed``, ``n_validation``; for images also ``jitter``), as recorded in ``synthetic.json``."""
    args = {key: int(getattr(spec, key, 0) if key == "n_validation" else getattr(spec, key))
            for key in _SPEC_KEYS}  # n_validation: optional, 0 = no validation split
    if _is_text(spec):
        return args
    return {**args, "jitter": int(getattr(spec, "jitter", 0))}


def _is_text(spec: Any) -> bool:
    """Whether a synthetic spec asks for the text-only set (``modality: text``)."""
    return getattr(spec, "modality", "image") == "text"


def _recorded_spec(root: Path) -> dict | None:
    try:
        return json.loads((root / SYNTHETIC_SPEC).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def synthetic_is_current(spec: Any, root: str | Path) -> bool:
    """Whether ``root`` holds the complete synthetic set of ``spec`` (files and record)."""
    root = Path(root)
    files = all((root / f"{split}.jsonl").is_file() for split in ("train", "test")) and (
        not getattr(spec, "n_validation", 0) or (root / "validation.jsonl").is_file())
    return files and _recorded_spec(root) == _record(spec)


def _record(spec: Any) -> dict[str, int]:
    """What ``synthetic.json`` records: the generation arguments and the generator's revision
    (a set written by an older generator is regenerated)."""
    if _is_text(spec):
        return {**synthetic_spec(spec), "modality": "text",
                "generator_revision": TEXT_GENERATOR_REVISION}
    return {**synthetic_spec(spec), "generator_revision": GENERATOR_REVISION}


def ensure_synthetic(spec: Any, root: str | Path) -> SyntheticVQA:
    """The synthetic set of ``spec`` under ``root``: generated unless ``root`` already holds it
    with the same spec (``synthetic.json``); regenerated when the recorded spec differs.

    The record is removed before and rewritten after generation, so an interrupted generation
    is redone. Raises DatasetError when the spec is unusable (e.g. too small an image).
    """
    root, wanted = Path(root), synthetic_spec(spec)
    if not synthetic_is_current(spec, root):
        (root / SYNTHETIC_SPEC).unlink(missing_ok=True)
        try:
            if _is_text(spec):
                make_synthetic_text(root, n_train=wanted["n_train"], n_test=wanted["n_test"],
                                    seed=wanted["seed"])
            else:
                make_synthetic_vqa(root, **wanted)
        except ValueError as exc:
            raise DatasetError(f"data.synthetic: {exc}; fix the synthetic block of the pipeline",
                               file=str(root)) from exc
        write_json_atomic(root / SYNTHETIC_SPEC, _record(spec), sort_keys=True)
    return SyntheticVQA(root=root, train=root / "train.jsonl", test=root / "test.jsonl",
                        **{"jitter": 0, **wanted})


def synthetic_source(root: str | Path, split: str) -> SourceRef:
    """The LLaVA file of split ``split`` of the synthetic set under ``root``, as a source."""
    return SourceRef(path=str(Path(root) / f"{split}.jsonl"), format="llava", split=split)


def _has_synthetic_split(spec: Any, split: str) -> bool:
    return spec is not None and split in SYNTHETIC_SPLITS and (
        split == "train" or getattr(spec, _SPLIT_SIZE[split], 0) > 0)


# ---------------------------------------------------------------------------- reading


def read_sources(sources: Any, *, on_error: str = "raise", limit: int | None = None,
                 image_cache: str | Path | None = None) -> DatasetRead:
    """Read ``sources`` in order; at most ``limit`` samples in all (each source also stops at
    its own ``limit``). A folder source is read at its ``split``; a file is its own split.

    Raises DuplicateSampleError when two sources give the same sample id (of a sample or of a
    skipped row).
    """
    samples: list[Sample] = []
    skips: list[Skip] = []
    origin: dict[str, str] = {}
    read_paths: list[str] = []
    for source in sources:
        remaining = None if limit is None else limit - len(samples)
        if remaining is not None and remaining <= 0:
            break
        caps = [x for x in (remaining, source.limit) if x is not None]
        read = read_dataset(source.path, format=source.format, image_root=source.image_root,
                            on_error=on_error, limit=min(caps) if caps else None,
                            split=source.split if Path(source.path).is_dir() else None,
                            image_cache=image_cache)
        _check_unique([*read.samples, *read.skips], origin, str(source.path))
        read_paths.append(str(source.path))
        samples += read.samples
        skips += read.skips
    return DatasetRead(samples=samples, skips=skips, source=", ".join(read_paths))


def _check_unique(items: list[Sample | Skip], origin: dict[str, str], path: str) -> None:
    """Refuse an id (of a sample, or of a skipped row) that an earlier source gave too: a skip
    record under the id of another source's sample would hide that sample in a cache."""
    for item in items:
        sample_id = item.sample_id if isinstance(item, Skip) else item.id
        if sample_id in origin:
            raise DuplicateSampleError(
                f"sample id {sample_id!r} occurs in {origin[sample_id]} and in {path}; caches and "
                "the trainer are keyed by sample id: give the rows distinct ids or drop one source",
                sample_id=sample_id, file=path)
        origin[sample_id] = path


def split_sources(data: Any, split: str, *, output_dir: str | Path) -> list[Any]:
    """The sources of split ``split`` of data config ``data``: its declared sources of that
    split, then the synthetic set's file (not generated here)."""
    sources = [s for s in data.sources if s.split == split]
    if _has_synthetic_split(data.synthetic, split):
        sources.append(synthetic_source(synthetic_dir(output_dir), split))
    return sources


def read_split(data: Any, split: str, *, output_dir: str | Path, on_error: str | None = None,
               limit: int | None = None, image_cache: str | Path | None = None) -> DatasetRead:
    """Split ``split`` of a pipeline's data (see :func:`split_sources`), generating the synthetic
    set under :func:`synthetic_dir` first if it is missing or stale; at most ``limit`` samples.

    ``on_error`` defaults to the data config's. Raises DatasetError when nothing gives the split.
    """
    sources = split_sources(data, split, output_dir=output_dir)
    if not sources:
        raise DatasetError(f"no data source gives the split {split!r} (output {output_dir}); "
                           f"add a source with split: {split}, or a synthetic block")
    if _has_synthetic_split(data.synthetic, split):
        ensure_synthetic(data.synthetic, synthetic_dir(output_dir))
    read = read_sources(sources, on_error=on_error or data.on_error, limit=limit,
                        image_cache=image_cache)
    return DatasetRead(samples=read.samples, skips=read.skips, source=f"split {split}: {read.source}")
