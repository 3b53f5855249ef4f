"""Training batches: teacher-cache records joined with dataset samples by sample id.

Teacher side (from the cache, never the teacher model). For each assistant turn k of a sample
(answer span ``[s_k, e_k)`` of the teacher sequence), a :class:`TeacherTurn` holds

- ``window``: the cached ``answer_hidden`` rows of turn k, positions ``s_k-1 .. e_k-1``
  (docs/method.md §1.2);
- ``answer_ids``: the record's input ids ``[s_k, e_k)`` (teacher tokenizer, end-of-turn included);
- ``question``: every cached row at a position ``< s_k`` in position order: the
  ``question_hidden`` rows and the answer-window rows of earlier turns, each position once
  (where both hold a position, e.g. the last token before an earlier answer, the answer-window
  row is used: it is the one the earlier turn's window also uses). None when the cache holds no
  ``question_hidden`` or the loader was told not to load it (L_reg off).

Student side: the same :class:`~genrecal.data.sample.Sample` run through the student's
OWN chat template and processor (:func:`~genrecal.model.encoding.encode_sample`). One
forward per side covers every turn (docs/method.md §1.2: multi-turn turns are sliced from one forward):
``student_labels[t] = input_ids[t+1]`` for ``t+1`` an answer token of a kept turn, and
``student_answer_starts[b][k]`` is ``s_k`` in the student sequence.

Turns: ``n_turns = min(student turns kept, teacher turns cached)`` (``max_length`` may drop
trailing turns on either side). Student turns beyond ``n_turns`` stay in the input (the student
sequence is not re-encoded) but get no labels and no answer start.

Join. The cache must hold every dataset sample: a sample missing from it (skipped at
extraction, or never extracted) is left out with a recorded :class:`Skip` (reason from the
cache manifest when it names one); :attr:`TrainLoader.skips` lists every skip. A record whose
content hash differs from the sample's is a :class:`ContentHashMismatchError` (never skipped:
the data changed, or the cache belongs to other data). Stage finetune has no cache: every
sample is used and ``TrainBatch.teacher`` is None.

Pipeline (:func:`make_loader`): :class:`~genrecal.train.sampler.BatchPlan` gives this rank's
batches of an epoch; a torch ``DataLoader`` replays them as its batch sampler, and its worker
processes run :class:`JoinedDataset` (read the record, check the hash, encode with the student
processor) and :class:`Collator` (pad into a :class:`TrainBatch`), so the training step does
not wait on decompression or image processing. Workers open their cache reader lazily
(``CacheReader`` is never pickled; nothing is ever unpickled from disk).

Teacher feeds. The teacher side comes from a :class:`TeacherFeed`: the cache
(:class:`CacheSource`), or a live teacher (online mode, :mod:`genrecal.train.online`), whose
workers only encode each sample with the teacher's processor (a :class:`TeacherRequest` in
``TrainBatch.teacher_requests``); the teacher forward then runs in the training process, which
fills in ``TrainBatch.teacher`` through :func:`teacher_turns` exactly as from a cache record.

RNG. The ``DataLoader`` draws its workers' base seed from a generator of its own, seeded by
(seed, rank, epoch) (:meth:`TrainLoader.worker_generator`), never from torch's global RNG: reading
batches leaves the training process's RNG (dropout masks) untouched, and a resumed run starts its
workers with the seeds an uninterrupted run gives them (persistent workers start once, with the
seeds of epoch 0).
"""

from __future__ import annotations

import copy
import ctypes
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from genrecal.data.problems import Skip
from genrecal.data.readers import DatasetRead
from genrecal.data.sample import Sample
from genrecal.store.errors import DatasetError, FingerprintMismatchError, SpanError
from genrecal.store.fingerprint import weight_files, weights_identity_files
from genrecal.store.logit_stats import LogitStats
from genrecal.store.manifest import load_manifest
from genrecal.store.reader import CachedSample, CacheReader
from genrecal.store.schema import MANIFEST
from genrecal.store.storage import CacheStorage
from genrecal.model.encoding import Encoded, encode_sample
from genrecal.model.families import Family
from genrecal.model.padding import pad_batch
from genrecal.train.errors import ContentHashMismatchError, DataJoinError, StageSetupError
from genrecal.train.losses import IGNORE_INDEX
from genrecal.train.sampler import BatchPlan, SamplerState

log = logging.getLogger(__name__)

__all__ = ["CacheSource", "Collator", "DataWait", "Example", "JoinReport", "JoinedDataset", "LoaderConfig",
           "StudentSide", "TeacherRequest", "TeacherFeed", "TeacherTurn", "TrainBatch", "TrainLoader",
           "GraceFeed", "GraceTarget", "check_cache_teacher", "check_same_tokenizer", "grace_target", "join_with_cache", "make_loader", "pad_student", "pad_token_id", "student_labels",
           "teacher_turns"]


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float64": torch.float64}


def _move(x, device, non_blocking: bool):
    return None if x is None else x.to(device, non_blocking=non_blocking)


def _pin(x):
    return None if x is None else x.pin_memory()


# ============================================================================ batch records


@dataclass
class TeacherTurn:
    """One assistant turn k of one sample, teacher side (from the cache).

    window: float ``[Na_k + 1, d_l]``, z over the answer window (positions s_k-1 .. e_k-1);
    answer_ids: int64 ``[Na_k]`` teacher answer token ids, end-of-turn included;
    question: float ``[Nq_k, d_l]`` cached rows at positions < s_k in position order, or None;
    answer_start: s_k, the teacher position of the first answer token (answer token j sits at
    s_k + j); question_positions: int64 ``[Nq_k]`` the teacher positions of ``question``'s rows.
    The positions feed the Recalibrator when it keeps the original positions
    (``recalibrator.reassign_positions: false``, the paper's NPE ablation).
    """

    window: torch.Tensor
    answer_ids: torch.Tensor
    question: torch.Tensor | None = None
    answer_start: int = 0
    question_positions: torch.Tensor | None = None

    def _apply(self, fn) -> "TeacherTurn":
        """A copy with ``fn`` applied to every tensor (``question_positions`` included)."""
        return replace(self, window=fn(self.window), answer_ids=fn(self.answer_ids),
                       question=None if self.question is None else fn(self.question),
                       question_positions=None if self.question_positions is None else fn(self.question_positions))

    def to(self, device, non_blocking: bool = False) -> "TeacherTurn":
        return self._apply(lambda t: _move(t, device, non_blocking))

    def pin_memory(self) -> "TeacherTurn":
        return self._apply(_pin)


@dataclass
class TrainBatch:
    """One batch of B samples (see the trainer contract).

    ids: B sample ids; student_inputs: ``model(**student_inputs)`` (``input_ids`` / ``attention_mask``
    int64 ``[B, Ls]`` right-padded, pixel inputs concatenated along dim 0); student_labels: int64
    ``[B, Ls]``, already shifted (``labels[t] = input_ids[t+1]`` on answer targets, else -100);
    student_answer_starts: per sample, per turn, the answer start s_k in the student sequence;
    teacher: per sample, per turn, a :class:`TeacherTurn`, or None without a cache (finetune);
    skipped: samples of this batch left out by the workers (``on_error="skip"``). A batch whose
    every sample was skipped has ``len(batch) == 0`` and empty inputs. teacher_requests: online
    mode only, per sample the teacher's encoding (``teacher`` is None until the live teacher
    fills it in, see :mod:`genrecal.train.online`); None otherwise.
    """

    ids: list[str]
    student_inputs: dict[str, torch.Tensor]
    student_labels: torch.Tensor
    student_answer_starts: list[list[int]]
    teacher: list[list[TeacherTurn]] | None
    skipped: list[Skip] = field(default_factory=list)
    teacher_requests: list[TeacherRequest] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device, non_blocking: bool = False) -> "TrainBatch":
        """A copy with every tensor on ``device``."""
        return replace(self, student_inputs={k: _move(v, device, non_blocking) for k, v in self.student_inputs.items()},
                       student_labels=_move(self.student_labels, device, non_blocking),
                       teacher=None if self.teacher is None else
                       [[t.to(device, non_blocking) for t in turns] for turns in self.teacher])

    def pin_memory(self) -> "TrainBatch":
        """A copy in pinned host memory (called by ``DataLoader(pin_memory=True)``)."""
        return replace(self, student_inputs={k: _pin(v) for k, v in self.student_inputs.items()},
                       student_labels=_pin(self.student_labels),
                       teacher=None if self.teacher is None else [[t.pin_memory() for t in turns]
                                                                  for turns in self.teacher])


@dataclass(frozen=True)
class TeacherRequest:
    """One sample encoded with the TEACHER's chat template and processor, for a live teacher.

    encoded: the teacher's :class:`Encoded` (``inputs`` with batch dim 1, ids, spans); n_turns:
    the turns the batch keeps (``min(student turns, teacher turns)``).
    """

    sample_id: str
    content_hash: str
    encoded: Encoded
    n_turns: int

    @property
    def spans(self):
        """The teacher's spans (:class:`~genrecal.store.spans.Spans`) of the sample."""
        return self.encoded.spans


@dataclass(frozen=True)
class Example:
    """One joined sample, before batching.

    inputs: the student processor's output (batch dim 1); labels: int64 ``[Ls]``;
    answer_starts: s_k per kept turn; teacher: the sample's turns (a :class:`TeacherRequest`
    in online mode), or None without a teacher source.
    """

    sample_id: str
    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    answer_starts: list[int]
    teacher: list[TeacherTurn] | TeacherRequest | None


# ============================================================================ teacher side


def _known_rows(cached: CachedSample) -> tuple[torch.Tensor, torch.Tensor]:
    """Every cached row, in position order, each position once (answer-window rows win ties).

    Returns int64 ``[n]`` sorted positions and float ``[n, d]`` rows.
    """
    positions = torch.cat([cached.answer_positions(), cached.question_positions])
    rows = torch.cat([cached.answer_hidden, cached.question_hidden])
    order = torch.argsort(positions, stable=True)  # answer rows come first among equal positions
    positions = positions[order]
    first = torch.ones_like(positions, dtype=torch.bool)
    first[1:] = positions[1:] != positions[:-1]
    return positions[first], rows.index_select(0, order[first].to(rows.device))  # rows may be on a GPU (online)


def teacher_turns(cached: CachedSample, n_turns: int) -> list[TeacherTurn]:
    """The first ``n_turns`` :class:`TeacherTurn` s of a cache record (see the module docstring).

    ``cached`` must carry ``answer_hidden``; ``question`` is filled when it carries
    ``question_hidden`` (with ``question_positions``), else None.
    """
    if cached.answer_hidden is None:
        raise DataJoinError(f"sample {cached.sample_id!r}: the cache record was read without answer_hidden; "
                            "load the record with the answer_hidden feature", sample_id=cached.sample_id)
    known = _known_rows(cached) if cached.question_hidden is not None else None
    rows = cached.answer_turn_rows()
    out = []
    for k in range(n_turns):
        start, end = cached.spans.answers[k]
        question = positions = None
        if known is not None:
            n = int(torch.searchsorted(known[0], start))
            question, positions = known[1][:n], known[0][:n]
        out.append(TeacherTurn(window=cached.answer_hidden[rows[k][0]:rows[k][1]],
                               answer_ids=cached.input_ids[start:end].clone(), question=question,
                               answer_start=int(start), question_positions=positions))
    return out


class TeacherFeed(Protocol):
    """Where the teacher side of the samples comes from (picklable: it travels to the workers).

    ``join(samples)`` (main process, once): the samples it can serve (dataset order), a
    :class:`Skip` for each other one, and the number of samples it holds (None: not a store);
    ``record(sample)`` (workers): the teacher's view of one sample, with ``.spans`` (its
    answers count the teacher turns), raising :class:`SpanError` / :class:`DatasetError` when
    the teacher cannot take the sample; ``turns(record, n_turns)``: the sample's entry in
    ``TrainBatch``: its first ``n_turns`` :class:`TeacherTurn` s, or a :class:`TeacherRequest`.
    """

    def join(self, samples: Sequence[Sample]) -> tuple[list[Sample], list[Skip], int | None]: ...

    def record(self, sample: Sample): ...

    def turns(self, record, n_turns: int) -> list[TeacherTurn] | TeacherRequest: ...


def check_cache_teacher(url, location: str, revision: str | None = None, *,
                        storage_options: dict | None = None) -> dict[str, str] | None:
    """Refuse a teacher cache written by another teacher than the pipeline's.

    location / revision: the pipeline's teacher (hub id or directory). Where its weight files
    are on this machine, their identity digest must equal the cache fingerprint's ``weights``
    (:mod:`genrecal.store.fingerprint`), and that expectation is returned for the cache readers
    to check again; a training node that never held the teacher compares the teacher location
    the cache records instead (returns None). Raises :class:`FingerprintMismatchError` naming
    both sides and the fixes.
    """
    storage = CacheStorage(url, storage_options)
    if not storage.exists(MANIFEST):
        raise DataJoinError(f"{url} holds no committed teacher cache (no {MANIFEST}), hence no teacher "
                            "artifacts either: extract it first (`genrecal extract PIPELINE`), point "
                            "cache.location at an extracted cache, or train with --online")
    manifest = load_manifest(storage)
    recorded = manifest.header.settings.get("teacher") or {}
    files = weight_files(location, revision)
    fix = ("Fix: point cache.location at a cache extracted with this teacher (`genrecal extract "
           "PIPELINE`), or pass --allow-teacher-mismatch to train on this cache deliberately.")
    if files:
        want = weights_identity_files(files)
        if manifest.teacher.weights != want:
            raise FingerprintMismatchError(
                f"teacher cache {url} was written for another teacher: its weights fingerprint is "
                f"{manifest.teacher.weights} (teacher {recorded.get('location', '?')!r}), but the "
                f"pipeline's teacher {location!r} has {want}. {fix}")
        return {"weights": want}
    names = {location, str(Path(location).expanduser().absolute())}
    if recorded.get("location") not in names or recorded.get("revision") != revision:
        raise FingerprintMismatchError(
            f"teacher cache {url} was written for teacher {recorded.get('location')!r} (revision "
            f"{recorded.get('revision')!r}, fingerprint {manifest.teacher.digest}); the pipeline's "
            f"teacher is {location!r} (revision {revision!r}), whose weights are not on this machine "
            f"to compare. {fix}")
    return None


def check_same_tokenizer(url, tokenizer) -> None:
    """Refuse a teacher whose tokenizer differs from the student's (GRACE reads one input for
    both models, docs/method.md §2.4). Compares the cached teacher tokenizer's vocabulary and
    added tokens with ``tokenizer``'s; padded embedding rows beyond the vocabulary may differ
    (the teacher's logits are sliced to the student's vocabulary)."""
    import tempfile

    from transformers import AutoTokenizer

    from genrecal.store.artifacts import load_tokenizer_files

    with tempfile.TemporaryDirectory(prefix="genrecal-teacher-tokenizer-") as tmp:
        for name, data in load_tokenizer_files(url).items():
            Path(tmp, name).write_bytes(data)
        teacher = AutoTokenizer.from_pretrained(tmp)
    mine, theirs = tokenizer.get_vocab(), teacher.get_vocab()
    if mine != theirs:
        differ = sorted(set(mine.items()) ^ set(theirs.items()), key=lambda kv: kv[1])[:5]
        raise StageSetupError(
            f"GRACE needs teacher and student to share the tokenizer, but the teacher of cache {url} "
            f"has {len(theirs)} tokens and the student {len(mine)}; first differences "
            f"(token, id): {differ}. Use a same-tokenizer pair (the GenRecal stages distil across "
            "tokenizers).")


class CacheSource:
    """The teacher cache as seen by one process: a :class:`CacheReader` opened lazily, once per process.

    Picklable: the reader is dropped when the object is sent to a worker process and reopened
    there on first use. ``dtype``: float dtype of the returned teacher tensors;
    ``load_question``: read ``question_hidden`` when the cache has it.
    """

    def __init__(self, url, *, dtype: torch.dtype = torch.float32, load_question: bool = True,
                 expect_teacher=None, verify: bool = True, storage_options: dict | None = None,
                 read: Sequence[str] | None = None):
        self.url, self.dtype, self.load_question = str(url), dtype, load_question
        self.expect_teacher, self.verify, self.storage_options = expect_teacher, verify, storage_options
        self.read = None if read is None else tuple(read)
        self._reader: CacheReader | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None, "_pid": None}

    def reader(self) -> CacheReader:
        if self._reader is None or self._pid != os.getpid():
            self._reader = CacheReader(self.url, expect_teacher=self.expect_teacher, verify=self.verify,
                                       dtype=self.dtype, storage_options=self.storage_options)
            self._pid = os.getpid()
        return self._reader

    def features(self) -> list[str]:
        """The cached features this source reads: ``read`` when given (each must be cached), else
        the GenRecal stages' answer_hidden, and question_hidden if asked and cached."""
        available = self.reader().features
        if self.read is not None:
            missing = [name for name in self.read if name not in available]
            if missing:
                raise DataJoinError(f"teacher cache {self.url} holds no {missing} (it has {sorted(available)}), "
                                    "which this stage reads; re-extract with those cache.features on")
            return list(self.read)
        if "answer_hidden" not in available:
            raise DataJoinError(f"teacher cache {self.url} holds no answer_hidden (it has {sorted(available)}); "
                                "the GenRecal stages need it. Re-extract with cache.features.answer_hidden: true")
        wanted = ["answer_hidden"]
        if self.load_question and "question_hidden" in available:
            wanted.append("question_hidden")
        return wanted

    def join(self, samples: Sequence[Sample]) -> tuple[list[Sample], list[Skip], int]:
        """The samples the cache holds and a Skip for each other one (see :func:`join_with_cache`)."""
        self.features()  # fail now, in the main process, if the cache cannot feed training
        kept, missing = join_with_cache(samples, self.reader())
        return kept, missing, len(self.reader())

    def turns(self, cached: CachedSample, n_turns: int) -> list[TeacherTurn]:
        return teacher_turns(cached, n_turns)

    def record(self, sample: Sample) -> CachedSample:
        """The record of ``sample``, after checking that it was extracted from the same content."""
        cached = self.reader().get(sample.id, dtype=self.dtype, features=self.features())
        if cached.content_hash != sample.content_hash:
            raise ContentHashMismatchError(
                f"sample {sample.id!r}: the teacher cache was extracted from other content than the dataset "
                f"holds. Cache {self.reader().url} has content hash {cached.content_hash}; dataset file "
                f"{sample.source or '<unknown>'} gives {sample.content_hash}. The data changed after extraction, "
                f"or the cache belongs to other data. Fix: re-extract the cache from this data, or point the "
                f"trainer at the dataset (and image files) the cache was extracted from.", sample_id=sample.id)
        return cached


@dataclass
class GraceTarget:
    """One sample's teacher signal for GRACE, from the cache (docs/method.md §2.4).

    input_ids: int64 ``[L]`` the teacher's input ids (GRACE needs them equal to the student's);
    answer_ids: int64 ``[n]`` the supervised tokens (answers of the kept turns, end-of-turn
    included) in position order, whose predicting positions ``t`` (next token at ``t + 1``)
    carry the rows below; stats: the cached :class:`~genrecal.store.logit_stats.LogitStats` of
    those ``n`` rows, or None; hidden: float ``[n, d_l]`` the teacher's post-norm z at those
    positions (the exact path), or None; grams: per image, the cached uncentred Gram ``[n_i,
    n_i]`` of the teacher's block L-2 states, or None; image_spans: each image's token range.
    gate: float ``[n]``, the confidence gate (2.5), filled on the device before the forward
    (:meth:`genrecal.train.step.StageModel.token_counts`).
    """

    input_ids: torch.Tensor
    answer_ids: torch.Tensor
    stats: LogitStats | None = None
    hidden: torch.Tensor | None = None
    grams: list[torch.Tensor] | None = None
    image_spans: tuple[tuple[int, int], ...] = ()
    gate: torch.Tensor | None = None

    def _apply(self, fn) -> "GraceTarget":
        stats = None if self.stats is None else LogitStats(**{k: fn(v) for k, v in self.stats.to_dict().items()})
        return replace(self, input_ids=fn(self.input_ids), answer_ids=fn(self.answer_ids), stats=stats,
                       hidden=None if self.hidden is None else fn(self.hidden),
                       grams=None if self.grams is None else [fn(g) for g in self.grams],
                       gate=None if self.gate is None else fn(self.gate))

    def to(self, device, non_blocking: bool = False) -> "GraceTarget":
        return self._apply(lambda t: _move(t, device, non_blocking))

    def pin_memory(self) -> "GraceTarget":
        return self._apply(_pin)


def grace_target(cached: CachedSample, n_turns: int) -> GraceTarget:
    """The :class:`GraceTarget` of the first ``n_turns`` turns of a cache record."""
    answers = cached.spans.answers[:n_turns]
    n = sum(e - s for s, e in answers)  # target rows of the kept turns: the first n, in order
    answer_ids = torch.cat([cached.input_ids[s:e] for s, e in answers])
    stats = None
    if cached.logit_stats is not None:
        stats = LogitStats(**{k: v[:n] for k, v in cached.logit_stats.to_dict().items()})
    hidden = None
    if cached.answer_hidden is not None:  # window k = rows of positions s_k-1 .. e_k-1; targets: all but the last
        rows = cached.answer_turn_rows()[:n_turns]
        hidden = torch.cat([cached.answer_hidden[a:b - 1] for a, b in rows])
    return GraceTarget(input_ids=cached.input_ids, answer_ids=answer_ids, stats=stats, hidden=hidden,
                       grams=cached.visual_gram, image_spans=tuple(cached.spans.images))


class GraceFeed:
    """The teacher side of a GRACE stage: cached logit information and Grams per sample.

    A :class:`TeacherFeed` over a :class:`CacheSource` that reads ``features`` (``logit_stats``
    or ``answer_hidden``, and ``visual_gram`` when RCKA is on); each sample's entry in
    ``TrainBatch.teacher`` is ``[GraceTarget]``.
    """

    def __init__(self, cache: CacheSource):
        self.cache = cache

    def join(self, samples: Sequence[Sample]) -> tuple[list[Sample], list[Skip], int]:
        return self.cache.join(samples)

    def record(self, sample: Sample) -> CachedSample:
        return self.cache.record(sample)

    def turns(self, cached: CachedSample, n_turns: int) -> list[GraceTarget]:
        return [grace_target(cached, n_turns)]


# ============================================================================ student side


@dataclass(frozen=True)
class StudentSide:
    """The student's processor and family (never its model): what the workers encode with."""

    processor: object
    family: Family
    max_length: int | None = None

    @classmethod
    def of(cls, student, max_length: int | None = None) -> "StudentSide":
        """From a :class:`~genrecal.model.loading.LoadedVLM` or a ``(processor, family)`` pair."""
        processor, family = student if isinstance(student, tuple) else (student.processor, student.family)
        if not isinstance(family, Family):
            raise TypeError(f"student: expected a LoadedVLM or (processor, Family), got family of type "
                            f"{type(family).__name__}")
        return cls(processor, family, max_length)

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.processor.tokenizer)

    def encode(self, sample: Sample) -> Encoded:
        return encode_sample((self.processor, self.family), sample, max_length=self.max_length)


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id (else its eos id, else 0): padded positions are masked anyway."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def student_labels(input_ids: torch.Tensor, answers: Sequence[tuple[int, int]], n_turns: int) -> torch.Tensor:
    """Shifted next-token labels of one student sequence.

    input_ids: int64 ``[L]``; answers: answer spans ``[s_k, e_k)``. Returns int64 ``[L]`` with
    ``labels[t] = input_ids[t+1]`` for ``s_k - 1 <= t < e_k - 1``, ``k < n_turns``, else -100.
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for start, end in answers[:n_turns]:
        labels[start - 1:end - 1] = input_ids[start:end]
    return labels


# ============================================================================ dataset


class JoinedDataset(Dataset):
    """``dataset[i]`` -> the :class:`Example` of sample i (or a :class:`Skip` under ``on_error="skip"``).

    samples: the joined samples (their ids are in the cache when ``cache`` is given);
    cache: the :class:`TeacherFeed`; None for stage finetune (``Example.teacher`` is None);

    memo_bytes: keep examples in memory, up to this many tensor bytes per process, so that a
    small dataset trained for several epochs encodes and reads each sample once (0: off). The
    examples are immutable downstream (the collator builds new batch tensors).
    """

    def __init__(self, samples: Sequence[Sample], student: StudentSide, cache: TeacherFeed | None = None,
                 *, on_error: Literal["raise", "skip"] = "raise", memo_bytes: int = 0):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error={on_error!r}; expected 'raise' or 'skip'")
        self.samples, self.student, self.cache, self.on_error = list(samples), student, cache, on_error
        self._memo: dict[int, Example | Skip] = {}
        self._memo_left = memo_bytes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Example | Skip:
        if i in self._memo:
            return self._memo[i]
        example = self._load(i)
        if self._memo_left > 0:
            size = _tensor_bytes(example)
            if size <= self._memo_left:
                self._memo[i], self._memo_left = example, self._memo_left - size
        return example

    def _load(self, i: int) -> Example | Skip:
        sample = self.samples[i]
        try:
            cached = None if self.cache is None else self.cache.record(sample)
        except (SpanError, DatasetError) as exc:  # a live teacher's encoding (a cache never raises these)
            return self._failure(sample, exc, "teacher")
        try:
            encoded = self.student.encode(sample)
        except (SpanError, DatasetError) as exc:
            return self._failure(sample, exc, "student")
        return self._example(sample, encoded, cached)

    def _failure(self, sample: Sample, exc: Exception, side: str) -> Skip:
        if self.on_error == "skip":
            return Skip(sample_id=sample.id, file=sample.source, reason=f"{side} side: {exc}")
        raise DataJoinError(f"sample {sample.id!r} (dataset file {sample.source or '<unknown>'}) cannot be "
                            f"encoded for the {side}: {exc}. Fix the sample, raise the {side} max_length, or "
                            f"train with on_error='skip' to leave such samples out (they are recorded)",
                            sample_id=sample.id) from exc

    def _example(self, sample: Sample, encoded: Encoded, cached) -> Example | Skip:
        answers = encoded.spans.answers
        n_turns = len(answers) if cached is None else min(len(answers), len(cached.spans.answers))
        if n_turns == 0:  # defensive: encode_sample and the cache both keep >= 1 answer
            return Skip(sample_id=sample.id, file=sample.source, reason="no turn left on both sides")
        ids = encoded.inputs["input_ids"].reshape(-1).long()
        return Example(sample_id=sample.id, inputs=dict(encoded.inputs), labels=student_labels(ids, answers, n_turns),
                       answer_starts=[s for s, _ in answers[:n_turns]],
                       teacher=None if cached is None else self.cache.turns(cached, n_turns))


def _tensor_bytes(value) -> int:
    """Bytes of every tensor in an example (dataclasses, dicts, lists walked)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return sum(_tensor_bytes(getattr(value, f)) for f in value.__dataclass_fields__)
    return 0


# ============================================================================ collate


def _pad_right(row: torch.Tensor, length: int, value: int) -> torch.Tensor:
    """row: ``[L]`` -> ``[length]`` padded with ``value`` at the end."""
    return torch.cat([row, row.new_full((length - row.shape[0],), value)])


def pad_student(inputs: Sequence[dict[str, torch.Tensor]], labels: Sequence[torch.Tensor],
                pad_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Right-pad per-sample student processor outputs into one batch.

    inputs: per-sample processor outputs (batch dim 1), padded by
    :func:`~genrecal.model.padding.pad_batch` (the padder of the teacher's inputs too);
    labels: int64 ``[L_b]`` each, padded with -100 into ``[B, L_max]``.
    """
    out = pad_batch(inputs, pad_id, "right")
    longest = out["input_ids"].shape[-1]
    return out, torch.stack([_pad_right(y, longest, IGNORE_INDEX) for y in labels])


@dataclass(frozen=True)
class Collator:
    """``collate(items)`` -> :class:`TrainBatch`; items are :class:`Example` s and :class:`Skip` s."""

    pad_id: int
    with_teacher: bool

    def __call__(self, items: Sequence[Example | Skip]) -> TrainBatch:
        examples = [x for x in items if isinstance(x, Example)]
        skipped = [x for x in items if isinstance(x, Skip)]
        if not examples:
            return TrainBatch([], {}, torch.zeros(0, 0, dtype=torch.long), [], [] if self.with_teacher else None,
                              skipped)
        inputs, labels = pad_student([x.inputs for x in examples], [x.labels for x in examples], self.pad_id)
        teacher = [x.teacher for x in examples] if self.with_teacher else None
        requests = None
        if teacher and isinstance(teacher[0], TeacherRequest):  # online: the live teacher fills `teacher` in
            teacher, requests = None, teacher
        return TrainBatch(ids=[x.sample_id for x in examples], student_inputs=inputs, student_labels=labels,
                          student_answer_starts=[x.answer_starts for x in examples], teacher=teacher,
                          skipped=skipped, teacher_requests=requests)


def collate_for_handover(collator: Collator, items: Sequence[Example | Skip]):
    """The loader's ``collate_fn``: ``collator(items)``, made ready (:func:`_for_handover`) when
    it runs in a worker process."""
    batch = collator(items)
    return _for_handover(batch) if torch.utils.data.get_worker_info() is not None else batch


INLINE_BYTES = 4 << 20
"""A worker sends a batch of at most this many tensor bytes inline through its result pipe."""


def _for_handover(batch: TrainBatch):
    """How a loader worker hands ``batch`` to the trainer.

    By default a worker moves each tensor's storage into shared memory: one segment per storage,
    a few per sample, and for each one the trainer asks the worker's resource-sharer thread for
    the file descriptor over a socket, a round trip that waits on the worker's GIL while it
    prepares the next batch (measured: 1-8 ms per batch of 2 small samples, 10% of a tiny
    step). Here a batch of at most :data:`INLINE_BYTES` of tensors travels inline in the pipe,
    its tensors' bytes as one buffer per dtype (:class:`_Inline`: no descriptor); a larger one
    as one shared-memory segment per dtype (:func:`_packed`).
    """
    if _tensor_bytes(batch) <= INLINE_BYTES:
        return _Inline(batch)
    return _packed(batch)


@dataclass(frozen=True)
class _Slot:
    """Where a tensor of an inline batch lies: ``shape`` elements from ``offset`` of its dtype's buffer."""

    dtype: str
    offset: int
    shape: tuple[int, ...]


class _Inline:
    """A batch that pickles as its structure with :class:`_Slot` s for tensors, plus one
    ``bytearray`` per dtype holding the tensors' values; it unpickles as the batch itself, its
    tensors views of those buffers (:func:`_from_inline`), in the trainer process."""

    def __init__(self, batch: TrainBatch):
        self.batch = batch

    def __reduce__(self):
        buffers: dict[str, bytearray] = {}

        def slot(x: torch.Tensor) -> _Slot:
            name = str(x.dtype).removeprefix("torch.")
            buf = buffers.setdefault(name, bytearray())
            offset = len(buf) // x.element_size()
            buf += x.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b""
            return _Slot(name, offset, tuple(x.shape))

        skeleton = _map_tensors(self.batch, slot)
        return _from_inline, (skeleton, buffers)


def _from_inline(skeleton: TrainBatch, buffers: dict[str, bytearray]) -> TrainBatch:
    flat = {name: torch.frombuffer(buf, dtype=getattr(torch, name)) if buf
            else torch.empty(0, dtype=getattr(torch, name)) for name, buf in buffers.items()}

    def tensor(slot: _Slot) -> torch.Tensor:
        n = math.prod(slot.shape)
        if n == 0:
            return torch.empty(slot.shape, dtype=getattr(torch, slot.dtype))
        return flat[slot.dtype][slot.offset:slot.offset + n].view(slot.shape)

    return _map_tensors(skeleton, tensor)


def _packed(batch: TrainBatch) -> TrainBatch:
    """``batch`` with every CPU tensor (student inputs and labels, teacher records) copied into
    one shared-memory buffer per dtype (allocated there, as default_collate does in workers),
    as views of it. Values, shapes and dtypes are unchanged."""
    sizes: dict[torch.dtype, int] = {}

    def count(x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            sizes[x.dtype] = sizes.get(x.dtype, 0) + x.numel()
        return x

    _map_tensors(batch, count)
    flat = {dt: torch.empty(0, dtype=dt).set_(torch.UntypedStorage._new_shared(n * dt.itemsize), 0, (n,))
            for dt, n in sizes.items()}
    at = dict.fromkeys(sizes, 0)

    def place(x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return x
        view = flat[x.dtype][at[x.dtype]:at[x.dtype] + x.numel()].view(x.shape)
        view.copy_(x)
        at[x.dtype] += x.numel()
        return view

    return _map_tensors(batch, place)


def _map_tensors(batch: TrainBatch, fn) -> TrainBatch:
    """A (shallow) copy of ``batch``, any attribute set on it kept, with ``fn`` applied to each
    of its tensors, in a fixed order."""
    out = copy.copy(batch)
    out.student_inputs = {k: fn(v) if isinstance(v, (torch.Tensor, _Slot)) else v
                          for k, v in batch.student_inputs.items()}
    out.student_labels = fn(batch.student_labels)
    out.teacher = None if batch.teacher is None else [
        [t._apply(fn) for t in turns] if isinstance(turns, list) else turns._apply(fn) for turns in batch.teacher]
    return out


# ============================================================================ join


@dataclass(frozen=True)
class JoinReport:
    """How the dataset and the cache were joined.

    n_data: dataset samples given; n_joined: samples trained on; n_cache: samples in the cache
    (None without one); skips: samples left out before training (missing from the cache, or
    skipped by the dataset reader), each with its reason.
    """

    n_data: int
    n_joined: int
    n_cache: int | None
    skips: tuple[Skip, ...]

    @property
    def n_cache_only(self) -> int:
        """Cached samples that the dataset does not hold (unused)."""
        return 0 if self.n_cache is None else self.n_cache - self.n_joined

    def summary(self) -> str:
        cache = "" if self.n_cache is None else f", {self.n_cache} cached ({self.n_cache_only} not in the data)"
        return f"{self.n_joined} of {self.n_data} dataset samples joined{cache}, {len(self.skips)} skipped"


def _check_unique(samples: Sequence[Sample]) -> None:
    seen: dict[str, Sample] = {}
    for sample in samples:
        if sample.id in seen:
            raise DataJoinError(f"sample id {sample.id!r} occurs twice (dataset files {seen[sample.id].source or '?'} "
                                f"and {sample.source or '?'}); samples are joined with the cache by id, so ids must "
                                f"be unique across every data source. Fix: give the rows distinct ids",
                                sample_id=sample.id)
        seen[sample.id] = sample


def join_with_cache(samples: Sequence[Sample], reader: CacheReader) -> tuple[list[Sample], list[Skip]]:
    """The samples whose id is in the cache (dataset order) and a :class:`Skip` for each other one.

    Streams the cache's sorted id index once (no per-id lookups); the reason of a missing sample
    is the one the extraction recorded when the manifest has it.
    """
    _check_unique(samples)
    wanted = {s.id for s in samples}
    present = {sample_id for sample_id in reader.sample_ids() if sample_id in wanted}
    extraction = {s.sample_id: s.reason for s in reader.manifest.skipped if s.sample_id in wanted}
    kept, skips = [], []
    for sample in samples:
        if sample.id in present:
            kept.append(sample)
            continue
        why = (f"skipped at extraction: {extraction[sample.id]}" if sample.id in extraction
               else "never extracted (the cache was built from other or fewer samples)")
        skips.append(Skip(sample_id=sample.id, file=sample.source, reason=f"not in teacher cache {reader.url}: {why}"))
    return kept, skips


# ============================================================================ loader


@dataclass(frozen=True)
class LoaderConfig:
    """Settings of :func:`make_loader`.

    batch_size: samples per batch per rank (at most); seed: of the epoch permutations;
    num_workers: worker processes (0: load in the training process); prefetch_factor: batches
    each worker prepares ahead; persistent_workers: keep workers across epochs; pin_memory: pin
    batches for fast host-to-GPU copies; max_length: student sequence limit (trailing turns are
    dropped to fit); teacher_dtype: float dtype of teacher tensors; load_question: read
    ``question_hidden`` (for L_reg) when cached; on_error: what a sample the student cannot
    encode does ("raise" or "skip", recorded); verify: check cache shard checksums on first read;
    multiprocessing_context: "fork" / "spawn" / "forkserver" (None: the platform default).
    """

    batch_size: int = 8
    seed: int = 0
    num_workers: int = 2
    prefetch_factor: int = 2
    persistent_workers: bool = True
    pin_memory: bool = False
    max_length: int | None = None
    teacher_dtype: str = "float32"
    load_question: bool = True
    on_error: Literal["raise", "skip"] = "raise"
    verify: bool = True
    multiprocessing_context: str | None = None
    memo_bytes: int = 0

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise ValueError("LoaderConfig: " + "; ".join(problems))

    def problems(self) -> list[str]:
        out = [f"{name}={getattr(self, name)!r} must be an integer >= {low}"
               for name, low in (("batch_size", 1), ("seed", 0), ("num_workers", 0), ("prefetch_factor", 1),
                                 ("memo_bytes", 0))
               if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int)
               or getattr(self, name) < low]
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 2):
            out.append(f"max_length={self.max_length!r} must be None or an integer >= 2")
        if self.teacher_dtype not in _DTYPES:
            out.append(f"teacher_dtype={self.teacher_dtype!r} must be one of {sorted(_DTYPES)}")
        if self.on_error not in ("raise", "skip"):
            out.append(f"on_error={self.on_error!r} must be 'raise' or 'skip'")
        return out

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.teacher_dtype]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "LoaderConfig":
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"LoaderConfig.from_dict: unknown keys {sorted(unknown)}")
        return cls(**data)

    def dataloader_kwargs(self) -> dict:
        if self.num_workers == 0:
            return {"num_workers": 0, "pin_memory": self.pin_memory}
        return {"num_workers": self.num_workers, "prefetch_factor": self.prefetch_factor,
                "persistent_workers": self.persistent_workers, "pin_memory": self.pin_memory,
                "multiprocessing_context": self.multiprocessing_context,
                "worker_init_fn": partial(_init_worker, parent=os.getpid())}


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _init_worker(_worker_id: int, *, parent: int) -> None:
    """Set up a loader worker process.

    One intra-op thread: the workers run in parallel with each other and the trainer. On Linux
    the kernel SIGKILLs the worker when the process that started it dies (``PR_SET_PDEATHSIG``):
    torch's own watchdog only polls the parent between batches, and a worker blocked on a full
    result queue with no reader left would outlive a SIGKILLed trainer. ``parent`` is the pid the
    worker was started from; if it is already gone the worker exits at once.
    """
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("loader worker %d: prctl(PR_SET_PDEATHSIG) failed (errno %d); it may outlive "
                        "a killed trainer", os.getpid(), ctypes.get_errno())
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(0)


class _ReplaySampler(Sampler):
    """The DataLoader's batch sampler: replays the batches the loader sets before each pass."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(list(self.batches))

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class DataWait:
    """Time the training loop spent waiting in ``next()`` for batches (seconds)."""

    total_s: float = 0.0
    batches: int = 0
    last_s: float = 0.0
    max_s: float = 0.0

    def add(self, seconds: float) -> None:
        self.total_s += seconds
        self.batches += 1
        self.last_s = seconds
        self.max_s = max(self.max_s, seconds)

    @property
    def mean_s(self) -> float:
        return self.total_s / self.batches if self.batches else 0.0

    def reset(self) -> None:
        self.total_s, self.batches, self.last_s, self.max_s = 0.0, 0, 0.0, 0.0


class TrainLoader:
    """Iterates one epoch of :class:`TrainBatch` es per ``iter()``, resumable from a :class:`SamplerState`.

    ``state`` is always the position after the last batch handed out (save it with a checkpoint);
    after the last batch of an epoch it moves to ``(epoch + 1, 0)`` when the loop asks for the next
    one. ``wait`` measures the time spent in ``next()``; ``skips`` lists every sample left out.
    """

    def __init__(self, dataset: JoinedDataset, plan: BatchPlan, collator: Collator, report: JoinReport,
                 config: LoaderConfig, state: SamplerState | None = None):
        self.dataset, self.plan, self.report, self.config = dataset, plan, report, config
        self._sampler = _ReplaySampler()
        self._loader = DataLoader(dataset, batch_sampler=self._sampler,
                                  collate_fn=partial(collate_for_handover, collator),
                                  generator=torch.Generator(), **config.dataloader_kwargs())
        self._state = plan.state()
        self._worker_skips: dict[str, Skip] = {}
        self.wait = DataWait()
        self._ahead: tuple[list, Iterator] | None = None  # (batches, iterator) of the next epoch, started early
        if state is not None:
            self.load_state(state)

    @property
    def state(self) -> SamplerState:
        return self._state

    def load_state(self, state: SamplerState) -> None:
        """Resume at ``state`` (checked against this run: seed, world size, rank, batch boundary)."""
        self.plan.remaining(state)
        self._state = state
        self._ahead = None  # an epoch started early from another position is not this one

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    def __len__(self) -> int:
        """Batches left in the current epoch."""
        return len(self.plan.remaining(self._state))

    @property
    def skips(self) -> list[Skip]:
        """Samples left out: at the join (before training) and by the workers so far."""
        return [*self.report.skips, *self._worker_skips.values()]

    def worker_generator(self, epoch: int) -> torch.Generator:
        """The generator the ``DataLoader`` draws its workers' base seed from when it starts
        them for ``epoch``: seeded by (seed, rank, epoch), or (seed, rank, 0) for persistent
        workers (started once, kept across epochs), so that workers started by a resumed run
        get the seeds an uninterrupted run gives them."""
        start = 0 if self._loader.persistent_workers else epoch
        state = np.random.SeedSequence([self.config.seed, self.plan.rank, start]).generate_state(1, np.uint64)
        return torch.Generator().manual_seed(int(state[0]))

    def __iter__(self) -> Iterator[TrainBatch]:
        batches = self.plan.remaining(self._state)
        if not batches:  # resumed at the very end of an epoch
            self._state = self._state.next_epoch()
            return
        ahead, self._ahead = self._ahead, None
        iterator = ahead[1] if ahead is not None and ahead[0] == batches else self._start(self._state.epoch, batches)
        for i, planned in enumerate(batches):
            started = time.perf_counter()
            batch = next(iterator)
            self.wait.add(time.perf_counter() - started)
            self._worker_skips.update((s.sample_id, s) for s in batch.skipped)
            self._state = self._state.advanced(len(planned))
            if i == len(batches) - 1:
                self._start_next_epoch()
            yield batch
        self._state = self._state.next_epoch()

    def _start(self, epoch: int, batches: list) -> Iterator[TrainBatch]:
        self._sampler.batches = batches
        self._loader.generator = self.worker_generator(epoch)  # never the global RNG
        return iter(self._loader)

    def _start_next_epoch(self) -> None:
        """With persistent workers, hand them the next epoch's first batches as soon as this
        epoch's last one is received, so that the trainer does not wait a whole batch at every
        epoch start. The order is the one the next ``iter()`` would start (it checks and takes
        it over); :meth:`load_state` drops it."""
        if not self._loader.persistent_workers:
            return
        following = self._state.next_epoch()
        batches = self.plan.remaining(following)
        if batches:
            self._ahead = (batches, self._start(following.epoch, batches))

    def close(self) -> None:
        """Stop persistent worker processes (they also stop when the loader is garbage collected)."""
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._loader._iterator = None


def _samples_of(data: Sequence[Sample] | DatasetRead) -> tuple[list[Sample], list[Skip]]:
    if isinstance(data, DatasetRead):
        return list(data.samples), [replace(s, reason=f"dataset reader: {s.reason}") for s in data.skips]
    return list(data), []


def _join(data: Sequence[Sample] | DatasetRead, source: TeacherFeed | None) -> tuple[list[Sample], JoinReport]:
    """The samples to train on and the :class:`JoinReport` (raises if none is left)."""
    samples, skips = _samples_of(data)
    n_data, n_cache = len(samples) + len(skips), None
    _check_unique(samples)
    if source is not None:
        samples, missing, n_cache = source.join(samples)
        skips = skips + missing
    if not samples:
        first = f"; first: {skips[0].sample_id!r}: {skips[0].reason}" if skips else ""
        fix = ("point the trainer at the data the cache was extracted from" if n_cache is not None
               else "check the data sources")
        raise DataJoinError(f"no sample left to train on: {n_data} in the data, {len(skips)} skipped{first}. "
                            f"Fix: {fix}")
    return samples, JoinReport(n_data=n_data, n_joined=len(samples), n_cache=n_cache, skips=tuple(skips))


def make_loader(data: Sequence[Sample] | DatasetRead, student, *, cache=None,
                config: LoaderConfig | None = None, world_size: int = 1, rank: int = 0,
                state: SamplerState | None = None, expect_teacher=None,
                storage_options: dict | None = None, source: TeacherFeed | None = None) -> TrainLoader:
    """A :class:`TrainLoader` over ``data`` joined with the teacher ``cache``.

    data: the dataset samples (or a :class:`DatasetRead`, whose skipped rows are recorded too);
    student: the student :class:`~genrecal.model.loading.LoadedVLM` or ``(processor, family)``
    (only the processor travels to the workers); cache: the cache URL, None for stage finetune;
    world_size / rank: this process's place under DDP; state: resume here (default: epoch 0,
    position 0); expect_teacher: the teacher fingerprint the cache must have; source: another
    :class:`TeacherFeed` instead of ``cache`` (online mode: :mod:`genrecal.train.online`).
    """
    config = config or LoaderConfig()
    if cache is not None and source is not None:
        raise ValueError("make_loader: pass the teacher cache or another teacher source, not both")
    if cache is not None:
        source = CacheSource(cache, dtype=config.dtype, load_question=config.load_question,
                             expect_teacher=expect_teacher, verify=config.verify, storage_options=storage_options)
    samples, report = _join(data, source)
    side = StudentSide.of(student, config.max_length)
    dataset = JoinedDataset(samples, side, source, on_error=config.on_error, memo_bytes=config.memo_bytes)
    plan = BatchPlan(len(samples), config.batch_size, config.seed, world_size, rank)
    return TrainLoader(dataset, plan, Collator(side.pad_id, source is not None), report, config, state)
