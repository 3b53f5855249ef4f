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

Sharded checkpoints (``parallel: fsdp``, :func:`save_sharded_checkpoint`): the trainable
weights and the AdamW states live as shards on the ranks, so every rank writes its own shards
with ``torch.distributed.checkpoint`` (DCP) into ``sharded/``, through DCP's safetensors storage
(``HuggingFaceStorageWriter(save_distributed=True)``: one ``shard-<rank>-...safetensors`` per
writing rank, each tensor chunk with its global offsets in the file's metadata; DCP's default
``.metadata`` file is a pickle, this storage writes none and its reader rebuilds the layout from
the safetensors headers, so nothing is ever unpickled)::

    step-00000040/
        trainer.json            layout "sharded", parameter names, the optimizer's JSON part
                                (param-group hyper-parameters), the loop state, the DCP files
        sharded/                DCP: "model.<param name>" and "optim.state.<param name>.<key>",
                                shard-<rank>-model-<k>-of-<n>.safetensors, n files of at most
                                SHARD_FILE_BYTES of the global tensors
        rank-00000.json / .safetensors   per rank, as above

Same atomicity (``.tmp-step-*`` renamed once every rank has written). DCP reshards on load:
:func:`restore_sharded_checkpoint` reads the weights and AdamW states into the current ranks'
shards whatever world size wrote them (plain tensors in a single process);
:func:`read_sharded_checkpoint` reads the loop state. At the same world size each rank restores
its own sampler and RNG states (bitwise resume); at another world size the ranks get rank 0's
sampler state (:meth:`genrecal.train.sampler.BatchPlan.resume` turns it into the global
position) and no RNG state.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import warnings
from collections.abc import Callable, Iterator
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
SHARDED = "sharded"
#: trainer.json "layout": the full weights in one file (DDP, one process) or DCP shards (FSDP).
LAYOUT_FULL, LAYOUT_SHARDED = "full", "sharded"
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


def _fresh_tmp(root: Path, step: int, rank: int, sub: str = "") -> tuple[Path, Path]:
    """(final directory, empty temporary directory) of checkpoint ``step``; rank 0 (re)creates
    the temporary one (with ``sub`` inside), every rank then waits at the caller's barrier."""
    final = root / checkpoint_name(step)
    tmp = root / f"{_TMP_PREFIX}{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / sub).mkdir(parents=True)
    return final, tmp


def save_checkpoint(root: str | Path, step: int, data: CheckpointData, *, rank: int = 0,
                    world_size: int = 1, barrier: Callable[[], None] = _no_barrier) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically (every rank calls this).

    Returns the final directory ``root/step-XXXXXXXX``. ``barrier`` synchronises the ranks
    (``torch.distributed.barrier``); single-process runs leave it out.
    """
    final, tmp = _fresh_tmp(Path(root), step, rank)
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
    if meta.get("layout", LAYOUT_FULL) != LAYOUT_FULL:
        raise CheckpointError(f"checkpoint {directory} is sharded (written with parallel: fsdp); "
                              "resume it with the stage config it was written with.")
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


# ==============================================================================================
# Sharded checkpoints (FSDP): torch.distributed.checkpoint into safetensors shards
# ==============================================================================================

_MODEL_KEY, _OPTIM_KEY = "model.", "optim."
#: Global bytes per DCP file of a sharded checkpoint (each rank writes about 1/world of them).
SHARD_FILE_BYTES = 1 << 30


def _file_index(tensors: dict[str, torch.Tensor], limit: int) -> dict[str, int]:
    """Keys -> file number (1-based), in order, each file holding at most ``limit`` bytes of the
    global tensors (a larger tensor alone). The same on every rank: it reads global shapes only."""
    index, number, size = {}, 1, 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if size and size + nbytes > limit:
            number, size = number + 1, 0
        index[key] = number
        size += nbytes
    return index


@contextlib.contextmanager
def _single_process_quietly() -> Iterator[None]:
    """DCP warns on every save / load without a process group; one process is a normal case."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def checkpoint_layout(directory: str | Path) -> str:
    """``"full"`` or ``"sharded"``: how the checkpoint ``directory`` stores the weights."""
    meta = _read_json(Path(directory) / TRAINER)
    return meta.get("layout", LAYOUT_FULL) if isinstance(meta, dict) else LAYOUT_FULL


def _flat_optimizer_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def _split_optimizer(flat: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """DCP's flattened optimizer state dict -> (tensors, JSON-able rest: the param-group
    hyper-parameters per parameter)."""
    tensors = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
    rest = {k: list(v) if isinstance(v, tuple) else v for k, v in flat.items() if k not in tensors}
    return tensors, rest


def _json_value(key: str, value: Any) -> Any:
    return tuple(value) if key.rsplit(".", 1)[-1] == "betas" and isinstance(value, list) else value


def save_sharded_checkpoint(root: str | Path, step: int, *, model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer, names: list[str],
                            trainer: dict[str, Any], sampler: dict[str, Any], rng: RngState,
                            rank: int = 0, world_size: int = 1,
                            barrier: Callable[[], None] = _no_barrier) -> Path:
    """Write sharded checkpoint ``step`` under ``root`` atomically (every rank calls this).

    model: the (FSDP-wrapped, or plain in one process) module whose parameters named ``names``
    train; optimizer: its AdamW. Each rank writes its own shards of the weights and optimizer
    states (DCP), its sampler and RNG states; rank 0 writes trainer.json and renames the
    directory into place once every rank is done. Returns ``root/step-XXXXXXXX``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    final, tmp = _fresh_tmp(Path(root), step, rank, SHARDED)
    barrier()
    by_name = dict(model.named_parameters())
    tensors: dict[str, torch.Tensor] = {_MODEL_KEY + n: by_name[n] for n in names}
    opt_tensors, opt_rest = _split_optimizer(get_optimizer_state_dict(
        model, optimizer, options=_flat_optimizer_options()))
    tensors.update({_OPTIM_KEY + k: v for k, v in opt_tensors.items()})
    # a collective: every rank writes its shards (a replicated tensor once), then all return
    # DCP's safetensors writer serialises a whole file in memory before writing it: files of at
    # most SHARD_FILE_BYTES (of the global tensors; a rank writes its 1/world part) bound that copy
    writer = HuggingFaceStorageWriter(str(tmp / SHARDED), save_distributed=True,
                                      fqn_to_index_mapping=_file_index(tensors, SHARD_FILE_BYTES))
    with _single_process_quietly():
        dcp.save(tensors, storage_writer=writer)
    _write_rank(tmp, CheckpointData(weights={}, optimizer={}, names=names, trainer=trainer,
                                    sampler=sampler, rng=rng), rank)
    barrier()
    if rank == 0:
        files = sorted(p.name for p in (tmp / SHARDED).iterdir())
        for name in files:
            fsync_path(tmp / SHARDED / name)
        _write_json(tmp / TRAINER, {"format": FORMAT, "version": VERSION, "layout": LAYOUT_SHARDED,
                                    "names": list(names), "optimizer": {"flat": opt_rest},
                                    "sharded_files": files, "trainer": trainer})
        _check_complete_sharded(tmp, world_size)
        replace_dir(tmp, final, prefix=f"{_TMP_PREFIX}old-{final.name}-")
        _write_latest(root, final.name)
    barrier()
    return final


def _check_complete_sharded(directory: Path, world_size: int) -> None:
    meta = _read_json(directory / TRAINER)
    ranks = [name for r in range(world_size) for name in _rank_files(r)]
    expected = [*ranks, *(f"{SHARDED}/{n}" for n in meta.get("sharded_files", []))]
    missing = [name for name in expected if not (directory / name).is_file()]
    if missing or not meta.get("sharded_files"):
        raise CheckpointError(f"sharded checkpoint {directory} is incomplete: missing "
                              f"{missing or [SHARDED + '/*.safetensors']}; it was damaged. Delete it to "
                              "restart from the previous one.")


@dataclass(frozen=True)
class CheckpointHeader:
    """The loop state of a checkpoint (:func:`read_sharded_checkpoint`; the trainer builds one
    from a full checkpoint too), without the model's tensors.

    trainer: the loop state; sampler: this rank's sampler state dict (rank 0's when the world
    size changed); rng: this rank's RNG states, None when the world size changed; world_size:
    the number of processes that wrote the checkpoint.
    """

    trainer: dict[str, Any]
    sampler: dict[str, Any]
    rng: RngState | None
    world_size: int


def read_sharded_checkpoint(directory: str | Path, *, rank: int = 0,
                           world_size: int = 1) -> CheckpointHeader:
    """The loop state of sharded checkpoint ``directory`` as seen by ``rank`` of ``world_size``
    (no tensor of the model is read: :func:`restore_sharded_checkpoint` does that)."""
    directory = Path(directory)
    meta = _read_sharded_meta(directory)
    saved_world = int(meta["trainer"].get("world_size", 1))
    _check_complete_sharded(directory, saved_world)
    same = saved_world == world_size
    json_name, tensor_name = _rank_files(rank if same else 0)
    rank_meta = _read_json(directory / json_name)
    rng = RngState.from_parts(_read_tensors(directory / tensor_name), rank_meta["rng"]) if same else None
    return CheckpointHeader(trainer=meta["trainer"], sampler=rank_meta["sampler"], rng=rng,
                         world_size=saved_world)


def _read_sharded_meta(directory: Path) -> dict[str, Any]:
    meta = _read_json(directory / TRAINER)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{directory / TRAINER} is not a {FORMAT} v{VERSION} file; it was "
                              "written by another program or genrecal version.")
    if meta.get("layout") != LAYOUT_SHARDED:
        raise CheckpointError(f"checkpoint {directory} is not sharded (written with parallel: ddp or "
                              "before FSDP); resume it with the stage config it was written with.")
    return meta


def restore_sharded_checkpoint(directory: str | Path, *, model: torch.nn.Module,
                               optimizer: torch.optim.Optimizer, names: list[str]) -> None:
    """Load sharded checkpoint ``directory`` into ``model``'s trainable parameters ``names``
    and ``optimizer`` (every rank calls this; DCP reshards to this run's world size, plain
    tensors in one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    directory = Path(directory)
    meta = _read_sharded_meta(directory)
    if list(meta["names"]) != list(names):
        missing, extra = sorted(set(names) - set(meta["names"])), sorted(set(meta["names"]) - set(names))
        raise CheckpointError(f"checkpoint {directory} holds other trainable parameters than this "
                              f"stage (missing {missing[:5]}, unexpected {extra[:5]}); resume "
                              "with the stage config it was written with.")
    # the optimizer's state tensors must exist to be loaded into: DCP initialises them with a
    # step at learning rate 0 (weights unchanged), then the load overwrites every value
    flat = get_optimizer_state_dict(model, optimizer, options=_flat_optimizer_options())
    opt_tensors, _ = _split_optimizer(flat)
    by_name = dict(model.named_parameters())
    dest: dict[str, torch.Tensor] = {_MODEL_KEY + n: by_name[n] for n in names}
    dest.update({_OPTIM_KEY + k: v for k, v in opt_tensors.items()})
    try:
        with torch.no_grad(), _single_process_quietly():
            dcp.load(dest, storage_reader=HuggingFaceStorageReader(str(directory / SHARDED)))
    except Exception as exc:  # DCP wraps the ranks' errors (a missing key, a damaged file)
        raise CheckpointError(f"cannot read the shards of checkpoint {directory}: {exc}; it is "
                              "damaged or belongs to another model; delete it to resume from the "
                              "previous one.") from exc
    flat.update({k: _json_value(k, v) for k, v in meta["optimizer"]["flat"].items()})
    set_optimizer_state_dict(model, optimizer, flat, options=_flat_optimizer_options())
