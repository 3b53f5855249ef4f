"""Deterministic synthetic cache samples, for tests of the cache, the trainer and benchmarks.

:func:`synthetic_sample` builds everything :meth:`CacheWriter.add` needs for sample ``i`` from a
seed: a multi-turn token sequence with image, question and answer spans, bfloat16 hidden states
with LLM-like per-channel scales (a few outlier channels), one Gram matrix per image and logit
statistics of random hidden states through a random head over a small vocabulary. Same ``i`` and seed, same
sample, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from genrecal.store import schema
from genrecal.store.gram import gram_from_upper, visual_gram
from genrecal.store.logit_stats import logit_statistics
from genrecal.store.schema import FeatureSpec, TeacherFingerprint
from genrecal.store.logit_transform import LogitTransform
from genrecal.store.spans import Spans

VOCAB = 97
HEAD_WIDTH = 16


def synthetic_features(width: int = 32, codec: str = "bf16", select: str = "all", k: int = 8,
                       temperature: float = 2.0, gram_codec: str = "f32", stats_codec: str = "f32",
                       question_codec: str | None = None) -> list[FeatureSpec]:
    """All four features, with the given codecs."""
    return [schema.answer_hidden(width, codec), schema.question_hidden(width, question_codec or codec, select),
            schema.visual_gram(gram_codec), schema.logit_stats(k, temperature, stats_codec)]


def synthetic_fingerprint(tag: str = "teacher") -> TeacherFingerprint:
    from hashlib import sha256

    return TeacherFingerprint(**{c: sha256(f"{tag}:{c}".encode()).hexdigest() for c in ("config", "weights", "tokenizer")})


def synthetic_spans(gen: torch.Generator) -> tuple[int, Spans]:
    """(sequence length, spans): a 2-token system prompt, then 1-2 turns of [image] question answer.

    Each question runs from the end of the previous answer (or 0) to the start of its answer, as
    :class:`Spans` requires; the first turn's question holds the image tokens.
    """
    pos, images, questions, answers = 2, [], [], []
    turns = int(torch.randint(1, 3, (1,), generator=gen))
    for turn in range(turns):
        if turn == 0:
            n_img = int(torch.randint(4, 10, (1,), generator=gen))
            images.append((pos + 1, pos + 1 + n_img))
            pos += n_img + 2
        pos += int(torch.randint(3, 12, (1,), generator=gen)) + 2  # question text, assistant header
        a_len = int(torch.randint(2, 16, (1,), generator=gen))
        questions.append((answers[-1][1] if answers else 0, pos))
        answers.append((pos, pos + a_len))
        pos += a_len
    return pos + 1, Spans(images=tuple(images), questions=tuple(questions), answers=tuple(answers))


def _hidden(gen: torch.Generator, rows: int, width: int) -> torch.Tensor:
    """LLM-like post-norm states: per-channel scales with a few outliers, in bfloat16 [rows, width]."""
    channel = torch.ones(width)
    channel[:: max(1, width // 4)] = 8.0
    return (torch.randn(rows, width, generator=gen) * channel).to(torch.bfloat16)


def synthetic_sample(i: int, features: Iterable[FeatureSpec], seed: int = 0) -> dict:
    """Keyword arguments of ``CacheWriter.add`` (all but the sample id) for sample ``i``."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
    length, spans = synthetic_spans(gen)
    ids = torch.randint(0, VOCAB, (length,), generator=gen)
    out = {"content_hash": f"{i:064x}", "input_ids": ids, "spans": spans}
    for spec in features:
        out[spec.name] = _feature_value(gen, spec, spans, ids)
    return out


def _feature_value(gen: torch.Generator, spec: FeatureSpec, spans: Spans, ids: torch.Tensor):
    if spec.name == "answer_hidden":
        return _hidden(gen, len(schema.answer_window_positions(spans)), spec.width)
    if spec.name == "question_hidden":
        return _hidden(gen, len(schema.question_positions(spans, spec.select)), spec.width)
    if spec.name == "visual_gram":
        return [gram_from_upper(visual_gram(torch.randn(e - s, 16, generator=gen)), e - s)
                for s, e in spans.images]
    targets = torch.tensor(schema.answer_target_positions(spans)) + 1
    z = torch.randn(len(targets), HEAD_WIDTH, generator=gen)
    head = torch.randn(VOCAB, HEAD_WIDTH, generator=gen) * (3 / HEAD_WIDTH**0.5)  # logits ~ N(0, 9)
    return logit_statistics(z, head, None, LogitTransform(), ids[targets], top_k=spec.width,
                            temperature=spec.temperature)


def write_synthetic_cache(url, n: int, features: list[FeatureSpec] | None = None, *, seed: int = 0,
                          start: int = 0, **writer_kwargs):
    """Write samples ``start .. start+n-1`` (ids ``s000000`` ...) and commit; returns the manifest."""
    from genrecal.store.writer import CacheWriter

    features = features or synthetic_features()
    writer_kwargs.setdefault("teacher", synthetic_fingerprint())
    writer_kwargs.setdefault("settings", {"synthetic": True, "seed": seed})
    with CacheWriter(url, features=features, **writer_kwargs) as writer:
        for i in range(start, start + n):
            writer.add(sample_id(i), **synthetic_sample(i, features, seed))
    from genrecal.store.manifest import load_manifest

    return load_manifest(writer.storage) if writer.commit else None


def sample_id(i: int) -> str:
    return f"s{i:06d}"
