"""genrecal.common.distributed.RankInfo: torchrun environment, process group, validation."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from genrecal.common.distributed import RankInfo
from genrecal.common.errors import DistributedEnvError


def test_from_the_torchrun_environment():
    assert RankInfo.from_env({}) == RankInfo(0, 1, 0)
    info = RankInfo.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (info.rank, info.world, info.local_rank, info.is_main, info.distributed) == (3, 4, 1, False, True)


@pytest.mark.parametrize("env, message", [
    ({"RANK": "x"}, "RANK='x' is not an integer"),
    ({"WORLD_SIZE": "2.5"}, "WORLD_SIZE='2.5' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK < WORLD_SIZE"),
    ({"WORLD_SIZE": "0"}, "RANK < WORLD_SIZE"),
    ({"LOCAL_RANK": "-1"}, "LOCAL_RANK >= 0"),
])
def test_bad_environments_are_refused(env, message):
    with pytest.raises(DistributedEnvError, match=message):
        RankInfo.from_env(env)


def test_direct_construction_is_validated():
    with pytest.raises(DistributedEnvError, match="RANK=1, WORLD_SIZE=1"):
        RankInfo(rank=1, world=1)


def test_current_without_a_process_group_is_a_single_process():
    assert not dist.is_initialized()
    info = RankInfo.current()
    assert info == RankInfo() and info.is_main and not info.distributed
    info.barrier()  # a no-op alone: must not need a process group


def test_current_reads_the_initialised_group(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        assert RankInfo.current() == RankInfo(0, 1, 3)  # local_rank from LOCAL_RANK
    finally:
        dist.destroy_process_group()
