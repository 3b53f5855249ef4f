"""Teacher artifacts: what the trainer needs of the teacher besides the cached tensors.

Under ``teacher/`` in a cache:

- ``config.json``: the teacher config dict;
- ``tokenizer/<name>``: the tokenizer files;
- ``head.safetensors`` (``weight`` [V, d], optional ``bias`` [V]) + ``head.json`` (the
  :class:`~genrecal.store.logit_transform.LogitTransform`, sizes): ``logits = transform(z W^T + b)``
  turns a cached post-norm hidden state z into the teacher's exact logits (docs/method.md §1.3:
  the KL target is computed exactly from the cached z_al and head_l);
- ``embeddings.safetensors``: rows of the teacher input embedding (``ids`` int64 [m], ``rows``
  [m, d]) for the token ids that occur in cached answers (GenRecal's alternative answer input).

The functions take plain tensors and dicts; extract glues them to the model. The manifest lists
these files with sizes and checksums (commit), and the loaders verify them when it exists.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from genrecal.store.errors import CacheFormatError, CacheIntegrityError
from genrecal.store.fingerprint import tokenizer_files as _tokenizer_files
from genrecal.store.logit_transform import LogitTransform
from genrecal.store.manifest import load_manifest
from genrecal.store.schema import MANIFEST, TEACHER_DIR, Manifest, check_relpath
from genrecal.store.storage import CacheStorage

CONFIG = f"{TEACHER_DIR}/config.json"
TOKENIZER_DIR = f"{TEACHER_DIR}/tokenizer"
HEAD = f"{TEACHER_DIR}/head.safetensors"
HEAD_INFO = f"{TEACHER_DIR}/head.json"
EMBEDDINGS = f"{TEACHER_DIR}/embeddings.safetensors"


@dataclass(frozen=True)
class TeacherHead:
    """The teacher's head: weight [V, d], bias [V] or None, and the logit transform."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    transform: LogitTransform

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    def logits(self, z: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """z: float [..., d] post-norm hidden states -> the teacher's logits [..., V] in ``dtype``."""
        if z.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden states have width {z.shape[-1]}, the teacher head expects {self.hidden_size}")
        w = self.weight.to(device=z.device, dtype=dtype)
        b = None if self.bias is None else self.bias.to(device=z.device, dtype=dtype)
        return self.transform.apply(F.linear(z.to(dtype), w, b))


@dataclass(frozen=True)
class TeacherEmbeddings:
    """Rows of the teacher's input embedding: ids int64 [m] (sorted, unique), rows [m, d]."""

    ids: torch.Tensor
    rows: torch.Tensor

    def lookup(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids: int [...] -> rows [..., d]; KeyError naming ids that were not cached."""
        pos = torch.searchsorted(self.ids, token_ids.reshape(-1).long()).clamp_max(max(len(self.ids) - 1, 0))
        found = self.ids[pos] == token_ids.reshape(-1) if len(self.ids) else torch.zeros(token_ids.numel(), dtype=torch.bool)
        if not found.all():
            missing = token_ids.reshape(-1)[~found].unique()[:10].tolist()
            raise KeyError(f"token ids {missing} have no cached teacher embedding row; re-extract with "
                           f"these ids in the embedding artifact")
        return self.rows[pos].reshape(*token_ids.shape, self.rows.shape[1])


def _storage(root) -> CacheStorage:
    return root if isinstance(root, CacheStorage) else CacheStorage(root)


# ----------------------------------------------------------------------------- writing


def write_teacher_artifacts(root, *, config: Mapping, tokenizer_files: Mapping[str, bytes] | str | Path,
                            lm_head_weight: torch.Tensor, lm_head_bias: torch.Tensor | None,
                            logit_transform: LogitTransform, embedding_ids: torch.Tensor | None = None,
                            embedding_rows: torch.Tensor | None = None) -> list[str]:
    """Write the teacher artifacts under ``root/teacher/``; returns the relative paths written.

    lm_head_weight: float [V, d]; lm_head_bias: float [V] or None (must agree with
    ``logit_transform.has_bias``); embedding_ids: int [m] unique token ids; embedding_rows:
    float [m, d] their input-embedding rows (both or neither).
    """
    storage = _storage(root)
    _check_head(lm_head_weight, lm_head_bias, logit_transform)
    written = [CONFIG]
    storage.write_bytes(CONFIG, json.dumps(dict(config), indent=1, sort_keys=True, default=str).encode())
    written += write_tokenizer_files(storage, tokenizer_files)
    head = {"weight": lm_head_weight.detach().cpu().contiguous()}
    if lm_head_bias is not None:
        head["bias"] = lm_head_bias.detach().cpu().contiguous()
    storage.write_bytes(HEAD, st_save(head))
    info = {"logit_transform": logit_transform.to_dict(), "vocab_size": int(lm_head_weight.shape[0]),
            "hidden_size": int(lm_head_weight.shape[1]), "dtype": str(lm_head_weight.dtype).removeprefix("torch.")}
    storage.write_bytes(HEAD_INFO, json.dumps(info, indent=1).encode())
    written += [HEAD, HEAD_INFO]
    if embedding_ids is not None or embedding_rows is not None:
        written.append(write_teacher_embeddings(storage, embedding_ids, embedding_rows, int(lm_head_weight.shape[1])))
    return written


def _check_head(weight: torch.Tensor, bias: torch.Tensor | None, transform: LogitTransform) -> None:
    if weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError(f"lm_head_weight must be a float [V, d] tensor, got {tuple(weight.shape)} {weight.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"lm_head_bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if transform.has_bias != (bias is not None):
        raise ValueError(f"logit_transform.has_bias={transform.has_bias} but lm_head_bias is "
                         f"{'given' if bias is not None else 'None'}; make them agree")


def write_tokenizer_files(root, files: Mapping[str, bytes] | str | Path) -> list[str]:
    """Write tokenizer files (a ``{name: bytes}`` mapping or a directory) to ``teacher/tokenizer/``."""
    storage = _storage(root)
    written = []
    for name, data in sorted(_tokenizer_files(files).items()):
        if "/" in name:
            raise ValueError(f"tokenizer file name {name!r} must be a plain file name")
        rel = check_relpath(f"{TOKENIZER_DIR}/{name}")
        storage.write_bytes(rel, data)
        written.append(rel)
    if not written:
        raise ValueError("no tokenizer files given; the trainer needs the teacher tokenizer")
    return written


def write_teacher_embeddings(root, ids: torch.Tensor | None, rows: torch.Tensor | None, width: int | None = None) -> str:
    """Write input-embedding rows: ids int [m] (unique), rows float [m, d]; stored sorted by id."""
    if ids is None or rows is None:
        raise ValueError("embedding_ids and embedding_rows must be given together")
    ids = ids.reshape(-1).long()
    if rows.ndim != 2 or rows.shape[0] != ids.numel() or (width is not None and rows.shape[1] != width):
        raise ValueError(f"embedding_rows must be [{ids.numel()}, {width or 'd'}], got {tuple(rows.shape)}")
    if ids.unique().numel() != ids.numel() or (ids.numel() and ids.min() < 0):
        raise ValueError("embedding_ids must be unique non-negative token ids")
    order = torch.argsort(ids)
    data = st_save({"ids": ids[order].contiguous(), "rows": rows.detach().cpu()[order].contiguous()})
    _storage(root).write_bytes(EMBEDDINGS, data)
    return EMBEDDINGS


# ----------------------------------------------------------------------------- reading


def _manifest_or_none(storage: CacheStorage) -> Manifest | None:
    if not storage.exists(MANIFEST):
        return None
    return load_manifest(storage)


def _read_verified(storage: CacheStorage, rel: str, manifest: Manifest | None) -> bytes:
    """File ``rel``; checked against the manifest's size and sha256 when a manifest is given."""
    if not storage.exists(rel):
        raise CacheFormatError(f"{storage.where(rel)} does not exist: the cache has no teacher artifacts; "
                               f"extract writes them with write_teacher_artifacts")
    data = storage.read_bytes(rel)
    if manifest is None:
        return data
    entry = next((a for a in manifest.artifacts if a.path == rel), None)
    if entry is None:
        raise CacheIntegrityError(f"{storage.where(rel)} is not listed in the manifest's artifacts; it was written "
                                  f"after commit: re-run commit_cache")
    if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise CacheIntegrityError(f"{storage.where(rel)} does not match the manifest (size {len(data)} vs "
                                  f"{entry.size}, or checksum differs): restore it or re-extract the teacher artifacts")
    return data


def _manifest_arg(storage: CacheStorage, verify: bool, manifest: Manifest | None) -> Manifest | None:
    if manifest is not None or not verify:
        return manifest
    return _manifest_or_none(storage)


def load_teacher_head(root, *, dtype: torch.dtype | None = None, verify: bool = True,
                      manifest: Manifest | None = None) -> TeacherHead:
    """The teacher head of cache ``root`` (verified against the manifest if there is one)."""
    storage = _storage(root)
    manifest = _manifest_arg(storage, verify, manifest)
    info = json.loads(_read_verified(storage, HEAD_INFO, manifest))
    tensors = st_load(_read_verified(storage, HEAD, manifest))
    transform = LogitTransform.from_dict(info["logit_transform"])
    weight, bias = tensors["weight"], tensors.get("bias")
    if dtype is not None:
        weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
    _check_head(weight, bias, transform)
    return TeacherHead(weight=weight, bias=bias, transform=transform)


def load_teacher_embeddings(root, *, verify: bool = True, manifest: Manifest | None = None) -> TeacherEmbeddings:
    storage = _storage(root)
    tensors = st_load(_read_verified(storage, EMBEDDINGS, _manifest_arg(storage, verify, manifest)))
    return TeacherEmbeddings(ids=tensors["ids"], rows=tensors["rows"])


def load_teacher_config(root, *, verify: bool = True, manifest: Manifest | None = None) -> dict:
    storage = _storage(root)
    return json.loads(_read_verified(storage, CONFIG, _manifest_arg(storage, verify, manifest)))


def load_tokenizer_files(root, *, verify: bool = True, manifest: Manifest | None = None) -> dict[str, bytes]:
    """``{name: bytes}`` of the teacher tokenizer files (write them to a dir to load a tokenizer)."""
    storage = _storage(root)
    manifest = _manifest_arg(storage, verify, manifest)
    return {rel.rsplit("/", 1)[1]: _read_verified(storage, rel, manifest)
            for rel in storage.list_files(TOKENIZER_DIR)}
