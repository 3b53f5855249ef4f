"""Padding per-sample model inputs into one batch: the one padder of teacher and student inputs.

A processor gives each sample's tensors with batch dim 1. :func:`pad_batch` stacks the
per-token keys (``input_ids`` padded with the tokenizer's pad id, :data:`DEFAULT_SEQUENCE_PAD_VALUES`
for the rest) along a new batch dim and concatenates every other key (``pixel_values``,
``image_grid_thw``, ``image_sizes``...) along dim 0 in sample order, which is how Qwen2-VL
(``[num_patches_total, C]``), LLaVA and Gemma 3 (``[num_images, 3, H, W]``) all take them.
The extraction pass, the live (online) teacher and the student collator all pad through here,
so the teacher sees the same tensors whichever path feeds it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from genrecal.store.errors import PaddingError

DEFAULT_SEQUENCE_PAD_VALUES: Mapping[str, int] = {
    "attention_mask": 0, "token_type_ids": 0, "mm_token_type_ids": 0, "labels": -100}
"""Per-token keys padded along the sequence (``input_ids`` is always padded with ``pad_id``)."""

_SIDES = ("right", "left")


def _check_side(side: str) -> None:
    if side not in _SIDES:
        raise PaddingError(f"padding side {side!r} is not one of {_SIDES}")


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
        raise PaddingError("pad_batch: got no samples; pass at least one sample's processor output")
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


def _normalise_sample(index: int, sample: Mapping[str, torch.Tensor],
                      pad_values: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Check one sample and give its per-token tensors the shape [1, L]."""
    if "input_ids" not in sample:
        raise PaddingError(f"pad_batch: sample {index} has no 'input_ids' (keys "
                            f"{sorted(sample)}); pass the processor output of each sample")
    row = {}
    for key, value in sample.items():
        if not isinstance(value, torch.Tensor) or value.ndim == 0:
            raise PaddingError(f"pad_batch: sample {index} key {key!r} must be a tensor with "
                                f"at least one dim, got {type(value).__name__}")
        row[key] = _as_row(index, key, value) if key in pad_values else value
    row.setdefault("attention_mask", torch.ones_like(row["input_ids"]))
    length = row["input_ids"].shape[1]
    for key in row.keys() & pad_values.keys():
        if row[key].shape[1] != length:
            raise PaddingError(f"pad_batch: sample {index} key {key!r} has length "
                                f"{row[key].shape[1]} but input_ids has {length}")
    return row


def _as_row(index: int, key: str, value: torch.Tensor) -> torch.Tensor:
    if value.ndim == 1:
        value = value[None]
    if value.ndim != 2 or value.shape[0] != 1:
        raise PaddingError(f"pad_batch: sample {index} key {key!r} must be [1, L] or [L] "
                            f"(one sample per dict), got {tuple(value.shape)}")
    return value


def _common_sequence_keys(rows: list[dict], pad_values: Mapping[str, int]) -> list[str]:
    keys = [k for k in pad_values if k in rows[0]]
    for i, row in enumerate(rows):
        if [k for k in pad_values if k in row] != keys:
            raise PaddingError(f"pad_batch: sample {i} has per-token keys "
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
        raise PaddingError(f"pad_batch: cannot concatenate {key!r} along dim 0, shapes {shapes}; "
                            "all samples must share the trailing dims (same image size / "
                            f"processor settings): {exc}") from exc
