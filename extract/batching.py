"""Length-bucketed batching and padding for the teacher pass.

:func:`plan_batches` groups sample indices of similar token length so that padded batches
waste little compute; :func:`pad_batch` turns per-sample processor outputs (batch dim 1) into
one model input dict. Nothing here knows a model: per-family tensors (``pixel_values``,
``image_grid_thw``, ...) are concatenated along dim 0 in sample order, which is how Qwen2-VL
(``[num_patches_total, C]``) and LLaVA (``[num_images, 3, H, W]``) both expect them.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import torch

from genrecal.extract.errors import BatchingError

DEFAULT_BUCKET_SIZE = 1024
"""Samples per sorting window: bounds how far the plan reorders the input (see plan_batches)."""

DEFAULT_SEQUENCE_PAD_VALUES: Mapping[str, int] = {
    "attention_mask": 0, "token_type_ids": 0, "mm_token_type_ids": 0, "labels": -100}
"""Per-token keys padded along the sequence (``input_ids`` is always padded with ``pad_id``)."""

_SIDES = ("right", "left")


# ---------------------------------------------------------------------------- planning


def plan_batches(lengths: Sequence[int], *, batch_size: int, max_tokens: int | None = None,
                 bucket_size: int | None = DEFAULT_BUCKET_SIZE,
                 seed: int | None = None) -> list[list[int]]:
    """Group sample indices into batches of similar length; every index appears exactly once.

    lengths:     token length of each sample (>= 1).
    batch_size:  most samples per batch.
    max_tokens:  if set, most PADDED tokens per batch (``len(batch) * longest``).
    bucket_size: the input is cut into consecutive windows of this many samples (None: one
                 window); each window is sorted longest-first (ties by index) and cut greedily
                 into batches. Larger windows pad less but reorder the input further.
    seed:        None keeps the longest-first order inside each window (the memory peak comes
                 first, so an out-of-memory shows up at once); an int shuffles the batch order
                 inside each window, reproducibly.
    Deterministic for given arguments.
    """
    _check_plan_args(lengths, batch_size, max_tokens, bucket_size)
    window = len(lengths) if bucket_size is None else bucket_size
    rng = None if seed is None else random.Random(seed)
    batches: list[list[int]] = []
    for w0 in range(0, len(lengths), max(window, 1)):
        order = sorted(range(w0, min(w0 + window, len(lengths))), key=lambda i: (-lengths[i], i))
        window_batches = _cut(order, lengths, batch_size, max_tokens)
        if rng is not None:
            rng.shuffle(window_batches)
        batches.extend(window_batches)
    return batches


def _check_plan_args(lengths, batch_size, max_tokens, bucket_size) -> None:
    bad = [i for i, n in enumerate(lengths)
           if isinstance(n, bool) or not isinstance(n, int) or n < 1]
    if bad:
        raise BatchingError(f"plan_batches: lengths must be ints >= 1; bad at sample indices "
                            f"{bad[:5]} (values {[lengths[i] for i in bad[:5]]})")
    for name, value in (("batch_size", batch_size), ("max_tokens", max_tokens),
                        ("bucket_size", bucket_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise BatchingError(f"plan_batches: {name}={value!r} must be an int >= 1")
    if max_tokens is not None:
        too_long = [i for i, n in enumerate(lengths) if n > max_tokens]
        if too_long:
            raise BatchingError(
                f"plan_batches: samples {too_long[:5]} (lengths "
                f"{[lengths[i] for i in too_long[:5]]}) are longer than max_tokens={max_tokens}; "
                "raise max_tokens or drop samples above that length before planning")


def _cut(order: list[int], lengths: Sequence[int], batch_size: int,
         max_tokens: int | None) -> list[list[int]]:
    """Greedy cut of a longest-first index list: a batch's longest sample is its first."""
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        full = len(current) == batch_size
        over = (max_tokens is not None and current
                and (len(current) + 1) * lengths[current[0]] > max_tokens)
        if full or over:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Fraction of padded positions: ``1 - sum(lengths) / sum(len(b) * max length in b)``."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    real = sum(lengths[i] for b in batches for i in b)
    return 0.0 if padded == 0 else 1.0 - real / padded


# ---------------------------------------------------------------------------- padding


def pad_offsets(lengths: Sequence[int], side: str) -> list[int]:
    """Index of each sample's first token in a batch padded by :func:`pad_batch`."""
    _check_side(side)
    longest = max(lengths, default=0)
    return [0 if side == "right" else longest - n for n in lengths]


def pad_batch(samples: Sequence[Mapping[str, torch.Tensor]], pad_id: int, side: str = "right",
              *, sequence_pad_values: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Pad per-sample processor outputs into one batch.

    samples: dicts of tensors with batch dim 1. ``input_ids`` ([1, L] or [L], integer) is
             required; per-token keys (``sequence_pad_values``, default
             :data:`DEFAULT_SEQUENCE_PAD_VALUES`) must have the same length L; a missing
             ``attention_mask`` is taken as all ones. Every other key (``pixel_values``,
             ``image_grid_thw``, ``image_sizes``, ...) is concatenated along dim 0 in sample
             order over the samples that have it (a text-only sample contributes nothing).
    pad_id:  the tokenizer's pad id, used for ``input_ids``.
    side:    "right" or "left" (``pad_offsets`` gives where each sample starts).
    Returns ``input_ids`` / per-token keys as [B, L_max] and the concatenated keys.
    """
    _check_side(side)
    if not samples:
        raise BatchingError("pad_batch: got no samples; plan_batches never yields an empty batch")
    pad_values = dict(DEFAULT_SEQUENCE_PAD_VALUES if sequence_pad_values is None
                      else sequence_pad_values)
    pad_values.setdefault("attention_mask", 0)
    pad_values["input_ids"] = pad_id
    rows = [_normalise_sample(i, s, pad_values) for i, s in enumerate(samples)]
    seq_keys = _common_sequence_keys(rows, pad_values)
    longest = max(r["input_ids"].shape[1] for r in rows)
    out = {k: torch.cat([_pad_row(r[k], longest, pad_values[k], side) for r in rows])
           for k in seq_keys}
    for key in _other_keys(rows, pad_values):
        out[key] = _concat(key, [r[key] for r in rows if key in r])
    return out


def _check_side(side: str) -> None:
    if side not in _SIDES:
        raise BatchingError(f"padding side {side!r} is not one of {_SIDES}")


def _normalise_sample(index: int, sample: Mapping[str, torch.Tensor],
                      pad_values: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Check one sample and give its per-token tensors the shape [1, L]."""
    if "input_ids" not in sample:
        raise BatchingError(f"pad_batch: sample {index} has no 'input_ids' (keys "
                            f"{sorted(sample)}); pass the processor output of each sample")
    row = {}
    for key, value in sample.items():
        if not isinstance(value, torch.Tensor) or value.ndim == 0:
            raise BatchingError(f"pad_batch: sample {index} key {key!r} must be a tensor with "
                                f"at least one dim, got {type(value).__name__}")
        row[key] = _as_row(index, key, value) if key in pad_values else value
    row.setdefault("attention_mask", torch.ones_like(row["input_ids"]))
    length = row["input_ids"].shape[1]
    for key in row.keys() & pad_values.keys():
        if row[key].shape[1] != length:
            raise BatchingError(f"pad_batch: sample {index} key {key!r} has length "
                                f"{row[key].shape[1]} but input_ids has {length}")
    return row


def _as_row(index: int, key: str, value: torch.Tensor) -> torch.Tensor:
    if value.ndim == 1:
        value = value[None]
    if value.ndim != 2 or value.shape[0] != 1:
        raise BatchingError(f"pad_batch: sample {index} key {key!r} must be [1, L] or [L] "
                            f"(one sample per dict), got {tuple(value.shape)}")
    return value


def _common_sequence_keys(rows: list[dict], pad_values: Mapping[str, int]) -> list[str]:
    keys = [k for k in pad_values if k in rows[0]]
    for i, row in enumerate(rows):
        if [k for k in pad_values if k in row] != keys:
            raise BatchingError(f"pad_batch: sample {i} has per-token keys "
                                f"{sorted(row.keys() & pad_values.keys())} but sample 0 has "
                                f"{sorted(keys)}; process every sample with the same processor")
    return keys


def _other_keys(rows: list[dict], pad_values: Mapping[str, int]) -> list[str]:
    """Non-per-token keys in first-seen order."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update((k, None) for k in row if k not in pad_values)
    return list(keys)


def _pad_row(row: torch.Tensor, length: int, value: int, side: str) -> torch.Tensor:
    """row [1, L] -> [1, length], padded with ``value`` on ``side``."""
    pad = row.new_full((1, length - row.shape[1]), value)
    return torch.cat([row, pad] if side == "right" else [pad, row], dim=1)


def _concat(key: str, parts: list[torch.Tensor]) -> torch.Tensor:
    try:
        return torch.cat(parts, dim=0)
    except RuntimeError as exc:
        shapes = [tuple(p.shape) for p in parts]
        raise BatchingError(f"pad_batch: cannot concatenate {key!r} along dim 0, shapes {shapes}; "
                            "all samples must share the trailing dims (same image size / "
                            f"processor settings): {exc}") from exc
