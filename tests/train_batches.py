"""Hand-built TrainBatches for the trainer tests (test_train_step / _loop / checkpoint).

Student side: real samples (one image, 1-2 turns) encoded by the tiny LLaVA student's own
processor, right-padded and labelled as the trainer contract says. Teacher side: seeded random
windows / questions of width ``D_TEACHER`` and answer ids in a ``V_TEACHER``-token vocabulary,
read by a seeded random teacher head. Everything is deterministic in the seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from genrecal.store.artifacts import TeacherHead
from genrecal.data.sample import Sample, Turn, content_hash
from genrecal.model.loading import encode_sample
from genrecal.store.logit_transform import LogitTransform
from genrecal.train.data import TeacherTurn, TrainBatch, pad_student, student_labels

D_TEACHER = 24
V_TEACHER = 40

_WORDS = ["red", "blue", "cat", "dog", "two", "three", "left", "right", "big", "small"]


def teacher_head(seed: int = 0, bias: bool = True) -> TeacherHead:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(V_TEACHER, D_TEACHER, generator=gen) * 0.3
    b = torch.randn(V_TEACHER, generator=gen) * 0.1 if bias else None
    return TeacherHead(weight=weight, bias=b, transform=LogitTransform(has_bias=bias))


def make_samples(n: int, image_dir: Path, seed: int = 0) -> list[Sample]:
    """n samples: an image, a question, 1 or 2 assistant turns of a few words."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    image_dir.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        path = image_dir / f"img-{seed}-{i}.png"
        # temp file + rename: processes that build the same samples at once (the DDP test's
        # ranks) never read a half-written image; every writer writes the same bytes
        tmp = image_dir / f".img-{seed}-{i}.{os.getpid()}.png"
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp)
        os.replace(tmp, path)
        words = lambda k: " ".join(rng.choice(_WORDS, size=k))  # noqa: E731
        turns = [Turn("user", (0, f"What is {words(2)}?")), Turn("assistant", (words(3),))]
        if i % 2:
            turns += [Turn("user", (f"And {words(1)}?",)), Turn("assistant", (words(2),))]
        digest = content_hash(tuple(turns), [path.read_bytes()])
        samples.append(Sample(id=f"s{i}", turns=tuple(turns), images=(path,), content_hash=digest))
    return samples


@dataclass(frozen=True)
class EncodedSample:
    sample_id: str
    inputs: dict
    input_ids: list[int]
    answers: tuple[tuple[int, int], ...]


def encode(student, samples: list[Sample]) -> list[EncodedSample]:
    out = []
    for s in samples:
        enc = encode_sample(student, s)
        out.append(EncodedSample(s.id, enc.inputs, enc.input_ids, enc.spans.answers))
    return out


def teacher_turns(sample_index: int, n_turns: int, seed: int = 0,
                  with_question: bool = True) -> list[TeacherTurn]:
    """Seeded random teacher turns of sample ``sample_index`` (same index -> same tensors)."""
    gen = torch.Generator().manual_seed(10_000 * seed + sample_index)
    turns, n_q = [], int(torch.randint(3, 8, (1,), generator=gen))
    for _ in range(n_turns):
        n_a = int(torch.randint(2, 6, (1,), generator=gen))
        window = torch.randn(n_a + 1, D_TEACHER, generator=gen)
        ids = torch.randint(0, V_TEACHER, (n_a,), generator=gen)
        question = torch.randn(n_q, D_TEACHER, generator=gen) if with_question else None
        turns.append(TeacherTurn(window=window, answer_ids=ids, question=question))
        n_q += n_a + 2
    return turns


def collate(encoded: list[EncodedSample], indices: list[int], pad_id: int, *,
            teacher: bool = True, seed: int = 0, with_question: bool = True) -> TrainBatch:
    """Right-padded TrainBatch of ``encoded[i] for i in indices`` (train.data's padding)."""
    chosen = [encoded[i] for i in indices]
    labels = [student_labels(e.inputs["input_ids"][0], e.answers, len(e.answers)) for e in chosen]
    inputs, padded = pad_student([e.inputs for e in chosen], labels, pad_id)
    turns = [teacher_turns(i, len(encoded[i].answers), seed, with_question) for i in indices] \
        if teacher else None
    return TrainBatch(ids=[e.sample_id for e in chosen], student_inputs=inputs,
                      student_labels=padded, student_answer_starts=[[s for s, _ in e.answers]
                                                                    for e in chosen],
                      teacher=turns)


class ListLoader:
    """A BatchLoader (the TrainLoader protocol) over pre-encoded samples, ordered by the real
    BatchPlan (seeded permutation, rank slices) and resumable from its SamplerState."""

    def __init__(self, encoded: list[EncodedSample], pad_id: int, batch_size: int, *,
                 seed: int = 0, world_size: int = 1, rank: int = 0, teacher: bool = True,
                 with_question: bool = True):
        from genrecal.train.sampler import BatchPlan

        self.encoded, self.pad_id = encoded, pad_id
        self.teacher, self.with_question = teacher, with_question
        self.plan = BatchPlan(len(encoded), batch_size, seed, world_size, rank)
        self.state = self.plan.state()

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    def load_state(self, state) -> None:
        self.plan.remaining(state)
        self.state = state

    def __iter__(self):
        for indices in self.plan.remaining(self.state):
            self.state = self.state.advanced(len(indices))
            yield collate(self.encoded, indices, self.pad_id, teacher=self.teacher,
                          with_question=self.with_question)
        self.state = self.state.next_epoch()
