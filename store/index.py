"""The sorted sample-id index of a committed cache.

An Arrow IPC file (``index/sample-ids-<sha>.arrow``) of ``(sample_id, shard, row)`` sorted by
``sample_id`` (UTF-8 byte order, which equals Python's string order) and split in record batches
of :data:`BATCH_ROWS`. Lookups binary-search the batches and then one batch, reading only those
batches (memory-mapped for local caches), so a reader's memory does not grow with the cache.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from genrecal.store.errors import CacheIntegrityError
from genrecal.store.schema import INDEX_DIR, RECORDS_FILE, FileEntry, ShardEntry
from genrecal.store.storage import CacheStorage

BATCH_ROWS = 8192
INDEX_SCHEMA = pa.schema([("sample_id", pa.string()), ("shard", pa.int32()), ("row", pa.int32())])


def read_sample_ids(storage: CacheStorage, entry: ShardEntry) -> pa.Array:
    """The ``sample_id`` column of a shard's records."""
    reader = pa.ipc.open_file(storage.open_arrow(f"{entry.dir}/{RECORDS_FILE}"))
    return reader.read_all().column("sample_id").combine_chunks()


def sorted_id_table(storage: CacheStorage, shards: list[ShardEntry]) -> pa.Table:
    """``(sample_id, shard, row)`` of every record of ``shards``, sorted by sample id."""
    tables = []
    for i, entry in enumerate(shards):
        ids = read_sample_ids(storage, entry)
        tables.append(pa.table({"sample_id": ids, "shard": pa.array([i] * len(ids), pa.int32()),
                                "row": pa.array(range(len(ids)), pa.int32())}, schema=INDEX_SCHEMA))
    table = pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()
    return table.take(pc.sort_indices(table, sort_keys=[("sample_id", "ascending")]))


def duplicate_ids(table: pa.Table, shards: list[ShardEntry]) -> dict[str, list[str]]:
    """Sample ids occurring more than once in a sorted id table -> the shards holding them."""
    ids = table.column("sample_id").combine_chunks()
    if len(ids) < 2:
        return {}
    same = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1)).to_pylist()
    dup_rows = sorted({j for i, eq in enumerate(same) if eq for j in (i, i + 1)})
    out: dict[str, list[str]] = {}
    for j in dup_rows:
        out.setdefault(ids[j].as_py(), []).append(shards[table.column("shard")[j].as_py()].name)
    return out


def write_index(storage: CacheStorage, table: pa.Table) -> FileEntry:
    """Write a sorted id table as a content-addressed index file; returns its file entry."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, INDEX_SCHEMA) as writer:
        for batch in table.combine_chunks().to_batches(max_chunksize=BATCH_ROWS):
            writer.write_batch(batch)
    data = sink.getvalue().to_pybytes()
    digest = hashlib.sha256(data).hexdigest()
    rel = f"{INDEX_DIR}/sample-ids-{digest[:16]}.arrow"
    storage.write_bytes(rel, data)
    return FileEntry(path=rel, size=len(data), sha256=digest)


class SampleIndex:
    """Lazy lookups in an index file: ``index[sample_id] -> (shard, row)``."""

    def __init__(self, storage: CacheStorage, entry: FileEntry, cache_batches: int = 4):
        where = storage.where(entry.path)
        fix = (f"Run `genrecal validate {storage.url}` for a full report; re-run commit_cache on the cache "
               f"(genrecal.store.writer.commit_cache({storage.url!r})) to rebuild the index from the shard "
               f"records, or re-extract the cache.")
        if not storage.exists(entry.path):
            raise CacheIntegrityError(f"the sample-id index of cache {storage.url} is missing ({where}, named by "
                                      f"its manifest, does not exist). {fix}")
        try:
            self._reader = pa.ipc.open_file(storage.open_arrow(entry.path))
        except (OSError, pa.ArrowInvalid) as exc:
            raise CacheIntegrityError(f"the sample-id index of cache {storage.url} cannot be read ({where}: {exc}). "
                                      f"{fix}") from exc
        if not self._reader.schema.equals(INDEX_SCHEMA, check_metadata=False):
            raise CacheIntegrityError(f"the sample-id index of cache {storage.url} has columns "
                                      f"{self._reader.schema.names} ({where}), expected {INDEX_SCHEMA.names}. {fix}")
        self._batches: OrderedDict[int, pa.RecordBatch] = OrderedDict()
        self._keep = cache_batches

    def __len__(self) -> int:
        return sum(self._reader.get_batch(i).num_rows for i in range(self._reader.num_record_batches))

    def _batch(self, i: int) -> pa.RecordBatch:
        if i in self._batches:
            self._batches.move_to_end(i)
        else:
            self._batches[i] = self._reader.get_batch(i)
            while len(self._batches) > self._keep:
                self._batches.popitem(last=False)
        return self._batches[i]

    def _first_id(self, i: int) -> str:
        return self._batch(i).column(0)[0].as_py()

    def lookup(self, sample_id: str) -> tuple[int, int] | None:
        """``(shard position in the manifest, row in its records)`` or None if absent."""
        lo, hi = 0, self._reader.num_record_batches
        if hi == 0:
            return None
        while hi - lo > 1:  # the last batch whose first id <= sample_id
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self._first_id(mid) <= sample_id else (lo, mid)
        batch = self._batch(lo)
        ids = batch.column(0)
        a, b = 0, batch.num_rows
        while a < b:
            mid = (a + b) // 2
            a, b = (mid + 1, b) if ids[mid].as_py() < sample_id else (a, mid)
        if a < batch.num_rows and ids[a].as_py() == sample_id:
            return batch.column(1)[a].as_py(), batch.column(2)[a].as_py()
        return None

    def __iter__(self) -> Iterator[tuple[str, int, int]]:
        """Every ``(sample_id, shard, row)`` in id order, one batch at a time."""
        for i in range(self._reader.num_record_batches):
            batch = self._reader.get_batch(i)
            yield from zip(*(batch.column(c).to_pylist() for c in range(3)))
