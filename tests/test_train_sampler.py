"""Training order (genrecal.train.sampler): permutations, rank slices, batches, resume."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genrecal.train.errors import SamplerError
from genrecal.train.sampler import BatchPlan, SamplerState, epoch_order, rank_slice, split_evenly


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
