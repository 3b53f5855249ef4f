"""One conformance suite for the teacher cache, run on a local directory and on ``memory://``."""

from __future__ import annotations

import json
import uuid

import fsspec
import pytest
import torch

from genrecal.store import schema
from genrecal.store.artifacts import (
    load_teacher_config, load_teacher_embeddings, load_teacher_head, load_tokenizer_files,
    write_teacher_artifacts,
)
from genrecal.store.codecs import decode_feature, encode_feature
from genrecal.store.errors import CacheIntegrityError, CacheWriteError, FingerprintMismatchError
from genrecal.store.inspect import format_inspect, inspect_cache, write_inspect_plots
from genrecal.store.reader import CacheReader
from synthetic_cache import (
    sample_id, synthetic_features, synthetic_fingerprint, synthetic_sample, write_synthetic_cache,
)
from genrecal.store.validate import validate_cache
from genrecal.store.logit_transform import LogitTransform
from genrecal.store.writer import CacheWriter, commit_cache

FP = synthetic_fingerprint()


@pytest.fixture(params=["local", "memory"])
def cache_url(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "cache")
        return
    root = f"/conformance-{uuid.uuid4().hex}"
    yield f"memory://{root}/cache"
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def expected_value(spec, value):
    """What the cache must return for ``value``: exactly the codec's decode(encode(value))."""
    gram_n = [k.shape[0] for k in value] if spec.name == "visual_gram" else None
    return decode_feature(spec, encode_feature(spec, value), torch.float32, gram_n)


def assert_same(a, b, what=""):
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b), what
        for x, y in zip(a, b):
            assert_same(x, y, what)
    elif hasattr(a, "topk_ids"):
        for name in ("topk_ids", "topk_logprobs", "target_logit", "lse", "lse_t", "entropy"):
            assert torch.equal(getattr(a, name), getattr(b, name)), f"{what}.{name}"
    else:
        assert torch.equal(a, b), what


def assert_sample(cached, i, features, seed=0):
    want = synthetic_sample(i, features, seed)
    assert cached.sample_id == sample_id(i) and cached.content_hash == want["content_hash"]
    assert torch.equal(cached.input_ids, want["input_ids"]) and cached.spans == want["spans"]
    for spec in features:
        assert_same(getattr(cached, spec.name), expected_value(spec, want[spec.name]), f"{cached.sample_id}.{spec.name}")
    if any(s.name == "question_hidden" for s in features):
        select = next(s.select for s in features if s.name == "question_hidden")
        assert cached.question_positions.tolist() == schema.question_positions(want["spans"], select)


CODEC_SETS = [
    dict(codec="bf16"),
    dict(codec="fp8_e4m3", select="text", gram_codec="bf16", stats_codec="bf16"),
    dict(codec="int8", question_codec="fp8_e4m3"),
]


@pytest.mark.parametrize("codecs", CODEC_SETS, ids=lambda c: c["codec"])
def test_roundtrip_every_feature_and_codec(cache_url, codecs):
    features = synthetic_features(width=24, **codecs)
    manifest = write_synthetic_cache(cache_url, 14, features, shard_tokens=200)
    assert len(manifest.shards) > 2 and manifest.counts.samples == 14
    reader = CacheReader(cache_url, expect_teacher=FP)
    for i in (13, 0, 7):  # random access across shards
        assert_sample(reader[sample_id(i)], i, features)
    seen = [s.sample_id for s in reader]
    assert seen == [sample_id(i) for i in range(14)]  # sequential: write order
    assert list(reader.sample_ids()) == sorted(seen) and len(reader) == 14
    assert validate_cache(cache_url) == []


def test_iteration_matches_random_access_and_positions(cache_url):
    features = synthetic_features(width=8)
    write_synthetic_cache(cache_url, 6, features, shard_tokens=150)
    reader = CacheReader(cache_url, max_open_shards=1)
    for cached in reader.iter_samples(features=["answer_hidden", "logit_stats"]):
        again = reader.get(cached.sample_id, features=["answer_hidden", "logit_stats"])
        assert torch.equal(cached.answer_hidden, again.answer_hidden)
        assert cached.question_hidden is None and cached.visual_gram is None
        assert len(cached.answer_positions()) == len(cached.answer_hidden)
        assert len(cached.target_positions()) == cached.logit_stats.n
        assert cached.answer_turn_rows()[-1][1] == len(cached.answer_hidden)
    assert len(reader._open) == 1  # the shard LRU stays bounded


def test_requested_dtype_and_unknown_ids(cache_url):
    write_synthetic_cache(cache_url, 3, synthetic_features(width=8))
    reader = CacheReader(cache_url)
    sample = reader.get(sample_id(1), dtype=torch.bfloat16)
    assert sample.answer_hidden.dtype == torch.bfloat16 and sample.logit_stats.lse.dtype == torch.bfloat16
    assert sample_id(1) in reader and "nope" not in reader
    with pytest.raises(KeyError, match="'nope' is not in cache"):
        reader["nope"]
    with pytest.raises(KeyError, match="not in cache"):
        reader.get(sample_id(1), features=["hidden_states"])


def test_resume_skips_committed_ids_and_equals_uninterrupted(cache_url, tmp_path):
    features = synthetic_features(width=8)
    kwargs = dict(teacher=FP, features=features, settings={"a": [1, 2]}, shard_tokens=120)
    with CacheWriter(cache_url, commit=False, **kwargs) as w:
        for i in range(5):
            w.add(sample_id(i), **synthetic_sample(i, features))
    with CacheWriter(cache_url, **kwargs) as w:
        added = [w.add(sample_id(i), **synthetic_sample(i, features)) for i in range(9)]
    assert added == [False] * 5 + [True] * 4
    reference = tmp_path / "reference"
    write_synthetic_cache(str(reference), 9, features, teacher=FP, settings={"a": [1, 2]}, shard_tokens=120)
    got, want = CacheReader(cache_url), CacheReader(str(reference))
    assert [s.sample_id for s in got] == [s.sample_id for s in want]
    for a, b in zip(got, want):
        assert_same(a.answer_hidden, b.answer_hidden)
        assert_same(a.logit_stats, b.logit_stats)


def test_resume_with_other_settings_is_refused(cache_url):
    features = synthetic_features(width=8)
    write_synthetic_cache(cache_url, 2, features)
    with pytest.raises(CacheWriteError, match="(?s)other settings.*settings: "):
        with CacheWriter(cache_url, teacher=FP, features=features, settings={"synthetic": False, "seed": 0}):
            pass
    with pytest.raises(CacheWriteError, match="(?s)other settings.*features: "):
        with CacheWriter(cache_url, teacher=FP, features=synthetic_features(width=8, codec="int8"),
                         settings={"synthetic": True, "seed": 0}):
            pass


def test_ranks_write_disjoint_shards_then_commit(cache_url):
    features = synthetic_features(width=8)
    kwargs = dict(teacher=FP, features=features, settings={}, shard_tokens=100, commit=False)
    with CacheWriter(cache_url, rank=0, **kwargs) as w0, CacheWriter(cache_url, rank=1, **kwargs) as w1:
        for i in range(10):
            (w0 if i % 2 == 0 else w1).add(sample_id(i), **synthetic_sample(i, features))
    manifest = commit_cache(cache_url)
    assert {s.rank for s in manifest.shards} == {0, 1}
    assert all(s.name.startswith(f"r{s.rank:05d}-") for s in manifest.shards)
    reader = CacheReader(cache_url)
    for i in range(10):
        assert_sample(reader[sample_id(i)], i, features)
    assert validate_cache(cache_url) == []


def test_commit_refuses_ids_written_by_two_ranks(cache_url):
    features = synthetic_features(width=8)
    kwargs = dict(teacher=FP, features=features, commit=False)
    with CacheWriter(cache_url, rank=0, **kwargs) as w0, CacheWriter(cache_url, rank=1, **kwargs) as w1:
        for w in (w0, w1):  # concurrent ranks cannot see each other's uncommitted samples
            assert w.add(sample_id(3), **synthetic_sample(3, features))
    with CacheWriter(cache_url, rank=2, **kwargs) as w2:  # a later writer does see them
        assert not w2.add(sample_id(3), **synthetic_sample(3, features))
    with pytest.raises(CacheWriteError, match="more than one.*s000003.*r00000-00000.*r00001-00000"):
        commit_cache(cache_url)


def test_skips_are_recorded_with_reason_and_file(cache_url):
    features = synthetic_features(width=8)
    with CacheWriter(cache_url, teacher=FP, features=features) as w:
        w.add(sample_id(0), **synthetic_sample(0, features))
        w.skip("broken", "image file missing", "data/train.json")
        assert w.has("broken") and w.has(sample_id(0)) and not w.has("other")
        with pytest.raises(CacheWriteError, match="already added or skipped"):
            w.add("broken", **synthetic_sample(1, features))
        with pytest.raises(CacheWriteError, match="already added or skipped"):
            w.skip(sample_id(0), "late")
    manifest = CacheReader(cache_url).manifest
    assert [(s.sample_id, s.reason, s.file) for s in manifest.skipped] == [("broken", "image file missing", "data/train.json")]
    summary = inspect_cache(cache_url)
    assert summary["skipped"]["by_reason"] == {"image file missing": 1}
    with CacheWriter(cache_url, teacher=FP, features=features) as w:  # earlier outcomes stand on resume
        assert w.has("broken")
        w.skip(sample_id(0), "late")
        assert not w.add("broken", **synthetic_sample(1, features))
    assert len(CacheReader(cache_url).manifest.skipped) == 1


def test_writer_lists_every_problem_of_a_bad_sample(cache_url):
    features = synthetic_features(width=8)
    good = synthetic_sample(0, features)
    bad = dict(good, answer_hidden=good["answer_hidden"][:-1],
               question_hidden=torch.full_like(good["question_hidden"], float("nan")))
    with CacheWriter(cache_url, teacher=FP, features=features[:3]) as w:
        with pytest.raises(CacheWriteError) as err:
            w.add("x", **bad)
        message = str(err.value)
        assert "answer window rows" in message and "NaN" in message and "not declared" in message
        with pytest.raises(CacheWriteError, match="spans: answers span"):
            w.add("y", **dict(good, spans={"questions": [[0, 1]], "answers": [[1, 400]]}, logit_stats=None))
        with pytest.raises(CacheWriteError, match="declared but missing"):
            w.add("z", **dict(good, visual_gram=None, logit_stats=None))
        assert not w.has("x")


def test_rolls_by_bytes(cache_url):
    features = synthetic_features(width=64)
    manifest = write_synthetic_cache(cache_url, 8, features, shard_bytes=8_000)
    assert len(manifest.shards) >= 4 and sum(s.samples for s in manifest.shards) == 8


def test_teacher_artifacts_give_exact_logits(cache_url):
    features = synthetic_features(width=16)
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(50, 16, generator=gen).bfloat16(), torch.randn(50, generator=gen)
    transform = LogitTransform(scale=0.5, softcap=30.0, has_bias=True)
    ids = torch.tensor([7, 3, 11])
    write_teacher_artifacts(cache_url, config={"model_type": "toy", "hidden_size": 16},
                            tokenizer_files={"tokenizer.json": b"{}", "vocab.txt": b"a\nb"},
                            lm_head_weight=weight, lm_head_bias=bias, logit_transform=transform,
                            embedding_ids=ids, embedding_rows=torch.randn(3, 16, generator=gen))
    write_synthetic_cache(cache_url, 2, features)
    reader = CacheReader(cache_url)
    head = reader.teacher_head()
    z = reader[sample_id(0)].answer_hidden
    zl = z.double() @ weight.double().T + bias.double()
    want = 30.0 * torch.tanh(zl * 0.5 / 30.0)
    assert torch.allclose(head.logits(z).double(), want, atol=1e-4)
    emb = load_teacher_embeddings(cache_url)
    assert emb.ids.tolist() == [3, 7, 11]
    assert torch.equal(emb.lookup(torch.tensor([[11, 7]])), emb.rows[[2, 1]][None])
    with pytest.raises(KeyError, match=r"\[5\]"):
        emb.lookup(torch.tensor([5]))
    assert load_teacher_config(cache_url)["model_type"] == "toy"
    assert load_tokenizer_files(cache_url) == {"tokenizer.json": b"{}", "vocab.txt": b"a\nb"}
    assert len(reader.manifest.artifacts) == 6 and validate_cache(cache_url) == []


def test_teacher_artifact_tampering_is_caught(cache_url):
    write_teacher_artifacts(cache_url, config={}, tokenizer_files={"t.json": b"{}"},
                            lm_head_weight=torch.randn(4, 8), lm_head_bias=None, logit_transform=LogitTransform())
    write_synthetic_cache(cache_url, 1, synthetic_features(width=8))
    fs, root = fsspec.core.url_to_fs(cache_url)
    fs.pipe_file(f"{root}/teacher/head.json", json.dumps({"logit_transform": LogitTransform(scale=2.0).to_dict(),
                                                          "vocab_size": 4, "hidden_size": 8}).encode())
    with pytest.raises(CacheIntegrityError, match="head.json does not match the manifest"):
        load_teacher_head(cache_url)
    assert [p.code for p in validate_cache(cache_url)] == ["file.size"]


def test_expected_teacher_mismatch_names_both(cache_url):
    write_synthetic_cache(cache_url, 1, synthetic_features(width=8))
    other = synthetic_fingerprint("other")
    with pytest.raises(FingerprintMismatchError) as err:
        CacheReader(cache_url, expect_teacher={"tokenizer": other.tokenizer})
    assert FP.tokenizer in str(err.value) and other.tokenizer in str(err.value)
    CacheReader(cache_url, expect_teacher={"tokenizer": FP.tokenizer, "weights": None})


def test_inspect_summary_json_and_plots(cache_url, tmp_path):
    features = synthetic_features(width=32, codec="int8")
    write_synthetic_cache(cache_url, 5, features)
    summary = inspect_cache(cache_url)
    json.dumps(summary)
    assert summary["samples"] == 5 and summary["features"]["answer_hidden"]["codec"] == "int8"
    assert 0 < summary["distributions"]["topk_mass"]["mean"] <= 1
    assert sum(summary["distributions"]["sequence_length"]["counts"]) == 5
    text = format_inspect(summary)
    assert "answer_hidden" in text and "int8" in text and "top-8 mass" in text
    paths = write_inspect_plots(summary, tmp_path / "plots")
    assert len(paths) == 3 and all(p.read_bytes().startswith(b"\x89PNG") for p in paths)


def test_cache_with_only_skips_commits_and_reads(cache_url):
    with CacheWriter(cache_url, teacher=FP, features=synthetic_features(width=8)) as w:
        w.skip("a", "empty answer")
    reader = CacheReader(cache_url)
    assert len(reader) == 0 and list(reader) == [] and "a" not in reader
    assert validate_cache(cache_url) == []


def test_id_set_membership_survives_compaction():
    from genrecal.store.writer import IdSet

    ids = IdSet()
    members = [f"id-{i}" for i in range(3000)]
    for m in members[:2000]:
        ids.add(m)
    ids.compact()
    for m in members[2000:]:
        ids.add(m)
    assert all(m in ids for m in members)
    assert not any(f"other-{i}" in ids for i in range(3000))
    # digests ending in a zero byte (1 in 256 ids) are found too
    zero_tail = [m for m in members if IdSet._key(m)[-2] == 0]
    assert zero_tail and all(m in ids for m in zero_tail)
