"""Training order (genrecal.train.sampler): permutations, rank slices, batches, resume."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genrecal.train.errors import SamplerError
from genrecal.train.sampler import (BatchPlan, SamplerState, epoch_order, partition, rank_slice,
                                     split_evenly)


def _all_rank_batches(n, batch_size, world_size, epoch=0, seed=0):
    return [BatchPlan(n, batch_size, seed, world_size, r).epoch_batches(epoch) for r in range(world_size)]


def _flat(batches):
    return [i for batch in batches for i in batch]


# ----------------------------------------------------------------------------- order


def test_epoch_order_is_a_permutation():
    order = epoch_order(37, seed=3, epoch=5)
    assert sorted(order) == list(range(37))
    assert order != list(range(37))


def test_epoch_order_depends_on_seed_and_epoch_only():
    assert epoch_order(50, 1, 2) == epoch_order(50, 1, 2)
    orders = {tuple(epoch_order(50, seed, epoch)) for seed in range(3) for epoch in range(3)}
    assert len(orders) == 9


def test_rank_slice_and_split_evenly():
    assert rank_slice(list(range(10)), 3, 1) == [1, 4, 7]
    parts = split_evenly(list(range(10)), 4)
    assert parts == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_exactly_once_per_epoch_across_ranks(world_size, batch_size):
    n = 10  # not divisible by 3 (nor by 4 = batch size)
    for epoch in range(3):
        ranks = _all_rank_batches(n, batch_size, world_size, epoch=epoch, seed=7)
        delivered = [i for batches in ranks for i in _flat(batches)]
        assert Counter(delivered) == Counter(range(n))
        sizes = [len(_flat(b)) for b in ranks]
        assert max(sizes) - min(sizes) <= 1
        assert all(0 < len(b) <= batch_size for batches in ranks for b in batches)


def test_ranks_run_the_same_number_of_steps_when_batch_size_allows():
    for n, w, b in [(10, 3, 2), (13, 3, 2), (7, 2, 3), (100, 3, 8), (11, 4, 4)]:
        plans = [BatchPlan(n, b, 0, w, r) for r in range(w)]
        assert len({p.steps_per_epoch for p in plans}) == 1
        assert not plans[0].uneven
        assert all(len(p.epoch_batches(0)) == p.steps_per_epoch for p in plans)


def test_batch_size_one_with_uneven_ranks_is_flagged():
    plans = [BatchPlan(10, 1, 0, 3, r) for r in range(3)]
    assert [p.steps_per_epoch for p in plans] == [4, 3, 3]
    assert all(p.uneven for p in plans)
    assert not BatchPlan(9, 1, 0, 3, 0).uneven


def test_single_rank_steps_match_ceil():
    plan = BatchPlan(100, 8)
    assert plan.steps_per_epoch == 13
    assert [len(b) for b in plan.epoch_batches(0)] == [8] * 9 + [7] * 4


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 8), st.integers(0, 120), st.integers(1, 16), st.integers(0, 3))
def test_plan_properties(world_size, extra, batch_size, epoch):
    n = world_size + extra
    ranks = _all_rank_batches(n, batch_size, world_size, epoch=epoch, seed=11)
    assert sorted(i for batches in ranks for i in _flat(batches)) == list(range(n))
    assert all(0 < len(b) <= batch_size for batches in ranks for b in batches)
    steps = {len(batches) for batches in ranks}
    uneven = BatchPlan(n, batch_size, 11, world_size, 0).uneven
    assert len(steps) == 1 or (uneven and batch_size == 1 and max(steps) - min(steps) == 1)


def test_different_seeds_and_epochs_give_different_batches():
    plan_a, plan_b = BatchPlan(40, 4, seed=0), BatchPlan(40, 4, seed=1)
    assert plan_a.epoch_batches(0) != plan_b.epoch_batches(0)
    assert plan_a.epoch_batches(0) != plan_a.epoch_batches(1)
    assert plan_a.epoch_batches(2) == BatchPlan(40, 4, seed=0).epoch_batches(2)


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("world_size,rank", [(1, 0), (3, 2)])
def test_resume_yields_exactly_the_remaining_batches(world_size, rank):
    plan = BatchPlan(23, 3, seed=5, world_size=world_size, rank=rank)
    full = plan.epoch_batches(4)
    state = plan.state(epoch=4)
    for k in range(len(full) + 1):
        restored = SamplerState.from_dict(state.to_dict())
        assert restored == state
        assert plan.remaining(restored) == full[k:]
        if k < len(full):
            state = state.advanced(len(full[k]))
    assert state.position == plan.rank_size
    assert state.next_epoch() == plan.state(epoch=5)


def test_resume_refuses_another_run():
    plan = BatchPlan(20, 4, seed=1, world_size=2, rank=0)
    for bad in (SamplerState(0, 0, seed=2, world_size=2, rank=0), SamplerState(0, 0, seed=1, world_size=1, rank=0),
                SamplerState(0, 0, seed=1, world_size=2, rank=1)):
        with pytest.raises(SamplerError, match="cannot resume"):
            plan.remaining(bad)


def test_resume_refuses_a_position_off_the_batch_boundaries():
    plan = BatchPlan(20, 4, seed=1)
    with pytest.raises(SamplerError, match="not a batch boundary.*batch_size 4"):
        plan.remaining(plan.state(0, 3))
    with pytest.raises(SamplerError, match="not a batch boundary"):
        plan.remaining(plan.state(0, 21))


# ----------------------------------------------------------------------------- validation


def test_state_round_trip_and_bad_dicts():
    state = SamplerState(epoch=2, position=12, seed=9, world_size=4, rank=3)
    assert SamplerState.from_dict(state.to_dict()) == state
    with pytest.raises(SamplerError, match="expected keys"):
        SamplerState.from_dict({"epoch": 0})
    with pytest.raises(SamplerError, match="expected keys"):
        SamplerState.from_dict({**state.to_dict(), "extra": 1})
    with pytest.raises(SamplerError, match="expected keys"):
        SamplerState.from_dict([1, 2])


@pytest.mark.parametrize("kwargs,match", [
    ({"rank": 2, "world_size": 2}, "rank 2 is not below"),
    ({"epoch": -1}, "epoch=-1"),
    ({"position": True}, "position=True"),
    ({"world_size": 0}, "world_size=0"),
    ({"seed": 1.5}, "seed=1.5"),
])
def test_state_rejects_bad_values(kwargs, match):
    with pytest.raises(SamplerError, match=match):
        SamplerState(**kwargs)


@pytest.mark.parametrize("args,match", [
    ((2, 1, 0, 3, 0), "2 samples cannot feed 3 ranks"),
    ((0, 1), "n_samples=0"),
    ((5, 0), "batch_size=0"),
    ((5, 1, 0, 2, 2), "rank 2 is not below"),
])
def test_plan_rejects_bad_settings(args, match):
    with pytest.raises(SamplerError, match=match):
        BatchPlan(*args)


# ----------------------------------------------------------------------------- world sizes


def _run_steps(n, batch_size, world_size, seed, epoch, origin, steps):
    """Every rank of a ``world_size`` run takes ``steps`` steps of the segment at ``origin``:
    (samples consumed, rank 0's state afterwards)."""
    ranks = partition(n, batch_size, world_size, seed, epoch, origin)
    assert len({len(b) for b in ranks}) == 1 or origin == 0  # a resumed segment is never uneven
    taken = [i for batches in ranks for b in batches[:steps] for i in b]
    rank0 = BatchPlan(n, batch_size, seed, world_size, 0).state(epoch, len(_flat(ranks[0][:steps])), origin)
    return taken, rank0


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 4), st.integers(0, 60), st.integers(1, 6), st.integers(0, 2))
def test_partition_is_exactly_once_for_world_sizes_one_to_four(world_size, extra, batch_size, epoch):
    n = world_size + extra
    ranks = partition(n, batch_size, world_size, seed=3, epoch=epoch)
    assert Counter(i for batches in ranks for i in _flat(batches)) == Counter(range(n))
    assert ranks == [BatchPlan(n, batch_size, 3, world_size, r).epoch_batches(epoch) for r in range(world_size)]
    assert partition(n, batch_size, world_size, seed=3, epoch=epoch) == ranks  # a pure function


@settings(max_examples=400, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 50), st.integers(1, 5), st.data())
def test_resume_at_another_world_size_reads_exactly_the_unseen_samples(w_before, w_after, extra, batch_size,
                                                                      data):
    """A run of w_before ranks stops after k steps (any k, the end of the epoch included) and
    resumes with w_after ranks (same per-rank batch size): the rest of the epoch is exactly the
    samples not yet seen, each once; then it changes the world size once more, back."""
    if w_before == w_after:  # the same world size keeps its own state and batches (bitwise)
        w_after = w_before % 4 + 1
    n = max(w_before, w_after) + extra
    seed, epoch = 7, 1
    bs_before = bs_after = batch_size
    steps = len(partition(n, bs_before, w_before, seed, epoch)[0])
    k = data.draw(st.integers(0, steps), label="steps before the stop")
    seen, saved = _run_steps(n, bs_before, w_before, seed, epoch, 0, k)
    assert BatchPlan(n, bs_before, seed, w_before, 0).consumed(saved) == len(seen)
    plan = BatchPlan(n, bs_after, seed, w_after, 0)
    state = plan.resume(saved)
    if len(seen) == n:  # the epoch was over: the next one starts from its beginning
        assert state == plan.state(epoch + 1)
        return
    assert (state.epoch, state.position, state.origin) == (epoch, 0, len(seen))
    rest = [i for r in range(w_after) for i in _flat(BatchPlan(n, bs_after, seed, w_after, r).remaining(
        BatchPlan(n, bs_after, seed, w_after, r).resume(saved)))]
    assert Counter(seen + rest) == Counter(range(n))
    assert all(len(b) <= bs_after for r in range(w_after)
               for b in BatchPlan(n, bs_after, seed, w_after, r).remaining(state if r == 0 else
                                                                          BatchPlan(n, bs_after, seed, w_after, r).resume(saved)))
    # a second change of world size inside the same epoch
    k2 = data.draw(st.integers(0, len(partition(n, bs_after, w_after, seed, epoch, state.origin)[0])), label="k2")
    more, saved2 = _run_steps(n, bs_after, w_after, seed, epoch, state.origin, k2)
    assert plan.consumed(saved2) == len(seen) + len(more)
    final = BatchPlan(n, bs_before, seed, w_before, 0).resume(saved2)
    if len(seen) + len(more) == n:
        assert final.epoch == epoch + 1
        return
    last = [i for r in range(w_before) for i in _flat(BatchPlan(n, bs_before, seed, w_before, r).remaining(
        BatchPlan(n, bs_before, seed, w_before, r).resume(saved2)))]
    assert Counter(seen + more + last) == Counter(range(n))


def test_same_world_size_resume_keeps_the_state_and_the_batches():
    plan = BatchPlan(23, 3, seed=5, world_size=3, rank=1)
    full = plan.epoch_batches(0)
    state = plan.state(0).advanced(len(full[0])).advanced(len(full[1]))
    assert plan.resume(state) == state
    assert plan.remaining(plan.resume(state)) == full[2:]


def test_a_resumed_segment_pads_short_slices_with_empty_batches():
    # 3 samples left for 2 ranks at batch size 1: both ranks take 2 steps, rank 1's last is empty
    ranks = partition(10, 1, 2, seed=0, epoch=0, origin=7)
    assert [len(b) for b in ranks[0]] == [1, 1] and [len(b) for b in ranks[1]] == [1, 0]
    # fewer samples left than ranks
    ranks = partition(10, 4, 4, seed=0, epoch=0, origin=8)
    assert [[len(b) for b in r] for r in ranks] == [[1], [1], [0], [0]]


def test_consumed_refuses_an_ambiguous_state_and_another_seed():
    ranks = partition(10, 1, 2, seed=0, epoch=0, origin=7)
    plan = BatchPlan(10, 1, 0, 2, 1)
    state = plan.state(0, position=1, origin=7)  # rank 1 after its only sample: step 1 or 2?
    assert len(ranks[1][0]) == 1
    with pytest.raises(SamplerError, match="use rank 0's state"):
        plan.consumed(state)
    with pytest.raises(SamplerError, match="seed"):
        BatchPlan(10, 1, 1, 2, 0).consumed(BatchPlan(10, 1, 0, 2, 0).state())


def test_old_state_dicts_without_origin_still_load():
    old = {"epoch": 1, "position": 4, "seed": 0, "world_size": 2, "rank": 1}
    assert SamplerState.from_dict(old) == SamplerState(1, 4, 0, 2, 1, origin=0)
