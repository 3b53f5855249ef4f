"""The teacher pass's inputs: the teacher checkpoint, the synthetic data, the samples.

A tiny teacher (``teacher.tiny``) is built by the kit at its location when that directory lacks a
complete model built with the same spec (``ensure_tiny_vlm``); synthetic data (``data.synthetic``)
is generated into the pipeline's output directory when it is missing or was generated with another
spec (``synthetic.json`` records it; :mod:`genrecal.data.pipeline_data`, shared with the
trainer and evaluation).
Under torchrun only rank 0 does either (the pipeline waits on a barrier).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from genrecal.extract.errors import ExtractSetupError
from genrecal.extract.job import ExtractJob, ExtractSettings
from genrecal.data import Sample, Skip
from genrecal.data import pipeline_data
from genrecal.store.errors import DatasetError, DuplicateSampleError


@dataclass(frozen=True)
class InputData:
    """The samples to extract, in order, and the rows the dataset reader skipped."""

    samples: list[Sample]
    skips: list[Skip]


def ensure_teacher(job: ExtractJob) -> None:
    """Build the tiny teacher at its location unless a complete one with the same spec is there
    (:func:`genrecal.model.tiny.ensure_tiny_vlm`)."""
    if job.tiny is None:
        return
    from genrecal.model.tiny import ensure_tiny_vlm

    ensure_tiny_vlm(job.tiny.kind, Path(job.settings.teacher.location), **job.tiny.build_kwargs())


def ensure_synthetic(job: ExtractJob) -> None:
    """Generate the synthetic VQA set into ``job.synthetic_dir`` unless it is there already
    with the same spec (:func:`genrecal.data.pipeline_data.ensure_synthetic`)."""
    if job.synthetic is None:
        return
    try:
        pipeline_data.ensure_synthetic(job.synthetic, job.synthetic_dir)
    except DatasetError as exc:
        raise ExtractSetupError(str(exc)) from exc


def read_inputs(settings: ExtractSettings, limit: int | None = None) -> InputData:
    """Read every train source in order; at most ``limit`` samples in all.

    Raises ExtractSetupError when two sources give the same sample id (the cache is keyed by id).
    """
    try:
        read = pipeline_data.read_sources(settings.sources, on_error=settings.read_on_error,
                                          limit=limit, image_cache=settings.image_cache)
    except DuplicateSampleError as exc:
        raise ExtractSetupError(str(exc)) from exc
    return InputData(samples=read.samples, skips=read.skips)


def sample_windows(samples: list, window: int) -> list[list]:
    """Consecutive windows of ``window`` items (the last may be shorter)."""
    if window < 1:
        raise ExtractSetupError(f"plan window {window} must be >= 1 sample")
    return [samples[i:i + window] for i in range(0, len(samples), window)]
