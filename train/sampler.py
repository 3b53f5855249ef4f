"""Training order: a seeded permutation per epoch, disjoint rank slices, batches, exact resume.

The order of epoch ``e`` is one permutation of the ``N`` joined samples, drawn from
``numpy.random.SeedSequence([seed, epoch])`` (PCG64): every rank computes the same global
order without communicating, and a different seed or epoch gives a different order.

Ranks (DDP). Rank ``r`` of ``W`` takes ``order[r::W]``: the slices are disjoint and together
hold every sample exactly once per epoch. When ``N`` is not divisible by ``W`` the first
``N % W`` ranks hold one sample more (ranks differ by at most one sample; nothing is dropped
or repeated, there is no padding).

Batches. Every rank cuts its slice into the SAME number of steps
``S = ceil(ceil(N / W) / batch_size)``, with batch sizes as equal as possible (they differ by
at most one and never exceed ``batch_size``), so DDP ranks run the same number of steps and
no batch is empty. The only case where that is impossible is ``batch_size == 1`` with ``N``
not divisible by ``W``: a rank with one sample fewer then has one step fewer
(:attr:`BatchPlan.uneven` is True and the loop must let that rank sit out the last step, e.g.
with a zero-loss step). ``N < W`` is refused (a rank would get no sample at all).

Resume. :class:`SamplerState` ``(epoch, position, seed, world_size, rank)`` says how many
samples of its slice a rank has consumed in ``epoch``; :meth:`BatchPlan.remaining` gives the
remaining batches of the epoch, exactly those an uninterrupted run would have produced, in
the same order. The position must fall on a batch boundary (it does when the loop saves the
state it read from the loader after a batch); a state saved with another seed, world size or
rank, or a position that no batch boundary matches (batch size or data changed), is refused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from genrecal.train.errors import SamplerError

__all__ = ["BatchPlan", "SamplerState", "epoch_order", "rank_slice", "split_evenly"]


def _check_int(owner: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SamplerError(f"{owner}: {name}={value!r} must be an integer >= {minimum}")


@dataclass(frozen=True)
class SamplerState:
    """Where one rank stands in the training order.

    epoch: the epoch being read (0-based); position: samples of this rank's slice of that
    epoch already consumed (a batch boundary); seed, world_size, rank: the run's settings,
    checked on resume.
    """

    epoch: int = 0
    position: int = 0
    seed: int = 0
    world_size: int = 1
    rank: int = 0

    def __post_init__(self):
        for name, minimum in (("epoch", 0), ("position", 0), ("seed", 0), ("world_size", 1), ("rank", 0)):
            _check_int("SamplerState", name, getattr(self, name), minimum)
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.rank >= self.world_size:
            raise SamplerError(f"SamplerState: rank {self.rank} is not below world_size {self.world_size}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SamplerState":
        """Inverse of :meth:`to_dict`; a missing or unknown key is a :class:`SamplerError`."""
        expected = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != expected:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise SamplerError(f"SamplerState.from_dict: expected keys {sorted(expected)}, got {got}; "
                               f"the checkpoint's sampler state is damaged or from another genrecal version")
        return cls(**data)

    def advanced(self, n_samples: int) -> "SamplerState":
        """The state after ``n_samples`` more samples of this epoch."""
        return replace(self, position=self.position + n_samples)

    def next_epoch(self) -> "SamplerState":
        return replace(self, epoch=self.epoch + 1, position=0)


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
    """``items`` cut, in order, into ``parts`` runs whose lengths differ by at most one (longer first)."""
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + base + (i < extra)
        out.append(items[start:stop])
        start = stop
    return out


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
        """Samples of this rank's slice per epoch."""
        return len(range(self.rank, self.n_samples, self.world_size))

    @property
    def steps_per_epoch(self) -> int:
        """Batches this rank reads per epoch (the same on every rank unless :attr:`uneven`)."""
        return min(self._steps, self.rank_size)

    @property
    def uneven(self) -> bool:
        """True when ranks differ in step count (``batch_size == 1`` and ``N % W != 0``)."""
        return self.n_samples // self.world_size < self._steps

    @property
    def _steps(self) -> int:
        largest = -(-self.n_samples // self.world_size)
        return -(-largest // self.batch_size)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every batch (lists of sample indices) this rank reads in ``epoch``, in order."""
        mine = rank_slice(epoch_order(self.n_samples, self.seed, epoch), self.world_size, self.rank)
        return split_evenly(mine, self.steps_per_epoch)

    def state(self, epoch: int = 0, position: int = 0) -> SamplerState:
        return SamplerState(epoch, position, self.seed, self.world_size, self.rank)

    def remaining(self, state: SamplerState) -> list[list[int]]:
        """The batches of ``state.epoch`` after ``state.position`` samples (see module docstring)."""
        self._check_state(state)
        batches = self.epoch_batches(state.epoch)
        done = 0
        for k, batch in enumerate(batches):
            if done == state.position:
                return batches[k:]
            done += len(batch)
        if done == state.position:
            return []
        boundaries = np.cumsum([0] + [len(b) for b in batches]).tolist()
        raise SamplerError(
            f"cannot resume rank {self.rank}: position {state.position} of epoch {state.epoch} is not a batch "
            f"boundary of this run ({self.n_samples} samples, batch_size {self.batch_size}, world_size "
            f"{self.world_size}: boundaries {_abbreviate(boundaries)}). The state was saved with another batch "
            f"size or other data; resume with the same settings and data, or restart the epoch (position 0)")

    def _check_state(self, state: SamplerState) -> None:
        mine = (self.seed, self.world_size, self.rank)
        theirs = (state.seed, state.world_size, state.rank)
        if mine != theirs:
            raise SamplerError(
                f"cannot resume: the sampler state was saved with (seed, world_size, rank) = {theirs} but this "
                f"run has {mine}. Resume with the same seed and number of processes (each rank loads its own "
                f"state), or restart the epoch from position 0")


def _abbreviate(values: list[int], keep: int = 6) -> str:
    if len(values) <= 2 * keep:
        return str(values)
    return f"[{', '.join(map(str, values[:keep]))}, ..., {', '.join(map(str, values[-keep:]))}]"
