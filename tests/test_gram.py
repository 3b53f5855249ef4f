"""genrecal.store.gram: visual Grams against float64 references, flattening round trips."""

from __future__ import annotations

import math

import pytest
import torch

from genrecal.store.errors import FeatureInputError
from genrecal.store.gram import (gram_from_upper, gram_side, require_finite, upper_triangle,
                                 upper_triangle_size, visual_gram)


def _gram_reference(states: torch.Tensor) -> torch.Tensor:
    v = states.double()
    norms = v.norm(dim=1, keepdim=True)
    v = torch.where(norms > 0, v / norms.clamp_min(1e-300), torch.zeros_like(v))
    return v @ v.T


@pytest.mark.parametrize("n,d,dtype", [(1, 5, torch.float32), (7, 16, torch.float32),
                                       (64, 48, torch.bfloat16), (30, 100, torch.float16)])
def test_visual_gram_matches_float64(n, d, dtype):
    states = (torch.randn(n, d, generator=torch.Generator().manual_seed(n)) * 20).to(dtype)
    flat = visual_gram(states)
    assert flat.dtype == torch.float32 and flat.shape == (upper_triangle_size(n),)
    ref = _gram_reference(states)
    torch.testing.assert_close(gram_from_upper(flat, n).double(), ref, rtol=0, atol=2e-6)


def test_upper_triangle_order_is_row_major():
    states = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    s = 1 / math.sqrt(2)
    expected = torch.tensor([1.0, s, 0.0, 1.0, s, 1.0])  # (0,0),(0,1),(0,2),(1,1),(1,2),(2,2)
    torch.testing.assert_close(visual_gram(states), expected)


def test_zero_row_is_eps_safe():
    states = torch.randn(5, 8)
    states[2] = 0
    gram = gram_from_upper(visual_gram(states), 5)
    assert bool(gram.isfinite().all())
    assert bool((gram[2] == 0).all()) and bool((gram[:, 2] == 0).all())
    torch.testing.assert_close(gram.diagonal()[[0, 1, 3, 4]], torch.ones(4))


def test_centring_from_stored_gram_matches_direct():
    """Storing uncentred K loses nothing: H K H from the flat Gram equals the float64 one."""
    n = 12
    states = torch.randn(n, 20, generator=torch.Generator().manual_seed(3))
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    centred = h @ gram_from_upper(visual_gram(states), n).double() @ h
    torch.testing.assert_close(centred, h @ _gram_reference(states) @ h, rtol=0, atol=1e-6)


def test_upper_triangle_inverts_gram_from_upper():
    n = 6
    sym = torch.randn(n, n, dtype=torch.float64)
    sym = sym + sym.T
    assert torch.equal(gram_from_upper(upper_triangle(sym), n), sym)
    assert upper_triangle(sym).shape == (upper_triangle_size(n),)


def test_gram_from_upper_round_trip_and_side():
    n = 9
    flat = torch.randn(upper_triangle_size(n), dtype=torch.float64)
    gram = gram_from_upper(flat, n)
    assert gram.dtype == torch.float64 and torch.equal(gram, gram.T)
    r, c = torch.triu_indices(n, n)
    assert torch.equal(gram[r, c], flat)
    assert [gram_side(upper_triangle_size(m)) for m in range(6)] == list(range(6))


@pytest.mark.parametrize("call,pattern", [
    (lambda: visual_gram(torch.randn(4)), "states must be"),
    (lambda: visual_gram(torch.randn(0, 4)), "states must be"),
    (lambda: visual_gram(torch.ones(3, 4, dtype=torch.long)), "states must be"),
    (lambda: visual_gram(torch.tensor([[1.0, float("inf")]])), "inf/NaN"),
    (lambda: visual_gram(torch.tensor([[1.0, float("nan")]])), "inf/NaN"),
    (lambda: require_finite([torch.ones(2), torch.tensor([0.0, float("nan")])], "grams"),
     "grams contain inf/NaN"),
    (lambda: gram_from_upper(torch.zeros(5), 3), r"expected a flat \[6\]"),
    (lambda: gram_from_upper(torch.zeros(2, 3), 2), "expected a flat"),
    (lambda: gram_side(7), "not n\\(n\\+1\\)/2"),
    (lambda: gram_side(-1), "not n\\(n\\+1\\)/2"),
    (lambda: upper_triangle(torch.zeros(2, 3)), "must be square"),
])
def test_gram_bad_inputs(call, pattern):
    with pytest.raises(FeatureInputError, match=pattern):
        call()


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_unchecked_gram_turns_a_bad_state_row_into_nan_that_require_finite_catches(bad):
    states = torch.randn(4, 6, dtype=torch.float32)
    states[2, 3] = bad
    flat = visual_gram(states, check_finite=False)
    gram = gram_from_upper(flat, 4)
    assert gram[2].isnan().all() and gram[:, 2].isnan().all()
    assert gram[[0, 1, 3]][:, [0, 1, 3]].isfinite().all()
    with pytest.raises(FeatureInputError, match="inf/NaN"):
        require_finite([visual_gram(torch.randn(3, 6)), flat], "visual_gram: grams")
    require_finite([visual_gram(torch.randn(3, 6))], "visual_gram: grams")  # finite: no error
    require_finite([], "nothing")
