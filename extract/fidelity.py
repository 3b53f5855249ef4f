"""``genrecal validate CACHE --against-teacher N``: does the cache still match its teacher?

N cached samples are drawn at random (seeded) and run through the teacher again, one at a
time, exactly as the teacher pass computes them (:func:`batch_sample_features`). Each fresh
value goes through the feature's codec (encode + decode) and is compared with the cached one,
so a deviation measures the teacher / environment, not the codec's rounding:

* hidden states and Grams: the largest absolute deviation, and relative to the largest |value|;
* logit statistics: per field the largest absolute deviation; top-k ids: the share of rows
  whose top-k id set differs;
* input ids, spans and content hash must be identical (a difference means the data or the
  processor changed since extraction).

The teacher and data come from the cache's recorded settings (:class:`ExtractSettings`), or from
a pipeline when given. The teacher must have the fingerprint the cache records.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from genrecal.extract.errors import FidelityError
from genrecal.extract.inputs import read_inputs
from genrecal.extract.job import ExtractSettings
from genrecal.extract.pipeline import batch_sample_features
from genrecal.extract.teacher import fingerprint, load_teacher, processor_files, resolve_device
from genrecal.store.codecs import decode_feature, encode_feature
from genrecal.store.fingerprint import fingerprint_mismatches
from genrecal.store.logit_stats import STAT_FIELDS
from genrecal.store.reader import CacheReader
from genrecal.store.schema import FeatureSpec
from genrecal.model.encoding import encode_sample


@dataclass
class Deviation:
    """The largest deviation of one feature part over the checked samples."""

    feature: str
    part: str
    max_abs: float = 0.0
    scale: float = 0.0  # the largest |cached value| seen (relative deviation = max_abs / scale)
    worst_sample: str = ""

    @property
    def max_rel(self) -> float:
        return self.max_abs / self.scale if self.scale > 0 else 0.0

    def update(self, sample_id: str, fresh: torch.Tensor, cached: torch.Tensor) -> None:
        if fresh.numel() == 0:
            return
        diff = float((fresh.double() - cached.double()).abs().max())
        self.scale = max(self.scale, float(cached.double().abs().max()))
        if diff > self.max_abs or not self.worst_sample:
            self.max_abs, self.worst_sample = max(diff, self.max_abs), sample_id


@dataclass
class FidelityReport:
    """Per feature part, the largest deviation; plus every structural mismatch."""

    cache: str
    samples: list[str]
    deviations: dict[tuple[str, str], Deviation] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def deviation(self, feature: str, part: str) -> Deviation:
        return self.deviations.setdefault((feature, part), Deviation(feature, part))

    def format(self) -> str:
        lines = [f"{self.cache}: teacher rerun on {len(self.samples)} cached sample(s)",
                 f"{'feature':<16} {'part':<14} {'max abs dev':>12} {'max rel dev':>12}  worst sample"]
        for dev in self.deviations.values():
            lines.append(f"{dev.feature:<16} {dev.part:<14} {dev.max_abs:>12.3e} "
                         f"{dev.max_rel:>12.3e}  {dev.worst_sample}")
        lines += [f"MISMATCH: {m}" for m in self.mismatches]
        return "\n".join(lines)


def check_against_teacher(cache: str, n: int, *, settings: ExtractSettings | None = None,
                          seed: int = 0, device: str | None = None,
                          device_map=None) -> FidelityReport:
    """Rerun the teacher on ``n`` random cached samples; see the module docstring."""
    if n < 1:
        raise FidelityError(f"--against-teacher {n}: give a number of samples >= 1")
    reader = CacheReader(cache)
    settings = settings or _recorded_settings(reader)
    picked = _pick(reader, n, seed)
    teacher = load_teacher(settings.teacher, device=resolve_device(device, device_map, 0, 1),
                           device_map=device_map)
    _check_fingerprint(reader, teacher)
    samples = _find_samples(settings, picked, reader.url)
    report = FidelityReport(cache=reader.url, samples=picked)
    for sample_id in picked:
        _compare(report, reader, teacher, samples[sample_id], settings.max_length)
    return report


def _recorded_settings(reader: CacheReader) -> ExtractSettings:
    try:
        return ExtractSettings.from_dict(reader.manifest.header.settings)
    except (KeyError, TypeError, ValueError) as exc:
        raise FidelityError(f"cache {reader.url} does not record where its teacher and data are "
                            f"({exc}); pass --pipeline NAME to take them from a pipeline") from exc


def _pick(reader: CacheReader, n: int, seed: int) -> list[str]:
    ids = list(reader.sample_ids())
    if not ids:
        raise FidelityError(f"cache {reader.url} holds no samples; nothing to compare")
    return sorted(random.Random(seed).sample(ids, min(n, len(ids))))


def _check_fingerprint(reader: CacheReader, teacher) -> None:
    found = fingerprint(teacher, processor_files(teacher))
    diffs = fingerprint_mismatches(found, reader.manifest.teacher)
    if diffs:
        lines = "; ".join(f"{k}: teacher {a[:12]}..., cache {b[:12]}..." for k, a, b in diffs)
        raise FidelityError(f"the teacher at {teacher.source.location} is not the one cache "
                            f"{reader.url} was extracted with ({lines}); point --pipeline to the "
                            "original teacher")


def _find_samples(settings: ExtractSettings, picked: list[str], where: str) -> dict:
    wanted = set(picked)
    found = {s.id: s for s in read_inputs(settings).samples if s.id in wanted}
    missing = sorted(wanted - set(found))
    if missing:
        raise FidelityError(f"cached samples {missing[:5]} are not in the data sources "
                            f"{[s.path for s in settings.sources]} any more; the data of {where} "
                            "changed (or pass --pipeline with the right data)")
    return found


def _compare(report: FidelityReport, reader: CacheReader, teacher, sample, max_length) -> None:
    cached = reader.get(sample.id)
    encoded = encode_sample(teacher.vlm, sample, max_length=max_length)
    specs = reader.features
    fresh = batch_sample_features(teacher, specs, [(sample, encoded)])[0]
    if not _same_record(report, cached, fresh, sample.content_hash):
        return  # other tokens or positions: the feature values are not comparable
    for name, spec in specs.items():
        _compare_feature(report, spec, sample.id, _through_codec(spec, fresh.values[name]),
                         getattr(cached, name))


def _same_record(report: FidelityReport, cached, fresh, content_hash: str) -> bool:
    """Whether hash, input ids and spans agree; records a mismatch otherwise."""
    problems = []
    if cached.content_hash != content_hash:
        problems.append("content hash (the image or text changed)")
    if cached.input_ids.tolist() != fresh.input_ids:
        problems.append("input ids (the tokenizer, chat template or max_length changed)")
    elif cached.spans != fresh.spans:
        problems.append(f"spans ({cached.spans} cached, {fresh.spans} now)")
    if problems:
        report.mismatches.append(f"sample {cached.sample_id!r}: " + "; ".join(problems) + " differ")
    return not problems


def _through_codec(spec: FeatureSpec, value):
    """``value`` as it reads back from the cache (encode + decode with the feature's codec)."""
    grams = [int(g.shape[0]) for g in value] if spec.name == "visual_gram" else None
    return decode_feature(spec, encode_feature(spec, value), torch.float32, grams)


def _compare_feature(report: FidelityReport, spec: FeatureSpec, sample_id: str, fresh, cached) -> None:
    if spec.name == "visual_gram":
        for f, c in zip(fresh, cached):
            report.deviation(spec.name, "gram").update(sample_id, f, c)
    elif spec.name == "logit_stats":
        for part in ("topk_logprobs",) + STAT_FIELDS:
            report.deviation(spec.name, part).update(sample_id, getattr(fresh, part), getattr(cached, part))
        report.deviation(spec.name, "topk_ids rows").update(
            sample_id, _topk_set_differs(fresh.topk_ids, cached.topk_ids), torch.zeros(1))
    else:
        report.deviation(spec.name, "values").update(sample_id, fresh, cached)


def _topk_set_differs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[1] float: share of rows whose top-k id sets differ (order within ties ignored)."""
    if a.shape[0] == 0:
        return torch.zeros(1)
    differs = (a.sort(dim=1).values != b.long().sort(dim=1).values).any(dim=1)
    return differs.double().mean().reshape(1)
