"""Cache safety: no symlink followed out of the cache root; stored types readable without genrecal."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from genrecal.store.errors import CacheFormatError
from genrecal.store.reader import CacheReader
from synthetic_cache import sample_id, synthetic_features, write_synthetic_cache
from genrecal.store.validate import validate_cache
from test_cache_conformance import cache_url  # noqa: F401  (the local + memory:// fixture)

FEATURES = synthetic_features(width=16)
README = Path(__file__).resolve().parents[1] / "README.md"


# ----------------------------------------------------------------------------- symlinks (local caches)


@pytest.fixture
def local_cache(tmp_path):
    """A committed local cache of 8 samples in >= 3 shards, and a directory outside it."""
    root = tmp_path / "cache"
    manifest = write_synthetic_cache(str(root), 8, FEATURES, shard_tokens=80)
    assert len(manifest.shards) >= 3
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    return root, manifest, outside


def move_out(root: Path, rel: str, outside: Path) -> Path:
    """Move ``root/rel`` to ``outside`` and leave a symlink to it in its place."""
    target = outside / rel.replace("/", "_")
    shutil.move(root / rel, target)
    os.symlink(target, root / rel)
    return target


def codes(url) -> list[str]:
    return sorted({p.code for p in validate_cache(url)})


def shard_ids(manifest, shard: int) -> list[str]:
    first = sum(s.samples for s in manifest.shards[:shard])
    return [sample_id(first + j) for j in range(manifest.shards[shard].samples)]


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "unverified"])
def test_shard_directory_symlinked_out_of_the_root(local_cache, verify):
    root, manifest, outside = local_cache
    rel = manifest.shards[1].dir
    target = move_out(root, rel, outside)
    problems = validate_cache(str(root))
    assert [(p.code, p.where) for p in problems] == [("path.symlink", rel)]
    assert str(target) in problems[0].message and "copy of its target" in problems[0].fix
    reader = CacheReader(str(root), verify=verify)
    reader[shard_ids(manifest, 0)[0]]  # other shards still read
    pattern = f"(?s)refusing to follow symlinks out of the cache root.*{re.escape(rel)} -> {re.escape(str(target))}"
    with pytest.raises(CacheFormatError, match=pattern):
        reader[shard_ids(manifest, 1)[0]]
    with pytest.raises(CacheFormatError, match="genrecal validate"):
        list(reader)


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "unverified"])
def test_tensor_file_symlinked_out_of_the_root(local_cache, verify):
    root, manifest, outside = local_cache
    rel = f"{manifest.shards[2].dir}/tensors.zarr/answer_hidden/data/c/0/0"
    move_out(root, rel, outside)
    assert [(p.code, p.where) for p in validate_cache(str(root))] == [("path.symlink", rel)]
    with pytest.raises(CacheFormatError, match=re.escape(rel)):
        CacheReader(str(root), verify=verify)[shard_ids(manifest, 2)[0]]


def test_zarr_directory_symlinked_out_even_if_unlisted(local_cache):
    """A symlinked directory inside a shard's zarr group is refused before zarr can open it."""
    root, manifest, outside = local_cache
    rel = f"{manifest.shards[0].dir}/tensors.zarr/question_hidden"
    move_out(root, rel, outside)
    assert codes(str(root)) == ["path.symlink"]
    with pytest.raises(CacheFormatError, match=re.escape(rel)):
        CacheReader(str(root), verify=False).get(sample_id(0), features=["question_hidden"])


def test_manifest_and_index_symlinked_out(local_cache):
    root, manifest, outside = local_cache
    move_out(root, manifest.index.path, outside)
    assert [(p.code, p.where) for p in validate_cache(str(root))] == [("path.symlink", manifest.index.path)]
    with pytest.raises(CacheFormatError, match=re.escape(manifest.index.path)):
        CacheReader(str(root))[sample_id(0)]
    move_out(root, "manifest.json", outside)
    assert codes(str(root)) == ["path.symlink"]
    with pytest.raises(CacheFormatError, match="manifest.json"):
        CacheReader(str(root))


def test_symlinks_inside_the_root_are_allowed(local_cache, tmp_path):
    root, manifest, _ = local_cache
    rel = manifest.shards[1].dir
    shutil.move(root / rel, root / "moved-shard")
    os.symlink(root / "moved-shard", root / rel)  # absolute link, staying inside the root
    records = f"{manifest.shards[2].dir}/records.arrow"
    shutil.move(root / records, root / "records-copy.arrow")
    os.symlink("../../records-copy.arrow", root / records)  # relative link, staying inside the root
    assert validate_cache(str(root)) == []
    assert len(list(CacheReader(str(root)))) == 8
    link = tmp_path / "link-to-cache"  # the root itself may be a symlink
    os.symlink(root, link)
    assert validate_cache(str(link)) == [] and len(list(CacheReader(str(link)))) == 8


# ----------------------------------------------------------------------------- stored types, without genrecal


def fp8_e4m3fn_to_float32(codes_u8: np.ndarray) -> np.ndarray:
    """OCP FP8 E4M3 (``float8_e4m3fn``) codes -> float32, from the bit layout alone."""
    c = codes_u8.astype(np.int32)
    sign = np.where(c & 0x80, -1.0, 1.0)
    exp, man = (c >> 3) & 0xF, c & 0x7
    value = np.where(exp == 0, man / 8.0 * 2.0**-6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    value = np.where((exp == 0xF) & (man == 0x7), np.nan, value)
    return (sign * value).astype(np.float32)


def decode_as_documented(group, feature: str, start: int, length: int) -> np.ndarray:
    """A hidden feature's rows, decoded by the rules of README.md ("Stored types")."""
    data = group[f"{feature}/data"]
    codec = data.attrs["codec"]
    assert data.attrs["feature"] == feature
    rows = data[start:start + length]
    if codec == "bf16":
        assert rows.dtype == np.uint16
        return (rows.astype(np.uint32) << 16).view(np.float32)
    scale = group[f"{feature}/scale"][start:start + length].astype(np.float32)[:, None]
    if codec == "fp8_e4m3":
        assert rows.dtype == np.uint8
        return fp8_e4m3fn_to_float32(rows) * scale
    assert codec == "int8" and rows.dtype == np.int8
    return rows.astype(np.float32) * scale


@pytest.mark.parametrize("codec", ["bf16", "fp8_e4m3", "int8"])
def test_plain_zarr_reader_decodes_as_the_readme_says(cache_url, codec):  # noqa: F811
    import fsspec
    import zarr

    readme = README.read_text()
    for documented in ('"genrecal_cache_format"', '"codec"', '"feature"', "upper 16 bits", "answer_hidden_start",
                       "float8_e4m3fn", "`scale`", "no bfloat16"):
        assert documented in readme, documented
    features = synthetic_features(width=16, codec=codec)
    manifest = write_synthetic_cache(cache_url, 4, features)
    reader = CacheReader(cache_url)
    fs, root = fsspec.core.url_to_fs(cache_url)
    checked = 0
    for entry in manifest.shards:
        where = f"{root}/{entry.dir}/tensors.zarr"
        group = zarr.open_group(fs.unstrip_protocol(where) if "://" in cache_url else where, mode="r", zarr_format=3)
        assert group.attrs["genrecal_cache_format"] == manifest.format_version
        records = pa.ipc.open_file(pa.BufferReader(fs.cat_file(f"{root}/{entry.dir}/records.arrow"))).read_all()
        for rec in records.to_pylist():
            for feature in ("answer_hidden", "question_hidden"):
                plain = decode_as_documented(group, feature, rec[f"{feature}_start"], rec[f"{feature}_length"])
                ours = getattr(reader.get(rec["sample_id"], dtype=torch.float32), feature)
                assert plain.dtype == np.float32 and plain.shape == tuple(ours.shape)
                assert np.array_equal(plain, ours.numpy()), (rec["sample_id"], feature)
                checked += 1
    assert checked == 8
