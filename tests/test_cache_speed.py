"""The cache's direct chunk path (genrecal.store.chunkio) and its threaded writer and reader.

Everything here is exact: the direct encoder must write the very bytes zarr writes, the direct
decoder must return the very values zarr returns, and threads only change who does the work,
never the result (bit-for-bit equality, no tolerance).
"""

from __future__ import annotations

import hashlib
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from zarr.storage import MemoryStore

from genrecal.store.chunkio import ArrayCodec
from genrecal.store.codecs import Part, array_layout
from genrecal.store.errors import CacheIntegrityError
from genrecal.store.reader import CacheReader
from genrecal.store.writer import _bf16_nonfinite
from synthetic_cache import sample_id, synthetic_features, write_synthetic_cache

N = 40


def _zarr_bytes(data: np.ndarray, part: Part) -> tuple[bytes | None, zarr.Array, dict]:
    """The shard object zarr itself writes for ``data`` with the cache's layout."""
    store: dict = {}
    layout = array_layout(len(data), part)
    arr = zarr.create_array(MemoryStore(store), **layout, zarr_format=3)
    if len(data):
        arr[...] = data
    key = "c/0/0" if part.width else "c/0"
    return (store[key].to_bytes() if key in store else None), arr, layout


def _cases():
    rng = np.random.default_rng(0)
    bf16 = Part("data", np.dtype(np.uint16), 96)
    wide = Part("data", np.dtype(np.uint16), 1024)  # 256 rows per 512 KiB chunk
    scale = Part("scale", np.dtype(np.float32), None)
    ids = Part("topk_ids", np.dtype(np.int32), 8)
    many = rng.integers(0, 2**16, (3000, 96), dtype=np.uint16)
    zero_chunks = rng.integers(0, 2**16, (700, 1024), dtype=np.uint16)
    zero_chunks[:300] = 0  # the first chunk and part of the second: the first is not stored
    return {
        "bf16 several chunks": (many, bf16),
        "edge chunk padded": (rng.integers(0, 2**16, (513, 1024), dtype=np.uint16), wide),
        "all-zero chunk skipped": (zero_chunks, wide),
        "all zero: no object": (np.zeros((40, 96), np.uint16), bf16),
        "no rows": (np.zeros((0, 96), np.uint16), bf16),
        "1-D float32": (rng.standard_normal(200_000).astype(np.float32), scale),
        "int32": (rng.integers(-5, 5000, (999, 8), dtype=np.int32), ids),
    }


@pytest.mark.parametrize("case", list(_cases()))
@pytest.mark.parametrize("threads", [1, 3])
def test_direct_encoding_is_byte_identical_to_zarr(case, threads):
    data, part = _cases()[case]
    want, arr, layout = _zarr_bytes(data, part)
    codec = ArrayCodec.from_layout(layout)
    with ThreadPoolExecutor(threads) as pool:
        got = codec.encode(data, pool if threads > 1 else None)
        # the same array given as uneven pieces (chunks gathered across them): the same bytes
        cuts = sorted({0, len(data), *random.Random(2).sample(range(len(data) + 1), min(6, len(data) + 1))})
        pieced = codec.encode([data[a:b] for a, b in zip(cuts, cuts[1:])], pool if threads > 1 else None)
    assert (None if got is None else b"".join(got)) == want
    assert (None if pieced is None else b"".join(pieced)) == want
    assert ArrayCodec.for_array(arr, layout) == codec  # zarr's metadata is the layout: direct path


@pytest.mark.parametrize("case", list(_cases()))
def test_direct_decoding_equals_zarr_on_any_row_range(case):
    data, part = _cases()[case]
    blob, arr, layout = _zarr_bytes(data, part)
    codec = ArrayCodec.from_layout(layout)
    index = codec.index(blob[-codec.index_bytes:], "test") if blob is not None else None
    read = (lambda offset, nbytes: memoryview(blob)[offset:offset + nbytes]) if blob else None
    rng = random.Random(1)
    ranges = [(0, len(data))] + [tuple(sorted(rng.sample(range(len(data) + 1), 2))) for _ in range(20)] \
        if len(data) else [(0, 0)]
    with ThreadPoolExecutor(3) as pool:
        for start, stop in ranges:
            serial = codec.decode_rows(read, index, start, stop, "test")
            parallel = codec.decode_rows(read, index, start, stop, "test", pool)
            assert serial.dtype == data.dtype and serial.shape == data[start:stop].shape
            assert np.array_equal(serial, arr[start:stop]) and np.array_equal(serial, data[start:stop])
            assert serial.tobytes() == parallel.tobytes()  # bit for bit


def test_other_layout_is_not_taken_for_the_cache_layout():
    part = Part("data", np.dtype(np.uint16), 96)
    layout = array_layout(3000, part)
    other = zarr.create_array(MemoryStore({}), shape=(3000, 96), dtype=np.uint16, chunks=(100, 96),
                              fill_value=0, zarr_format=3)  # zarr's default codecs, no sharding
    assert ArrayCodec.for_array(other, layout) is None


def test_shard_index_checksum_is_checked():
    data, part = _cases()["bf16 several chunks"]
    blob, _, layout = _zarr_bytes(data, part)
    codec = ArrayCodec.from_layout(layout)
    tail = bytearray(blob[-codec.index_bytes:])
    tail[3] ^= 1
    with pytest.raises(CacheIntegrityError, match="CRC-32C"):
        codec.index(bytes(tail), "where/it/is")


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[int, str]:
    """The same samples written with 1 and with 3 writer threads, in several shards."""
    root = tmp_path_factory.mktemp("speed")
    out = {}
    for threads in (1, 3):
        url = str(root / f"cache-{threads}")
        write_synthetic_cache(url, N, synthetic_features(width=48), shard_tokens=300, threads=threads)
        out[threads] = url
    return out


def test_writer_threads_write_the_same_bytes(caches):
    one, three = (Path(caches[t]) for t in (1, 3))
    files = sorted(p.relative_to(one) for p in (one / "shards").rglob("*") if p.is_file())
    assert len(files) > 10 and files == sorted(p.relative_to(three) for p in (three / "shards").rglob("*")
                                               if p.is_file())
    for rel in files:
        assert (one / rel).read_bytes() == (three / rel).read_bytes(), rel


def test_checksums_taken_in_memory_match_the_files_on_disk(caches):
    reader = CacheReader(caches[3])
    assert len(reader.manifest.shards) > 2
    for shard in reader.manifest.shards:
        for entry in shard.files:
            data = (Path(caches[3]) / entry.path).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (entry.size, entry.sha256), entry.path


def _same(a, b):
    assert a.sample_id == b.sample_id and torch.equal(a.input_ids, b.input_ids) and a.spans == b.spans
    assert torch.equal(a.answer_hidden, b.answer_hidden) and torch.equal(a.question_hidden, b.question_hidden)
    assert all(torch.equal(x, y) for x, y in zip(a.visual_gram, b.visual_gram))
    assert torch.equal(a.logit_stats.topk_ids, b.logit_stats.topk_ids)
    assert torch.equal(a.logit_stats.topk_logprobs, b.logit_stats.topk_logprobs)


@pytest.mark.parametrize("threads", [1, 3])
def test_random_access_equals_sequential_read(caches, threads):
    sequential = {s.sample_id: s for s in CacheReader(caches[1]).iter_samples(dtype=torch.bfloat16)}
    assert len(sequential) == N
    reader = CacheReader(caches[1], threads=threads, max_open_shards=2)
    order = list(range(N))
    random.Random(0).shuffle(order)
    for i in order:
        _same(reader.get(sample_id(i), dtype=torch.bfloat16), sequential[sample_id(i)])


def test_reader_threads_read_the_same_values(caches):
    serial = list(CacheReader(caches[1]).iter_samples())
    parallel = list(CacheReader(caches[1], threads=3).iter_samples())
    assert len(serial) == len(parallel) == N
    for a, b in zip(serial, parallel):
        _same(a, b)


def test_reader_and_writer_refuse_bad_thread_counts(tmp_path, caches):
    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        CacheReader(caches[1], threads=0)
    from genrecal.store.errors import CacheWriteError
    from genrecal.store.writer import CacheWriter
    from synthetic_cache import synthetic_fingerprint

    with pytest.raises(CacheWriteError, match="threads must be an integer >= 1"):
        CacheWriter(tmp_path / "c", teacher=synthetic_fingerprint(), features=synthetic_features(), threads=True)


def test_damaged_shard_index_is_refused_without_verify(caches, tmp_path):
    import shutil

    url = str(tmp_path / "copy")
    shutil.copytree(caches[1], url)
    reader = CacheReader(url, verify=False)
    entry = next(f for f in reader.manifest.shards[0].files if f.path.endswith("answer_hidden/data/c/0/0"))
    path = Path(url) / entry.path
    blob = bytearray(path.read_bytes())
    blob[-10] ^= 0xFF  # inside the shard index
    path.write_bytes(bytes(blob))
    with pytest.raises(CacheIntegrityError, match="CRC-32C"):
        next(iter(reader.iter_samples()))


@pytest.mark.parametrize("where", [0, 65535, 65536, 200_000 - 1])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_bf16_nonfinite_scan_finds_every_position(where, value):
    x = torch.randn(200_000).to(torch.bfloat16)
    x[x.abs() > 1e30] = 0
    bits = x.view(torch.int16).numpy().view(np.uint16)
    assert not _bf16_nonfinite(bits)
    x[where] = value
    assert _bf16_nonfinite(x.view(torch.int16).numpy().view(np.uint16))


def test_bf16_nonfinite_scan_keeps_large_finite_values():
    x = torch.tensor([3.3e38, -3.3e38, 1e-40, -0.0], dtype=torch.bfloat16)  # max finite, subnormal
    assert torch.isfinite(x).all() and not _bf16_nonfinite(x.view(torch.int16).numpy().view(np.uint16))


@pytest.mark.parametrize("target", ["answer_hidden/data/c/0/0", "records.arrow"])
@pytest.mark.parametrize("threads", [1, 3])
def test_checksums_still_checked_before_any_value_with_threads(caches, tmp_path, target, threads):
    """With a thread pool the tensor objects are hashed while they are decoded; a bad checksum
    still raises (naming the file) before any value is returned, as without threads."""
    import shutil

    url = str(tmp_path / "copy")
    shutil.copytree(caches[1], url)
    reader = CacheReader(url, threads=threads)
    entry = next(f for f in reader.manifest.shards[1].files if f.path.endswith(target))
    path = Path(url) / entry.path
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 3] ^= 0x01  # a chunk's payload (or the records' body), not the shard index
    path.write_bytes(bytes(blob))
    first_of_shard = reader.shard(0).records.num_rows  # shard 0 is intact and reads
    assert reader.get(sample_id(0)).sample_id == sample_id(0)
    with pytest.raises(CacheIntegrityError, match=f"(?s)is corrupt.*{entry.path}.*sha256"):
        reader.get(sample_id(first_of_shard))
    with pytest.raises(CacheIntegrityError, match="is corrupt"):
        list(CacheReader(url, threads=threads).iter_samples())
