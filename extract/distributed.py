"""Scale-out under torchrun: which rank this is, a gloo process group, barriers, work split.

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them the run is rank 0 of 1
and nothing here touches ``torch.distributed``. With ``WORLD_SIZE > 1`` a gloo group (CPU,
works with or without GPUs) is used only for barriers: ranks never exchange tensors, each
writes its own shards, and rank 0 commits the manifest once every rank is done.

Work is split by window (see :mod:`genrecal.extract.job`): window ``w`` belongs to rank
``w % world``, a disjoint and deterministic split that does not change between reruns.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from genrecal.extract.errors import DistributedError

DEFAULT_TIMEOUT = timedelta(hours=24)
"""How long a barrier waits: ranks finish their share at different times."""


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the job: ``rank`` of ``world``, GPU ``local_rank`` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def rank_info(env: Mapping[str, str] | None = None) -> RankInfo:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (torchrun's variables); defaults 0 / 1 / 0."""
    env = os.environ if env is None else env
    values = {}
    for key, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        raw = env.get(key, "")
        try:
            values[key] = int(raw) if raw != "" else default
        except ValueError:
            raise DistributedError(f"environment variable {key}={raw!r} is not an integer; launch "
                                   "with torchrun, or unset RANK/WORLD_SIZE/LOCAL_RANK") from None
    info = RankInfo(rank=values["RANK"], world=values["WORLD_SIZE"], local_rank=values["LOCAL_RANK"])
    if info.world < 1 or not 0 <= info.rank < info.world or info.local_rank < 0:
        raise DistributedError(f"RANK={info.rank}, WORLD_SIZE={info.world}, LOCAL_RANK="
                               f"{info.local_rank}: need 0 <= RANK < WORLD_SIZE; launch with torchrun")
    return info


@contextmanager
def process_group(info: RankInfo, timeout: timedelta = DEFAULT_TIMEOUT) -> Iterator[None]:
    """A gloo process group for the duration of the block when ``world > 1`` (else nothing)."""
    import torch.distributed as dist

    created = info.distributed and not dist.is_initialized()
    if created:
        if "MASTER_ADDR" not in os.environ:
            raise DistributedError(f"WORLD_SIZE={info.world} but MASTER_ADDR is not set; launch "
                                   "the ranks with torchrun (it sets MASTER_ADDR/MASTER_PORT)")
        dist.init_process_group("gloo", rank=info.rank, world_size=info.world, timeout=timeout)
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()


def barrier(info: RankInfo) -> None:
    """Wait until every rank gets here (no-op for a single process)."""
    if info.distributed:
        import torch.distributed as dist

        dist.barrier()


def owned(items: Sequence, info: RankInfo) -> list:
    """The items of this rank: positions ``i`` with ``i % world == rank``."""
    return [item for i, item in enumerate(items) if i % info.world == info.rank]
