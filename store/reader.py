"""Reading a committed teacher cache (local path or fsspec URL).

:class:`CacheReader` refuses a cache of an unknown format version, a manifest that fails its
schema or was edited after commit, and (when the caller says which teacher it expects) a cache
written for another teacher. Shards are opened on demand (a small LRU), their files checked
against the manifest's checksums on first use, and sample ids are looked up in the sorted index
file without loading it: memory does not grow with the size of the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterable, Iterator, Mapping

import torch
from genrecal.store.artifacts import load_teacher_head
from genrecal.store.errors import CacheIntegrityError
from genrecal.store.index import SampleIndex
from genrecal.store.manifest import check_teacher, load_manifest
from genrecal.store.schema import MANIFEST, FeatureSpec, TeacherFingerprint
from genrecal.store.shard import CachedSample, ShardReader, file_problems
from genrecal.store.storage import CacheStorage

__all__ = ["CacheReader", "CachedSample", "open_cache"]


class CacheReader:
    """Random access by sample id and sequential iteration by shard over a committed cache.

    ``expect_teacher``: the teacher fingerprint (or a mapping naming some of its components) the
    caller requires; ``verify``: check each shard's file checksums on first read; ``dtype``: the
    default float dtype of returned tensors; ``max_open_shards``: size of the shard LRU;
    ``threads``: threads that decode the chunks of a read (1: the calling thread; the values
    do not depend on it).
    """

    def __init__(self, url, *, expect_teacher: TeacherFingerprint | Mapping | None = None, verify: bool = True,
                 dtype: torch.dtype = torch.float32, max_open_shards: int = 4, storage_options: dict | None = None,
                 threads: int = 1):
        self.storage = CacheStorage(url, storage_options)
        self.manifest = load_manifest(self.storage)
        if expect_teacher is not None:
            check_teacher(self.manifest, expect_teacher, self.storage.url)
        self.verify, self.dtype, self.max_open_shards = verify, dtype, max(1, max_open_shards)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"CacheReader: threads must be an integer >= 1, got {threads!r}")
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="cache-reader") if threads > 1 else None
        self._open: OrderedDict[int, ShardReader] = OrderedDict()
        self._verified: set[int] = set()
        self._index: SampleIndex | None = None

    @property
    def features(self) -> dict[str, FeatureSpec]:
        return self.manifest.features

    @property
    def url(self) -> str:
        return self.storage.url

    def __len__(self) -> int:
        return self.manifest.counts.samples

    def __repr__(self) -> str:
        return f"CacheReader({self.url!r}, samples={len(self)}, shards={len(self.manifest.shards)})"

    # ------------------------------------------------------------------ shards

    def shard(self, i: int) -> ShardReader:
        """The ``i``-th shard of the manifest, opened (and verified once) on demand."""
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        verify = self.verify and i not in self._verified
        reader = ShardReader(self.storage, self.manifest.shards[i], self.features, verify=verify, pool=self._pool)
        self._verified.add(i)
        self._open[i] = reader
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return reader

    def iter_shards(self) -> Iterator[ShardReader]:
        for i in range(len(self.manifest.shards)):
            yield self.shard(i)

    def __iter__(self) -> Iterator[CachedSample]:
        """Every sample, shard after shard, in write order."""
        for shard in self.iter_shards():
            yield from shard.iter_samples(self.dtype)

    def iter_samples(self, dtype: torch.dtype | None = None, features: Iterable[str] | None = None) -> Iterator[CachedSample]:
        """Like iteration, with a dtype and a subset of features to load."""
        names = self._features(features)
        for shard in self.iter_shards():
            yield from shard.iter_samples(dtype or self.dtype, names)

    # ------------------------------------------------------------------ random access

    @property
    def index(self) -> SampleIndex:
        """The sample-id index (its checksum checked first when ``verify``)."""
        if self._index is None:
            entry = self.manifest.index
            if entry is None:
                raise KeyError(f"cache {self.url} holds no samples")
            self.storage.check_no_escape(entry.path)
            bad = file_problems(self.storage, [entry]) if self.verify else []
            if bad:
                lines = "\n".join(f"  - {self.storage.where(path)}: {msg}" for _, path, msg in bad)
                raise CacheIntegrityError(
                    f"the sample-id index of cache {self.url} is damaged:\n{lines}\nRun `genrecal validate "
                    f"{self.url}` for a full report; re-run commit_cache on the cache "
                    f"(genrecal.store.writer.commit_cache({self.url!r})) to rebuild the index from the shard "
                    f"records, or re-extract the cache.")
            self._index = SampleIndex(self.storage, entry)
        return self._index

    def _has_index(self) -> bool:
        """Whether the manifest names an index; raises if it has samples but names none."""
        if self.manifest.index is None and len(self):
            raise CacheIntegrityError(f"{self.storage.where(MANIFEST)} counts {len(self)} samples but names no "
                                      f"sample-id index; re-run commit_cache on the cache to rebuild it, or run "
                                      f"`genrecal validate {self.url}`")
        return self.manifest.index is not None

    def locate(self, sample_id: str) -> tuple[int, int] | None:
        """``(shard, row)`` of a sample id, or None."""
        return self.index.lookup(sample_id) if self._has_index() else None

    def __contains__(self, sample_id: str) -> bool:
        return self.locate(sample_id) is not None

    def get(self, sample_id: str, dtype: torch.dtype | None = None, features: Iterable[str] | None = None) -> CachedSample:
        """The cached sample ``sample_id`` (KeyError if absent)."""
        where = self.locate(sample_id)
        if where is None:
            raise KeyError(f"sample {sample_id!r} is not in cache {self.url} "
                           f"({len(self)} samples; skipped ones are listed by `genrecal inspect`)")
        if not 0 <= where[0] < len(self.manifest.shards) or not 0 <= where[1] < self.manifest.shards[where[0]].samples:
            raise CacheIntegrityError(f"cache {self.url}: the index points {sample_id!r} to shard #{where[0]} row "
                                      f"{where[1]}, which does not exist ({len(self.manifest.shards)} shards); re-run "
                                      f"commit_cache to rebuild the index, or `genrecal validate {self.url}`")
        shard = self.shard(where[0])
        found = shard.records.column("sample_id")[where[1]].as_py()
        if found != sample_id:
            raise CacheIntegrityError(f"cache {self.url}: the index points {sample_id!r} to shard "
                                      f"{shard.entry.name} row {where[1]}, which holds {found!r}; "
                                      f"re-run commit_cache to rebuild the index")
        return shard.sample(where[1], dtype or self.dtype, self._features(features))

    __getitem__ = get

    def sample_ids(self) -> Iterator[str]:
        """Every sample id in sorted order (streamed from the index)."""
        if self._has_index():
            for sample_id, _, _ in self.index:
                yield sample_id

    def _features(self, features: Iterable[str] | None) -> list[str]:
        names = list(self.features if features is None else features)
        unknown = [n for n in names if n not in self.features]
        if unknown:
            raise KeyError(f"features {unknown} are not in cache {self.url} (it has {sorted(self.features)})")
        return names

    # ------------------------------------------------------------------ teacher

    def teacher_head(self, dtype: torch.dtype | None = None):
        """The teacher's lm_head and logit transform (:class:`~genrecal.store.artifacts.TeacherHead`)."""
        manifest = self.manifest if self.verify else None
        return load_teacher_head(self.storage, dtype=dtype, verify=self.verify, manifest=manifest)


def open_cache(url, **kwargs) -> CacheReader:
    """Shorthand for :class:`CacheReader`."""
    return CacheReader(url, **kwargs)
