"""Corrupted caches: each damage is reported by validate AND refused by the reader, clearly."""

from __future__ import annotations

import hashlib
import json
import re

import fsspec
import pyarrow as pa
import pytest
import torch

from genrecal.store import writer as writer_module
from genrecal.store.errors import CacheFormatError, CacheIntegrityError, FingerprintMismatchError
from genrecal.store.reader import CacheReader
from genrecal.store.schema import FileEntry, Manifest, RankLog
from synthetic_cache import sample_id, synthetic_features, synthetic_fingerprint, write_synthetic_cache
from genrecal.store.validate import validate_cache
from genrecal.store.writer import commit_cache, read_rank_logs
from genrecal.store.storage import CacheStorage
from test_cache_conformance import cache_url  # noqa: F401  (the local + memory:// fixture)

FEATURES = synthetic_features(width=16)


@pytest.fixture
def cache(cache_url):  # noqa: F811
    """A committed cache of 8 samples in several shards: (url, fs, root, manifest)."""
    manifest = write_synthetic_cache(cache_url, 8, FEATURES, shard_tokens=80)
    assert len(manifest.shards) >= 3
    fs, root = fsspec.core.url_to_fs(cache_url)
    return cache_url, fs, root, manifest


def codes(url, **kwargs) -> list[str]:
    return sorted({p.code for p in validate_cache(url, **kwargs)})


def read_all(url, **kwargs):
    reader = CacheReader(url, **kwargs)
    return [s.sample_id for s in reader]


def data_file(manifest: Manifest, shard: int = 1) -> FileEntry:
    return next(f for f in manifest.shards[shard].files if f.path.endswith("answer_hidden/data/c/0/0"))


def edit_manifest(fs, root, edit, reseal: bool) -> None:
    raw = json.loads(fs.cat_file(f"{root}/manifest.json"))
    edit(raw)
    if reseal:
        raw["digest"] = Manifest.model_validate(raw).content_digest()
    fs.pipe_file(f"{root}/manifest.json", json.dumps(raw).encode())


def test_clean_cache_has_no_problem(cache):
    url, *_ = cache
    assert validate_cache(url) == [] and len(read_all(url)) == 8


def test_flipped_byte(cache):
    url, fs, root, manifest = cache
    entry = data_file(manifest)
    data = bytearray(fs.cat_file(f"{root}/{entry.path}"))
    data[len(data) // 2] ^= 0x10
    fs.pipe_file(f"{root}/{entry.path}", bytes(data))
    problems = validate_cache(url)
    assert [(p.code, p.where) for p in problems] == [("file.checksum", entry.path)]
    assert "re-extract" in problems[0].fix
    reader = CacheReader(url)
    reader[sample_id(0)]  # shard 0 is intact
    with pytest.raises(CacheIntegrityError, match=f"(?s)shard {manifest.shards[1].name}.*answer_hidden.*sha256"):
        list(reader)


def test_truncated_shard(cache):
    url, fs, root, manifest = cache
    rel = f"{manifest.shards[2].dir}/records.arrow"
    fs.pipe_file(f"{root}/{rel}", fs.cat_file(f"{root}/{rel}")[:100])
    assert codes(url) == ["file.size"]
    with pytest.raises(CacheIntegrityError, match="records.arrow: size 100 bytes.*truncated"):
        read_all(url)
    with pytest.raises(CacheIntegrityError, match="cannot read the records"):
        read_all(url, verify=False)  # unverified, the damage still surfaces as a clear error


def test_missing_shard(cache):
    url, fs, root, manifest = cache
    fs.rm(f"{root}/{manifest.shards[0].dir}", recursive=True)
    problems = validate_cache(url)
    assert {p.code for p in problems} == {"file.missing"} and len(problems) == len(manifest.shards[0].files)
    with pytest.raises(CacheIntegrityError, match=f"(?s)shard {manifest.shards[0].name}.*records.arrow: file is missing"):
        CacheReader(url)[sample_id(0)]


@pytest.mark.parametrize("reseal", [False, True], ids=["edited", "edited-and-resealed"])
def test_edited_manifest(cache, reseal):
    url, fs, root, _ = cache

    def edit(raw):
        raw["counts"]["samples"] += 1
        raw["shards"][0]["files"][0]["size"] += 3

    edit_manifest(fs, root, edit, reseal)
    found = codes(url)
    assert "count.manifest" in found and "file.size" in found
    assert ("manifest.digest" in found) != reseal
    error = CacheIntegrityError
    with pytest.raises(error, match="modified after commit" if not reseal else "manifest says"):
        read_all(url)


def test_manifest_not_matching_schema(cache):
    url, fs, root, _ = cache
    edit_manifest(fs, root, lambda raw: raw["shards"][0].pop("tokens"), reseal=False)
    problems = validate_cache(url)
    assert [p.code for p in problems] == ["manifest.schema"] and "shards.0.tokens" in problems[0].where
    with pytest.raises(CacheFormatError, match="shards.0.tokens: Field required"):
        CacheReader(url)


def test_unknown_version(cache):
    url, fs, root, _ = cache
    edit_manifest(fs, root, lambda raw: raw.update(format_version=99), reseal=False)
    problems = validate_cache(url)
    assert [p.code for p in problems] == ["format.version"] and "99" in problems[0].message
    with pytest.raises(CacheFormatError, match="version 99 is not supported.*format version 1"):
        CacheReader(url)


def test_fingerprint_mismatch(cache):
    url, *_ = cache
    other = synthetic_fingerprint("another-teacher")
    problems = validate_cache(url, expect_teacher=other)
    assert {p.code for p in problems} == {"teacher.mismatch"} and len(problems) == 3
    assert other.weights in " ".join(p.message for p in problems)
    with pytest.raises(FingerprintMismatchError, match=f"weights: cache has {synthetic_fingerprint().weights}, "
                                                       f"expected {other.weights}"):
        CacheReader(url, expect_teacher=other)


def test_path_escaping_the_root(cache):
    url, fs, root, _ = cache
    edit_manifest(fs, root, lambda raw: raw["shards"][0]["files"][0].update(path="../../etc/passwd"), reseal=True)
    found = codes(url)
    assert "path.escape" in found and "path.outside_shard" in found
    with pytest.raises(CacheFormatError, match=r"(?s)outside the cache root.*\.\./\.\./etc/passwd"):
        CacheReader(url)
    with pytest.raises(ValueError, match="escapes the cache root"):
        CacheStorage(url).path("../x")


def test_missing_manifest(cache):
    url, fs, root, _ = cache
    fs.rm(f"{root}/manifest.json")
    assert codes(url) == ["manifest.missing"]
    with pytest.raises(CacheFormatError, match="never committed: run .*commit_cache"):
        CacheReader(url)


def test_every_problem_is_listed(cache):
    url, fs, root, manifest = cache
    fs.rm(f"{root}/{manifest.shards[0].dir}", recursive=True)
    entry = data_file(manifest, 2)
    fs.pipe_file(f"{root}/{entry.path}", b"garbage")
    edit_manifest(fs, root, lambda raw: raw["counts"].update(tokens=1), reseal=False)
    assert codes(url) == ["count.manifest", "file.missing", "file.size", "manifest.digest"]


# ----------------------------------------------------------------------------- content damage
# A buggy writer that stored wrong content with matching checksums: only the content checks see it.


def reseal(url) -> None:
    """Recompute every file size / checksum in the rank shard lists, then commit again."""
    storage = CacheStorage(url)
    for rank, log in read_rank_logs(storage).items():
        shards = []
        for shard in log.shards:
            files = tuple(FileEntry(path=f.path, size=storage.sha256(f.path)[0], sha256=storage.sha256(f.path)[1])
                          for f in shard.files)
            shards.append(shard.model_copy(update={"files": files}))
        fixed = RankLog.model_validate({**log.model_dump(), "shards": [s.model_dump() for s in shards]})
        storage.write_bytes(f"ranks/rank-{rank:05d}.json", fixed.model_dump_json().encode())
    commit_cache(url)


def rewrite_records(url, manifest: Manifest, shard: int, edit) -> None:
    storage = CacheStorage(url)
    rel = f"{manifest.shards[shard].dir}/records.arrow"
    table = pa.ipc.open_file(pa.BufferReader(storage.read_bytes(rel))).read_all()
    rows = table.to_pylist()
    edit(rows)
    table = pa.Table.from_pylist(rows, schema=table.schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    storage.write_bytes(rel, sink.getvalue().to_pybytes())


def test_nan_in_a_tensor(cache_url, monkeypatch):  # noqa: F811
    monkeypatch.setitem(writer_module._CHECKS, "answer_hidden", lambda *args: [])
    features = synthetic_features(width=16)
    from synthetic_cache import synthetic_sample

    with writer_module.CacheWriter(cache_url, teacher=synthetic_fingerprint(), features=features) as w:
        for i in range(3):
            s = synthetic_sample(i, features)
            if i == 1:
                s["answer_hidden"][0, 3] = float("nan")
            w.add(sample_id(i), **s)
    problems = validate_cache(cache_url)
    assert [(p.code, p.where) for p in problems] == [
        ("tensor.nonfinite", "shards/r00000-00000/tensors.zarr/answer_hidden/data")]
    assert "'s000001'" in problems[0].message
    assert torch.isnan(CacheReader(cache_url)[sample_id(1)].answer_hidden).any()


def test_inconsistent_offsets_and_duplicates(cache):
    url, fs, root, manifest = cache

    def edit(rows):
        rows[0]["answer_hidden_length"] += 1  # overlaps the next record
        rows[-1]["logit_stats_length"] += 1  # runs past the end of the array
        rows[-1]["sample_id"] = sample_id(0)  # duplicates an id of shard 0

    rewrite_records(url, manifest, 1, edit)
    with pytest.raises(Exception, match="more than one"):
        reseal(url)
    # commit refuses; a hand-made manifest with the same content is caught by validate
    new = manifest.model_copy(update={"shards": tuple(
        s.model_copy(update={"files": tuple(FileEntry(path=f.path, size=CacheStorage(url).sha256(f.path)[0],
                                                       sha256=CacheStorage(url).sha256(f.path)[1]) for f in s.files)})
        for s in manifest.shards)}).sealed()
    fs.pipe_file(f"{root}/manifest.json", new.model_dump_json().encode())
    found = codes(url)
    assert found == ["count.feature_rows", "index.mismatch", "offsets.bounds", "offsets.length", "offsets.order",
                     "sample.duplicate", "tensor.shape"]
    reader = CacheReader(url)
    with pytest.raises(CacheIntegrityError, match="index points"):
        reader[manifest_last_id(manifest)]
    with pytest.raises(CacheIntegrityError, match=f"sample {sample_id(manifest.shards[0].samples)!r} .*answer_hidden"):
        list(reader)


def test_malformed_record_spans_are_reported_not_raised(cache):
    url, fs, root, manifest = cache

    def edit(rows):
        rows[0]["question_spans"] = [[1, 2]]  # no longer tiles the sequence up to the answer
        rows[-1]["answer_spans"] = [[5, 10**6]]  # well-formed but past the end of the sequence

    rewrite_records(url, manifest, 1, edit)
    reseal(url)
    problems = validate_cache(url)
    assert [p.code for p in problems] == ["record.spans"]
    first = manifest.shards[0].samples  # shard 1 holds samples first .. first + samples - 1
    first, last = sample_id(first), sample_id(first + manifest.shards[1].samples - 1)
    assert f"2 sample(s) have invalid spans: {first!r}, {last!r}" in problems[0].message


def manifest_last_id(manifest: Manifest) -> str:
    """The id whose record was overwritten in shard 1 (its last record)."""
    return sample_id(sum(s.samples for s in manifest.shards[:2]) - 1)


def test_checksums_of_shard_files_are_sha256(cache):
    url, fs, root, manifest = cache
    for f in manifest.shards[0].files:
        assert hashlib.sha256(fs.cat_file(f"{root}/{f.path}")).hexdigest() == f.sha256


# ----------------------------------------------------------------------------- offsets and index
# Records edited and checksums recomputed (reseal): the reader must refuse what the trainer would
# choke on (too few rows, rows past the end of an array) with the sample named, not slice silently.


def shard_ids(manifest: Manifest, shard: int) -> list[str]:
    first = sum(s.samples for s in manifest.shards[:shard])
    return [sample_id(first + j) for j in range(manifest.shards[shard].samples)]


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "unverified"])
def test_offsets_past_the_end_of_the_arrays(cache, verify):
    url, fs, root, manifest = cache
    last = shard_ids(manifest, 1)[-1]

    def edit(rows):
        rows[-1]["answer_hidden_start"] += 3  # same length, last 3 rows beyond the array

    rewrite_records(url, manifest, 1, edit)
    reseal(url)
    bounds = [p for p in validate_cache(url) if p.code == "offsets.bounds"]
    assert len(bounds) == 1 and bounds[0].where == f"{manifest.shards[1].dir}/tensors.zarr/answer_hidden"
    assert "1 sample(s) have rows outside the arrays" in bounds[0].message and repr(last) in bounds[0].message
    assert bounds[0].fix.startswith("re-extract")
    reader = CacheReader(url, verify=verify)
    reader[shard_ids(manifest, 1)[0]]  # the other records of the shard are intact
    pattern = (f"(?s)r00000-00001: sample {last!r} .*answer_hidden: its rows .* run past the end .*"
               f"genrecal validate .*re-extract")
    with pytest.raises(CacheIntegrityError, match=pattern):
        reader[last]
    with pytest.raises(CacheIntegrityError, match=pattern):
        list(reader)


def test_fewer_rows_than_the_spans_need(cache):
    url, fs, root, manifest = cache
    last = shard_ids(manifest, 1)[-1]

    def edit(rows):
        rows[-1]["logit_stats_length"] -= 2  # contiguous offsets, but 2 target rows short

    rewrite_records(url, manifest, 1, edit)
    reseal(url)
    assert {"offsets.length", "count.feature_rows"} <= set(codes(url))
    reader = CacheReader(url)
    with pytest.raises(CacheIntegrityError, match=f"sample {last!r} .*logit_stats: (\\d+) logit_stats rows stored, "
                                                  f"its spans need (\\d+).*genrecal validate"):
        reader.get(last, features=["logit_stats"])


def test_array_shorter_than_the_manifest_says(cache):
    url, fs, root, manifest = cache
    entry = manifest.shards[1]
    # a faulty writer left the question_hidden arrays one row short; records and manifest unchanged
    import zarr

    store = CacheStorage(url).zarr_store(f"{entry.dir}/tensors.zarr").with_read_only(False)
    group = zarr.open_group(store, mode="r+", zarr_format=3)
    group["question_hidden/data"].resize((entry.feature_rows["question_hidden"] - 1, 16))
    reseal(url)
    assert {"offsets.bounds", "tensor.shape"} <= set(codes(url))
    with pytest.raises(CacheIntegrityError, match=r"tensor array question_hidden/data is \(\d+, 16\) uint16, the "
                                                  r"manifest and feature spec need \(\d+, 16\) uint16.*genrecal validate"):
        list(CacheReader(url, verify=False))


def test_missing_index_directory(cache):
    url, fs, root, manifest = cache
    fs.rm(f"{root}/index", recursive=True)
    assert codes(url) == ["file.missing"]
    for verify in (True, False):
        reader = CacheReader(url, verify=verify)
        assert len(read_all(url, verify=verify)) == 8  # sequential reading needs no index
        pattern = (f"(?s)sample-id index of cache {re.escape(url)} is (damaged|missing).*index/sample-ids-.*"
                   f"(file is missing|does not exist).*genrecal validate.*commit_cache")
        with pytest.raises(CacheIntegrityError, match=pattern):
            reader[sample_id(0)]
        with pytest.raises(CacheIntegrityError, match=pattern):
            list(reader.sample_ids())


def test_index_pointing_past_the_shards(cache):
    url, fs, root, manifest = cache
    from genrecal.store.index import INDEX_SCHEMA

    table = pa.table({"sample_id": ["s000000"], "shard": pa.array([99], pa.int32()), "row": pa.array([0], pa.int32())},
                     schema=INDEX_SCHEMA)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, INDEX_SCHEMA) as w:
        w.write_table(table)
    data = sink.getvalue().to_pybytes()
    fs.pipe_file(f"{root}/{manifest.index.path}", data)
    edit_manifest(fs, root, lambda raw: raw["index"].update(size=len(data), sha256=hashlib.sha256(data).hexdigest()),
                  reseal=True)
    assert "index.mismatch" in codes(url)
    with pytest.raises(CacheIntegrityError, match="index points 's000000' to shard #99 row 0, which does not exist"):
        CacheReader(url)[sample_id(0)]
