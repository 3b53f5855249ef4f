"""Training metrics: a JSONL log per stage, a loss-curve PNG, a progress bar.

One JSON object per optimizer step (written by rank 0)::

    {"stage": "align", "step": 12, "epoch": 0, "loss": 7.1, "ar": 4.2, "kl": 1.3, ...,
     "lr": 0.00091, "grad_norm": 3.2, "samples": 16, "tokens_teacher": 201,
     "tokens_student": 188, "samples_per_s": 41.0, "data_wait_s": 0.01, "step_time_s": 0.39}

Loss parts are means over the global batch's tokens of their kind (teacher answer tokens for
ar / kl / reg_ce / reg_kl, student target tokens for ce_student); ``loss`` is their weighted
sum, the quantity the optimizer minimised. On resume, :class:`MetricsLog` drops the records
past the checkpoint's step, so the log of a resumed run equals that of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from genrecal.common.atomic import write_text_atomic

#: Record fields that depend on wall-clock time (everything else is reproducible).
TIMING_FIELDS = ("samples_per_s", "data_wait_s", "step_time_s")
LOSS_FIELDS = ("loss", "ar", "kl", "reg_ce", "reg_kl", "ce_student")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a metrics JSONL file (an unfinished last line is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a kill: everything after it is lost too
    return records


class MetricsLog:
    """Append-only JSONL metrics of one stage.

    resume_step: keep the existing records with ``step <= resume_step`` (rewritten atomically)
    and append after them; None starts a new file. ``enabled=False`` (ranks > 0) writes nothing.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self.records = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        self._rewrite()

    def _rewrite(self) -> None:
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def plot_losses(records: Iterable[dict[str, Any]], path: str | Path, title: str) -> Path | None:
    """Loss curves (one line per loss field present) vs step as a PNG; None without records."""
    records = list(records)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        for field in LOSS_FIELDS:
            points = [(r["step"], r[field]) for r in records
                      if isinstance(r.get(field), (int, float)) and math.isfinite(r[field])]
            if points:
                ax.plot(*zip(*points), label=field, linewidth=2.0 if field == "loss" else 1.0)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (mean per token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return Path(path)


class Progress:
    """tqdm bar over optimizer steps showing loss, LR and samples/s (disabled off rank 0)."""

    def __init__(self, total: int, initial: int, description: str, enabled: bool = True):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=description, disable=not enabled,
                        unit="step", dynamic_ncols=True)

    def update(self, record: dict[str, Any]) -> None:
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             sps=f"{record['samples_per_s']:.1f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
