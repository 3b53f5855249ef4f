"""Training order: a seeded permutation per epoch, disjoint rank slices, batches, exact resume,
also at another world size.

The order of epoch ``e`` is one permutation of the ``N`` joined samples, drawn from
``numpy.random.SeedSequence([seed, epoch])`` (PCG64): every rank computes the same global
order without communicating, and a different seed or epoch gives a different order.

The partition is a pure function (MosaicML Streaming style) of ``(N, batch_size, world size W,
seed, epoch, origin)``, :func:`partition`: it needs no state but where the epoch's current
*segment* starts. ``origin`` is the number of samples of the epoch's order consumed (by all
ranks together) before the segment: 0 for an epoch read from its start, the global position
where a run resumed at another world size otherwise.

Ranks. Of the segment's samples ``rest = order[origin:]``, rank ``r`` of ``W`` takes
``rest[r::W]``: the slices are disjoint and together hold every sample exactly once. When
``len(rest)`` is not divisible by ``W`` the first ``len(rest) % W`` ranks hold one sample more
(nothing is dropped or repeated, there is no padding).

Batches. Every rank cuts its slice into the SAME number of steps
``S = ceil(ceil(len(rest) / W) / batch_size)``, with batch sizes as equal as possible (they
differ by at most one, never exceed ``batch_size``, longer ones first), so DDP / FSDP ranks run
the same number of steps. In an epoch read from its start (``origin == 0``) no batch is empty;
the only case where equal step counts are then impossible is ``batch_size == 1`` with ``N`` not
divisible by ``W``: a rank with one sample fewer has one step fewer (:attr:`BatchPlan.uneven`,
which the loop refuses under several processes). ``N < W`` is refused. In a resumed segment
(``origin > 0``) every rank has exactly ``S`` steps; a rank whose slice is shorter than ``S``
(``batch_size == 1`` or fewer samples left than ranks) gets EMPTY batches at the end of the
segment, which the loop runs as zero-loss steps.

Prefix property. After ``k`` steps of every rank, the samples consumed are exactly
``rest[:P]`` with ``P = sum_r c_r(k)`` (the per-rank counts ``c_r`` are non-increasing in ``r``
and differ by at most one, so the strided slices consumed form one prefix). The epoch's
progress is therefore ONE number, the global position ``origin + P``, whatever the world size.

Resume. :class:`SamplerState` ``(epoch, position, seed, world_size, rank, origin)``: ``position``
counts the samples of this rank's slice of the segment already consumed.

* Same world size (and rank): :meth:`BatchPlan.remaining` gives the remaining batches of the
  epoch, exactly those an uninterrupted run would have produced, in the same order (bitwise
  resume). The position must fall on a batch boundary (it does when the loop saves the state
  it read from the loader after a batch); another seed or a position no batch boundary matches
  (batch size or data changed) is refused.
* Another world size: :meth:`BatchPlan.resume` turns rank 0's saved state into the global
  position (:meth:`BatchPlan.consumed`) and starts a new segment there, re-partitioned over
  the new ranks: the rest of the epoch is exactly the samples not yet seen, each once. The next
  epoch starts from its beginning (``origin`` 0) as usual.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from genrecal.train.errors import SamplerError

__all__ = ["BatchPlan", "SamplerState", "epoch_order", "partition", "rank_slice", "split_evenly"]


def _check_int(owner: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SamplerError(f"{owner}: {name}={value!r} must be an integer >= {minimum}")


@dataclass(frozen=True)
class SamplerState:
    """Where one rank stands in the training order.

    epoch: the epoch being read (0-based); position: samples of this rank's slice of the
    epoch's current segment already consumed (a batch boundary); seed, world_size, rank: the
    run's settings, checked on resume; origin: samples of the epoch consumed globally before
    the current segment began (0 unless the run resumed at another world size in this epoch).
    """

    epoch: int = 0
    position: int = 0
    seed: int = 0
    world_size: int = 1
    rank: int = 0
    origin: int = 0

    def __post_init__(self):
        for name, minimum in (("epoch", 0), ("position", 0), ("seed", 0), ("world_size", 1), ("rank", 0),
                              ("origin", 0)):
            _check_int("SamplerState", name, getattr(self, name), minimum)
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.rank >= self.world_size:
            raise SamplerError(f"SamplerState: rank {self.rank} is not below world_size {self.world_size}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SamplerState":
        """Inverse of :meth:`to_dict`; a missing or unknown key is a :class:`SamplerError`.
        A state without ``origin`` (written before segments existed) reads as origin 0."""
        expected = {f.name for f in fields(cls)}
        keys = set(data) if isinstance(data, dict) else None
        if keys is None or keys not in (expected, expected - {"origin"}):
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise SamplerError(f"SamplerState.from_dict: expected keys {sorted(expected)}, got {got}; "
                               f"the checkpoint's sampler state is damaged or from another genrecal version")
        return cls(**data)

    def advanced(self, n_samples: int) -> "SamplerState":
        """The state after ``n_samples`` more samples of this rank's slice of the epoch."""
        return replace(self, position=self.position + n_samples)

    def next_epoch(self) -> "SamplerState":
        return replace(self, epoch=self.epoch + 1, position=0, origin=0)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The global order of epoch ``epoch``: a permutation of ``range(n)`` seeded by (seed, epoch)."""
    for name, value in (("n", n), ("seed", seed), ("epoch", epoch)):
        _check_int("epoch_order", name, value, 0)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)])))
    return rng.permutation(int(n)).tolist()


def rank_slice(order: list[int], world_size: int, rank: int) -> list[int]:
    """Rank ``rank``'s share ``order[rank::world_size]`` (disjoint; sizes differ by <= 1)."""
    return order[rank::world_size]


def split_evenly(items: list[int], parts: int) -> list[list[int]]:
    """``items`` cut, in order, into ``parts`` runs whose lengths differ by at most one (longer
    first; empty runs at the end when ``parts > len(items)``)."""
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + base + (i < extra)
        out.append(items[start:stop])
        start = stop
    return out


def _segment_steps(n_rest: int, batch_size: int, world_size: int) -> int:
    """Steps every rank takes in a segment of ``n_rest`` samples: ceil(ceil(n_rest / W) / bs)."""
    return -(-(-(-n_rest // world_size)) // batch_size)


def _rank_batches(order: list[int], batch_size: int, world_size: int, rank: int, origin: int) -> list[list[int]]:
    rest = order[origin:]
    mine = rank_slice(rest, world_size, rank)
    steps = _segment_steps(len(rest), batch_size, world_size)
    if origin == 0:  # an epoch from its start: never an empty batch (the `uneven` case instead)
        steps = min(steps, len(mine))
    return split_evenly(mine, steps) if steps else []


def partition(n_samples: int, batch_size: int, world_size: int, seed: int, epoch: int,
              origin: int = 0) -> list[list[list[int]]]:
    """Every rank's batches of the segment of epoch ``epoch`` that starts after ``origin``
    samples (module docstring): ``out[rank][step]`` is a list of sample indices. A pure function."""
    for name, value, minimum in (("n_samples", n_samples, 1), ("batch_size", batch_size, 1),
                                 ("world_size", world_size, 1), ("origin", origin, 0)):
        _check_int("partition", name, value, minimum)
    if origin > n_samples:
        raise SamplerError(f"partition: origin {origin} is past the {n_samples} samples of the epoch")
    order = epoch_order(n_samples, seed, epoch)
    return [_rank_batches(order, batch_size, world_size, r, origin) for r in range(world_size)]


@dataclass(frozen=True)
class BatchPlan:
    """The batches one rank reads: ``n_samples`` joined samples, ``batch_size`` per step at most."""

    n_samples: int
    batch_size: int
    seed: int = 0
    world_size: int = 1
    rank: int = 0

    def __post_init__(self):
        for name, minimum in (("n_samples", 1), ("batch_size", 1), ("seed", 0), ("world_size", 1), ("rank", 0)):
            _check_int("BatchPlan", name, getattr(self, name), minimum)
        if self.rank >= self.world_size:
            raise SamplerError(f"BatchPlan: rank {self.rank} is not below world_size {self.world_size}")
        if self.n_samples < self.world_size:
            raise SamplerError(f"BatchPlan: {self.n_samples} samples cannot feed {self.world_size} ranks "
                               f"(each rank needs at least one sample per epoch); use more data or fewer ranks")

    @property
    def rank_size(self) -> int:
        """Samples of this rank's slice per epoch (read from its start)."""
        return len(range(self.rank, self.n_samples, self.world_size))

    @property
    def steps_per_epoch(self) -> int:
        """Batches this rank reads per epoch read from its start (the same on every rank unless
        :attr:`uneven`)."""
        return min(self._steps, self.rank_size)

    @property
    def uneven(self) -> bool:
        """True when ranks differ in step count (``batch_size == 1`` and ``N % W != 0``)."""
        return self.n_samples // self.world_size < self._steps

    @property
    def _steps(self) -> int:
        return _segment_steps(self.n_samples, self.batch_size, self.world_size)

    def epoch_batches(self, epoch: int, origin: int = 0) -> list[list[int]]:
        """Every batch (lists of sample indices) this rank reads in the segment of ``epoch``
        that starts after ``origin`` samples (the whole epoch by default), in order."""
        _check_int("BatchPlan.epoch_batches", "origin", origin, 0)
        if origin > self.n_samples:
            raise SamplerError(f"BatchPlan: origin {origin} is past the {self.n_samples} samples of the epoch")
        order = epoch_order(self.n_samples, self.seed, epoch)
        return _rank_batches(order, self.batch_size, self.world_size, self.rank, origin)

    def state(self, epoch: int = 0, position: int = 0, origin: int = 0) -> SamplerState:
        return SamplerState(epoch, position, self.seed, self.world_size, self.rank, origin)

    def remaining(self, state: SamplerState) -> list[list[int]]:
        """The batches of ``state.epoch`` after ``state.position`` samples of this rank's slice
        of the segment (see module docstring); the state must be this run's (seed, world size,
        rank)."""
        self._check_state(state)
        batches = self.epoch_batches(state.epoch, state.origin)
        return batches[self._steps_done(batches, state):]

    def consumed(self, state: SamplerState) -> int:
        """Samples of ``state.epoch`` consumed by ALL ranks together once ``state``'s rank
        stands at ``state``: ``origin + sum_r c_r(k)``, k the steps that rank has taken (the
        prefix property, module docstring). Exact for rank 0's state (its batches are never
        empty); another rank's state at the end of its slice may be ambiguous and is refused.
        ``state`` may come from another world size than this plan's (same data, batch size, seed)."""
        if state.seed != self.seed:
            raise SamplerError(f"cannot resume: the sampler state was saved with seed {state.seed} but this "
                               f"run has {self.seed}; resume with the same seed")
        ranks = partition(self.n_samples, self.batch_size, state.world_size, self.seed, state.epoch,
                          state.origin)
        mine = ranks[state.rank]
        steps = self._steps_done(mine, state, rank=state.rank, world_size=state.world_size)
        if steps < len(mine) and not mine[steps] and any(len(r) > steps and r[steps] for r in ranks):
            raise SamplerError(f"cannot tell the global position from rank {state.rank}'s sampler state (its "
                               "slice ended before the segment did); use rank 0's state")
        return state.origin + sum(len(b) for batches in ranks for b in batches[:steps])

    def resume(self, saved: SamplerState) -> SamplerState:
        """The state this rank continues from after ``saved`` (rank 0's state when the world
        size changed): ``saved`` itself under the same world size and rank (checked: a batch
        boundary of this run), else a new segment at the global position ``consumed(saved)``,
        re-partitioned over this run's ranks (the next epoch when nothing of it is left)."""
        if (saved.world_size, saved.rank) == (self.world_size, self.rank):
            self.remaining(saved)
            return saved
        consumed = self.consumed(saved)
        if consumed >= self.n_samples:
            return self.state(saved.epoch + 1)
        return self.state(saved.epoch, 0, origin=consumed)

    def _steps_done(self, batches: list[list[int]], state: SamplerState, *, rank: int | None = None,
                    world_size: int | None = None) -> int:
        done = 0
        for k, batch in enumerate(batches):
            if done == state.position:
                return k
            done += len(batch)
        if done == state.position:
            return len(batches)
        boundaries = np.cumsum([0] + [len(b) for b in batches]).tolist()
        raise SamplerError(
            f"cannot resume rank {self.rank if rank is None else rank}: position {state.position} of epoch "
            f"{state.epoch} is not a batch boundary of this run ({self.n_samples} samples, batch_size "
            f"{self.batch_size}, world_size {self.world_size if world_size is None else world_size}: boundaries "
            f"{_abbreviate(boundaries)}). The state was saved with another batch size or other data; resume "
            "with the same settings and data, or restart the epoch (position 0)")

    def _check_state(self, state: SamplerState) -> None:
        mine = (self.seed, self.world_size, self.rank)
        theirs = (state.seed, state.world_size, state.rank)
        if mine != theirs:
            raise SamplerError(
                f"cannot resume: the sampler state was saved with (seed, world_size, rank) = {theirs} but this "
                f"run has {mine}. Each rank loads its own state; at another number of processes convert "
                f"rank 0's state with BatchPlan.resume, or restart the epoch from position 0")


def _abbreviate(values: list[int], keep: int = 6) -> str:
    if len(values) <= 2 * keep:
        return str(values)
    return f"[{', '.join(map(str, values[:keep]))}, ..., {', '.join(map(str, values[-keep:]))}]"
