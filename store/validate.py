"""``genrecal validate CACHE``: every problem of a cache, not just the first.

Checks: no symlink anywhere in the cache leading out of its root (such paths are reported, never
followed); the manifest (present, JSON, format version, schema, digest, no path escaping the
root); every listed file present with its size and sha256 (shards, index, teacher artifacts);
each shard's records (schema, spans, status) against its tensors (offsets contiguous and inside
the arrays, lengths matching the spans, array shapes, no NaN/Inf); counts per shard and in total
against the manifest; no duplicate sample id; the sample-id index equal to the records.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import zarr
from pydantic import ValidationError

from genrecal.store.codecs import feature_parts
from genrecal.store.fingerprint import fingerprint_mismatches
from genrecal.store.index import INDEX_SCHEMA, SampleIndex
from genrecal.store.schema import (
    FORMAT_VERSION, MANIFEST, RECORDS_FILE, STATUSES, TENSORS_DIR, FeatureSpec, Manifest, ShardEntry,
    TeacherFingerprint, question_positions, record_span_problems, records_schema, spans_from_record,
)
from genrecal.store.shard import expected_rows, file_problems
from genrecal.store.storage import CacheStorage

_SHOW = 5  # sample ids quoted per aggregated problem


@dataclass(frozen=True)
class Problem:
    """One problem: a stable ``code``, ``where`` (file / shard / sample), ``message``, ``fix``."""

    code: str
    where: str
    message: str
    fix: str

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"[{self.code}] {self.where}: {self.message} -> {self.fix}"


_FIX_REEXTRACT = "re-extract the affected samples into a new cache (or restore the files from a copy)"
_FIX_RECOMMIT = "re-run commit_cache on the cache to rebuild manifest.json from the rank shard lists"
_FIX_SYMLINK = ("replace the symlink by a copy of its target inside the cache (a cache must hold its own files), "
                "or re-extract the cache")


def validate_cache(url, storage_options: dict | None = None, check_values: bool = True,
                   expect_teacher: TeacherFingerprint | Mapping | None = None) -> list[Problem]:
    """Every problem found in the cache at ``url`` (an empty list: the cache is valid).

    ``check_values``: decode every tensor to look for NaN/Inf (reads all data);
    ``expect_teacher``: also report a teacher fingerprint other than this one.
    """
    storage = CacheStorage(url, storage_options)
    links = storage.escaping_links()
    problems = [Problem("path.symlink", rel, f"symlink to {target}, outside the cache root {storage.real_root} "
                        f"(not followed)", _FIX_SYMLINK) for rel, target in links]
    manifest = _check_manifest(storage, problems)
    if manifest is None:
        return problems
    if expect_teacher is not None:
        problems += [Problem("teacher.mismatch", f"{MANIFEST}:header.teacher.{k}", f"cache has {found}, expected {want}",
                             "use the cache extracted with the expected teacher, or re-extract")
                     for k, found, want in fingerprint_mismatches(manifest.teacher, expect_teacher)]
    bad_paths = {p for _, p, _ in manifest.unsafe_paths()}
    bad_paths |= {f.path for _, f in manifest.file_entries() if _under_any(f.path, links)}  # reported above
    problems += [Problem("path.escape", f"{MANIFEST}:{w}", f"path {p!r} escapes the cache root", _FIX_RECOMMIT)
                 for w, p, _ in manifest.unsafe_paths()]
    ids: list[pa.Table] = []
    for i, entry in enumerate(manifest.shards):
        if any(_under_any(rel, [(entry.dir, "")]) or _under_any(entry.dir, [(rel, "")]) for rel, _ in links):
            continue  # not read: a symlink under the shard leaves the root (reported above)
        table = _check_shard(storage, manifest, i, entry, bad_paths, check_values, problems)
        if table is not None:
            ids.append(table)
    problems += _check_artifacts(storage, manifest, bad_paths)
    problems += _check_counts(manifest)
    problems += _check_ids(storage, manifest, ids, bad_paths)
    return problems


# ----------------------------------------------------------------------------- manifest


def _under_any(path: str, links: list[tuple[str, str]]) -> bool:
    """Whether ``path`` is one of the ``links``' paths or lies under one of them."""
    return any(path == rel or path.startswith(f"{rel}/") for rel, _ in links)


def _check_manifest(storage: CacheStorage, problems: list[Problem]) -> Manifest | None:
    real = storage.resolves_outside(MANIFEST)
    if real is not None:
        if not any(p.code == "path.symlink" and p.where == MANIFEST for p in problems):
            problems.append(Problem("path.symlink", MANIFEST, f"resolves to {real}, outside the cache root "
                                    f"{storage.real_root} (not followed)", _FIX_SYMLINK))
        return None
    if not storage.exists(MANIFEST):
        problems.append(Problem("manifest.missing", storage.where(MANIFEST), "no manifest.json",
                                "commit the cache (commit_cache) or point at the cache root"))
        return None
    try:
        raw = json.loads(storage.read_bytes(MANIFEST))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(Problem("manifest.json", storage.where(MANIFEST), f"not valid JSON: {exc}", _FIX_RECOMMIT))
        return None
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        problems.append(Problem("format.version", storage.where(MANIFEST),
                                f"format version {version!r}; this genrecal supports {FORMAT_VERSION}",
                                "use the genrecal release that wrote the cache, or re-extract it"))
        return None
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        problems += [Problem("manifest.schema", f"{MANIFEST}:{'.'.join(map(str, e['loc']))}", e["msg"], _FIX_RECOMMIT)
                     for e in exc.errors()]
        return None
    if manifest.digest != manifest.content_digest():
        problems.append(Problem("manifest.digest", storage.where(MANIFEST),
                                "the manifest was modified after commit (its digest does not match its content)",
                                _FIX_RECOMMIT))
    return manifest


def _file_problems(storage: CacheStorage, files, bad_paths: set[str]) -> list[Problem]:
    safe = [f for f in files if f.path not in bad_paths]
    return [Problem(code, path, msg, _FIX_SYMLINK if code == "path.symlink" else _FIX_REEXTRACT)
            for code, path, msg in file_problems(storage, safe)]


def _check_artifacts(storage: CacheStorage, manifest: Manifest, bad_paths: set[str]) -> list[Problem]:
    return _file_problems(storage, manifest.artifacts, bad_paths)


def _check_counts(manifest: Manifest) -> list[Problem]:
    shards, counts = manifest.shards, manifest.counts
    found = {"samples": sum(s.samples for s in shards), "tokens": sum(s.tokens for s in shards),
             "skipped": len(manifest.skipped)}
    out = [Problem("count.manifest", f"{MANIFEST}:counts.{k}", f"{getattr(counts, k)}, shards add up to {v}", _FIX_RECOMMIT)
           for k, v in found.items() if getattr(counts, k) != v]
    for name in manifest.features:
        total = sum(s.feature_rows.get(name, 0) for s in shards)
        if counts.feature_rows.get(name) != total:
            out.append(Problem("count.manifest", f"{MANIFEST}:counts.feature_rows.{name}",
                               f"{counts.feature_rows.get(name)}, shards add up to {total}", _FIX_RECOMMIT))
    return out


# ----------------------------------------------------------------------------- shards


def _check_shard(storage, manifest: Manifest, i: int, entry: ShardEntry, bad_paths, check_values,
                 problems: list[Problem]) -> pa.Table | None:
    """Check one shard; returns its ``(sample_id, shard, row)`` table if its records are readable."""
    where = f"{entry.dir}"
    outside = [f.path for f in entry.files if not f.path.startswith(f"{entry.dir}/")]
    problems += [Problem("path.outside_shard", f"{MANIFEST}:shards[{i}]", f"file {p!r} is not under {entry.dir}/",
                         _FIX_RECOMMIT) for p in outside]
    file_bad = _file_problems(storage, entry.files, bad_paths)
    problems += file_bad
    if file_bad or outside:
        return None
    records = _read_records(storage, entry, manifest.features, problems)
    if records is None:
        return None
    try:  # checksums matched: only a faulty writer gets here with unreadable content
        group = zarr.open_group(storage.zarr_store(f"{entry.dir}/{TENSORS_DIR}"), mode="r", zarr_format=3)
        rows = records.to_pylist()
        problems += _check_records(where, entry, manifest.features, rows)
        for name, spec in manifest.features.items():
            problems += _check_feature(where, entry, spec, rows, group, check_values)
    except Exception as exc:  # zarr / numcodecs raise many types on malformed content
        problems.append(Problem("tensor.unreadable", f"{where}/{TENSORS_DIR}", f"{type(exc).__name__}: {exc}",
                                _FIX_REEXTRACT))
    return pa.table({"sample_id": records.column("sample_id"),
                     "shard": pa.array([i] * records.num_rows, pa.int32()),
                     "row": pa.array(range(records.num_rows), pa.int32())}, schema=INDEX_SCHEMA)


def _read_records(storage, entry: ShardEntry, features, problems: list[Problem]) -> pa.Table | None:
    rel = f"{entry.dir}/{RECORDS_FILE}"
    try:
        table = pa.ipc.open_file(storage.open_arrow(rel)).read_all()
    except (OSError, pa.ArrowInvalid) as exc:
        problems.append(Problem("records.unreadable", rel, str(exc), _FIX_REEXTRACT))
        return None
    if not table.schema.equals(records_schema(features), check_metadata=False):
        problems.append(Problem("records.schema", rel, f"schema {table.schema} does not match the declared features",
                                _FIX_REEXTRACT))
        return None
    return table


def _aggregate(code: str, where: str, what: str, ids: list[str], fix: str) -> list[Problem]:
    if not ids:
        return []
    shown = ", ".join(repr(x) for x in ids[:_SHOW]) + (" ..." if len(ids) > _SHOW else "")
    return [Problem(code, where, f"{len(ids)} sample(s) {what}: {shown}", fix)]


def _check_records(where: str, entry: ShardEntry, features, rows: list[dict]) -> list[Problem]:
    out = []
    if len(rows) != entry.samples:
        out.append(Problem("count.shard", where, f"{len(rows)} records, manifest says {entry.samples}", _FIX_RECOMMIT))
    tokens = sum(len(r["input_ids"]) for r in rows)
    if tokens != entry.tokens:
        out.append(Problem("count.shard", where, f"{tokens} tokens, manifest says {entry.tokens}", _FIX_RECOMMIT))
    bad_spans = [r["sample_id"] for r in rows if record_span_problems(r)]
    bad_status = [r["sample_id"] for r in rows if r["status"] not in STATUSES]
    out += _aggregate("record.spans", where, "have invalid spans", bad_spans, _FIX_REEXTRACT)
    out += _aggregate("record.status", where, f"have a status outside {STATUSES}", bad_status, _FIX_REEXTRACT)
    return out


def _expected_length(spec: FeatureSpec, rec: dict) -> int | None:
    """Rows the record's spans call for; None if its spans are malformed (reported as record.spans)."""
    if record_span_problems(rec):
        return None
    return expected_rows(spec, rec)


def _record_problems(spec: FeatureSpec, rec: dict) -> bool:
    if record_span_problems(rec):
        return False  # already reported as record.spans
    spans = spans_from_record(rec)
    if spec.name == "question_hidden":
        return list(rec["question_hidden_positions"]) != question_positions(spans, spec.select)
    if spec.name == "visual_gram":
        return len(rec["visual_gram_n"]) != len(spans.images) or any(n <= 0 for n in rec["visual_gram_n"])
    return False


def _check_feature(where: str, entry: ShardEntry, spec: FeatureSpec, rows: list[dict], group, check_values) -> list[Problem]:
    name, out = spec.name, []
    fwhere = f"{where}/{TENSORS_DIR}/{name}"
    order, length, meta = [], [], []
    cursor = 0
    for rec in rows:
        start, n = rec[f"{name}_start"], rec[f"{name}_length"]
        if start != cursor or n < 0:
            order.append(rec["sample_id"])
        expected = _expected_length(spec, rec)
        if expected is not None and n != expected:
            length.append(rec["sample_id"])
        if _record_problems(spec, rec):
            meta.append(rec["sample_id"])
        cursor = start + max(n, 0)
    out += _aggregate("offsets.order", fwhere, "have offsets that overlap or leave gaps", order, _FIX_REEXTRACT)
    out += _aggregate("offsets.length", fwhere, "have a row count that does not match their spans", length, _FIX_REEXTRACT)
    out += _aggregate("record.positions", fwhere, "have recorded positions / image sizes inconsistent with their spans",
                      meta, _FIX_REEXTRACT)
    if entry.feature_rows.get(name) != cursor:
        out.append(Problem("count.feature_rows", fwhere, f"records cover {cursor} rows, manifest says "
                           f"{entry.feature_rows.get(name)}", _FIX_RECOMMIT))
    out += _check_arrays(fwhere, spec, rows, group, cursor, check_values)
    return out


def _check_arrays(fwhere: str, spec: FeatureSpec, rows: list[dict], group, total: int, check_values) -> list[Problem]:
    out = []
    starts = np.array([r[f"{spec.name}_start"] for r in rows], dtype=np.int64)
    lengths = np.array([r[f"{spec.name}_length"] for r in rows], dtype=np.int64)
    arrays = {}
    for part in feature_parts(spec):
        try:
            arrays[part.name] = group[f"{spec.name}/{part.name}"]
        except KeyError:
            out.append(Problem("tensor.missing", f"{fwhere}/{part.name}", "array is missing", _FIX_REEXTRACT))
    if arrays:  # what a reader would slice: each record's rows must lie inside every array
        n_rows = min(a.shape[0] if a.shape else 0 for a in arrays.values())
        bad = np.nonzero((starts < 0) | (lengths < 0) | (starts + lengths > n_rows))[0]
        outside = [rows[j]["sample_id"] for j in bad]
        out += _aggregate("offsets.bounds", fwhere, f"have rows outside the arrays' {n_rows} rows (a reader would get "
                          f"fewer rows than recorded)", outside, _FIX_REEXTRACT)
    for part in feature_parts(spec):
        if part.name not in arrays:
            continue
        arr = arrays[part.name]
        shape = (total, part.width) if part.width else (total,)
        if tuple(arr.shape) != shape or np.dtype(arr.dtype) != part.dtype:
            out.append(Problem("tensor.shape", f"{fwhere}/{part.name}", f"array {tuple(arr.shape)} {arr.dtype}, records "
                               f"and spec need {shape} {part.dtype}", _FIX_REEXTRACT))
            continue
        if check_values:
            bad_rows = _nonfinite_rows(spec, part.name, arr[...])
            ids = sorted({rows[j]["sample_id"] for j in np.searchsorted(starts, bad_rows, side="right") - 1})
            out += _aggregate("tensor.nonfinite", f"{fwhere}/{part.name}", "have NaN/Inf values", ids, _FIX_REEXTRACT)
    return out


def _nonfinite_rows(spec: FeatureSpec, part: str, data: np.ndarray) -> np.ndarray:
    """Row indices of ``data`` (one stored part) holding a NaN/Inf once decoded."""
    values = _as_float(spec, part, data)
    if values is None:
        return np.zeros(0, dtype=np.int64)
    return np.nonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))[0]


def _as_float(spec: FeatureSpec, part: str, data: np.ndarray) -> np.ndarray | None:
    """A stored part as float32 values, or None for parts that cannot hold NaN/Inf."""
    if part == "topk_ids":
        return None
    codec = spec.codec if part in ("data", "topk_logprobs") else "f32"
    bits = torch.from_numpy(np.ascontiguousarray(data))
    if codec == "bf16":
        return bits.view(torch.int16).view(torch.bfloat16).float().numpy()
    if codec == "fp8_e4m3":
        return bits.view(torch.float8_e4m3fn).float().numpy()
    return None if codec == "int8" else data


# ----------------------------------------------------------------------------- ids and index


def _check_ids(storage, manifest: Manifest, tables: list[pa.Table], bad_paths) -> list[Problem]:
    table = pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()
    table = table.take(pc.sort_indices(table, sort_keys=[("sample_id", "ascending")]))
    ids = table.column("sample_id").to_pylist()
    dups = sorted({a for a, b in zip(ids, ids[1:]) if a == b})
    out = [Problem("sample.duplicate", MANIFEST, f"sample id {d!r} occurs more than once", _FIX_REEXTRACT)
           for d in dups]
    skipped_cached = sorted(set(s.sample_id for s in manifest.skipped) & set(ids))
    out += _aggregate("sample.skipped_and_cached", f"{MANIFEST}:skipped", "are both skipped and cached",
                      skipped_cached, _FIX_RECOMMIT)
    if manifest.index is None:
        if ids:
            out.append(Problem("index.missing", MANIFEST, "the manifest has no sample-id index", _FIX_RECOMMIT))
        return out
    idx_bad = _file_problems(storage, [manifest.index], bad_paths)
    if idx_bad or manifest.index.path in bad_paths:
        return out + idx_bad
    if len(tables) == len(manifest.shards) and not _index_matches(storage, manifest, table):
        out.append(Problem("index.mismatch", manifest.index.path,
                           "the sample-id index does not match the shard records", _FIX_RECOMMIT))
    return out


def _index_matches(storage, manifest: Manifest, table: pa.Table) -> bool:
    """Whether the index file holds exactly the sorted ``(sample_id, shard, row)`` of the records."""
    want = zip(*(table.column(c).to_pylist() for c in ("sample_id", "shard", "row")))
    return list(SampleIndex(storage, manifest.index)) == list(want)


