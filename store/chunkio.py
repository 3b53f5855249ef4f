"""Direct encoding and decoding of the cache's zarr v3 arrays, at the speed of the codec.

Every tensor array of a shard is one zarr v3 *shard* object (:func:`genrecal.store.codecs.array_layout`):
its inner chunks (``chunk_rows`` rows, the last one padded with the fill value 0), each encoded
as little-endian bytes then blosc (zstd-1, byte shuffle, blocksize = chunk bytes), concatenated
in chunk order, followed by the shard index, ``n_chunks`` x ``(offset, nbytes)`` as little-endian
uint64 (``2^64 - 1`` twice for a chunk that is all fill value and not stored), and the CRC-32C
of the index (uint32, little-endian). An array whose chunks are all fill value has no object.

zarr's own array API runs every chunk through an asyncio pipeline; at the cache's sizes that
costs 3-8x the codec's time (docs/cache_speed.md). :class:`ArrayCodec` writes the same bytes
(tests check them byte-identical to zarr's) and reads any row range of them, decoding only the
chunks it overlaps, straight into the output array, on a thread pool (blosc releases the GIL).
zarr still writes the metadata (``zarr.json``), and a reader takes this path only when an
array's metadata is exactly the layout above (:meth:`ArrayCodec.for_array`); ``genrecal
validate`` reads every array through zarr itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import google_crc32c
import numpy as np
from numcodecs import Blosc

from genrecal.store.errors import CacheIntegrityError

EMPTY = np.uint64(2**64 - 1)  # index entry of a chunk not stored (all fill value)
_INDEX_ENTRY = 16  # bytes: offset and nbytes, uint64 each
_CRC = 4


@dataclass(frozen=True)
class ArrayCodec:
    """The chunking and codec of one cache array of ``rows`` x ``width`` (None: 1-D) ``dtype``.

    ``chunk``: rows per inner chunk; ``blocksize``: blosc block size in bytes.
    """

    rows: int
    width: int | None
    dtype: np.dtype
    chunk: int
    blocksize: int

    @classmethod
    def from_layout(cls, layout: dict) -> "ArrayCodec":
        """From :func:`genrecal.store.codecs.array_layout`'s keyword arguments."""
        shape, chunks = layout["shape"], layout["chunks"]
        return cls(rows=shape[0], width=shape[1] if len(shape) == 2 else None, dtype=np.dtype(layout["dtype"]),
                   chunk=chunks[0], blocksize=int(layout["compressors"].blocksize))

    @classmethod
    def for_array(cls, array, layout: dict) -> "ArrayCodec | None":
        """The codec of an opened zarr array if its metadata is exactly ``layout`` (what the cache
        writer writes for its shape), else None (the caller reads through zarr)."""
        meta = array.metadata
        want = _layout_metadata(_layout_key(layout))
        got = meta.to_dict()
        if any(got.get(k) != want.get(k) for k in ("shape", "data_type", "chunk_grid", "chunk_key_encoding",
                                                   "fill_value", "codecs")):
            return None
        return cls.from_layout(layout)

    # ------------------------------------------------------------------ geometry

    @property
    def n_chunks(self) -> int:
        return max(1, math.ceil(self.rows / self.chunk))

    @property
    def row_shape(self) -> tuple[int, ...]:
        return (self.width,) if self.width else ()

    @property
    def chunk_bytes(self) -> int:
        return self.chunk * (self.width or 1) * self.dtype.itemsize

    @property
    def index_bytes(self) -> int:
        return self.n_chunks * _INDEX_ENTRY + _CRC

    def chunk_key(self) -> str:
        """The path of the shard object inside the array's directory."""
        return "c/0/0" if self.width else "c/0"

    def _blosc(self) -> Blosc:
        return _blosc(self.dtype.itemsize, self.blocksize)

    # ------------------------------------------------------------------ encode

    def encode(self, data: np.ndarray | Sequence[np.ndarray],
               pool: ThreadPoolExecutor | None = None) -> list[bytes] | None:
        """data: ``dtype`` [rows(, width)], or pieces of it to stack row-wise (not copied: each
        chunk is gathered from them) -> the shard object as a list of byte strings to write one
        after the other (None: all fill value, no object)."""
        pieces = [data] if isinstance(data, np.ndarray) else list(data)
        rows = sum(len(p) for p in pieces)
        bad = [p for p in pieces if p.shape[1:] != self.row_shape or p.dtype != self.dtype]
        if rows != self.rows or bad:
            raise ValueError(f"arrays of {[p.shape for p in pieces]} {[str(p.dtype) for p in pieces]}, codec is "
                             f"for {(self.rows, *self.row_shape)} {self.dtype}")
        if self.rows == 0:
            return None
        starts = np.cumsum([0] + [len(p) for p in pieces])
        blosc = self._blosc()

        def one(i: int) -> bytes:
            lo, hi = i * self.chunk, min((i + 1) * self.chunk, self.rows)
            k = int(np.searchsorted(starts, lo, side="right")) - 1
            if hi <= starts[k + 1] and hi - lo == self.chunk:  # inside one piece: no copy
                block = np.ascontiguousarray(pieces[k][lo - starts[k]:hi - starts[k]])
            else:  # across pieces, or the edge chunk (padded with the fill value, as zarr does)
                block = np.zeros((self.chunk, *self.row_shape), self.dtype)
                at = lo
                while at < hi:
                    while starts[k + 1] <= at:
                        k += 1
                    take = min(hi, starts[k + 1]) - at
                    block[at - lo:at - lo + take] = pieces[k][at - starts[k]:at - starts[k] + take]
                    at += take
            if not block.any():  # zarr's write_empty_chunks=False: an all-fill chunk is not stored
                return b""
            return blosc.encode(block)

        parts = _map(pool, one, range(self.n_chunks))
        index = np.full((self.n_chunks, 2), EMPTY, dtype="<u8")
        offset = 0
        for i, part in enumerate(parts):
            if part:
                index[i] = (offset, len(part))
                offset += len(part)
        if offset == 0:
            return None
        index_bytes = index.tobytes()
        crc = np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes()
        return [p for p in parts if p] + [index_bytes, crc]

    # ------------------------------------------------------------------ decode

    def index(self, tail: bytes | memoryview, where: str) -> np.ndarray:
        """The shard index, uint64 [n_chunks, 2], from the object's last :attr:`index_bytes` bytes
        (its CRC-32C checked: :class:`CacheIntegrityError` naming ``where`` otherwise)."""
        tail = memoryview(tail)
        if len(tail) != self.index_bytes:
            raise CacheIntegrityError(f"{where}: tensor object too short for its shard index "
                                      f"({len(tail)} of {self.index_bytes} bytes); run `genrecal validate`")
        body, crc = tail[:-_CRC], np.frombuffer(tail[-_CRC:], "<u4")[0]
        if google_crc32c.value(bytes(body)) != int(crc):
            raise CacheIntegrityError(f"{where}: the shard index fails its CRC-32C checksum (file altered or "
                                      f"truncated); run `genrecal validate`")
        return np.frombuffer(body, "<u8").reshape(self.n_chunks, 2)

    def decode_rows(self, read: Callable[[int, int], bytes | memoryview], index: np.ndarray | None,
                    start: int, stop: int, where: str, pool: ThreadPoolExecutor | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` as a new ``dtype`` array.

        read(offset, nbytes): bytes of the shard object; index: from :meth:`index`, None when
        the array has no object (all fill value). Only the chunks overlapping the rows are
        read and decoded, each straight into the output where it is whole.
        """
        if not 0 <= start <= stop <= self.rows:
            raise CacheIntegrityError(f"{where}: rows {start}..{stop} outside the array's {self.rows} rows")
        first, last = start // self.chunk, -(-stop // self.chunk)
        span = np.empty(((last - first) * self.chunk, *self.row_shape), self.dtype)
        blosc = self._blosc()

        def one(i: int) -> None:
            dst = span[(i - first) * self.chunk:(i - first + 1) * self.chunk]
            if index is None or index[i, 0] == EMPTY:
                dst[...] = 0
                return
            offset, nbytes = int(index[i, 0]), int(index[i, 1])
            try:
                blosc.decode(read(offset, nbytes), out=dst)
            except (RuntimeError, ValueError) as exc:  # numcodecs raises these on corrupt input
                raise CacheIntegrityError(f"{where}: chunk {i} cannot be decoded ({exc}); run `genrecal "
                                          f"validate`") from exc

        _map(pool, one, range(first, last))
        lo, n = start - first * self.chunk, stop - start
        # a few rows out of whole chunks (less than half of them): copied, so that they do not
        # keep the chunks' buffer alive; a long read (a whole array) stays a view, no extra pass
        rows = span[lo:lo + n]
        return rows.copy() if 2 * n < len(span) else rows


def _map(pool: ThreadPoolExecutor | None, fn: Callable, items: Sequence | range) -> list:
    if pool is None or len(items) < 2:
        return [fn(i) for i in items]
    return list(pool.map(fn, items))


@lru_cache(maxsize=64)
def _blosc(typesize: int, blocksize: int) -> Blosc:
    return Blosc(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE, blocksize=blocksize, typesize=typesize)


def _layout_key(layout: dict) -> tuple:
    return (tuple(layout["shape"]), str(np.dtype(layout["dtype"])), tuple(layout["chunks"]),
            tuple(layout["shards"]), int(layout["compressors"].typesize), int(layout["compressors"].blocksize))


@lru_cache(maxsize=256)
def _layout_metadata(key: tuple) -> dict:
    """The zarr metadata (as a dict) zarr writes for a layout: the reference a cache array's
    metadata must equal for the direct path."""
    import zarr
    from zarr.codecs import BloscCodec
    from zarr.storage import MemoryStore

    shape, dtype, chunks, shards, typesize, blocksize = key
    blosc = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=typesize, blocksize=blocksize)
    arr = zarr.create_array(MemoryStore(), shape=shape, dtype=dtype, chunks=chunks, shards=shards,
                            compressors=blosc, fill_value=0, zarr_format=3)
    return arr.metadata.to_dict()
