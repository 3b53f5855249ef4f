"""This process's place in a torchrun job, shared by the teacher pass and the trainer.

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them a run is rank 0 of 1.
:class:`RankInfo` only describes the place (from the environment or from an initialised
default process group) and offers a barrier that is a no-op alone; the collectives each
package needs (extract: a gloo group for barriers; train: DDP and all-reduces) live there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from genrecal.common.errors import DistributedEnvError

_ENV = (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0))


@dataclass(frozen=True)
class RankInfo:
    """Rank ``rank`` of ``world`` processes, using device ``local_rank`` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world or self.local_rank < 0:
            raise DistributedEnvError(
                f"RANK={self.rank}, WORLD_SIZE={self.world}, LOCAL_RANK={self.local_rank}: need "
                "0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0; launch the ranks with torchrun")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RankInfo:
        """From RANK / WORLD_SIZE / LOCAL_RANK (torchrun's variables; defaults 0 / 1 / 0)."""
        env = os.environ if env is None else env
        return cls(*(_env_int(env, key, default) for key, default in _ENV))

    @classmethod
    def current(cls) -> RankInfo:
        """From the initialised default process group (rank 0 of 1 when there is none);
        ``local_rank`` from LOCAL_RANK, else the global rank."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        rank = dist.get_rank()
        return cls(rank, dist.get_world_size(), _env_int(os.environ, "LOCAL_RANK", rank))

    def barrier(self) -> None:
        """Wait until every rank of the default process group gets here (no-op alone)."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


def _env_int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key, "")
    try:
        return int(raw) if raw != "" else default
    except ValueError:
        raise DistributedEnvError(f"environment variable {key}={raw!r} is not an integer; launch "
                                  "with torchrun, or unset RANK/WORLD_SIZE/LOCAL_RANK") from None
