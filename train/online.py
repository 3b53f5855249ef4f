"""Online mode: the teacher runs live in the training process, no cache (docs/method.md §1).

For users whose GPUs hold the teacher next to the student, and to prove that cache-fed
training is what online training would be. Per batch:

* the loader's workers encode each sample with the TEACHER's chat template and processor
  (:class:`OnlineSource`, a :class:`~genrecal.train.data.TeacherFeed`), next to the student
  encoding: ``TrainBatch.teacher_requests``; the turn count is ``min(student turns, teacher
  turns)`` as with a cache;
* :class:`OnlineTeacher` runs the extraction's own forward and row selection
  (:mod:`genrecal.model.teacher_forward`) once per micro-batch: right padding, the
  post-norm last hidden state ``z`` at exactly the positions the extraction caches
  (:func:`~genrecal.store.schema.answer_window_positions`, and
  :func:`~genrecal.store.schema.question_positions` with the configured select). The rows form
  the :class:`~genrecal.store.reader.CachedSample` a cache would return, which
  :func:`~genrecal.train.data.teacher_turns` turns into the batch's ``TeacherTurn`` s: the same
  code as the cache-fed path, so windows, answer ids and question rows follow the same rules;
* the teacher head ``head_l`` (and, for ``answer_input="embedding"``, the embedding rows) come
  from the live teacher's modules instead of the cache artifacts.

``OnlineSettings.round_to`` rounds the rows through a cache codec (``bf16``, ``fp8_e4m3``,
``int8``; :mod:`genrecal.store.codecs`) exactly as writing and reading a cache with that codec
would: with it, online training equals cache-fed training step for step
(tests/test_train_online.py). :class:`OnlineLoader` wraps a :class:`~genrecal.train.data.TrainLoader`
(same sampler, same resume state) and fills every batch's teacher side in before handing it out.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import torch

from genrecal.store.artifacts import TeacherEmbeddings, TeacherHead
from genrecal.store.codecs import decode_values, encode_values
from genrecal.data.problems import Skip
from genrecal.data.sample import Sample
from genrecal.store.reader import CachedSample
from genrecal.store.schema import FEATURE_CODECS, question_positions
from genrecal.model.encoding import encode_sample
from genrecal.model.families import Family
from genrecal.model.teacher_forward import hidden_rows, teacher_forward
from genrecal.train.data import (DataWait, LoaderConfig, TeacherRequest, TeacherTurn, TrainBatch,
                                 TrainLoader, make_loader, pad_token_id, teacher_turns)
from genrecal.train.step import TeacherSide

if TYPE_CHECKING:
    from genrecal.model.loading import LoadedVLM
    from genrecal.train.sampler import SamplerState

__all__ = ["ROUNDING_CODECS", "OnlineLoader", "OnlineSettings", "OnlineSource", "OnlineTeacher",
           "load_online_teacher", "make_online_loader"]

ROUNDING_CODECS = FEATURE_CODECS["answer_hidden"]
"""Cache codecs of the hidden features whose rounding :attr:`OnlineSettings.round_to` reproduces."""
QUESTION_SELECTS = ("all", "text")


@dataclass(frozen=True)
class OnlineSettings:
    """How the live teacher produces features.

    max_length: teacher sequence limit (trailing turns dropped to fit; the pipeline's
    ``cache.max_length``); question: which question rows feed L_reg, ``"all"`` (image tokens
    included) or ``"text"``, None for none (``cache.features.question_hidden``); round_to: a
    cache codec (:data:`ROUNDING_CODECS`) whose rounding the rows get, None for none;
    micro_batch: samples per teacher forward (None: the whole batch in one forward).
    """

    max_length: int | None = None
    question: str | None = "all"
    round_to: str | None = None
    micro_batch: int | None = None

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise ValueError("OnlineSettings: " + "; ".join(problems))

    def problems(self) -> list[str]:
        out = []
        for name, low in (("max_length", 2), ("micro_batch", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                out.append(f"{name}={value!r} must be None or an integer >= {low}")
        if self.question is not None and self.question not in QUESTION_SELECTS:
            out.append(f"question={self.question!r} must be None or one of {list(QUESTION_SELECTS)}")
        if self.round_to is not None and self.round_to not in ROUNDING_CODECS:
            out.append(f"round_to={self.round_to!r} must be None or one of {list(ROUNDING_CODECS)}")
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> OnlineSettings:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"OnlineSettings.from_dict: unknown keys {sorted(unknown)}")
        return cls(**data)


# ============================================================================ workers


class OnlineSource:
    """The teacher side of the loader's workers: the teacher's processor, never its model.

    A :class:`~genrecal.train.data.TeacherFeed`: every sample is served (nothing to join);
    ``record`` encodes a sample with the teacher's chat template and processor (raising
    :class:`~genrecal.store.errors.SpanError` when it cannot, e.g. past ``max_length``).
    """

    def __init__(self, processor, family: Family, max_length: int | None = None):
        self.processor, self.family, self.max_length = processor, family, max_length

    def join(self, samples: Sequence[Sample]) -> tuple[list[Sample], list[Skip], None]:
        return list(samples), [], None

    def record(self, sample: Sample) -> TeacherRequest:
        encoded = encode_sample((self.processor, self.family), sample, max_length=self.max_length)
        return TeacherRequest(sample.id, sample.content_hash, encoded, n_turns=len(encoded.spans.answers))

    def turns(self, request: TeacherRequest, n_turns: int) -> TeacherRequest:
        return dataclasses.replace(request, n_turns=n_turns)


# ============================================================================ the live teacher


class OnlineTeacher:
    """A loaded teacher producing the features a cache would hold, live.

    teacher: a :class:`~genrecal.model.loading.LoadedVLM` (eval mode; any device or
    device map: its inputs go to the device of its first parameter).
    """

    def __init__(self, teacher: LoadedVLM, settings: OnlineSettings | None = None):
        self.vlm, self.settings = teacher, settings or OnlineSettings()
        first = next(teacher.model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.pad_id = pad_token_id(teacher.tokenizer)

    @property
    def family(self) -> Family:
        return self.vlm.family

    def source(self) -> OnlineSource:
        return OnlineSource(self.vlm.processor, self.family, self.settings.max_length)

    # -- teacher parts ----------------------------------------------------------------------

    def head(self) -> TeacherHead:
        """``head_l``: the live lm_head's weight [V, d] / bias [V] (not copied) + LogitTransform."""
        lm_head = self.family.lm_head(self.vlm.model)
        bias = None if lm_head.bias is None else lm_head.bias.detach()
        return TeacherHead(weight=lm_head.weight.detach(), bias=bias,
                           transform=self.family.logit_transform(self.vlm.model))

    def embeddings(self) -> TeacherEmbeddings:
        """Every row of the teacher's input embedding (ids 0..V-1 on the CPU, rows not copied)."""
        rows = self.vlm.model.get_input_embeddings().weight.detach()
        return TeacherEmbeddings(ids=torch.arange(rows.shape[0]), rows=rows)

    def teacher_side(self, answer_input: str = "hidden", device: torch.device | str = "cpu") -> TeacherSide:
        """The :class:`~genrecal.train.step.TeacherSide` of a GenRecal stage, from the live teacher."""
        embeddings = self.embeddings() if answer_input == "embedding" else None
        return TeacherSide.from_artifacts(self.head(), embeddings, device)

    # -- features -----------------------------------------------------------------------------

    def fill(self, batch: TrainBatch, *, dtype: torch.dtype = torch.float32, question: bool = True) -> TrainBatch:
        """``batch`` with ``teacher`` filled in from its ``teacher_requests`` (see :meth:`turns`)."""
        if batch.teacher_requests is None:
            return batch
        turns = self.turns(batch.teacher_requests, dtype=dtype, question=question)
        return dataclasses.replace(batch, teacher=turns, teacher_requests=None)

    def turns(self, requests: Sequence[TeacherRequest], *, dtype: torch.dtype = torch.float32,
              question: bool = True) -> list[list[TeacherTurn]]:
        """Per request, its first ``n_turns`` TeacherTurns, as :func:`teacher_turns` builds them
        from a cache record (``question``: False leaves ``TeacherTurn.question`` None)."""
        records = self.records(requests, dtype=dtype, question=question)
        return [teacher_turns(record, r.n_turns) for record, r in zip(records, requests)]

    def records(self, requests: Sequence[TeacherRequest], *, dtype: torch.dtype = torch.float32,
                question: bool = True) -> list[CachedSample]:
        """The :class:`CachedSample` a cache extracted with these settings would return.

        Runs :func:`~genrecal.model.teacher_forward.teacher_forward` and
        :func:`~genrecal.model.teacher_forward.hidden_rows` over micro-batches of
        ``settings.micro_batch`` requests: the extraction's own forward and row selection.
        """
        step = self.settings.micro_batch or max(len(requests), 1)
        select = self.settings.question if question else None
        out = []
        for first in range(0, len(requests), step):
            chunk = requests[first:first + step]
            states = teacher_forward(self.vlm.model, self.family, [r.encoded.inputs for r in chunk],
                                     self.pad_id, penultimate=False)
            for i, request in enumerate(chunk):
                answer, rows = hidden_rows(states.final[i], request.encoded.spans, states.offsets[i],
                                           question=select)
                out.append(self._record(request, answer, rows, dtype))
        return out

    def _record(self, request: TeacherRequest, answer: torch.Tensor, question: torch.Tensor | None,
                dtype: torch.dtype) -> CachedSample:
        """One sample's rows [n, d] -> its cache-equivalent record."""
        spans = request.encoded.spans
        positions = None if question is None else question_positions(spans, self.settings.question)
        return CachedSample(
            sample_id=request.sample_id, content_hash=request.content_hash,
            status="truncated" if request.encoded.dropped_turns else "ok",
            input_ids=torch.tensor(request.encoded.input_ids, dtype=torch.long), spans=spans,
            answer_hidden=self._round(answer, dtype),
            question_hidden=None if question is None else self._round(question, dtype),
            question_positions=None if positions is None else torch.tensor(positions, dtype=torch.long))

    def _round(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """rows [n, d] -> ``dtype``, rounded through the ``round_to`` codec as the cache writer and
        reader would (on the CPU then)."""
        codec = self.settings.round_to
        if codec is None:
            return rows.to(dtype)
        return decode_values(encode_values(rows.cpu(), codec), codec, dtype)


# ============================================================================ loader


class OnlineLoader:
    """A :class:`TrainLoader` whose batches get their teacher side from a live teacher.

    Same sampler, state, resume and ``steps_per_epoch`` as the wrapped loader. ``wait``: time
    spent waiting for the workers (student and teacher encodings); ``teacher_wait``: time spent
    in the teacher forward (both are part of the loop's data wait).
    """

    def __init__(self, loader: TrainLoader, teacher: OnlineTeacher):
        self.loader, self.teacher = loader, teacher
        self.teacher_wait = DataWait()

    @property
    def state(self) -> SamplerState:
        return self.loader.state

    def load_state(self, state: SamplerState) -> None:
        self.loader.load_state(state)

    @property
    def steps_per_epoch(self) -> int:
        return self.loader.steps_per_epoch

    @property
    def plan(self):
        return self.loader.plan

    @property
    def report(self):
        return self.loader.report

    @property
    def wait(self) -> DataWait:
        return self.loader.wait

    @property
    def skips(self) -> list[Skip]:
        return self.loader.skips

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[TrainBatch]:
        config = self.loader.config
        for batch in self.loader:
            started = time.perf_counter()
            batch = self.teacher.fill(batch, dtype=config.dtype, question=config.load_question)
            self.teacher_wait.add(time.perf_counter() - started)
            yield batch

    def close(self) -> None:
        self.loader.close()


def make_online_loader(data, student, teacher: OnlineTeacher, *, config: LoaderConfig | None = None,
                       world_size: int = 1, rank: int = 0, state: SamplerState | None = None) -> OnlineLoader:
    """An :class:`OnlineLoader` over ``data`` (samples or a DatasetRead) with ``teacher`` live.

    Arguments as :func:`~genrecal.train.data.make_loader`; ``config.teacher_dtype`` is the dtype of
    the teacher tensors and ``config.load_question`` False leaves out the question rows.
    """
    loader = make_loader(data, student, source=teacher.source(), config=config, world_size=world_size,
                         rank=rank, state=state)
    return OnlineLoader(loader, teacher)


def load_online_teacher(pipeline, device: torch.device | str, *, question: bool,
                        round_to: str | None = None) -> OnlineTeacher:
    """The teacher of ``pipeline`` (a :class:`~genrecal.common.config.Pipeline`), loaded for online mode.

    It runs in its configured dtype on ``device`` (the training device) unless the pipeline
    gives it a ``device_map``; the features follow the pipeline's cache settings (``max_length``,
    ``features.question_hidden`` when ``question``, i.e. when L_reg is on, and ``batch_size``
    samples per teacher forward, as extraction runs it) and ``round_to``.
    """
    from genrecal.model.loading import load_vlm

    spec, features = pipeline.teacher, pipeline.cache.features
    vlm = load_vlm(pipeline.model_location("teacher"), family=spec.family, dtype=spec.dtype,
                   device=str(device), device_map=spec.device_map, trust_remote_code=spec.trust_remote_code,
                   revision=spec.revision)
    select = features.question_hidden if question and features.question_hidden != "none" else None
    settings = OnlineSettings(max_length=pipeline.cache.max_length, question=select, round_to=round_to,
                              micro_batch=pipeline.cache.batch_size)
    return OnlineTeacher(vlm, settings)
