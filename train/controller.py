"""GRACE's Lagrangian controller of beta and the linear warm-ups (docs/method.md §2.2).

``beta`` is the dual variable of the constraint "EMA of L_GDKD at most tau". Once per OPTIMIZER
step (not per micro-batch), without gradient, projected dual ascent:

    (2.10) m    <- ema * m + (1 - ema) * Lbar_GDKD
    (2.11) beta <- clip(beta + eta * (m - tau), beta_min, beta_max)

``Lbar_GDKD`` is the step's L_GDKD averaged over its accumulation micro-batches and over all
ranks: the trainer feeds the global ``gdkd`` mean it logs (summed over micro-batches and ranks
with one all-reduce, :mod:`genrecal.train.loop`), so every rank feeds the same value and holds
the same ``beta``. Everything is plain Python floats (IEEE float64); no tensor, no autograd.

How the EMA starts (the reference leaves it open): bias-corrected, as in Adam. The controller
keeps the raw accumulator ``s`` (starting at 0.0) and the number of updates ``t``:

    s_t = ema * s_{t-1} + (1 - ema) * L_t,     m_t = s_t / (1 - ema ** t)

so ``m_1 = L_1`` and, at every step, ``m_t`` is a weighted mean of the losses seen so far with
weights summing to 1. Why not the alternatives: starting ``m`` at 0 makes ``m - tau`` about
``-tau`` for the first ~1/(1-ema) steps and drags beta down for no reason; starting ``m`` at the
first loss gives that single loss weight ``ema ** (t-1)``, i.e. ~100x any later loss for the
first hundred steps at ema = 0.99, and the first losses (untrained student, warm-ups) are the
least representative ones. After ~1/(1-ema) steps all three agree. The checkpoint records
``s`` and ``t`` together with ``beta`` (:meth:`LagrangianController.state_dict`), which is what
the start rule needs to resume bit for bit.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

from genrecal.common.config import ControllerConfig
from genrecal.train.errors import TrainError

__all__ = ["ControllerError", "LagrangianController", "linear_warmup"]


class ControllerError(TrainError, ValueError):
    """The controller or a warm-up got a value they cannot use, or a
    controller checkpoint state that does not fit."""


#: The keys of :meth:`LagrangianController.state_dict`, all plain JSON numbers.
STATE_KEYS = ("beta", "ema_sum", "steps")


class LagrangianController:
    """beta of GRACE by projected dual ascent on the bias-corrected EMA of L_GDKD (module doc).

    :attr:`beta` is the value the NEXT optimizer step's loss uses: ``beta_init`` before the
    first :meth:`update`, afterwards the result of the latest one. Call :meth:`update` once per
    optimizer step with that step's L_GDKD averaged over micro-batches and ranks.
    """

    def __init__(self, config: ControllerConfig | None = None):
        self.config = ControllerConfig() if config is None else config
        self._beta = float(self.config.beta_init)
        self._ema_sum = 0.0  # raw (biased) EMA accumulator s_t
        self._steps = 0      # number of updates t

    # -- read-outs -----------------------------------------------------------------------------

    @property
    def beta(self) -> float:
        """The beta of the next optimizer step's loss."""
        return self._beta

    @property
    def steps(self) -> int:
        """How many optimizer steps have updated the controller."""
        return self._steps

    @property
    def ema(self) -> float | None:
        """The bias-corrected EMA m of L_GDKD (None before the first update)."""
        if self._steps == 0:
            return None
        return self._ema_sum / (1.0 - float(self.config.ema) ** self._steps)

    # -- the update ----------------------------------------------------------------------------

    def update(self, step_loss: float) -> float:
        """Fold in one optimizer step's L_GDKD (mean over its micro-batches and all ranks) and
        return the new :attr:`beta` (2.10)-(2.11). A non-finite loss is refused and leaves the
        state unchanged (it would poison the EMA for good)."""
        loss = _finite_float(step_loss, "step_loss")
        cfg = self.config
        ema = float(cfg.ema)
        ema_sum = ema * self._ema_sum + (1.0 - ema) * loss
        steps = self._steps + 1
        m = ema_sum / (1.0 - ema ** steps)
        beta = self._beta + float(cfg.eta) * (m - float(cfg.tau))
        beta = min(max(beta, float(cfg.beta_min)), float(cfg.beta_max))
        self._ema_sum, self._steps, self._beta = ema_sum, steps, beta
        return beta

    # -- checkpointing -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, float | int]:
        """``{"beta": float, "ema_sum": float, "steps": int}``: plain Python numbers. Python
        floats round-trip through ``json.dumps``/``json.loads`` exactly (shortest repr), so a run
        resumed from this state continues bit for bit."""
        return {"beta": self._beta, "ema_sum": self._ema_sum, "steps": self._steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output. Refuses (:class:`ControllerError`, state left as
        it was) a non-mapping, missing or unknown keys, non-numbers (bools included), non-finite
        floats, a negative or non-integer ``steps``, a non-zero ``ema_sum`` at ``steps == 0`` and
        a ``beta`` outside this config's ``[beta_min, beta_max]``."""
        where = "controller state"
        if not isinstance(state, Mapping):
            raise ControllerError(f"{where}: expected a mapping with keys {list(STATE_KEYS)}, "
                                  f"got {type(state).__name__}. Fix: pass the dict that "
                                  "LagrangianController.state_dict() returned")
        missing = [k for k in STATE_KEYS if k not in state]
        unknown = sorted(str(k) for k in state if k not in STATE_KEYS)
        if missing or unknown:
            raise ControllerError(
                f"{where}: missing keys {missing}, unknown keys {unknown}; expected exactly "
                f"{list(STATE_KEYS)}. Fix: resume from a checkpoint written by this version of "
                "genrecal.train.controller, or start the stage afresh")
        beta = _finite_float(state["beta"], f"{where} key 'beta'")
        ema_sum = _finite_float(state["ema_sum"], f"{where} key 'ema_sum'")
        steps = state["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ControllerError(f"{where} key 'steps': need an integer >= 0, got {steps!r}. "
                                  "Fix: resume from an intact checkpoint")
        if steps == 0 and ema_sum != 0.0:
            raise ControllerError(f"{where}: ema_sum={ema_sum!r} at steps=0; the EMA "
                                  "accumulator starts at 0.0. Fix: resume from an intact "
                                  "checkpoint")
        cfg = self.config
        if not float(cfg.beta_min) <= beta <= float(cfg.beta_max):
            raise ControllerError(
                f"{where}: beta={beta!r} lies outside this config's [beta_min, beta_max] = "
                f"[{cfg.beta_min}, {cfg.beta_max}]. Fix: resume with the controller config the "
                "checkpoint was written with")
        self._beta, self._ema_sum, self._steps = beta, ema_sum, int(steps)

    def __repr__(self) -> str:
        return (f"LagrangianController(beta={self._beta!r}, ema={self.ema!r}, "
                f"steps={self._steps})")


# ==============================================================================================
# Warm-ups
# ==============================================================================================

def linear_warmup(step: int, warmup_steps: int) -> float:
    """``min(1, step / warmup_steps)``; 1.0 when ``warmup_steps == 0`` (docs/method.md §2.2,
    w_r and w_d).

    ``step`` is 1-BASED: the index of the optimizer step being taken (the first step of a stage
    is 1 and gets ``1 / warmup_steps``; step ``warmup_steps`` is the first at full weight).
    ``step < 1`` is refused, to catch a 0-based caller.
    """
    for name, value, low in (("step", step, 1), ("warmup_steps", warmup_steps, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ControllerError(f"linear_warmup: {name} must be an integer >= {low}, got "
                                  f"{value!r} (step is the 1-based index of the optimizer step "
                                  "being taken)")
    if warmup_steps == 0:
        return 1.0
    return min(1.0, step / warmup_steps)


# ==============================================================================================
# Helpers
# ==============================================================================================

def _finite_float(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.dtype.is_complex:
            x = x.detach().to(torch.float64).cpu().item()
        else:
            raise ControllerError(f"{what}: expected a number, got {type(x).__name__} {x!r}")
    value = float(x)
    if not math.isfinite(value):
        raise ControllerError(f"{what} is {value!r}; need a finite number. Fix: find the "
                              "non-finite loss upstream")
    return value
