"""GRACE's Lagrangian controller and warm-ups (genrecal.train.controller, docs/method.md §2.2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from genrecal.common.config import ControllerConfig
from genrecal.train.controller import ControllerError, LagrangianController, linear_warmup

DEFAULT = ControllerConfig()


def reference_betas(cfg: ControllerConfig, losses) -> list[float]:
    """Hand-written float64 reference: m_t as the explicitly weighted mean of L_1..L_t with the
    bias-corrected EMA weights (1 - ema) ema^(t-k) / (1 - ema^t), then the projected step."""
    ema = np.float64(cfg.ema)
    beta = np.float64(cfg.beta_init)
    out = []
    losses = np.asarray(losses, dtype=np.float64)
    for t in range(1, len(losses) + 1):
        k = np.arange(1, t + 1)
        weights = (1 - ema) * ema ** (t - k) / (1 - ema ** t)
        m = np.sum(weights * losses[:t])
        beta = np.clip(beta + np.float64(cfg.eta) * (m - np.float64(cfg.tau)),
                       np.float64(cfg.beta_min), np.float64(cfg.beta_max))
        out.append(float(beta))
    return out


def run(cfg: ControllerConfig, losses) -> list[float]:
    ctl = LagrangianController(cfg)
    return [ctl.update(x) for x in losses]


# ---------------------------------------------------------------------------------------------
# trajectory
# ---------------------------------------------------------------------------------------------

def test_initial_beta_and_ema_start_rule():
    ctl = LagrangianController(DEFAULT)
    assert ctl.beta == 0.5 and ctl.steps == 0 and ctl.ema is None
    # First update: the bias-corrected EMA equals the first loss (no drag towards 0).
    beta1 = ctl.update(5.0)
    assert ctl.ema == pytest.approx(5.0, rel=1e-15)
    assert beta1 == ctl.beta == pytest.approx(0.5 + 0.003 * (5.0 - 3.0), rel=1e-15)  # 0.506
    # Second: m = (ema * L1 + L2) / (1 + ema), the weights sum to 1.
    beta2 = ctl.update(1.0)
    m2 = (0.99 * 5.0 + 1.0) / 1.99
    assert ctl.ema == pytest.approx(m2, rel=1e-14)
    assert beta2 == pytest.approx(0.506 + 0.003 * (m2 - 3.0), rel=1e-14)
    assert ctl.steps == 2


def test_default_trajectory_matches_reference():
    rng = np.random.default_rng(0)
    losses = rng.uniform(0.5, 6.0, size=300).tolist()
    got = run(DEFAULT, losses)
    want = reference_betas(DEFAULT, losses)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)


def test_clipping_at_both_bounds_without_windup():
    cfg = ControllerConfig(beta_init=0.5, beta_min=0.1, beta_max=1.0, tau=3.0, eta=0.1, ema=0.5)
    losses = [20.0] * 6 + [0.0] * 12 + [3.5] * 3
    got = run(cfg, losses)
    want = reference_betas(cfg, losses)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)
    assert 0.5 + 0.1 * (20.0 - 3.0) > 1.0  # unclipped step 1 would be 2.2
    assert got[0] == 1.0 and max(got) == 1.0            # exactly beta_max
    assert min(got) == 0.1 and got[17] == 0.1           # exactly beta_min
    # Projection, no windup: beta sits at beta_min while m < tau and leaves it at the first
    # step where m > tau again (step 21 here), by exactly eta * (m - tau).
    assert [reference_m(cfg, losses[:t]) > cfg.tau for t in (19, 20, 21)] == [False, False, True]
    assert got[19] == 0.1
    assert got[20] == pytest.approx(0.1 + 0.1 * (reference_m(cfg, losses) - 3.0), abs=1e-15)
    assert got[20] > 0.1
    # Hand-computed: step 7 (first L = 0): m = (sum_{k<=6} .5^(7-k) * 20 * .5) / (1 - .5^7)
    m7 = 0.5 * 20.0 * sum(0.5 ** (7 - k) for k in range(1, 7)) / (1 - 0.5 ** 7)
    assert got[6] == pytest.approx(min(1.0, max(0.1, 1.0 + 0.1 * (m7 - 3.0))), abs=1e-15)


def reference_m(cfg: ControllerConfig, losses) -> float:
    t = len(losses)
    return sum((1 - cfg.ema) * cfg.ema ** (t - k) * x
               for k, x in enumerate(losses, start=1)) / (1 - cfg.ema ** t)


def test_ema_zero_tracks_the_last_loss():
    cfg = ControllerConfig(ema=0.0, eta=0.01)
    ctl = LagrangianController(cfg)
    for x in (4.0, 2.0, 7.0):
        ctl.update(x)
        assert ctl.ema == x


def test_non_finite_loss_refused_and_state_kept():
    ctl = LagrangianController(DEFAULT)
    ctl.update(4.0)
    before = ctl.state_dict()
    for bad in (float("nan"), float("inf"), "3.0", None, True):
        with pytest.raises(ControllerError):
            ctl.update(bad)
    assert ctl.state_dict() == before
    ctl.update(torch.tensor(4.0, dtype=torch.float64))  # 0-d tensors and numpy scalars are fine
    ctl.update(np.float32(4.0))
    assert ctl.steps == 3


# ---------------------------------------------------------------------------------------------
# fed once per optimizer step
# ---------------------------------------------------------------------------------------------

def test_controller_fed_accumulation_means():
    micro = [[5.0, 3.0, 1.0, 2.0], [0.5, 0.25, 6.0, 6.0], [3.0, 3.0, 3.0, 3.0]] * 20
    ctl = LagrangianController(DEFAULT)
    got = [ctl.update(sum(mb) / len(mb)) for mb in micro]
    want = reference_betas(DEFAULT, [sum(mb) / len(mb) for mb in micro])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)
    # Not per micro-batch: feeding every micro-batch separately gives another trajectory.
    per_micro = run(DEFAULT, [x for mb in micro for x in mb])
    assert per_micro[3::4] != got


# ---------------------------------------------------------------------------------------------
# checkpoint state
# ---------------------------------------------------------------------------------------------

def test_state_dict_json_round_trip_resumes_bitwise():
    rng = np.random.default_rng(7)
    losses = rng.uniform(0.0, 7.0, size=60).tolist()
    cfg = ControllerConfig(eta=0.02)  # hits both bounds on the way
    whole = run(cfg, losses)

    first = LagrangianController(cfg)
    head = [first.update(x) for x in losses[:23]]
    state = first.state_dict()
    assert set(state) == {"beta", "ema_sum", "steps"}
    assert all(type(v) in (float, int) for v in state.values())
    restored = json.loads(json.dumps(state))
    assert restored == state

    second = LagrangianController(cfg)
    second.load_state_dict(restored)
    assert second.beta == first.beta and second.ema == first.ema and second.steps == 23
    tail = [second.update(x) for x in losses[23:]]
    assert head + tail == whole  # exact float equality
    assert second.state_dict() == run_state(cfg, losses)


def run_state(cfg, losses):
    ctl = LagrangianController(cfg)
    for x in losses:
        ctl.update(x)
    return ctl.state_dict()


def test_fresh_state_round_trip():
    ctl = LagrangianController(DEFAULT)
    state = json.loads(json.dumps(ctl.state_dict()))
    assert state == {"beta": 0.5, "ema_sum": 0.0, "steps": 0}
    other = LagrangianController(DEFAULT)
    other.load_state_dict(state)
    assert other.ema is None and other.beta == 0.5


GOOD = {"beta": 0.5, "ema_sum": 1.25, "steps": 3}


@pytest.mark.parametrize("bad, words", [
    ({"beta": 0.5, "ema_sum": 1.25}, "missing keys ['steps']"),
    ({**GOOD, "m": 3.0}, "unknown keys ['m']"),
    ({**GOOD, "beta": "0.5"}, "'beta'"),
    ({**GOOD, "beta": float("nan")}, "'beta'"),
    ({**GOOD, "beta": True}, "'beta'"),
    ({**GOOD, "ema_sum": float("inf")}, "'ema_sum'"),
    ({**GOOD, "ema_sum": None}, "'ema_sum'"),
    ({**GOOD, "steps": -1}, "'steps'"),
    ({**GOOD, "steps": 3.0}, "'steps'"),
    ({**GOOD, "steps": True}, "'steps'"),
    ({**GOOD, "steps": 0}, "ema_sum"),
    ({**GOOD, "beta": 1.5}, "[beta_min, beta_max]"),
    ({**GOOD, "beta": 0.05}, "[beta_min, beta_max]"),
    ([0.5, 1.25, 3], "mapping"),
])
def test_bad_state_dicts_are_refused(bad, words):
    ctl = LagrangianController(DEFAULT)
    ctl.update(2.0)
    before = ctl.state_dict()
    with pytest.raises(ControllerError) as info:
        ctl.load_state_dict(bad)
    assert words in str(info.value)
    assert ctl.state_dict() == before


def test_good_state_accepts_integral_json_numbers():
    ctl = LagrangianController(DEFAULT)
    ctl.load_state_dict({"beta": 1, "ema_sum": 2, "steps": 4})
    assert ctl.beta == 1.0 and type(ctl.beta) is float and ctl.steps == 4


# ---------------------------------------------------------------------------------------------
# warm-ups
# ---------------------------------------------------------------------------------------------

def test_linear_warmup_values():
    assert linear_warmup(1, 400) == 1 / 400  # 1-based: the first step already gets 1/W
    assert linear_warmup(200, 400) == 0.5
    assert linear_warmup(399, 400) == 399 / 400
    assert linear_warmup(400, 400) == 1.0
    assert linear_warmup(10_000, 400) == 1.0
    assert linear_warmup(1, 1) == 1.0
    assert linear_warmup(1, 0) == 1.0 and linear_warmup(57, 0) == 1.0  # warmup_steps 0: w = 1
    assert all(type(linear_warmup(s, w)) is float for s, w in ((1, 0), (3, 4), (9, 4)))


@pytest.mark.parametrize("step, warmup", [(0, 400), (-1, 400), (1, -1), (1.0, 400), (1, 4.0),
                                          (True, 400)])
def test_linear_warmup_refuses_bad_arguments(step, warmup):
    with pytest.raises(ControllerError):
        linear_warmup(step, warmup)
