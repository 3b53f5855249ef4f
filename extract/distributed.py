"""Scale-out under torchrun: a gloo process group for barriers, and the work split.

This process's place (:class:`genrecal.common.distributed.RankInfo`, read from torchrun's
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``) is shared with the trainer; alone (rank 0 of 1)
nothing here touches ``torch.distributed``. With ``WORLD_SIZE > 1`` a gloo group (CPU,
works with or without GPUs) is used only for barriers: ranks never exchange tensors, each
writes its own shards, and rank 0 commits the manifest once every rank is done.

Work is split by window (see :mod:`genrecal.extract.job`): window ``w`` belongs to rank
``w % world``, a disjoint and deterministic split that does not change between reruns.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta

from genrecal.extract.errors import DistributedError
from genrecal.common.distributed import RankInfo

DEFAULT_TIMEOUT = timedelta(hours=24)
"""How long a barrier waits: ranks finish their share at different times."""


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


def owned(items: Sequence, info: RankInfo) -> list:
    """The items of this rank: positions ``i`` with ``i % world == rank``."""
    return [item for i, item in enumerate(items) if i % info.world == info.rank]
