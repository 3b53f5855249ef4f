"""Atomic training checkpoints: safetensors for tensors, JSON for the rest, never pickle.

Layout under a stage's ``checkpoints/`` directory::

    step-00000040/
        trainer.json            format, step, schedule, counters, stage config, parameter names,
                                optimizer param groups and non-tensor optimizer state
        weights.safetensors     the trainable parameters, by name ("student.<name>",
                                "recalibrator.<name>")
        optimizer.safetensors   the optimizer's tensor state, key "<param name>::<state key>"
        rank-00000.json         per rank: sampler state, python / numpy RNG (non-tensor part)
        rank-00000.safetensors  per rank: torch CPU (and CUDA) RNG, numpy MT19937 key
    latest                      name of the newest complete checkpoint

Atomicity. Everything is written into ``.tmp-step-XXXXXXXX/`` and renamed into place in one
``os.replace`` once every rank has written its files; ``latest`` is replaced the same way
afterwards. A run killed at any moment leaves the previous checkpoint intact, and a partial
directory is never read (:func:`latest_checkpoint` also ignores ``.tmp-*`` and directories
without ``trainer.json``).

Under DDP every rank calls :func:`save_checkpoint` with a ``barrier``; rank 0 writes the shared
files (the trainable weights and optimizer state are identical on every rank), each rank its
own RNG and sampler state; the directory must be on a file system all ranks share.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from genrecal.common.atomic import fsync_path, replace_dir, write_text_atomic
from genrecal.train.errors import CheckpointError

FORMAT = "genrecal.train.checkpoint"
VERSION = 1
TRAINER = "trainer.json"
WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.safetensors"
LATEST = "latest"
_PREFIX = "step-"
_TMP_PREFIX = ".tmp-"
_SEP = "::"


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def _rank_files(rank: int) -> tuple[str, str]:
    return f"rank-{rank:05d}.json", f"rank-{rank:05d}.safetensors"


def _no_barrier() -> None:
    return None


# ==============================================================================================
# RNG state
# ==============================================================================================

@dataclass(frozen=True)
class RngState:
    """Every global RNG a training step may draw from (dropout, sampling, augmentations).

    torch_cpu: uint8 tensor (``torch.get_rng_state``); cuda: one uint8 tensor per device;
    python: ``random.getstate()`` as JSON lists; numpy: ``np.random.get_state()`` with its
    MT19937 key as an int64 tensor [624].
    """

    torch_cpu: torch.Tensor
    cuda: tuple[torch.Tensor, ...]
    python: list
    numpy_key: torch.Tensor
    numpy_rest: list

    @classmethod
    def capture(cls) -> RngState:
        cuda = tuple(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else ()
        version, internal, gauss = random.getstate()
        name, key, pos, has_gauss, cached = np.random.get_state()
        return cls(torch_cpu=torch.get_rng_state(), cuda=cuda,
                   python=[version, list(internal), gauss],
                   numpy_key=torch.from_numpy(key.astype(np.int64)),
                   numpy_rest=[name, int(pos), int(has_gauss), float(cached)])

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.cuda:
            seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if seen < len(self.cuda):
                raise CheckpointError(
                    f"the checkpoint holds the RNG state of {len(self.cuda)} CUDA device(s) but "
                    f"this process sees {seen}; resume on the same kind of machine.")
            torch.cuda.set_rng_state_all(list(self.cuda))
        version, internal, gauss = self.python
        random.setstate((version, tuple(internal), gauss))
        name, pos, has_gauss, cached = self.numpy_rest
        key = self.numpy_key.numpy().astype(np.uint32)
        np.random.set_state((name, key, pos, has_gauss, cached))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"torch_cpu": self.torch_cpu, "numpy_key": self.numpy_key}
        out.update({f"cuda_{i}": t for i, t in enumerate(self.cuda)})
        return out

    def meta(self) -> dict[str, Any]:
        return {"python": self.python, "numpy_rest": self.numpy_rest, "n_cuda": len(self.cuda)}

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> RngState:
        cuda = tuple(tensors[f"cuda_{i}"] for i in range(int(meta["n_cuda"])))
        return cls(torch_cpu=tensors["torch_cpu"], cuda=cuda, python=meta["python"],
                   numpy_key=tensors["numpy_key"], numpy_rest=meta["numpy_rest"])


# ==============================================================================================
# Optimizer state <-> tensors + JSON
# ==============================================================================================

def flatten_optimizer(state: dict[str, Any], names: list[str]
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` -> (tensors keyed "<param name>::<key>", JSON-able rest).

    names: the parameter names in optimizer order (index i of the state dict = names[i]).
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in state["state"].items():
        name = names[int(index)]
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}{_SEP}{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(name, {})[key] = value
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                        names: list[str]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer` for the parameters ``names`` (optimizer order)."""
    index = {name: i for i, name in enumerate(names)}
    state: dict[int, dict[str, Any]] = {}
    for flat, value in tensors.items():
        name, _, key = flat.rpartition(_SEP)
        if name not in index:
            raise CheckpointError(f"optimizer state names parameter {name!r}, which this stage "
                                  "does not train; resume with the same stage config.")
        state.setdefault(index[name], {})[key] = value
    for name, values in meta["scalars"].items():
        state.setdefault(index[name], {}).update(values)
    groups = []
    for g in meta["param_groups"]:
        group = {k: tuple(v) if k == "betas" else v for k, v in g.items() if k != "params"}
        groups.append({**group, "params": [index[n] for n in g["params"]]})
    return {"state": state, "param_groups": groups}


# ==============================================================================================
# Save
# ==============================================================================================

@dataclass(frozen=True)
class CheckpointData:
    """What one rank saves / what a resume restores.

    weights: trainable parameters by name; optimizer: ``optimizer.state_dict()``; names: the
    optimizer's parameter names in order; trainer: JSON-able loop state (step, schedule,
    counters, stage config); sampler: this rank's sampler state dict; rng: this rank's RNGs.
    """

    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    names: list[str]
    trainer: dict[str, Any]
    sampler: dict[str, Any]
    rng: RngState


def _write_json(path: Path, data: Any) -> None:
    with path.open("w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())


def _write_shared(tmp: Path, data: CheckpointData) -> None:
    weights = {k: v.detach().contiguous().cpu() for k, v in data.weights.items()}
    save_file(weights, str(tmp / WEIGHTS), metadata={"format": FORMAT})
    opt_tensors, opt_meta = flatten_optimizer(data.optimizer, data.names)
    save_file(opt_tensors, str(tmp / OPTIMIZER), metadata={"format": FORMAT})
    for name in (WEIGHTS, OPTIMIZER):
        fsync_path(tmp / name)
    _write_json(tmp / TRAINER, {"format": FORMAT, "version": VERSION, "names": data.names,
                                "optimizer": opt_meta, "trainer": data.trainer})


def _write_rank(tmp: Path, data: CheckpointData, rank: int) -> None:
    json_name, tensor_name = _rank_files(rank)
    save_file(data.rng.tensors(), str(tmp / tensor_name), metadata={"format": FORMAT})
    fsync_path(tmp / tensor_name)
    _write_json(tmp / json_name, {"sampler": data.sampler, "rng": data.rng.meta()})


def _write_latest(root: Path, name: str) -> None:
    write_text_atomic(root / LATEST, name + "\n")
    fsync_path(root)


def save_checkpoint(root: str | Path, step: int, data: CheckpointData, *, rank: int = 0,
                    world_size: int = 1, barrier: Callable[[], None] = _no_barrier) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically (every rank calls this).

    Returns the final directory ``root/step-XXXXXXXX``. ``barrier`` synchronises the ranks
    (``torch.distributed.barrier``); single-process runs leave it out.
    """
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f"{_TMP_PREFIX}{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    _write_rank(tmp, data, rank)
    if rank == 0:
        _write_shared(tmp, data)
    barrier()
    if rank == 0:
        _check_complete(tmp, world_size)
        replace_dir(tmp, final, prefix=f"{_TMP_PREFIX}old-{final.name}-")
        _write_latest(root, final.name)
    barrier()
    return final


def prune_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (``keep <= 0``: keep them all)
    and stale temporary directories; returns what was deleted."""
    root = Path(root)
    removed = _complete_checkpoints(root)[:-keep] if keep > 0 else []
    removed += [p for p in root.glob(f"{_TMP_PREFIX}*") if p.is_dir()]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


# ==============================================================================================
# Load
# ==============================================================================================

def _complete_checkpoints(root: Path) -> list[Path]:
    found = [p for p in root.glob(f"{_PREFIX}*") if p.is_dir() and (p / TRAINER).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (the one ``latest`` names), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text(encoding="utf-8").strip()
        if named.name.startswith(_PREFIX) and (named / TRAINER).is_file():
            return named
    complete = _complete_checkpoints(root)
    return complete[-1] if complete else None


def _check_complete(directory: Path, world_size: int) -> None:
    ranks = [name for r in range(world_size) for name in _rank_files(r)]
    expected = [TRAINER, WEIGHTS, OPTIMIZER, *ranks]
    missing = [name for name in expected if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is incomplete: missing {missing}; it was "
                              "written by another number of processes or damaged. Resume with the "
                              "same world size, or delete it to restart from the previous one.")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}; the checkpoint is damaged, delete it "
                              "to resume from the previous one.") from exc


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}; the checkpoint is damaged, delete it "
                              "to resume from the previous one.") from exc


def load_checkpoint(directory: str | Path, *, rank: int = 0, world_size: int = 1) -> CheckpointData:
    """Read checkpoint ``directory`` as seen by ``rank`` (its own RNG and sampler state)."""
    directory = Path(directory)
    if not (directory / TRAINER).is_file():
        _check_complete(directory, world_size)
    meta = _read_json(directory / TRAINER)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{directory / TRAINER} is not a {FORMAT} v{VERSION} file; it was "
                              "written by another program or genrecal version.")
    saved_world = meta["trainer"].get("world_size", 1)
    if saved_world != world_size:
        raise CheckpointError(f"checkpoint {directory} was written by {saved_world} process(es) "
                              f"but this run has {world_size}; resume with the same number of "
                              "processes (the data order depends on it).")
    _check_complete(directory, world_size)
    names = list(meta["names"])
    optimizer = unflatten_optimizer(_read_tensors(directory / OPTIMIZER), meta["optimizer"], names)
    json_name, tensor_name = _rank_files(rank)
    rank_meta = _read_json(directory / json_name)
    rng = RngState.from_parts(_read_tensors(directory / tensor_name), rank_meta["rng"])
    return CheckpointData(weights=_read_tensors(directory / WEIGHTS), optimizer=optimizer,
                          names=names, trainer=meta["trainer"], sampler=rank_meta["sampler"],
                          rng=rng)


def restore_weights(params: list[tuple[str, torch.nn.Parameter]],
                    weights: dict[str, torch.Tensor], where: str | Path) -> None:
    """Copy saved weights into the trainable parameters (names, shapes and dtypes must match)."""
    names = [n for n, _ in params]
    missing, extra = sorted(set(names) - set(weights)), sorted(set(weights) - set(names))
    if missing or extra:
        raise CheckpointError(f"checkpoint {where} holds other trainable parameters than this "
                              f"stage (missing {missing[:5]}, unexpected {extra[:5]}); resume "
                              "with the stage config it was written with.")
    with torch.no_grad():
        for name, param in params:
            saved = weights[name]
            if saved.shape != param.shape or saved.dtype != param.dtype:
                raise CheckpointError(f"checkpoint {where}: parameter {name} is "
                                      f"{saved.dtype} {tuple(saved.shape)} but the model has "
                                      f"{param.dtype} {tuple(param.shape)}; resume with the same "
                                      "student and precision settings.")
            param.copy_(saved)
