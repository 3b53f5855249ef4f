"""The teacher pass's inputs: the teacher checkpoint, the synthetic data, the samples.

A tiny teacher (``teacher.tiny``) is built by the kit at its location when that directory has no
``config.json``; synthetic data (``data.synthetic``) is generated into the pipeline's output
directory when it is missing or was generated with another spec (``synthetic.json`` records it).
Under torchrun only rank 0 does either (the pipeline waits on a barrier).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from genrecal.extract.errors import ExtractSetupError
from genrecal.extract.job import EXTRACT_SPLIT, ExtractJob, ExtractSettings
from genrecal.store.data import Sample, Skip, read_dataset

SYNTHETIC_SPEC = "synthetic.json"


@dataclass(frozen=True)
class InputData:
    """The samples to extract, in order, and the rows the dataset reader skipped."""

    samples: list[Sample]
    skips: list[Skip]


def ensure_teacher(job: ExtractJob) -> None:
    """Build the tiny teacher at its location if the directory holds no checkpoint yet."""
    location = Path(job.settings.teacher.location)
    if job.tiny is None or (location / "config.json").is_file():
        return
    from genrecal.store.vlm.tiny import build_tiny_vlm

    build_tiny_vlm(job.tiny.kind, location, **job.tiny.build_kwargs())


def ensure_synthetic(job: ExtractJob) -> None:
    """Generate the synthetic VQA set into ``job.synthetic_dir`` unless it is there already."""
    if job.synthetic is None:
        return
    root = Path(job.synthetic_dir)
    spec = job.synthetic.to_dict()
    marker = root / SYNTHETIC_SPEC
    if (root / f"{EXTRACT_SPLIT}.jsonl").is_file() and marker.is_file() \
            and json.loads(marker.read_text()) == spec:
        return
    from genrecal.store.data import make_synthetic_vqa

    try:
        make_synthetic_vqa(root, n_train=job.synthetic.n_train, n_test=job.synthetic.n_test,
                           image_size=job.synthetic.image_size, seed=job.synthetic.seed)
    except ValueError as exc:
        raise ExtractSetupError(f"data.synthetic: {exc}; fix the synthetic block of the "
                                "pipeline") from exc
    marker.write_text(json.dumps(spec, sort_keys=True))


def read_inputs(settings: ExtractSettings, limit: int | None = None) -> InputData:
    """Read every train source in order; at most ``limit`` samples in all.

    Raises ExtractSetupError when two sources give the same sample id (the cache is keyed by id).
    """
    samples: list[Sample] = []
    skips: list[Skip] = []
    origin: dict[str, str] = {}
    for source in settings.sources:
        remaining = None if limit is None else limit - len(samples)
        if remaining is not None and remaining <= 0:
            break
        caps = [x for x in (remaining, source.limit) if x is not None]
        cap = min(caps) if caps else None
        read = read_dataset(source.path, format=source.format, image_root=source.image_root,
                            on_error=settings.read_on_error, limit=cap,
                            split=source.split if Path(source.path).is_dir() else None,
                            image_cache=settings.image_cache)
        _check_unique(read.samples, origin, source.path)
        samples += read.samples
        skips += read.skips
    return InputData(samples=samples, skips=skips)


def _check_unique(samples: list[Sample], origin: dict[str, str], path: str) -> None:
    for sample in samples:
        if sample.id in origin:
            raise ExtractSetupError(f"sample id {sample.id!r} occurs in {origin[sample.id]} and in "
                                    f"{path}; the cache is keyed by sample id: give the rows "
                                    "distinct ids or drop one source")
        origin[sample.id] = path


def sample_windows(samples: list, window: int) -> list[list]:
    """Consecutive windows of ``window`` items (the last may be shorter)."""
    if window < 1:
        raise ExtractSetupError(f"plan window {window} must be >= 1 sample")
    return [samples[i:i + window] for i in range(0, len(samples), window)]
