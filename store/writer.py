"""Writing a teacher cache: one :class:`CacheWriter` per rank, then :func:`commit_cache`.

Protocol (crash-safe, exactly once):

1. A writer owns rank ``r``: it alone writes shards ``shards/r<r>-<seq>`` (a lock file enforces
   it locally). Samples are buffered and a shard is written when it reaches ``shard_tokens``
   input tokens or ``shard_bytes`` encoded bytes; locally it is written under a temporary name
   and renamed when complete.
2. After a shard is complete the writer atomically replaces ``ranks/rank-<r>.json`` with its
   full shard list: that file is the commit point. A crash leaves complete committed shards,
   plus temporaries / unlisted shards that the next writer of the rank deletes.
3. On reopening, a writer skips every sample id already committed (by any rank) or skipped.
4. :func:`commit_cache` merges the rank lists, writes the sorted sample-id index and finally
   ``manifest.json``. A single-rank writer commits on a clean exit (``commit=True``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import numpy as np
import torch

from genrecal.store.codecs import encode_feature
from genrecal.store.errors import CacheIntegrityError, CacheWriteError
from genrecal.store.index import duplicate_ids, read_sample_ids, sorted_id_table, write_index
from genrecal.store.logit_stats import STAT_FIELDS, LogitStats
from genrecal.store.schema import (
    FORMAT_VERSION, MANIFEST, RANKS_DIR, SHARDS_DIR, TEACHER_DIR, TMP_PREFIX, CacheHeader, Counts,
    FeatureSpec, FileEntry, Manifest, RankLog, ShardEntry, SkippedSample, TeacherFingerprint,
    answer_target_positions, answer_window_positions, parse_shard_name, question_positions,
    rank_log_path, shard_name,
)
from genrecal.store.shard import ShardBuffer, write_shard
from genrecal.store.storage import CacheStorage
from genrecal.store.spans import Spans

DEFAULT_SHARD_TOKENS = 1 << 20
DEFAULT_SHARD_BYTES = 512 << 20


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class IdSet:
    """A set of sample ids held as sorted 128-bit digests (compact for millions of ids).

    Keys end in a 0x01 byte: numpy's fixed-width bytes drop trailing NULs, which would make a
    digest ending in 0x00 unfindable.
    """

    def __init__(self):
        self._sorted = np.zeros(0, dtype="S17")
        self._pending: set[bytes] = set()

    @staticmethod
    def _key(sample_id: str) -> bytes:
        return hashlib.blake2b(sample_id.encode(), digest_size=16).digest() + b"\x01"

    def __contains__(self, sample_id: str) -> bool:
        key = self._key(sample_id)
        if key in self._pending:
            return True
        i = np.searchsorted(self._sorted, key)
        return bool(i < len(self._sorted) and self._sorted[i] == key)

    def add(self, sample_id: str) -> None:
        self._pending.add(self._key(sample_id))
        if len(self._pending) >= 1 << 16:
            self.compact()

    def compact(self) -> None:
        new = np.array(sorted(self._pending), dtype="S17")
        self._sorted = np.union1d(self._sorted, new)
        self._pending.clear()


# ----------------------------------------------------------------------------- rank logs


def read_rank_logs(storage: CacheStorage) -> dict[int, RankLog]:
    """Every rank's committed shard list, by rank."""
    logs = {}
    for name in storage.list_dir(RANKS_DIR):
        if name.startswith("rank-") and name.endswith(".json"):
            rel = f"{RANKS_DIR}/{name}"
            try:
                log = RankLog.model_validate_json(storage.read_bytes(rel))
            except ValueError as exc:
                raise CacheIntegrityError(f"{storage.where(rel)}: invalid rank shard list ({exc}); "
                                          f"it is written atomically, so this file was altered") from exc
            logs[log.rank] = log
    return logs


def header_differences(a: CacheHeader, b: CacheHeader) -> list[str]:
    """Human-readable differences between two cache headers (empty if equal)."""
    da, db = a.model_dump(mode="json"), b.model_dump(mode="json")
    return [f"{k}: {json.dumps(da[k], sort_keys=True)} != {json.dumps(db[k], sort_keys=True)}"
            for k in da if da[k] != db[k]]


# ----------------------------------------------------------------------------- writer


class CacheWriter:
    """Writes samples of one rank into a cache; a context manager.

    ``features``: the declared :class:`FeatureSpec` s (every sample must provide each of them);
    ``settings``: extraction settings recorded in the manifest (JSON-serialisable dict);
    ``teacher``: the teacher fingerprint (:mod:`genrecal.store.fingerprint`).
    ``commit``: merge all ranks into ``manifest.json`` on a clean exit (leave False for
    multi-rank runs and call :func:`commit_cache` once every rank is done).
    ``threads``: threads that encode a shard's chunks and checksum its files (1: the calling
    thread alone; the bytes written do not depend on it).
    """

    def __init__(self, url, *, teacher: TeacherFingerprint, features: Iterable[FeatureSpec] | Mapping,
                 settings: Mapping | None = None, rank: int = 0,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 commit: bool = True, storage_options: dict | None = None, threads: int = 1):
        specs = list(features.values()) if isinstance(features, Mapping) else list(features)
        settings = _json_normalised(dict(settings or {}))
        self.header = CacheHeader(format_version=FORMAT_VERSION, teacher=teacher, settings=settings,
                                  features={s.name: s for s in specs})
        if len(self.header.features) != len(specs):
            raise CacheWriteError(f"a feature is declared twice in {[s.name for s in specs]}")
        if rank < 0:
            raise CacheWriteError(f"rank must be >= 0, got {rank}")
        self.storage = CacheStorage(url, storage_options)
        self.rank, self.commit = rank, commit
        self.shard_tokens, self.shard_bytes = shard_tokens, shard_bytes
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise CacheWriteError(f"threads must be an integer >= 1, got {threads!r}")
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._lock_fd = None
        self._open = False

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "CacheWriter":
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(commit=self.commit and exc_type is None)

    def open(self) -> None:
        """Lock the rank, check settings against the cache, clean up and load committed ids."""
        self._lock()
        try:
            self._load_state()
        except BaseException:
            self._unlock()
            raise

    def _load_state(self) -> None:
        logs = read_rank_logs(self.storage)
        self._check_header(logs)
        own = logs.get(self.rank)
        self._shards = list(own.shards) if own else []
        self._skipped = list(own.skipped) if own else []
        self._created_at = own.created_at if own else _now()
        self._remove_uncommitted()
        self._done = IdSet()
        self._session = IdSet()
        for log in logs.values():
            self._load_ids(log)
        self._done.compact()
        self._seq = 1 + max((parse_shard_name(s.name)[1] for s in self._shards), default=-1)
        self._buffer = ShardBuffer(self.header.features)
        self._open = True
        self._log_written = (len(self._shards), len(self._skipped)) if own is not None else None
        if own is None:
            self._write_log()

    def close(self, commit: bool = True) -> Manifest | None:
        """Write the buffered samples as a last shard, record skips, optionally commit."""
        if not self._open:
            return None
        try:
            self.flush()
            if self._log_written != (len(self._shards), len(self._skipped)):  # skips since the last shard
                self._write_log()
        finally:
            self._open = False
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
            self._unlock()
        return commit_cache(self.storage.url, self.storage.options) if commit else None

    def _lock(self) -> None:
        if not self.storage.local:
            return
        import fcntl

        path = self.storage.path(f"{RANKS_DIR}/rank-{self.rank:05d}.lock")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CacheWriteError(f"rank {self.rank} of cache {self.storage.url} is being written by another "
                                  f"process (lock {path}); give every concurrent writer a distinct rank") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _check_header(self, logs: dict[int, RankLog]) -> None:
        for rank, log in sorted(logs.items()):
            diffs = header_differences(log.header, self.header)
            if diffs:
                raise CacheWriteError(
                    f"cache {self.storage.url} (rank {rank}) was written with other settings than this "
                    f"writer's:\n  " + "\n  ".join(f"cache vs yours: {d}" for d in diffs) +
                    "\nUse the same teacher, features and settings to resume, or write to a new cache.")

    def _remove_uncommitted(self) -> None:
        """Delete this rank's temporaries and shards that never made it into its shard list."""
        listed = {s.name for s in self._shards}
        for name in self.storage.list_dir(SHARDS_DIR):
            parsed = parse_shard_name(name)
            own_tmp = name.startswith(f"{TMP_PREFIX}r{self.rank:05d}-")
            if own_tmp or (parsed and parsed[0] == self.rank and name not in listed):
                self.storage.remove(f"{SHARDS_DIR}/{name}")

    def _load_ids(self, log: RankLog) -> None:
        for entry in log.shards:
            for sample_id in read_sample_ids(self.storage, entry).to_pylist():
                self._done.add(sample_id)
        for skip in log.skipped:
            self._done.add(skip.sample_id)

    # ------------------------------------------------------------------ samples

    def has(self, sample_id: str) -> bool:
        """True if ``sample_id`` is already committed, skipped, or added in this session."""
        self._require_open()
        return sample_id in self._session or sample_id in self._done

    def add(self, sample_id: str, *, content_hash: str, input_ids, spans: Spans | dict, status: str = "ok",
            answer_hidden: torch.Tensor | None = None, question_hidden: torch.Tensor | None = None,
            visual_gram: Sequence[torch.Tensor] | None = None, logit_stats: LogitStats | None = None) -> bool:
        """Buffer one sample; returns False (and stores nothing) if it was committed before.

        input_ids: int [L] teacher input ids; spans: see :class:`Spans`.
        answer_hidden: float [n_win, d] at ``answer_window_positions(spans)``;
        question_hidden: float [n_q, d] at ``question_positions(spans, select)``;
        visual_gram: one symmetric [n_i, n_i] Gram per image span
        (``gram_from_upper(visual_gram(states), n_i)``, :mod:`genrecal.store.gram`); logit_stats: at ``answer_target_positions(spans)``.
        Raises :class:`CacheWriteError` listing every problem of the sample.
        """
        self._require_open()
        if sample_id in self._session:
            raise CacheWriteError(f"sample {sample_id!r} was already added or skipped by this writer; "
                                  f"sample ids must be unique in a cache")
        if sample_id in self._done:
            return False
        values = {"answer_hidden": answer_hidden, "question_hidden": question_hidden,
                  "visual_gram": visual_gram, "logit_stats": logit_stats}
        record, problems = _make_record(sample_id, content_hash, input_ids, spans, status)
        if not problems:
            problems = _feature_problems(self.header.features, values, record)
        if problems:
            raise CacheWriteError(f"sample {sample_id!r} cannot be cached:\n  - " + "\n  - ".join(problems))
        encoded = {n: encode_feature(s, values[n]) for n, s in self.header.features.items()}
        self._buffer.add(record, encoded)
        self._session.add(sample_id)
        if self._buffer.tokens >= self.shard_tokens or self._buffer.nbytes >= self.shard_bytes:
            self.flush()
        return True

    def skip(self, sample_id: str, reason: str, file: str = "") -> None:
        """Record that ``sample_id`` (from dataset ``file``) was not cached, and why.

        An id already cached or skipped by an earlier run keeps that outcome (nothing is recorded);
        one already added or skipped by this writer raises :class:`CacheWriteError`.
        """
        self._require_open()
        if sample_id in self._session:
            raise CacheWriteError(f"sample {sample_id!r} cannot be skipped: this writer already added or skipped it")
        if sample_id in self._done:
            return
        self._skipped.append(SkippedSample(sample_id=sample_id, reason=reason, file=str(file)))
        self._session.add(sample_id)

    def flush(self) -> ShardEntry | None:
        """Write the buffered samples as one shard and commit it to the rank's shard list."""
        self._require_open()
        if not len(self._buffer):
            return None
        if self.threads > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cache-writer")
        entry = write_shard(self.storage, shard_name(self.rank, self._seq), self.rank, self._buffer, self._pool)
        self._shards.append(entry)
        self._write_log()
        self._seq += 1
        self._buffer = ShardBuffer(self.header.features)
        return entry

    def _write_log(self) -> None:
        self._log_written = (len(self._shards), len(self._skipped))
        log = RankLog(header=self.header, rank=self.rank, created_at=self._created_at,
                      shards=tuple(self._shards), skipped=tuple(self._skipped))
        self.storage.write_bytes(rank_log_path(self.rank), log.model_dump_json(indent=1).encode())

    def _require_open(self) -> None:
        if not getattr(self, "_open", False):
            raise CacheWriteError("the cache writer is not open: use it as `with CacheWriter(...) as w:`")

    @property
    def shards(self) -> tuple[ShardEntry, ...]:
        return tuple(self._shards)


# ----------------------------------------------------------------------------- sample checks


def _json_normalised(settings: dict) -> dict:
    """``settings`` as it reads back from JSON (tuples become lists), or CacheWriteError."""
    try:
        return json.loads(json.dumps(settings, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise CacheWriteError(f"extraction settings must be a JSON-serialisable dict: {exc}") from exc


def _make_record(sample_id, content_hash, input_ids, spans, status) -> tuple[dict, list[str]]:
    problems = []
    if not isinstance(sample_id, str) or not sample_id:
        problems.append("sample_id must be a non-empty string")
    if not isinstance(content_hash, str) or not content_hash:
        problems.append("content_hash must be a non-empty string (genrecal.data.sample.content_hash)")
    if status not in ("ok", "truncated"):
        problems.append(f"status {status!r} is not one of ('ok', 'truncated')")
    ids = torch.as_tensor(input_ids)
    if ids.ndim != 1 or ids.is_floating_point() or ids.numel() == 0:
        problems.append(f"input_ids must be a non-empty 1-D integer sequence, got shape {tuple(ids.shape)} {ids.dtype}")
        ids = torch.zeros(0, dtype=torch.long)
    elif ids.min() < 0 or ids.long().max() >= 2**31:
        problems.append("input_ids must lie in [0, 2^31)")
    try:
        spans = Spans.coerce(spans)
        problems += [f"spans: {p}" for p in spans.problems(len(ids))]
    except (ValueError, TypeError) as exc:
        problems.append(f"spans: {exc}")
        spans = Spans()
    record = {"sample_id": sample_id, "content_hash": content_hash, "status": status,
              "input_ids": ids.tolist(), "image_spans": [list(p) for p in spans.images],
              "question_spans": [list(p) for p in spans.questions],
              "answer_spans": [list(p) for p in spans.answers], "_spans": spans}
    return record, problems


def _feature_problems(features: dict[str, FeatureSpec], values: dict, record: dict) -> list[str]:
    """Every mismatch between the given feature values and the declared features."""
    spans = record.pop("_spans")
    problems = []
    for name, value in values.items():
        spec = features.get(name)
        if spec is None:
            if value is not None:
                problems.append(f"{name} given but not declared in the writer's features {sorted(features)}")
            continue
        if value is None:
            problems.append(f"{name} is declared but missing; every sample must provide every declared feature")
            continue
        problems += [f"{name}: {p}" for p in _CHECKS[name](spec, value, spans, record)]
    return problems


def _tensor_problems(t, rows: int, width: int, what: str) -> list[str]:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return [f"{what} must be a floating-point torch.Tensor"]
    if tuple(t.shape) != (rows, width):
        return [f"{what} has shape {tuple(t.shape)}, expected ({rows}, {width})"]
    if not _has_nonfinite(t):
        return []
    bad = (~torch.isfinite(t)).nonzero()
    return [f"{what} has {len(bad)} NaN/Inf values, first at {bad[0].tolist()}"]


def _has_nonfinite(t: torch.Tensor) -> bool:
    """Any NaN/Inf in ``t``; bfloat16 is tested on its exponent bits (5x faster than isfinite)."""
    if t.dtype == torch.bfloat16:
        return _bf16_nonfinite(t.contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1))
    return not bool(torch.isfinite(t).all())


_SCAN = 1 << 16  # elements per block: the masked copy stays in the CPU cache


def _bf16_nonfinite(bits: np.ndarray) -> bool:
    """bits: uint16 [n] bfloat16 bit patterns -> any NaN/Inf (exponent bits all ones, i.e.
    ``bits & 0x7FFF >= 0x7F80``), scanned block by block (one pass over memory)."""
    buf = np.empty(min(len(bits), _SCAN), np.uint16)
    for i in range(0, len(bits), _SCAN):
        block = bits[i:i + _SCAN]
        out = buf[:len(block)]
        np.bitwise_and(block, 0x7FFF, out=out)
        if out.max() >= 0x7F80:
            return True
    return False


def _check_answer(spec, value, spans, record) -> list[str]:
    rows = len(answer_window_positions(spans))
    return _tensor_problems(value, rows, spec.width, "answer window rows (answer_window_positions)")


def _check_question(spec, value, spans, record) -> list[str]:
    positions = question_positions(spans, spec.select)
    record["question_hidden_positions"] = positions
    return _tensor_problems(value, len(positions), spec.width, f"question rows (question_positions, select={spec.select})")


def _check_gram(spec, value, spans, record) -> list[str]:
    grams = list(value)
    if len(grams) != len(spans.images):
        return [f"{len(grams)} Gram matrices for {len(spans.images)} image spans; give one per image"]
    problems = []
    for i, k in enumerate(grams):
        n = k.shape[0] if isinstance(k, torch.Tensor) and k.ndim == 2 else -1
        problems += _tensor_problems(k, max(n, 0), max(n, 0), f"image {i} Gram") if n > 0 else \
            [f"image {i} Gram must be a non-empty square [n, n] float tensor"]
    record["visual_gram_n"] = [int(k.shape[0]) if isinstance(k, torch.Tensor) and k.ndim == 2 else 0 for k in grams]
    return problems


def _check_stats(spec, value, spans, record) -> list[str]:
    if not isinstance(value, LogitStats):
        return ["logit_stats must be a genrecal.store.logit_stats.LogitStats (logit_statistics)"]
    rows = len(answer_target_positions(spans))
    if value.n != rows:
        return [f"{value.n} rows, expected {rows} (answer_target_positions)"]
    problems = value.problems(spec.width)
    for name in ("topk_logprobs",) + STAT_FIELDS:
        t = getattr(value, name)
        if not problems and not torch.isfinite(t).all():
            problems.append(f"{name} has NaN/Inf values")
    if not problems and value.topk_ids.numel() and (value.topk_ids.min() < 0 or value.topk_ids.long().max() >= 2**31):
        problems.append("topk_ids must lie in [0, 2^31)")
    return problems


_CHECKS = {"answer_hidden": _check_answer, "question_hidden": _check_question,
           "visual_gram": _check_gram, "logit_stats": _check_stats}


# ----------------------------------------------------------------------------- commit


def commit_cache(url, storage_options: dict | None = None) -> Manifest:
    """Merge every rank's shard list into ``manifest.json`` (written last); returns the manifest.

    Checks that all ranks agree on teacher, features and settings, that every listed shard file
    is present with its recorded size, and that no sample id occurs twice. Writes the sorted
    sample-id index and lists the teacher artifacts with their checksums.
    """
    storage = CacheStorage(url, storage_options)
    logs = read_rank_logs(storage)
    if not logs:
        raise CacheWriteError(f"cache {storage.url} has no rank shard list under {RANKS_DIR}/: "
                              f"nothing was written; run the extraction first")
    header = _common_header(storage, logs)
    shards = [s for rank in sorted(logs) for s in logs[rank].shards]
    _check_shard_files(storage, shards)
    table = sorted_id_table(storage, shards)
    dups = duplicate_ids(table, shards)
    if dups:
        shown = "; ".join(f"{k!r} in {v}" for k, v in list(dups.items())[:10])
        raise CacheWriteError(f"cache {storage.url}: {len(dups)} sample id(s) were written by more than one "
                              f"rank/shard ({shown}); give each rank a disjoint part of the dataset")
    index = write_index(storage, table) if shards else None
    manifest = _build_manifest(storage, logs, header, shards, index)
    storage.write_bytes(MANIFEST, manifest.model_dump_json(indent=1).encode())
    _remove_stale_indexes(storage, index)
    return manifest


def _common_header(storage: CacheStorage, logs: dict[int, RankLog]) -> CacheHeader:
    first = min(logs)
    for rank, log in logs.items():
        diffs = header_differences(logs[first].header, log.header)
        if diffs:
            raise CacheWriteError(f"cache {storage.url}: rank {rank} was written with other settings than rank "
                                  f"{first}:\n  " + "\n  ".join(diffs) + "\nRe-extract that rank with the same settings.")
    return logs[first].header


def _check_shard_files(storage: CacheStorage, shards: list[ShardEntry]) -> None:
    problems = []
    for entry in shards:
        for f in entry.files:
            if not storage.exists(f.path):
                problems.append(f"{f.path}: missing")
            elif storage.size(f.path) != f.size:
                problems.append(f"{f.path}: {storage.size(f.path)} bytes, expected {f.size}")
    if problems:
        raise CacheIntegrityError(f"cache {storage.url}: committed shard files are damaged:\n  - " +
                                  "\n  - ".join(problems[:20]) + "\nRe-extract the affected rank into a new cache.")


def _artifact_entries(storage: CacheStorage) -> tuple[FileEntry, ...]:
    out = []
    for rel in storage.list_files(TEACHER_DIR):
        size, digest = storage.sha256(rel)
        out.append(FileEntry(path=rel, size=size, sha256=digest))
    return tuple(out)


def _build_manifest(storage, logs, header, shards, index) -> Manifest:
    skipped = {s.sample_id: s for rank in sorted(logs) for s in logs[rank].skipped}
    rows = {name: sum(s.feature_rows.get(name, 0) for s in shards) for name in header.features}
    counts = Counts(samples=sum(s.samples for s in shards), tokens=sum(s.tokens for s in shards),
                    feature_rows=rows, skipped=len(skipped))
    created = {"created_at": min(log.created_at for log in logs.values()), "committed_at": _now(),
               "genrecal_version": _version(), "host": platform.node(), "ranks": sorted(logs)}
    return Manifest(format_version=FORMAT_VERSION, created=created, header=header, shards=tuple(shards),
                    counts=counts, skipped=tuple(skipped.values()), index=index,
                    artifacts=_artifact_entries(storage)).sealed()


def _remove_stale_indexes(storage: CacheStorage, keep: FileEntry | None) -> None:
    for name in storage.list_dir("index"):
        rel = f"index/{name}"
        if keep is None or rel != keep.path:
            storage.remove(rel)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("genrecal")
    except PackageNotFoundError:
        return "unknown"


