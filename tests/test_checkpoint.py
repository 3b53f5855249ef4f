"""Checkpoints (genrecal.train.checkpoint): optimizer/RNG round trips, atomic directories,
damaged and foreign checkpoints, no pickle anywhere."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from genrecal.train.checkpoint import (LATEST, CheckpointData, RngState, flatten_optimizer,
                                       latest_checkpoint, load_checkpoint, prune_checkpoints,
                                       restore_weights, save_checkpoint, unflatten_optimizer)
from genrecal.train.errors import CheckpointError


def _params(seed: int = 0) -> list[tuple[str, torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(seed)
    return [("student.a.weight", torch.nn.Parameter(torch.randn(4, 3, generator=gen))),
            ("recalibrator.b.bias", torch.nn.Parameter(torch.randn(5, generator=gen)))]


def _trained_optimizer(params, steps: int = 2) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW([p for _, p in params], lr=1e-2, weight_decay=0.1)
    for i in range(steps):
        loss = sum((p * (i + 1)).square().sum() for _, p in params)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def _data(params, opt, step: int = 3) -> CheckpointData:
    return CheckpointData(weights=dict(params), optimizer=opt.state_dict(),
                          names=[n for n, _ in params],
                          trainer={"step": step, "world_size": 1, "note": "x"},
                          sampler={"epoch": 1, "position": 4}, rng=RngState.capture())


def test_optimizer_state_round_trips_through_tensors_and_json():
    params = _params()
    opt = _trained_optimizer(params)
    tensors, meta = flatten_optimizer(opt.state_dict(), [n for n, _ in params])
    assert set(tensors) == {f"{n}::{k}" for n, _ in params for k in ("step", "exp_avg",
                                                                     "exp_avg_sq")}
    tensors = st_load(st_save(tensors))  # through the file format: no shared storage, no pickle
    clone = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in params]
    opt2 = torch.optim.AdamW([p for _, p in clone], lr=1e-2, weight_decay=0.1)
    opt2.load_state_dict(unflatten_optimizer(tensors, json.loads(json.dumps(meta)),
                                             [n for n, _ in clone]))
    for (_, a), (_, b) in zip(params, clone):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[a][key], opt2.state[b][key])
    for o, ps in ((opt, params), (opt2, clone)):  # one more identical step on each
        sum(p.sum() for _, p in ps).backward()
        o.step()
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(params, clone))


def test_rng_state_round_trip():
    state = RngState.capture()
    first = (torch.rand(3), random.random(), np.random.rand(2))
    torch.manual_seed(123), random.seed(5), np.random.seed(7)
    restored = RngState.from_parts(state.tensors(), json.loads(json.dumps(state.meta())))
    restored.restore()
    again = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    assert np.array_equal(first[2], again[2])


def test_save_load_round_trip_writes_only_json_and_safetensors(tmp_path):
    params = _params()
    opt = _trained_optimizer(params)
    path = save_checkpoint(tmp_path, 3, _data(params, opt))
    assert path.name == "step-00000003" and latest_checkpoint(tmp_path) == path
    assert (tmp_path / LATEST).read_text().strip() == path.name
    suffixes = {p.suffix for p in path.iterdir()}
    assert suffixes == {".json", ".safetensors"}
    loaded = load_checkpoint(path)
    assert loaded.trainer["note"] == "x" and loaded.sampler == {"epoch": 1, "position": 4}
    assert loaded.names == [n for n, _ in params]
    fresh = _params(seed=9)
    restore_weights(fresh, loaded.weights, path)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(params, fresh))


def test_partial_and_temporary_directories_are_never_read(tmp_path):
    params = _params()
    opt = _trained_optimizer(params)
    good = save_checkpoint(tmp_path, 1, _data(params, opt, step=1))
    crashed = tmp_path / ".tmp-step-00000002"  # a save killed before its rename
    crashed.mkdir()
    (crashed / "weights.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == good
    (tmp_path / LATEST).unlink()  # pointer lost: the newest complete directory is found
    (tmp_path / "step-00000005").mkdir()  # no trainer.json: incomplete, ignored
    assert latest_checkpoint(tmp_path) == good
    assert latest_checkpoint(tmp_path / "missing") is None


def test_resaving_a_step_replaces_it_and_prune_keeps_the_newest(tmp_path):
    params = _params()
    opt = _trained_optimizer(params)
    for step in (1, 2, 3, 3):
        save_checkpoint(tmp_path, step, _data(params, opt, step=step))
    shutil.copytree(tmp_path / "step-00000001", tmp_path / ".tmp-step-00000009")
    removed = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == [".tmp-step-00000009", "step-00000001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "step-00000002",
                                                          "step-00000003"]


def test_damaged_or_foreign_checkpoints_are_refused(tmp_path):
    params = _params()
    opt = _trained_optimizer(params)
    path = save_checkpoint(tmp_path, 1, _data(params, opt))
    with pytest.raises(CheckpointError, match=r"1 process\(es\) but this run has 2"):
        load_checkpoint(path, world_size=2)
    (path / "rank-00000.json").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete: missing \['rank-00000.json'\]"):
        load_checkpoint(path)
    path = save_checkpoint(tmp_path, 2, _data(params, opt))
    (path / "weights.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(path)
    path = save_checkpoint(tmp_path, 3, _data(params, opt))
    (path / "trainer.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a genrecal.train.checkpoint"):
        load_checkpoint(path)


def test_restore_weights_checks_names_shapes_and_dtypes(tmp_path):
    params = _params()
    weights = {n: p.detach() for n, p in params}
    with pytest.raises(CheckpointError, match="missing"):
        restore_weights(params, {"student.a.weight": weights["student.a.weight"]}, tmp_path)
    with pytest.raises(CheckpointError, match="float64"):
        restore_weights(params, {**weights, "student.a.weight": weights["student.a.weight"]
                                 .double()}, tmp_path)
    with pytest.raises(CheckpointError, match=r"\(2, 3\)"):
        restore_weights(params, {**weights, "student.a.weight": torch.zeros(2, 3)}, tmp_path)
