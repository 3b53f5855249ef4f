"""The teacher fingerprint: which teacher (config, weights, tokenizer) a cache was written for.

- config: sha256 of the canonical JSON of the config dict, without keys that name a path or a
  library version (``_name_or_path``, ``transformers_version``, ``_commit_hash``) at any depth;
- weights: an identity digest of the weight files (name, size, safetensors header and 16
  sampled 64 KiB blocks per file) or of in-memory tensors (names, shapes, dtypes, content).
  It tells teachers apart cheaply; it is not a full integrity check of a 100 GB checkpoint;
- tokenizer: sha256 over the tokenizer files (sorted names, sizes, bytes).

A reader given an expected fingerprint refuses a cache whose fingerprint differs, naming both.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from genrecal.store.schema import TeacherFingerprint, canonical_json

VOLATILE_CONFIG_KEYS = frozenset({"_name_or_path", "name_or_path", "transformers_version", "_commit_hash"})
WEIGHT_SUFFIXES = (".safetensors", ".bin")
"""Files whose identity is the weights component of the fingerprint."""
_SAMPLE_BLOCKS = 16
_BLOCK = 1 << 16


def _strip_volatile(obj):
    if isinstance(obj, Mapping):
        return {k: _strip_volatile(v) for k, v in obj.items() if k not in VOLATILE_CONFIG_KEYS}
    if isinstance(obj, (list, tuple)):
        return [_strip_volatile(v) for v in obj]
    return obj


def config_hash(config: Mapping) -> str:
    """sha256 of a model config dict (e.g. ``PretrainedConfig.to_dict()``), paths/versions dropped."""
    return hashlib.sha256(canonical_json(_strip_volatile(config))).hexdigest()


def tokenizer_files(source: Mapping[str, bytes] | str | Path) -> dict[str, bytes]:
    """Tokenizer files as ``{name: bytes}`` from a mapping or a directory (regular files only)."""
    if isinstance(source, Mapping):
        return {str(k): bytes(v) for k, v in source.items()}
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"tokenizer directory {root} does not exist")
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def tokenizer_hash(source: Mapping[str, bytes] | str | Path) -> str:
    """sha256 over the tokenizer files: sorted names, each name and content length-prefixed."""
    h = hashlib.sha256()
    for name, data in sorted(tokenizer_files(source).items()):
        for piece in (name.encode(), data):
            h.update(len(piece).to_bytes(8, "little"))
            h.update(piece)
    return h.hexdigest()


def _file_identity(h, path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        if path.suffix == ".safetensors" and size >= 8:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(n, size - 8)))
        for i in range(_SAMPLE_BLOCKS):
            f.seek(max(0, size - _BLOCK) * i // max(1, _SAMPLE_BLOCKS - 1))
            h.update(f.read(_BLOCK))


def weights_identity_files(paths: list[str | os.PathLike]) -> str:
    """Identity digest of weight files (order-independent; see the module docstring)."""
    h = hashlib.sha256(b"files")
    for path in sorted(Path(p) for p in paths):
        _file_identity(h, path)
    return h.hexdigest()


def weight_files(location: str | os.PathLike, revision: str | None = None) -> list[Path]:
    """A checkpoint's weight files: a local directory, or a hub id already in the local hub cache.

    Empty when the checkpoint is not on this machine (e.g. a training node that never held the
    teacher): the weights identity cannot be taken from files there.
    """
    root = Path(location)
    if not root.is_dir():
        try:
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(str(location), revision=revision, local_files_only=True))
        except Exception:  # noqa: BLE001 -- not in the local hub cache: no files to hash
            return []
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def weights_identity_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """Identity digest of in-memory weights: every tensor's name, shape, dtype and bytes."""
    h = hashlib.sha256(b"tensors")
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def teacher_fingerprint(config: Mapping, weights: str, tokenizer: Mapping[str, bytes] | str | Path) -> TeacherFingerprint:
    """The fingerprint of a teacher from its config dict, weights identity digest and tokenizer."""
    return TeacherFingerprint(config=config_hash(config), weights=weights, tokenizer=tokenizer_hash(tokenizer))


def fingerprint_mismatches(found: TeacherFingerprint, expected: TeacherFingerprint | Mapping) -> list[tuple[str, str, str]]:
    """``(component, found, expected)`` for every component that differs.

    ``expected`` may be a mapping naming only some components (e.g. ``{"tokenizer": h}``).
    """
    wanted = expected.model_dump() if isinstance(expected, TeacherFingerprint) else dict(expected)
    unknown = set(wanted) - {"config", "weights", "tokenizer"}
    if unknown:
        raise ValueError(f"expected fingerprint: unknown components {sorted(unknown)}")
    return [(k, getattr(found, k), v) for k, v in wanted.items() if v is not None and getattr(found, k) != v]
