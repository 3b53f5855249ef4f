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


# ----------------------------------------------------------------------------- sharded (FSDP)


class _Tiny(torch.nn.Module):
    """Parameters named like a StageModel's ("student.*", "recalibrator.*"), one frozen."""

    def __init__(self, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.student = torch.nn.Linear(3, 5)
        self.recalibrator = torch.nn.Linear(5, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        self.student.bias.requires_grad_(False)

    def trained(self):
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]


def _sharded_run(seed: int = 0, steps: int = 2):
    model = _Tiny(seed)
    opt = torch.optim.AdamW([{"params": [p for _, p in model.trained()], "lr_mult": 1.0}], lr=1e-2,
                            weight_decay=0.1, betas=(0.8, 0.9))
    for i in range(steps):
        model.recalibrator(model.student(torch.full((2, 3), float(i + 1)))).square().sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _save_sharded(root, model, opt, step=2):
    from genrecal.train.checkpoint import save_sharded_checkpoint

    names = [n for n, _ in model.trained()]
    return save_sharded_checkpoint(root, step, model=model, optimizer=opt, names=names,
                                   trainer={"step": step, "world_size": 1},
                                   sampler={"epoch": 0, "position": 2}, rng=RngState.capture())


def test_sharded_checkpoint_round_trips_bitwise_through_safetensors_only(tmp_path, monkeypatch):
    import genrecal.train.checkpoint as checkpoint
    from genrecal.train.checkpoint import (checkpoint_layout, read_sharded_checkpoint,
                                           restore_sharded_checkpoint)

    monkeypatch.setattr(checkpoint, "SHARD_FILE_BYTES", 64)  # 16 floats per file: several files
    model, opt = _sharded_run()
    path = _save_sharded(tmp_path, model, opt)
    assert latest_checkpoint(tmp_path) == path and checkpoint_layout(path) == "sharded"
    assert {p.suffix for p in path.rglob("*") if p.is_file()} == {".json", ".safetensors"}  # no pickle
    assert len(list((path / "sharded").iterdir())) > 3
    header = read_sharded_checkpoint(path)
    assert header.trainer["step"] == 2 and header.sampler == {"epoch": 0, "position": 2}
    assert header.world_size == 1 and header.rng is not None
    fresh, fresh_opt = _sharded_run(seed=5, steps=0)
    restore_sharded_checkpoint(path, model=fresh, optimizer=fresh_opt,
                               names=[n for n, _ in fresh.trained()])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()) if a.requires_grad)
    assert not torch.equal(model.student.bias, fresh.student.bias)  # frozen: not in the checkpoint
    with torch.no_grad():
        fresh.student.bias.copy_(model.student.bias)  # (the frozen parts come from the stage inputs)
    assert fresh_opt.param_groups[0]["betas"] == (0.8, 0.9) and fresh_opt.param_groups[0]["lr_mult"] == 1.0
    for (_, a), (_, b) in zip(model.trained(), fresh.trained()):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[a][key], fresh_opt.state[b][key])
    for m, o in ((model, opt), (fresh, fresh_opt)):  # one more identical step on each
        m.recalibrator(m.student(torch.ones(2, 3))).sum().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()) if a.requires_grad)


def test_sharded_checkpoints_refuse_damage_and_the_other_layout(tmp_path):
    from genrecal.train.checkpoint import read_sharded_checkpoint, restore_sharded_checkpoint

    model, opt = _sharded_run()
    path = _save_sharded(tmp_path / "s", model, opt)
    with pytest.raises(CheckpointError, match="is sharded"):
        load_checkpoint(path)
    names = [n for n, _ in model.trained()]
    with pytest.raises(CheckpointError, match="other trainable parameters"):
        restore_sharded_checkpoint(path, model=model, optimizer=opt, names=names[:1])
    next((path / "sharded").iterdir()).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        read_sharded_checkpoint(path)
    params = _params()
    full = save_checkpoint(tmp_path / "f", 1, _data(params, _trained_optimizer(params)))
    with pytest.raises(CheckpointError, match="not sharded"):
        read_sharded_checkpoint(full)
    crashed = tmp_path / "s" / ".tmp-step-00000003"  # a sharded save killed before its rename
    shutil.copytree(tmp_path / "s" / "step-00000002", crashed)
    assert latest_checkpoint(tmp_path / "s") == path
