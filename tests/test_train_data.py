"""Training batches (genrecal.train.data) against a cache written from a REAL tiny-teacher forward.

The cache is written directly with CacheWriter from ``teacher(**inputs, output_hidden_states=True)``
at the answer-window / question positions, so the joined TeacherTurns are checked against the
teacher's own hidden states, and the student side against an independent student encoding.
"""

from __future__ import annotations

import pytest
import torch

from genrecal.store import schema
from genrecal.data.problems import Skip
from genrecal.data.readers import DatasetRead
from genrecal.store.errors import PaddingError
from synthetic_cache import synthetic_fingerprint
from genrecal.model.encoding import encode_sample
from genrecal.model.loading import load_vlm
from genrecal.store.writer import CacheWriter
from genrecal.train.data import (
    Collator, LoaderConfig, StudentSide, TrainBatch, make_loader, pad_student, student_labels,
)
from genrecal.train.errors import ContentHashMismatchError, DataJoinError
from genrecal.train.sampler import SamplerState

DATA_FILE = "data/train.jsonl"


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return load_vlm(tiny_teacher_dir)


@pytest.fixture(scope="module")
def student(tiny_student_dir):
    return load_vlm(tiny_student_dir)


@pytest.fixture
def samples(make_sample):
    """Single-turn with image, multi-turn with an image in each user turn, text only, multi-turn."""
    def make(*turns, images=((40, 56),), sample_id):
        return make_sample(*turns, images=images, sample_id=sample_id, source=DATA_FILE)

    return [
        make(("user", (0, "What is shown?")), ("assistant", ("A red square.",)), sample_id="s-a"),
        make(("system", ("Be brief.",)), ("user", (0, "Colour?")), ("assistant", ("Blue.",)),
             ("user", ("And the shape?", 1)), ("assistant", ("A circle, I think.",)),
             images=((40, 56), (32, 32)), sample_id="s-b"),
        make(("user", ("Say hi.",)), ("assistant", ("Hi there!",)), images=(), sample_id="s-c"),
        make(("user", (0, "Count them.")), ("assistant", ("Three.",)), ("user", ("Sure?",)),
             ("assistant", ("Yes, three.",)), sample_id="s-d"),
    ]


def teacher_forward(teacher, sample):
    """(teacher encoding, post-norm last hidden state z [L, d] float32)."""
    encoded = encode_sample(teacher, sample)
    with torch.no_grad():
        out = teacher.model(**encoded.inputs, output_hidden_states=True)
    return encoded, teacher.family.final_hidden(teacher.model, out.hidden_states)[0].float()


def write_cache(url, teacher, samples, *, question=True, skipped=()):
    """A committed cache of ``samples`` (bf16 hidden states); returns {id: (encoding, z)}."""
    width = teacher.model.config.get_text_config().hidden_size
    features = [schema.answer_hidden(width)] + ([schema.question_hidden(width, select="all")] if question else [])
    truth = {}
    with CacheWriter(url, teacher=synthetic_fingerprint(), features=features) as writer:
        for sample in samples:
            encoded, z = teacher_forward(teacher, sample)
            truth[sample.id] = (encoded, z)
            spans = encoded.spans
            rows = {"answer_hidden": z[schema.answer_window_positions(spans)]}
            if question:
                rows["question_hidden"] = z[schema.question_positions(spans, "all")]
            writer.add(sample.id, content_hash=sample.content_hash, input_ids=encoded.input_ids,
                       spans=spans, **rows)
        for sample_id, reason in skipped:
            writer.skip(sample_id, reason, file=DATA_FILE)
    return truth


def bf16(x):
    return x.to(torch.bfloat16).float()


def config(**kwargs):
    return LoaderConfig(**{"batch_size": 2, "num_workers": 0, "seed": 3, **kwargs})


def epoch(loader):
    return list(loader)


def by_id(batches):
    """{sample id: (batch, row)} over a list of batches."""
    return {sid: (batch, b) for batch in batches for b, sid in enumerate(batch.ids)}


# ----------------------------------------------------------------------------- the joined batch


def expected_question(spans, k, z):
    """Teacher rows at every cached position < s_k, position order, each once (independent of data.py)."""
    cached = set(schema.question_positions(spans, "all"))
    for s, e in spans.answers[:k]:
        cached |= set(range(s - 1, e))
    return bf16(z[sorted(p for p in cached if p < spans.answers[k][0])])


def check_teacher(batch, b, encoded, z, n_turns):
    turns = batch.teacher[b]
    assert len(turns) == n_turns
    spans = encoded.spans
    for k, turn in enumerate(turns):
        s, e = spans.answers[k]
        assert turn.window.dtype == torch.float32
        assert torch.equal(turn.window, bf16(z[s - 1:e]))  # bf16 codec: exact after rounding
        assert turn.answer_ids.dtype == torch.long
        assert turn.answer_ids.tolist() == encoded.input_ids[s:e]
        assert torch.equal(turn.question, expected_question(spans, k, z))


def check_student(batch, b, encoded, pad_id, n_turns):
    ids = encoded.input_ids
    length = len(ids)
    targets = {p for s, e in encoded.spans.answers[:n_turns] for p in range(s, e)}
    labels = [ids[t + 1] if t + 1 in targets else -100 for t in range(length)]
    width = batch.student_labels.shape[1]
    assert batch.student_labels[b].tolist() == labels + [-100] * (width - length)
    assert batch.student_inputs["input_ids"][b].tolist() == ids + [pad_id] * (width - length)
    assert batch.student_inputs["attention_mask"][b].tolist() == [1] * length + [0] * (width - length)
    assert batch.student_answer_starts[b] == [s for s, _ in encoded.spans.answers[:n_turns]]


def test_joined_batches_match_teacher_forward_and_student_spans(tmp_path, teacher, student, samples):
    truth = write_cache(tmp_path / "cache", teacher, samples)
    loader = make_loader(samples, student, cache=tmp_path / "cache", config=config())
    batches = epoch(loader)
    assert sorted(by_id(batches)) == sorted(s.id for s in samples)
    pad_id = StudentSide.of(student).pad_id
    for sample in samples:
        batch, b = by_id(batches)[sample.id]
        encoded, z = truth[sample.id]
        n_turns = len(encoded.spans.answers)
        assert n_turns == (2 if sample.id in ("s-b", "s-d") else 1)
        check_teacher(batch, b, encoded, z, n_turns)
        check_student(batch, b, encode_sample(student, sample), pad_id, n_turns)
    assert loader.report.skips == () and loader.report.n_joined == 4 and loader.report.n_cache_only == 0


def test_collated_student_inputs_reproduce_single_sample_forwards(tmp_path, student, samples):
    loader = make_loader(samples, student, config=config(batch_size=4))
    (batch,) = epoch(loader)
    assert batch.teacher is None
    singles = [encode_sample(student, s).inputs for s in (next(x for x in samples if x.id == i) for i in batch.ids)]
    expected_pixels = torch.cat([x["pixel_values"] for x in singles if "pixel_values" in x])
    assert torch.equal(batch.student_inputs["pixel_values"], expected_pixels)
    with torch.no_grad():
        together = student.model(**batch.student_inputs).logits
        for b, single in enumerate(singles):
            alone = student.model(**single).logits[0]
            torch.testing.assert_close(together[b, :alone.shape[0]], alone, atol=1e-5, rtol=1e-4)


def test_student_max_length_limits_the_turns_of_both_sides(tmp_path, teacher, student, samples):
    multi = samples[3]
    truth = write_cache(tmp_path / "cache", teacher, [multi])
    full = encode_sample(student, multi)
    limit = full.spans.answers[0][1] + 2
    assert limit < len(full.input_ids)
    (batch,) = epoch(make_loader([multi], student, cache=tmp_path / "cache", config=config(max_length=limit)))
    assert len(batch.teacher[0]) == 1 and len(batch.student_answer_starts[0]) == 1
    check_teacher(batch, 0, *truth[multi.id], n_turns=1)
    check_student(batch, 0, encode_sample(student, multi, max_length=limit), StudentSide.of(student).pad_id, 1)


def test_question_rows_are_none_without_question_hidden(tmp_path, teacher, student, samples):
    write_cache(tmp_path / "noq", teacher, samples[:2], question=False)
    write_cache(tmp_path / "q", teacher, samples[:2])
    for url, cfg in ((tmp_path / "noq", config()), (tmp_path / "q", config(load_question=False))):
        (batch,) = epoch(make_loader(samples[:2], student, cache=url, config=cfg))
        assert all(t.question is None for turns in batch.teacher for t in turns)


def test_teacher_dtype_is_configurable(tmp_path, teacher, student, samples):
    write_cache(tmp_path / "cache", teacher, samples[:1])
    (batch,) = epoch(make_loader(samples[:1], student, cache=tmp_path / "cache",
                                 config=config(teacher_dtype="bfloat16")))
    assert batch.teacher[0][0].window.dtype == torch.bfloat16
    assert batch.teacher[0][0].question.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- join errors and skips


def test_content_hash_mismatch_names_everything(tmp_path, teacher, student, samples, make_sample):
    write_cache(tmp_path / "cache", teacher, samples[:1])
    changed = make_sample(("user", (0, "What is shown?")), ("assistant", ("A green square.",)),
                          sample_id="s-a", source=DATA_FILE)
    loader = make_loader([changed], student, cache=tmp_path / "cache", config=config())
    with pytest.raises(ContentHashMismatchError) as info:
        epoch(loader)
    message = str(info.value)
    for part in ("'s-a'", samples[0].content_hash, changed.content_hash, str(tmp_path / "cache"), DATA_FILE,
                 "re-extract"):
        assert part in message
    assert info.value.sample_id == "s-a"


def test_samples_missing_from_the_cache_are_skipped_and_recorded(tmp_path, teacher, student, samples):
    write_cache(tmp_path / "cache", teacher, samples[:2], skipped=[("s-d", "answer longer than max_length")])
    data = DatasetRead(samples=samples, skips=[Skip("s-x", DATA_FILE, "row 7: no answer")], source=DATA_FILE)
    loader = make_loader(data, student, cache=tmp_path / "cache", config=config())
    report = loader.report
    assert (report.n_data, report.n_joined, report.n_cache) == (5, 2, 2)
    reasons = {s.sample_id: s.reason for s in loader.skips}
    assert sorted(reasons) == ["s-c", "s-d", "s-x"]
    assert "never extracted" in reasons["s-c"]
    assert "skipped at extraction: answer longer than max_length" in reasons["s-d"]
    assert reasons["s-x"] == "dataset reader: row 7: no answer"
    assert all(s.file == DATA_FILE for s in loader.skips)
    assert sorted(by_id(epoch(loader))) == ["s-a", "s-b"]
    assert "2 of 5 dataset samples joined" in report.summary()


def test_nothing_joined_is_an_error(tmp_path, teacher, student, samples):
    write_cache(tmp_path / "cache", teacher, samples[:1])
    with pytest.raises(DataJoinError, match="no sample left to train on.*'s-b'"):
        make_loader(samples[1:2], student, cache=tmp_path / "cache", config=config())


def test_duplicate_ids_are_an_error(student, samples):
    with pytest.raises(DataJoinError, match="'s-a' occurs twice"):
        make_loader([samples[0], samples[0]], student, config=config())


def test_cache_without_answer_hidden_is_refused(tmp_path, teacher, student, samples):
    width = teacher.model.config.get_text_config().hidden_size
    with CacheWriter(tmp_path / "cache", teacher=synthetic_fingerprint(),
                     features=[schema.question_hidden(width)]) as writer:
        encoded, z = teacher_forward(teacher, samples[0])
        spans = encoded.spans
        writer.add("s-a", content_hash=samples[0].content_hash, input_ids=encoded.input_ids, spans=spans,
                   question_hidden=z[schema.question_positions(spans, "all")])
    with pytest.raises(DataJoinError, match="no answer_hidden.*Re-extract"):
        make_loader(samples[:1], student, cache=tmp_path / "cache", config=config())


def test_student_encoding_failures_raise_or_are_skipped(student, samples):
    too_short = 8  # the first answer of every sample ends later than this
    with pytest.raises(DataJoinError, match="cannot be encoded for the student.*on_error='skip'"):
        epoch(make_loader(samples[:2], student, config=config(max_length=too_short)))
    loader = make_loader(samples[:2], student, config=config(max_length=too_short, on_error="skip"))
    (batch,) = epoch(loader)
    assert len(batch) == 0 and batch.student_inputs == {} and batch.teacher is None
    assert sorted(s.sample_id for s in batch.skipped) == ["s-a", "s-b"]
    assert sorted(s.sample_id for s in loader.skips) == ["s-a", "s-b"]
    assert all(s.reason.startswith("student side:") for s in loader.skips)


# ----------------------------------------------------------------------------- order, resume, workers


def flatten(batches):
    return [sid for batch in batches for sid in batch.ids]


def assert_same_batches(a: list[TrainBatch], b: list[TrainBatch]):
    assert [x.ids for x in a] == [y.ids for y in b]
    for x, y in zip(a, b):
        assert x.student_inputs.keys() == y.student_inputs.keys()
        assert all(torch.equal(x.student_inputs[k], y.student_inputs[k]) for k in x.student_inputs)
        assert torch.equal(x.student_labels, y.student_labels)
        assert x.student_answer_starts == y.student_answer_starts
        for tx, ty in zip(x.teacher, y.teacher):
            for u, v in zip(tx, ty):
                assert torch.equal(u.window, v.window) and torch.equal(u.answer_ids, v.answer_ids)
                assert torch.equal(u.question, v.question)


def test_epochs_resume_and_ranks(tmp_path, teacher, student, samples):
    write_cache(tmp_path / "cache", teacher, samples)
    loader = make_loader(samples, student, cache=tmp_path / "cache", config=config(batch_size=1))
    first, second = flatten(epoch(loader)), flatten(epoch(loader))
    assert sorted(first) == sorted(second) == sorted(s.id for s in samples) and first != second
    assert loader.state == SamplerState(epoch=2, position=0, seed=3)
    assert loader.wait.batches == 8 and loader.wait.total_s >= 0

    interrupted = make_loader(samples, student, cache=tmp_path / "cache", config=config(batch_size=1))
    iterator = iter(interrupted)
    done = [next(iterator).ids[0], next(iterator).ids[0]]
    saved = interrupted.state.to_dict()
    assert saved["position"] == 2 and done == first[:2]
    resumed = make_loader(samples, student, cache=tmp_path / "cache", config=config(batch_size=1),
                          state=SamplerState.from_dict(saved))
    assert len(resumed) == 2
    assert flatten(epoch(resumed)) == first[2:]

    per_rank = [flatten(epoch(make_loader(samples, student, cache=tmp_path / "cache", config=config(),
                                          world_size=3, rank=r))) for r in range(3)]
    assert sorted(sum(per_rank, [])) == sorted(s.id for s in samples)


def test_worker_processes_give_the_same_batches(tmp_path, teacher, student, samples, monkeypatch):
    write_cache(tmp_path / "cache", teacher, samples)
    in_process = epoch(make_loader(samples, student, cache=tmp_path / "cache", config=config()))
    workers = make_loader(samples, student, cache=tmp_path / "cache", config=config(num_workers=2))
    try:
        from_workers = epoch(workers)
        assert_same_batches(from_workers, in_process)
        for batch in from_workers:  # handed over packed: one buffer per dtype (small: inline, not shared)
            tensors = [*batch.student_inputs.values(), batch.student_labels]
            tensors += [x for turns in batch.teacher for t in turns
                        for x in (t.window, t.answer_ids, t.question, t.question_positions) if x is not None]
            assert len({x.untyped_storage().data_ptr() for x in tensors}) == len({x.dtype for x in tensors})
            assert not any(x.is_shared() for x in tensors)
        monkeypatch.setattr("genrecal.train.data.INLINE_BYTES", 0)  # every batch through shared memory
        shared = make_loader(samples, student, cache=tmp_path / "cache", config=config(num_workers=1,
                                                                                       persistent_workers=False))
        batches = epoch(shared)
        assert_same_batches(batches, in_process)
        for batch in batches:
            assert batch.student_labels.is_shared() and batch.teacher[0][0].window.is_shared()
        assert workers.state.epoch == 1
        again = epoch(workers)  # persistent workers, next epoch's order
        assert sorted(flatten(again)) == sorted(flatten(in_process))
    finally:
        workers.close()


def test_memoised_examples_give_the_same_batches_and_are_read_once(tmp_path, teacher, student, samples):
    """memo_bytes: later epochs come from memory (no encoding, no cache read) and equal a loader
    without the memo batch for batch (the same code builds them: exact); a budget smaller than
    one example keeps nothing."""
    write_cache(tmp_path / "cache", teacher, samples)
    plain = make_loader(samples, student, cache=tmp_path / "cache", config=config())
    memo = make_loader(samples, student, cache=tmp_path / "cache", config=config(memo_bytes=1 << 30))
    calls = []
    load = memo.dataset._load
    memo.dataset._load = lambda i: calls.append(i) or load(i)
    for _ in range(3):  # three epochs, each in its own order
        assert_same_batches(epoch(memo), epoch(plain))
    assert sorted(calls) == list(range(len(samples)))  # each sample loaded once
    tiny = make_loader(samples, student, cache=tmp_path / "cache", config=config(memo_bytes=1))
    epoch(tiny)
    assert tiny.dataset._memo == {}
    with pytest.raises(ValueError, match="memo_bytes"):
        config(memo_bytes=-1)


def test_worker_errors_reach_the_training_process(tmp_path, teacher, student, samples, make_sample):
    write_cache(tmp_path / "cache", teacher, samples[:1])
    changed = make_sample(("user", (0, "What?")), ("assistant", ("Else.",)), sample_id="s-a", source=DATA_FILE)
    loader = make_loader([changed], student, cache=tmp_path / "cache", config=config(num_workers=1))
    with pytest.raises(ContentHashMismatchError, match="'s-a'"):
        epoch(loader)


# ----------------------------------------------------------------------------- small pieces


def test_student_labels_are_shifted_answer_tokens():
    ids = torch.arange(10, 20)
    labels = student_labels(ids, [(3, 5), (7, 9)], n_turns=2)
    assert labels.tolist() == [-100, -100, 13, 14, -100, -100, 17, 18, -100, -100]
    assert student_labels(ids, [(3, 5), (7, 9)], n_turns=1).tolist()[6:8] == [-100, -100]


def test_pad_student_pads_tokens_and_concatenates_the_rest():
    a = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
         "pixel_values": torch.zeros(4, 6), "image_grid_thw": torch.tensor([[1, 2, 2]])}
    b = {"input_ids": torch.tensor([[4]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    inputs, labels = pad_student([a, b], [torch.tensor([2, 3, -100]), torch.tensor([-100])], pad_id=0)
    assert inputs["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert labels.tolist() == [[2, 3, -100], [-100, -100, -100]]
    assert inputs["pixel_values"].shape == (4, 6) and inputs["image_grid_thw"].tolist() == [[1, 2, 2]]
    with pytest.raises(PaddingError, match="per-token keys"):
        pad_student([a, {**b, "mm_token_type_ids": torch.zeros(1, 1, dtype=torch.long)}],
                    [torch.tensor([0, 0, 0]), torch.tensor([0])], 0)


def test_collator_and_batch_move(student, samples):
    loader = make_loader(samples[:2], student, config=config())
    (batch,) = epoch(loader)
    moved = batch.to("cpu")
    assert moved.ids == batch.ids and torch.equal(moved.student_labels, batch.student_labels)
    assert Collator(pad_id=0, with_teacher=True)([Skip("x", "f", "r")]).teacher == []


def test_loader_config_round_trip_and_validation():
    cfg = LoaderConfig(batch_size=4, max_length=512, teacher_dtype="bfloat16", on_error="skip")
    assert LoaderConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="batch_size=0"):
        LoaderConfig(batch_size=0)
    with pytest.raises(ValueError, match="teacher_dtype='int8'"):
        LoaderConfig(teacher_dtype="int8")
    with pytest.raises(ValueError, match="unknown keys"):
        LoaderConfig.from_dict({"batch": 2})


def test_next_epoch_started_early_gives_the_same_batches_and_resumes(tmp_path, teacher, student, samples):
    """Persistent workers get the next epoch's first batches when an epoch's last one is handed
    out; the epochs are still exactly the in-process ones, and a load_state in between drops the
    early start (the resumed position is served instead)."""
    write_cache(tmp_path / "cache", teacher, samples)
    in_process = make_loader(samples, student, cache=tmp_path / "cache", config=config())
    want = [epoch(in_process) for _ in range(3)]
    workers = make_loader(samples, student, cache=tmp_path / "cache", config=config(num_workers=1))
    try:
        first = epoch(workers)
        assert workers._ahead is not None  # epoch 1 is under way in the worker
        assert_same_batches(first, want[0])
        assert_same_batches(epoch(workers), want[1])
        mid = SamplerState(epoch=1, position=2, seed=3, world_size=1, rank=0)
        workers.load_state(mid)  # drops the early start of epoch 2
        assert workers._ahead is None
        assert_same_batches(epoch(workers), want[1][1:])
        assert_same_batches(epoch(workers), want[2])
    finally:
        workers.close()


def test_inline_handover_round_trips_every_kind_of_teacher_record():
    """A worker's small batch pickles as its structure plus one byte buffer per dtype and comes
    back equal: TeacherTurns (views, None questions) and GRACE targets (logit statistics,
    Grams, bf16 rows, an empty tensor), student inputs included."""
    import pickle

    from genrecal.store.logit_stats import STAT_FIELDS, LogitStats
    from genrecal.train.data import GraceTarget, TeacherTurn, _Inline

    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(9, 6, generator=gen)
    turns = [[TeacherTurn(window=rows[1:4], answer_ids=torch.arange(3), question=rows[:1], answer_start=2,
                          question_positions=torch.tensor([0])),
              TeacherTurn(window=rows[4:9].t(), answer_ids=torch.arange(2), question=None)]]
    stats = LogitStats(topk_ids=torch.randint(0, 50, (3, 4), generator=gen),
                       topk_logprobs=torch.randn(3, 4, generator=gen),
                       **{f: torch.randn(3, generator=gen) for f in STAT_FIELDS})
    grace = [GraceTarget(input_ids=torch.arange(7), answer_ids=torch.arange(3), stats=stats,
                         hidden=torch.randn(3, 6, generator=gen).to(torch.bfloat16),
                         grams=[torch.randn(2, 2, generator=gen), torch.zeros(0, 0)], image_spans=((1, 3),))]
    for teacher in (turns, grace):
        batch = TrainBatch(ids=["a"], student_inputs={"input_ids": torch.arange(5)[None], "pixel_values":
                                                      torch.randn(2, 3, generator=gen)},
                           student_labels=torch.full((1, 5), -100), student_answer_starts=[[2]], teacher=teacher)
        back = pickle.loads(pickle.dumps(_Inline(batch)))
        assert isinstance(back, TrainBatch) and back.ids == ["a"]
        assert all(torch.equal(back.student_inputs[k], v) for k, v in batch.student_inputs.items())
        assert torch.equal(back.student_labels, batch.student_labels)
        for mine, theirs in zip(back.teacher, batch.teacher):
            as_list = (lambda x: x if isinstance(x, list) else [x])  # noqa: E731
            for a, b in zip(as_list(mine), as_list(theirs)):
                got, want = [], []
                a._apply(lambda x: got.append(x) or x)
                b._apply(lambda x: want.append(x) or x)
                assert len(got) == len(want)
                assert all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(got, want))
