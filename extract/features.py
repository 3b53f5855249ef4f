"""From one batch's teacher states to each sample's cached features.

Positions follow docs/method.md §1.2 through :mod:`genrecal.store.schema`:

* ``answer_hidden`` and ``question_hidden``: ``z`` at :func:`answer_window_positions` (the last
  token before each answer through its last token) and :func:`question_positions` (``all``:
  image tokens included, ``text``: without them), taken by
  :func:`~genrecal.model.teacher_forward.hidden_rows`, which online training calls too;
* ``visual_gram``: per image span, ``K = V V^T`` of the row-normalised penultimate-layer states
  (:func:`genrecal.store.gram.visual_gram`), as the symmetric matrix the writer takes;
* ``logit_stats``: at :func:`answer_target_positions`, with next-token targets, computed for the
  whole batch in one call to :func:`~genrecal.store.logit_stats.logit_statistics` (streamed over
  the vocabulary: no ``[tokens, V]`` logits in full).

Results are CPU tensors, safe to hand to the background writer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from genrecal.extract.teacher import Teacher
from genrecal.store.gram import gram_from_upper, require_finite, visual_gram
from genrecal.store.logit_stats import LogitStats, logit_statistics
from genrecal.store.schema import FeatureSpec, answer_target_positions
from genrecal.model.encoding import Encoded
from genrecal.store.spans import Spans
from genrecal.model.teacher_forward import TeacherStates, hidden_rows


@dataclass(frozen=True)
class SampleFeatures:
    """One sample's record and feature values, as :meth:`CacheWriter.add` takes them."""

    sample_id: str
    content_hash: str
    input_ids: list[int]
    spans: Spans
    status: str
    values: dict[str, object] = field(default_factory=dict)
    source: str = ""  # the dataset file the sample came from


def batch_features(teacher: Teacher, encoded: Sequence[Encoded], states: TeacherStates,
                   specs: Mapping[str, FeatureSpec]) -> list[dict]:
    """Per sample of the batch, ``{feature name: value}`` for every spec (CPU tensors).

    encoded: the batch's samples in batch order; states: their teacher states [B, N, d] from
    :func:`~genrecal.model.teacher_forward.teacher_forward` (with each sample's offset).
    """
    offsets = states.offsets
    select = specs["question_hidden"].select if "question_hidden" in specs else None
    out = [dict() for _ in encoded]
    for i, (enc, off) in enumerate(zip(encoded, offsets)):
        answer, question = hidden_rows(states.final[i], enc.spans, off, question=select)
        if "answer_hidden" in specs:
            out[i]["answer_hidden"] = answer.cpu()
        if question is not None:
            out[i]["question_hidden"] = question.cpu()
    if "visual_gram" in specs:
        for values, grams in zip(out, batch_grams(states.penultimate, encoded, offsets)):
            values["visual_gram"] = grams
    if "logit_stats" in specs:
        for values, stats in zip(out, batch_logit_stats(teacher, encoded, states.final, offsets,
                                                        specs["logit_stats"])):
            values["logit_stats"] = stats
    return out


def batch_grams(penultimate: torch.Tensor, encoded: Sequence[Encoded],
                offsets: Sequence[int]) -> list[list[torch.Tensor]]:
    """penultimate [B, N, d] -> per sample, per image, its float32 Gram [n_i, n_i] on the CPU.

    All the batch's Grams are checked for inf/NaN in one device sync (a non-finite state makes
    its Gram row NaN), not one per image.
    """
    grams = [image_grams(penultimate[i], enc.spans, off)
             for i, (enc, off) in enumerate(zip(encoded, offsets))]
    require_finite([g for sample in grams for g in sample], "visual_gram: the batch's visual states")
    return [[g.cpu() for g in sample] for sample in grams]


def image_grams(penultimate: torch.Tensor, spans: Spans, offset: int) -> list[torch.Tensor]:
    """penultimate [N, d] -> per image span, its float32 Gram [n_i, n_i] on penultimate's device.

    Not checked for inf/NaN (that would sync per image): :func:`batch_features` checks a whole
    batch's Grams at once (:func:`batch_grams`).
    """
    grams = []
    for start, end in spans.images:
        flat = visual_gram(penultimate[offset + start:offset + end], check_finite=False)
        grams.append(gram_from_upper(flat, end - start))
    return grams


def batch_logit_stats(teacher: Teacher, encoded: Sequence[Encoded], final: torch.Tensor,
                      offsets: Sequence[int], spec: FeatureSpec) -> list[LogitStats]:
    """Logit statistics of every sample of a batch, from one chunked-vocabulary pass.

    final: [B, N, d] post-norm states. Row t of a sample predicts token t+1 (its target).
    """
    rows, targets, counts = [], [], []
    for i, (enc, off) in enumerate(zip(encoded, offsets)):
        positions = answer_target_positions(enc.spans)
        index = torch.tensor(positions, dtype=torch.long, device=final.device)
        rows.append(final[i].index_select(0, index + off))
        targets.append(torch.tensor([enc.input_ids[p + 1] for p in positions], dtype=torch.long))
        counts.append(len(positions))
    stats = logit_statistics(torch.cat(rows), teacher.head_weight, teacher.head_bias,
                             teacher.transform, torch.cat(targets).to(final.device),
                             top_k=spec.width, temperature=spec.temperature)
    return split_stats(stats, counts)


def split_stats(stats: LogitStats, counts: Sequence[int]) -> list[LogitStats]:
    """Cut stacked statistics into consecutive pieces of ``counts`` rows, on the CPU."""
    pieces = {name: torch.split(t.cpu(), list(counts)) for name, t in stats.to_dict().items()}
    return [LogitStats(**{name: parts[j] for name, parts in pieces.items()})
            for j in range(len(counts))]
