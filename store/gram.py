"""Per-image visual Gram matrices for Relational CKA (docs/method.md §2.1), as stored in the cache.

The cache stores, per image, the UNCENTRED Gram ``K = V V^T`` of the row-normalised
penultimate-layer visual-token states, flattened as its upper triangle (diagonal included) in
``torch.triu_indices(n, n)`` order. Extraction computes it with :func:`visual_gram`, the cache
codecs and the trainer rebuild the symmetric matrix with :func:`gram_from_upper`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from genrecal.store.errors import FeatureInputError


def upper_triangle_size(n: int) -> int:
    """Number of entries of an n x n upper triangle including the diagonal: n(n+1)/2."""
    return n * (n + 1) // 2


def gram_side(num_entries: int) -> int:
    """Inverse of :func:`upper_triangle_size`; raises FeatureInputError if not triangular."""
    n = (math.isqrt(8 * num_entries + 1) - 1) // 2 if num_entries >= 0 else -1
    if n < 0 or upper_triangle_size(n) != num_entries:
        raise FeatureInputError(f"gram_side: {num_entries} entries is not n(n+1)/2 for any n; "
                                "the flat Gram is truncated or not an upper triangle")
    return n


def visual_gram(states: torch.Tensor, *, eps: float = 1e-12, check_finite: bool = True) -> torch.Tensor:
    """Uncentred Gram of row-normalised visual-token states of ONE image, as an upper triangle.

    states: [n, d] any float dtype; penultimate-layer (output of block L-2) hidden states at
            the image's visual-token positions.
    Returns float32 [n(n+1)/2]: ``K = V V^T`` with ``V`` the rows of ``states`` divided by
    ``max(||row||_2, eps)`` (an all-zero row stays zero), computed in float32, flattened in
    ``torch.triu_indices(n, n)`` order -- row-major over the upper triangle:
    (0,0), (0,1), ..., (0,n-1), (1,1), (1,2), ..., (n-1,n-1).

    docs/method.md §2.1, eq. (2.7) uses the centred ``K~ = H K H`` (H = I - 11^T/n). We store
    the UNCENTRED K: centring is an O(n^2) operation at train time, K~ is a function of K, and
    keeping K also leaves the choice of kernel normalisation to the trainer. Rebuild the
    symmetric matrix with :func:`gram_from_upper`.

    check_finite: reject inf/NaN states here. The check reads a value back from the device (a
    sync per call); a caller computing many Grams passes False and checks all the results at
    once with :func:`require_finite` (a non-finite state row makes its Gram row NaN).
    """
    if states.ndim != 2 or states.shape[0] == 0 or not states.is_floating_point():
        raise FeatureInputError(f"visual_gram: states must be a float [n>=1, d] tensor of one "
                                f"image's visual tokens, got {states.dtype} {tuple(states.shape)}")
    if check_finite:
        require_finite([states], "visual_gram: states")
    with torch.no_grad():
        v = F.normalize(states.to(torch.float32), p=2.0, dim=1, eps=eps)
        return upper_triangle(v @ v.T)


def require_finite(tensors: Sequence[torch.Tensor], what: str) -> None:
    """Raise FeatureInputError if any of ``tensors`` holds inf/NaN, with ONE device sync in all.

    tensors: float tensors of any shape, all on one device; what: named in the message.
    """
    if not tensors:
        return
    if not bool(torch.stack([t.isfinite().all() for t in tensors]).all()):
        raise FeatureInputError(f"{what} contain inf/NaN; check the teacher's penultimate-layer "
                                "hidden states (float16 overflow? run the teacher in bfloat16)")


def upper_triangle(matrix: torch.Tensor) -> torch.Tensor:
    """[n, n] -> [n(n+1)/2], same dtype: the upper triangle incl. diagonal, row-major (see module doc)."""
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise FeatureInputError(f"upper_triangle: a Gram matrix must be square [n, n], got shape "
                                f"{tuple(matrix.shape)}")
    n = matrix.shape[0]
    r, c = torch.triu_indices(n, n, device=matrix.device)
    return matrix[r, c]


def gram_from_upper(flat: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`visual_gram`'s flattening: [n(n+1)/2] -> symmetric [n, n], same dtype."""
    if flat.ndim != 1 or flat.shape[0] != upper_triangle_size(n):
        raise FeatureInputError(f"gram_from_upper: expected a flat [{upper_triangle_size(n)}] "
                                f"upper triangle for n={n}, got {tuple(flat.shape)}; pass the "
                                "image's visual-token count as n")
    gram = flat.new_zeros(n, n)
    r, c = torch.triu_indices(n, n, device=flat.device)
    gram[r, c] = flat
    gram[c, r] = flat
    return gram
