"""Length-bucketed batching for the teacher pass.

:func:`plan_batches` groups sample indices of similar token length so that padded batches
waste little compute; the padding itself is :func:`genrecal.model.padding.pad_batch`, shared
with the live teacher and the student collator.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from genrecal.extract.errors import BatchingError

DEFAULT_BUCKET_SIZE = 1024
"""Samples per sorting window: bounds how far the plan reorders the input (see plan_batches)."""


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
