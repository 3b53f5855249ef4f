"""genrecal.extract.batching and genrecal.extract.background."""

from __future__ import annotations

import random
import threading
import time
import traceback

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from genrecal.extract.background import BackgroundWriter
from genrecal.extract.batching import padding_fraction, plan_batches
from genrecal.extract.errors import BatchingError, ExtractError, WriterError
from genrecal.store.errors import PaddingError
from genrecal.model.padding import pad_batch, pad_offsets


def _skewed_lengths(n=2000, seed=0):
    rng = random.Random(seed)
    return [max(1, int(rng.lognormvariate(5.0, 0.9))) for _ in range(n)]


def _flat(batches):
    return sorted(i for b in batches for i in b)


# ---------------------------------------------------------------------------- plan_batches


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), max_size=80), batch_size=st.integers(1, 9),
       max_tokens=st.one_of(st.none(), st.integers(300, 2000)),
       bucket_size=st.one_of(st.none(), st.integers(1, 40)),
       seed=st.one_of(st.none(), st.integers(0, 5)))
def test_plan_covers_every_index_once_within_limits(lengths, batch_size, max_tokens, bucket_size,
                                                    seed):
    batches = plan_batches(lengths, batch_size=batch_size, max_tokens=max_tokens,
                           bucket_size=bucket_size, seed=seed)
    assert _flat(batches) == list(range(len(lengths)))
    assert all(1 <= len(b) <= batch_size for b in batches)
    if max_tokens is not None:
        assert all(len(b) * max(lengths[i] for i in b) <= max_tokens for b in batches)
    if bucket_size is not None:  # a batch never mixes two windows
        assert all(len({i // bucket_size for i in b}) == 1 for b in batches)


def test_plan_is_deterministic_and_seed_only_reorders_batches():
    lengths = _skewed_lengths(500)
    plain = plan_batches(lengths, batch_size=8, bucket_size=100)
    assert plain == plan_batches(lengths, batch_size=8, bucket_size=100)
    seeded = plan_batches(lengths, batch_size=8, bucket_size=100, seed=1)
    assert seeded == plan_batches(lengths, batch_size=8, bucket_size=100, seed=1)
    assert seeded != plain and sorted(map(tuple, seeded)) == sorted(map(tuple, plain))
    assert seeded != plan_batches(lengths, batch_size=8, bucket_size=100, seed=2)


def test_unseeded_window_starts_with_its_longest_batch():
    lengths = _skewed_lengths(300)
    batches = plan_batches(lengths, batch_size=4, bucket_size=None)
    assert lengths[batches[0][0]] == max(lengths)
    firsts = [lengths[b[0]] for b in batches]
    assert firsts == sorted(firsts, reverse=True)


def test_bucketing_pads_less_than_input_order():
    lengths = _skewed_lengths()
    unbucketed = [list(range(i, min(i + 16, len(lengths)))) for i in range(0, len(lengths), 16)]
    bucketed = plan_batches(lengths, batch_size=16, bucket_size=512)
    global_sort = plan_batches(lengths, batch_size=16, bucket_size=None)
    base = padding_fraction(lengths, unbucketed)
    assert base > 0.4
    assert padding_fraction(lengths, bucketed) < base / 5
    assert padding_fraction(lengths, global_sort) <= padding_fraction(lengths, bucketed)


def test_max_tokens_caps_padded_tokens():
    lengths = _skewed_lengths(400)
    cap = max(lengths) * 2
    batches = plan_batches(lengths, batch_size=64, max_tokens=cap)
    assert all(len(b) * max(lengths[i] for i in b) <= cap for b in batches)
    assert any(len(b) > 2 for b in batches)  # short samples still share batches


def test_padding_fraction_value():
    assert padding_fraction([2, 4, 4], [[0, 1], [2]]) == pytest.approx(1 - 10 / 12)
    assert padding_fraction([3], []) == 0.0


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(lengths=[3, 0, 2], batch_size=2), r"bad at sample indices \[1\]"),
    (dict(lengths=[3, 2.5], batch_size=2), r"bad at sample indices \[1\]"),
    (dict(lengths=[3, True], batch_size=2), r"bad at sample indices \[1\]"),
    (dict(lengths=[3], batch_size=0), "batch_size=0"),
    (dict(lengths=[3], batch_size=2, bucket_size=0), "bucket_size=0"),
    (dict(lengths=[3], batch_size=2, max_tokens=-5), "max_tokens=-5"),
    (dict(lengths=[5, 50, 9], batch_size=2, max_tokens=10), r"samples \[1\] \(lengths \[50\]\)"),
])
def test_plan_bad_inputs(kwargs, pattern):
    with pytest.raises(BatchingError, match=pattern) as info:
        plan_batches(kwargs.pop("lengths"), **kwargs)
    assert isinstance(info.value, ExtractError)


def test_plan_empty():
    assert plan_batches([], batch_size=4) == []
    assert plan_batches([], batch_size=4, bucket_size=None) == []


# ---------------------------------------------------------------------------- pad_batch


def _sample(ids, **extra):
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids),
                                                                            dtype=torch.long),
            **extra}


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_batch_pads_ids_and_mask(side):
    samples = [_sample([5, 6, 7]), _sample([8]), _sample([1, 2])]
    out = pad_batch(samples, pad_id=0, side=side)
    assert out["input_ids"].shape == (3, 3) and out["input_ids"].dtype == torch.long
    offsets = pad_offsets([3, 1, 2], side)
    for row, sample, off in zip(range(3), samples, offsets):
        n = sample["input_ids"].shape[1]
        assert torch.equal(out["input_ids"][row, off:off + n], sample["input_ids"][0])
        assert int(out["attention_mask"][row].sum()) == n
        assert int(out["attention_mask"][row, off:off + n].sum()) == n
        pad = torch.cat([out["input_ids"][row, :off], out["input_ids"][row, off + n:]])
        assert bool((pad == 0).all())
    expected_first = [[5, 6, 7], [8, 0, 0], [1, 2, 0]] if side == "right" else \
        [[5, 6, 7], [0, 0, 8], [0, 1, 2]]
    assert out["input_ids"].tolist() == expected_first


def test_pad_batch_qwen2_vl_style_concatenation():
    """pixel_values [num_patches, C] and image_grid_thw [num_images, 3] concatenate in order."""
    a = _sample([1, 2, 3, 4], pixel_values=torch.full((4, 6), 1.0),
                image_grid_thw=torch.tensor([[1, 2, 2]]),
                mm_token_type_ids=torch.tensor([[0, 1, 1, 0]]))
    b = _sample([9], mm_token_type_ids=torch.tensor([[0]]))  # text-only sample
    c = _sample([7, 7], pixel_values=torch.full((8, 6), 3.0),
                image_grid_thw=torch.tensor([[1, 2, 2], [1, 2, 2]]),
                mm_token_type_ids=torch.tensor([[1, 1]]))
    out = pad_batch([a, b, c], pad_id=-1, side="left")
    assert out["pixel_values"].shape == (12, 6)
    assert out["pixel_values"][:4].eq(1).all() and out["pixel_values"][4:].eq(3).all()
    assert out["image_grid_thw"].tolist() == [[1, 2, 2]] * 3
    assert out["mm_token_type_ids"].tolist() == [[0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 1, 1]]
    assert out["input_ids"][1].tolist() == [-1, -1, -1, 9]


def test_pad_batch_llava_style_and_1d_ids_without_mask():
    samples = [{"input_ids": torch.tensor([4, 5]), "pixel_values": torch.zeros(1, 3, 8, 8)},
               {"input_ids": torch.tensor([6, 7, 8]), "pixel_values": torch.ones(1, 3, 8, 8)}]
    out = pad_batch(samples, pad_id=0)
    assert out["pixel_values"].shape == (2, 3, 8, 8) and out["pixel_values"][1].eq(1).all()
    assert out["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_pad_batch_custom_pad_values():
    samples = [_sample([1, 2], labels=torch.tensor([[1, 2]])),
               _sample([3], labels=torch.tensor([[3]]))]
    out = pad_batch(samples, pad_id=0)
    assert out["labels"].tolist() == [[1, 2], [3, -100]]
    out = pad_batch(samples, pad_id=0, sequence_pad_values={"labels": -1})
    assert out["labels"].tolist() == [[1, 2], [3, -1]]
    assert out["attention_mask"].tolist() == [[1, 1], [1, 0]]


@pytest.mark.parametrize("samples,side,pattern", [
    ([], "right", "no samples"),
    ([_sample([1])], "middle", "padding side"),
    ([{"attention_mask": torch.ones(1, 2)}], "right", "sample 0 has no 'input_ids'"),
    ([_sample([1]), {"input_ids": torch.ones(2, 3, dtype=torch.long)}], "right",
     r"sample 1 key 'input_ids' must be \[1, L\]"),
    ([_sample([1, 2], attention_mask=torch.ones(1, 3))], "right",
     "key 'attention_mask' has length 3 but input_ids has 2"),
    ([_sample([1], mm_token_type_ids=torch.zeros(1, 1)), _sample([2])], "right",
     "sample 1 has per-token keys"),
    ([_sample([1], pixel_values=torch.zeros(2, 6)), _sample([2], pixel_values=torch.zeros(2, 5))],
     "right", "cannot concatenate 'pixel_values'"),
    ([_sample([1], image_sizes=[3, 4])], "right", "key 'image_sizes' must be a tensor"),
    ([_sample([1], scalar=torch.tensor(2.0))], "right", "key 'scalar' must be a tensor"),
])
def test_pad_batch_bad_inputs(samples, side, pattern):
    with pytest.raises(PaddingError, match=pattern):
        pad_batch(samples, pad_id=0, side=side)


# ---------------------------------------------------------------------------- background writer


def test_writer_keeps_order_and_drains_on_close():
    written = []

    def sink(item):
        time.sleep(0.001)
        written.append(item)

    with BackgroundWriter(sink, max_queue=3) as writer:
        for i in range(100):
            writer.submit(i)
    assert written == list(range(100))
    stats = writer.stats()
    assert stats.submitted == stats.written == 100


def test_writer_back_pressure_blocks_producer_and_is_counted():
    """The producer blocks exactly when the queue is full; counted, not timed (no wall-clock bound)."""
    started, release = threading.Event(), threading.Event()
    written = []

    def sink(item):
        started.set()
        release.wait(30)
        written.append(item)

    writer = BackgroundWriter(sink, max_queue=2)
    writer.submit(0)
    assert started.wait(30)  # the worker holds item 0; the queue is empty
    writer.submit(1)
    writer.submit(2)  # queue full now; neither submit blocked
    assert writer.stats().waited == 0 and writer.stats().submitted == 3
    producer = threading.Thread(target=writer.submit, args=(3,))
    producer.start()  # blocks until the worker takes item 1
    for _ in range(3000):  # the producer counts the wait before it blocks
        if writer.stats().waited == 1:
            break
        time.sleep(0.01)
    assert writer.stats().waited == 1 and producer.is_alive() and writer.stats().submitted == 3
    release.set()
    producer.join(30)
    writer.close()
    assert not producer.is_alive() and written == [0, 1, 2, 3]
    stats = writer.stats()
    assert stats.submitted == stats.written == 4 and stats.waited == 1
    assert 0 < stats.wait_seconds <= stats.elapsed_seconds
    assert 0 < stats.busy_seconds <= stats.elapsed_seconds
    assert 0 < stats.wait_fraction <= 1 and 0 < stats.busy_fraction <= 1
    assert set(stats.to_dict()) >= {"wait_seconds", "busy_seconds", "wait_fraction", "waited"}


def _failing_sink(bad_item, written):
    def sink(item):
        if item == bad_item:
            raise ValueError(f"disk full at {item}")
        written.append(item)
    return sink


@pytest.mark.timeout(10)
def test_writer_failure_is_raised_by_submit_with_cause():
    written = []
    writer = BackgroundWriter(_failing_sink(3, written), max_queue=1)
    pattern = r"failed on item #3 \(ValueError: disk full at 3\)"
    with pytest.raises(WriterError, match=pattern) as info:
        for i in range(1000):  # max_queue=1: must not deadlock after the worker fails
            writer.submit(i)
    cause = info.value.__cause__
    assert isinstance(cause, ValueError)
    assert any(frame.name == "sink" for frame in traceback.extract_tb(cause.__traceback__))
    assert writer.failed and written == [0, 1, 2]
    with pytest.raises(WriterError):  # the job stays stopped
        writer.submit(99)
    writer.close()  # already reported: close does not raise it again
    assert written == [0, 1, 2] and writer.stats().written == 3


def test_writer_failure_is_raised_by_close():
    written = []
    with pytest.raises(WriterError, match="item #4") as info:
        with BackgroundWriter(_failing_sink(4, written), max_queue=10) as writer:
            for i in range(5):
                writer.submit(i)
    assert isinstance(info.value.__cause__, ValueError) and written == [0, 1, 2, 3]


def test_writer_drains_when_body_raises():
    written = []
    with pytest.raises(KeyError):
        with BackgroundWriter(written.append, max_queue=2) as writer:
            for i in range(6):
                writer.submit(i)
            raise KeyError("forward pass failed")
    assert written == list(range(6))


def test_writer_misuse():
    writer = BackgroundWriter(lambda item: None)
    writer.close()
    writer.close()  # idempotent
    with pytest.raises(WriterError, match="after close"):
        writer.submit(1)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(WriterError, match="max_queue"):
            BackgroundWriter(lambda item: None, max_queue=bad)
