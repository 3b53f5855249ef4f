"""``genrecal inspect`` and ``genrecal validate`` on synthetic teacher caches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from genrecal import cli
from genrecal.store.manifest import load_manifest
from genrecal.store.storage import CacheStorage
from synthetic_cache import synthetic_features, write_synthetic_cache

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """A committed 6-sample cache in several shards (read-only for every test)."""
    url = str(tmp_path_factory.mktemp("cli") / "cache")
    manifest = write_synthetic_cache(url, 6, synthetic_features(width=8), shard_tokens=80)
    assert len(manifest.shards) >= 2
    return url


def invoke(*args: str):
    return CliRunner().invoke(cli.app, list(args))


def test_inspect_text(cache):
    result = invoke("inspect", cache)
    assert result.exit_code == 0, result.output
    assert f"cache      {cache}" in result.output
    assert "samples    6 in" in result.output
    for feature in ("answer_hidden", "question_hidden", "visual_gram", "logit_stats"):
        assert feature in result.output


def test_inspect_json_parses_and_matches_the_manifest(cache):
    result = invoke("inspect", cache, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    manifest = load_manifest(CacheStorage(cache))
    assert summary["samples"] == 6 and summary["tokens"] == manifest.counts.tokens
    assert summary["shards"] == len(manifest.shards)
    assert set(summary["features"]) == set(manifest.features)
    assert "distributions" in summary


def test_inspect_plots_writes_pngs(cache, tmp_path):
    out = tmp_path / "plots"
    result = invoke("inspect", cache, "--json", "--plots", str(out))
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)  # the plot paths go to stderr, stdout stays JSON
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} == {"sequence_lengths.png", "bytes_per_feature.png", "topk_mass.png"}
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in pngs)
    assert all(f"wrote {p}" in result.stderr for p in pngs)


def test_validate_ok(cache):
    manifest = load_manifest(CacheStorage(cache))
    result = invoke("validate", cache)
    assert result.exit_code == 0, result.output
    assert result.stdout == (f"ok: {cache}: 6 samples, {manifest.counts.tokens} tokens in "
                             f"{len(manifest.shards)} shard(s), no problem found\n")


def test_validate_corrupted_cache_lists_the_problem(tmp_path):
    url = str(tmp_path / "cache")
    manifest = write_synthetic_cache(url, 3, synthetic_features(width=8))
    data = next(f.path for f in manifest.shards[0].files if f.path.endswith("answer_hidden/data/c/0/0"))
    path = Path(url) / data
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    result = invoke("validate", url)
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"[file.checksum] {data}: sha256 ")
    assert lines[1].startswith("    fix: re-extract")
    assert f"{url}: 1 problem(s)" in result.stderr


def test_validate_missing_cache_is_a_problem_not_a_crash(tmp_path):
    result = invoke("validate", str(tmp_path / "nowhere"))
    assert result.exit_code == 1, result.output
    assert result.stdout.startswith("[manifest.missing] ")


def test_inspect_missing_cache_is_a_user_error(tmp_path):
    result = invoke("inspect", str(tmp_path / "nowhere"))
    assert result.exit_code == cli.EXIT_USER_ERROR
    assert "is not a genrecal teacher cache" in result.stderr
