"""One shard: an Arrow IPC file of per-sample records plus a zarr v3 group of flat tensors.

:class:`ShardBuffer` accumulates encoded samples in memory and :func:`write_shard` writes them
under a temporary name, then renames the directory into place (local filesystems); the caller
records the returned :class:`ShardEntry` in its rank's shard list, which is the commit point.
:class:`ShardReader` reads a committed shard back, by row or sequentially; it refuses a shard
whose directory holds a symlink out of the cache root, and checks every record it returns
(:func:`record_row_problem`): valid spans, rows inside the arrays, as many rows as the spans need.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import zarr
from zarr.storage import MemoryStore

from genrecal.store.chunkio import EMPTY, ArrayCodec
from genrecal.store.codecs import array_layout, decode_feature, feature_parts, raw_bytes
from genrecal.store.errors import CacheIntegrityError
from genrecal.store.gram import upper_triangle_size
from genrecal.store.logit_stats import LogitStats
from genrecal.store.schema import (
    FORMAT_VERSION, RECORDS_FILE, SHARDS_DIR, TENSORS_DIR, TMP_PREFIX, FeatureSpec, FileEntry,
    ShardEntry, answer_target_positions, answer_window_positions, question_positions, record_span_problems,
    records_schema, spans_from_record,
)
from genrecal.store.storage import CacheStorage
from genrecal.store.spans import Spans


@dataclass(frozen=True)
class CachedSample:
    """One sample read back from a cache.

    input_ids: int64 [L]; answer_hidden: [n_win, d] at :meth:`answer_positions` (the answer
    windows, turn after turn); question_hidden: [n_q, d] at ``question_positions`` (int64);
    visual_gram: one symmetric [n_i, n_i] Gram per image; logit_stats: at :meth:`target_positions`.
    Absent features are None.
    """

    sample_id: str
    content_hash: str
    status: str
    input_ids: torch.Tensor
    spans: Spans
    answer_hidden: torch.Tensor | None = None
    question_hidden: torch.Tensor | None = None
    question_positions: torch.Tensor | None = None
    visual_gram: tuple[torch.Tensor, ...] | None = None
    logit_stats: LogitStats | None = None

    def answer_positions(self) -> torch.Tensor:
        """int64 [n_win]: token positions of the ``answer_hidden`` rows."""
        return torch.tensor(answer_window_positions(self.spans), dtype=torch.long)

    def target_positions(self) -> torch.Tensor:
        """int64 [n_tgt]: positions of the ``logit_stats`` rows (next token is an answer token)."""
        return torch.tensor(answer_target_positions(self.spans), dtype=torch.long)

    def answer_turn_rows(self) -> list[tuple[int, int]]:
        """Per answer turn, the half-open row range of its window in ``answer_hidden``."""
        out, start = [], 0
        for s, e in self.spans.answers:
            out.append((start, start + e - s + 1))
            start += e - s + 1
        return out


# ----------------------------------------------------------------------------- writing


class ShardBuffer:
    """Encoded samples of one shard, held in memory until the shard is written."""

    def __init__(self, features: dict[str, FeatureSpec]):
        self.features = features
        self.records: list[dict] = []
        self.parts: dict[str, dict[str, list[np.ndarray]]] = {
            name: {p.name: [] for p in feature_parts(spec)} for name, spec in features.items()}
        self.rows = {name: 0 for name in features}
        self.tokens = 0
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.records)

    def add(self, record: dict, encoded: dict[str, dict[str, np.ndarray]]) -> None:
        """Append one sample: ``record`` (records-schema fields except offsets), encoded parts."""
        record = dict(record)
        for name, parts in encoded.items():
            length = len(next(iter(parts.values())))
            record[f"{name}_start"], record[f"{name}_length"] = self.rows[name], length
            self.rows[name] += length
            for part, arr in parts.items():
                self.parts[name][part].append(arr)
                self.nbytes += arr.nbytes
        self.records.append(record)
        self.tokens += len(record["input_ids"])

    def files(self, pool: ThreadPoolExecutor | None = None) -> dict[str, bytes | list[bytes]]:
        """The shard's files, keyed by path inside the shard directory: each its bytes, or a list
        of byte strings that make it up in order (the tensor objects: never joined in memory);
        ``pool``: threads that encode the tensor chunks (None: this thread)."""
        files = {RECORDS_FILE: _records_bytes(self.records, self.features)}
        files.update({f"{TENSORS_DIR}/{k}": v for k, v in self._zarr_files(pool).items()})
        return files

    def _zarr_files(self, pool: ThreadPoolExecutor | None) -> dict[str, bytes | list[bytes]]:
        """zarr writes the metadata; :class:`ArrayCodec` the shard objects (the bytes zarr writes)."""
        store: dict = {}
        group = zarr.open_group(MemoryStore(store), mode="w", zarr_format=3,
                                attributes={"genrecal_cache_format": FORMAT_VERSION})
        objects = {}
        for name, spec in self.features.items():
            for part in feature_parts(spec):
                pieces = [np.asarray(a, dtype=part.dtype) for a in self.parts[name][part.name]]
                layout = array_layout(sum(len(a) for a in pieces), part)
                group.create_array(f"{name}/{part.name}", **layout, attributes={"codec": spec.codec, "feature": name})
                codec = ArrayCodec.from_layout(layout)
                encoded = codec.encode(pieces, pool)
                if encoded is not None:
                    objects[f"{name}/{part.name}/{codec.chunk_key()}"] = encoded
        files = {key: buf.to_bytes() for key, buf in store.items()}
        files.update(objects)
        return files


def _records_bytes(records: list[dict], features: dict[str, FeatureSpec]) -> bytes:
    table = pa.Table.from_pylist(records, schema=records_schema(features))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def write_shard(storage: CacheStorage, name: str, rank: int, buffer: ShardBuffer,
                pool: ThreadPoolExecutor | None = None) -> ShardEntry:
    """Write ``buffer`` as shard ``name``; returns its entry (sizes and sha256 of every file).

    Locally the files go to a temporary directory renamed into place once complete; on other
    filesystems they are written in place (rename is a copy there) and the rank's shard list,
    written by the caller afterwards, is the commit point. The checksums are of the bytes
    written, taken from memory (on ``pool``'s threads, while the files are written, if given).
    """
    files = buffer.files(pool)
    keys = sorted(files)
    digests = [pool.submit(_sha256, files[k]) for k in keys] if pool is not None else None
    final = f"{SHARDS_DIR}/{name}"
    target = f"{SHARDS_DIR}/{TMP_PREFIX}{name}-{secrets.token_hex(4)}" if storage.local else final
    # without a pool, the checksums are taken while the fsyncs wait on the disk
    hexes = storage.write_tree(target, files, while_syncing=None if pool is not None else
                               (lambda: [_sha256(files[k]) for k in keys]))
    if target != final:
        storage.rename(target, final)
    hexes = [d.result() for d in digests] if digests is not None else hexes
    entries = tuple(FileEntry(path=f"{final}/{k}", size=_size(files[k]), sha256=h) for k, h in zip(keys, hexes))
    return ShardEntry(name=name, rank=rank, samples=len(buffer), tokens=buffer.tokens,
                      feature_rows=dict(buffer.rows),
                      feature_bytes=_feature_bytes(files, buffer.features),
                      raw_bytes={n: raw_bytes(s, buffer.rows[n]) for n, s in buffer.features.items()},
                      files=entries)


def _is_tensor_object(path: str) -> bool:
    """Whether a shard file is a zarr shard object (``.../c/0/0``, ``.../c/0``): the large ones."""
    return f"/{TENSORS_DIR}/" in path and "/c/" in path


def _sha256(data: bytes | list[bytes]) -> str:
    """sha256 of a file's bytes (given whole or as its pieces in order); releases the GIL."""
    h = hashlib.sha256()
    for piece in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
        h.update(piece)
    return h.hexdigest()


def _size(data: bytes | list[bytes]) -> int:
    return len(data) if isinstance(data, (bytes, bytearray, memoryview)) else sum(len(p) for p in data)


def _feature_bytes(files: dict[str, bytes], features: dict[str, FeatureSpec]) -> dict[str, int]:
    return {name: sum(_size(v) for k, v in files.items() if k.startswith(f"{TENSORS_DIR}/{name}/"))
            for name in features}


# ----------------------------------------------------------------------------- reading


def file_problems(storage: CacheStorage, files) -> list[tuple[str, str, str]]:
    """``(code, path, message)`` for every file leaving the root through a symlink (not read),
    missing, or of the wrong size or checksum."""
    out = []
    for entry in files:
        real = storage.resolves_outside(entry.path)
        if real is not None:
            out.append(("path.symlink", entry.path, f"resolves through a symlink to {real}, outside the cache "
                                                    f"root {storage.real_root} (not read)"))
            continue
        if not storage.exists(entry.path):
            out.append(("file.missing", entry.path, "file is missing"))
            continue
        size, digest = storage.sha256(entry.path)
        if size != entry.size:
            out.append(("file.size", entry.path, f"size {size} bytes, manifest says {entry.size} (truncated?)"))
        elif digest != entry.sha256:
            out.append(("file.checksum", entry.path, f"sha256 {digest[:16]}..., manifest says {entry.sha256[:16]}..."))
    return out


def expected_rows(spec: FeatureSpec, rec: dict, spans: Spans | None = None) -> int:
    """Rows of feature ``spec`` that record ``rec`` calls for (its spans must be valid)."""
    spans = spans if spans is not None else spans_from_record(rec)
    if spec.name == "answer_hidden":
        return len(answer_window_positions(spans))
    if spec.name == "question_hidden":
        return len(question_positions(spans, spec.select))
    if spec.name == "logit_stats":
        return len(answer_target_positions(spans))
    return sum(upper_triangle_size(n) for n in rec["visual_gram_n"])


def record_row_problem(spec: FeatureSpec, rec: dict, array_rows: int, spans: Spans | None = None) -> str | None:
    """Why record ``rec``'s rows of ``spec`` cannot be read as its value, or None if they can.

    Its rows ``[start, start + length)`` must lie inside the ``array_rows`` rows of the feature's
    arrays and number what its spans call for; its question positions / image sizes must match
    its spans. The record's spans must be valid (:func:`record_span_problems`); ``spans``: them,
    if already built.
    """
    name = spec.name
    start, length = rec[f"{name}_start"], rec[f"{name}_length"]
    if start < 0 or length < 0:
        return f"negative offsets (start {start}, length {length})"
    if start + length > array_rows:
        return (f"its rows {start}..{start + length - 1} run past the end of the {name} arrays "
                f"({array_rows} rows)")
    spans = spans if spans is not None else spans_from_record(rec)
    if name == "visual_gram":
        sizes = list(rec["visual_gram_n"])
        if len(sizes) != len(spans.images) or any(n <= 0 for n in sizes):
            return f"its image sizes visual_gram_n={sizes} do not match its {len(spans.images)} image span(s)"
    need = expected_rows(spec, rec, spans)
    if length != need:
        return f"{length} {name} rows stored, its spans need {need}"
    if name == "question_hidden" and list(rec["question_hidden_positions"]) != question_positions(spans, spec.select):
        return "its recorded question positions do not match its spans"
    return None


class ShardReader:
    """Read access to one committed shard; files are checked on first use when ``verify``.

    Always (``verify`` or not): a shard directory holding a symlink out of the cache root is
    refused (:class:`~genrecal.store.errors.CacheFormatError`), the arrays must have the shape
    and dtype the manifest and feature specs call for, and each record read must pass
    :func:`record_row_problem` (:class:`CacheIntegrityError` naming the sample otherwise).
    """

    def __init__(self, storage: CacheStorage, entry: ShardEntry, features: dict[str, FeatureSpec],
                 verify: bool = True, pool: ThreadPoolExecutor | None = None):
        self.storage, self.entry, self.features, self.pool = storage, entry, features, pool
        storage.check_no_escape(entry.dir)
        self._pending: list = []
        if verify and pool is not None:
            self._verify_overlapped()
        elif verify:
            self.verify()
        self.records = self._open_records()
        self.group = self._open_group()
        self._arrays: dict[str, zarr.Array] = {}
        self._rows: dict[str, int] = {}
        self._direct: dict[str, tuple | None] = {}

    def verify(self) -> None:
        """Raise :class:`CacheIntegrityError` naming every bad file of this shard."""
        self._raise_bad(file_problems(self.storage, self.entry.files))

    def _verify_overlapped(self) -> None:
        """Verify on the pool's threads: the small files (records, metadata) before this returns,
        the tensor objects while their chunks are decoded; :meth:`_settle` waits for those and
        raises, before any decoded value leaves the reader."""
        futures = [(e, self.pool.submit(file_problems, self.storage, [e])) for e in self.entry.files]
        self._pending = [f for e, f in futures if _is_tensor_object(e.path)]
        if any(f.result() for e, f in futures if not _is_tensor_object(e.path)):
            self._settle()

    def _settle(self) -> None:
        """Wait for the overlapped checksums (if any); raise naming every bad file."""
        pending, self._pending = self._pending, []
        if pending:
            self._raise_bad([p for f in pending for p in f.result()] +
                            file_problems(self.storage, [e for e in self.entry.files
                                                         if not _is_tensor_object(e.path)]))

    def _raise_bad(self, bad: list) -> None:
        if bad:
            lines = "\n".join(f"  - {self.storage.where(path)}: {msg}" for _, path, msg in bad)
            raise CacheIntegrityError(
                f"shard {self.entry.name} of cache {self.storage.url} is corrupt:\n{lines}\n"
                f"Run `genrecal validate {self.storage.url}` for a full report; re-extract the "
                f"affected samples into a new cache (or restore the files from a copy).")

    def _open_records(self) -> pa.Table:
        rel = f"{self.entry.dir}/{RECORDS_FILE}"
        try:
            table = pa.ipc.open_file(self.storage.open_arrow(rel)).read_all()
        except (OSError, pa.ArrowInvalid) as exc:
            raise CacheIntegrityError(f"{self.storage.where(rel)}: cannot read the records ({exc}); "
                                      f"run `genrecal validate {self.storage.url}`") from exc
        if not table.schema.equals(records_schema(self.features), check_metadata=False):
            raise CacheIntegrityError(f"{self.storage.where(rel)}: the records' columns do not match the features "
                                      f"declared in the manifest; run `genrecal validate {self.storage.url}`")
        if table.num_rows != self.entry.samples:
            raise CacheIntegrityError(f"{self.storage.where(rel)}: {table.num_rows} records, the manifest says "
                                      f"{self.entry.samples}; run `genrecal validate {self.storage.url}`")
        return table

    def _open_group(self):
        rel = f"{self.entry.dir}/{TENSORS_DIR}"
        try:
            return zarr.open_group(self.storage.zarr_store(rel), mode="r", zarr_format=3)
        except Exception as exc:  # zarr raises several types for missing / malformed groups
            raise CacheIntegrityError(f"{self.storage.where(rel)}: cannot open the tensor group ({exc}); "
                                      f"run `genrecal validate {self.storage.url}`") from exc

    def __len__(self) -> int:
        return self.records.num_rows

    def record(self, row: int) -> dict:
        return self.records.slice(row, 1).to_pylist()[0]

    def array(self, feature: str, part: str) -> zarr.Array:
        """The zarr array of one feature part (opened once: its metadata is read on first use)."""
        key = f"{feature}/{part}"
        if key not in self._arrays:
            try:
                self._arrays[key] = self.group[key]
            except KeyError:
                raise CacheIntegrityError(f"{self.storage.where(self.entry.dir)}: tensor array {key} is missing; "
                                          f"run `genrecal validate {self.storage.url}`") from None
        return self._arrays[key]

    def rows(self, feature: str) -> int:
        """Rows of every array of ``feature``, checked once against the manifest and the spec."""
        if feature not in self._rows:
            want = self.entry.feature_rows.get(feature)
            for part in feature_parts(self.features[feature]):
                arr = self.array(feature, part.name)
                shape = (want, part.width) if part.width else (want,)
                if tuple(arr.shape) != shape or np.dtype(arr.dtype) != part.dtype:
                    raise CacheIntegrityError(
                        f"{self.storage.where(self.entry.dir)}: tensor array {feature}/{part.name} is "
                        f"{tuple(arr.shape)} {np.dtype(arr.dtype)}, the manifest and feature spec need {shape} "
                        f"{part.dtype}. Run `genrecal validate {self.storage.url}` for a full report; re-extract "
                        f"the affected samples into a new cache.")
            self._rows[feature] = want
        return self._rows[feature]

    def check_record(self, row: int, rec: dict, features) -> None:
        """Raise :class:`CacheIntegrityError` unless record ``rec`` (number ``row``) has valid spans
        and readable rows of every feature in ``features`` (see :func:`record_row_problem`)."""
        bad = record_span_problems(rec)
        problem = f"invalid spans ({'; '.join(bad)})" if bad else None
        spans = None if problem else spans_from_record(rec)
        for name in () if problem else features:
            problem = record_row_problem(self.features[name], rec, self.rows(name), spans)
            if problem:
                problem = f"feature {name}: {problem}"
                break
        if problem:
            raise CacheIntegrityError(
                f"{self.storage.where(self.entry.dir)}: sample {rec['sample_id']!r} (record {row} of shard "
                f"{self.entry.name}): {problem}; the shard's records and tensors disagree. Run `genrecal validate "
                f"{self.storage.url}` for a full report; re-extract the affected samples into a new cache.")

    def read_part(self, feature: str, part: str, start: int, length: int) -> np.ndarray:
        """Rows ``[start, start + length)`` of one feature part: decoded directly
        (:mod:`genrecal.store.chunkio`, only the chunks they overlap, on the reader's threads)
        when the array has the cache's layout, else through zarr."""
        direct = self._direct_reader(feature, part)
        if direct is None:
            self._settle()
            return self.array(feature, part)[start:start + length]
        codec, index, read, where = direct
        try:
            out = codec.decode_rows(read, index, start, start + length, where, self.pool)
        except CacheIntegrityError:
            self._settle()  # a bad checksum explains a failed decode: report that first
            raise
        self._settle()
        return out

    def _direct_reader(self, feature: str, part: str):
        """``(ArrayCodec, shard index, read(offset, nbytes), where)`` of one array, or None when its
        metadata is not exactly the cache writer's layout."""
        key = f"{feature}/{part}"
        if key not in self._direct:
            rows = self.rows(feature)
            spec = next(p for p in feature_parts(self.features[feature]) if p.name == part)
            codec = ArrayCodec.for_array(self.array(feature, part), array_layout(rows, spec))
            self._direct[key] = None if codec is None else self._open_object(key, codec)
        return self._direct[key]

    def _open_object(self, key: str, codec: ArrayCodec) -> tuple:
        rel = f"{self.entry.dir}/{TENSORS_DIR}/{key}/{codec.chunk_key()}"
        where = self.storage.where(rel)
        if not self.storage.exists(rel):  # zarr writes no object for an all-fill array
            return codec, None, None, where
        read = self.storage.reader(rel)
        size = self.storage.size(rel)
        if size < codec.index_bytes:
            raise CacheIntegrityError(f"{where}: {size} bytes, shorter than its shard index; run "
                                      f"`genrecal validate {self.storage.url}`")
        try:
            index = codec.index(read(size - codec.index_bytes, codec.index_bytes), where)
        except CacheIntegrityError:
            self._settle()
            raise
        ends = index[index[:, 0] != EMPTY].sum(axis=1)
        if len(ends) and int(ends.max()) > size - codec.index_bytes:
            raise CacheIntegrityError(f"{where}: its shard index points past the end of the file (truncated?); "
                                      f"run `genrecal validate {self.storage.url}`")
        return codec, index, read, where

    def sample(self, row: int, dtype: torch.dtype, features=None) -> CachedSample:
        """The sample in record ``row``; ``features``: names to load (default: all declared)."""
        rec = self.record(row)
        names = list(features if features is not None else self.features)
        self.check_record(row, rec, names)
        values = {}
        for name in names:
            start, length = rec[f"{name}_start"], rec[f"{name}_length"]
            parts = {p.name: self.read_part(name, p.name, start, length) for p in feature_parts(self.features[name])}
            values[name] = decode_feature(self.features[name], parts, dtype, rec.get("visual_gram_n"))
        return _build_sample(rec, values)

    def iter_samples(self, dtype: torch.dtype, features=None) -> Iterator[CachedSample]:
        """Every sample in record order, reading each tensor array once."""
        names = list(features if features is not None else self.features)
        for name in names:
            self.rows(name)  # shapes and dtypes checked before anything is read
        arrays = {n: {p.name: self.read_part(n, p.name, 0, self.rows(n)) for p in feature_parts(self.features[n])}
                  for n in names}
        for row, rec in enumerate(self.records.to_pylist()):
            self.check_record(row, rec, names)
            values = {}
            for name in names:
                start, stop = rec[f"{name}_start"], rec[f"{name}_start"] + rec[f"{name}_length"]
                parts = {p: a[start:stop] for p, a in arrays[name].items()}
                values[name] = decode_feature(self.features[name], parts, dtype, rec.get("visual_gram_n"))
            yield _build_sample(rec, values)


def _build_sample(rec: dict, values: dict) -> CachedSample:
    positions = rec.get("question_hidden_positions")
    return CachedSample(
        sample_id=rec["sample_id"], content_hash=rec["content_hash"], status=rec["status"],
        input_ids=torch.tensor(rec["input_ids"], dtype=torch.long), spans=spans_from_record(rec),
        question_positions=torch.tensor(positions, dtype=torch.long) if positions is not None else None,
        **values)
