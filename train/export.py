"""Stage outputs: the student as a plain transformers checkpoint, the Recalibrator apart.

``export_student`` writes ``model.save_pretrained`` plus the processor files into one directory
that ``AutoModelForImageTextToText.from_pretrained`` / ``load_vlm`` load directly; the
Recalibrator (a training-only module, docs/method.md §1) never enters it and is saved with
:meth:`Recalibrator.save` next to it. Both are written into a temporary directory and renamed
into place, so a killed export never leaves a half-written model behind.

The processor is written by :func:`genrecal.model.saving.save_processor`, in the form
``load_vlm`` reassembles (video-slot processors as their parts, without torchvision).

``stage_done.json`` marks a finished stage and tells the next stage where the student (and
the Recalibrator) to continue from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from genrecal.common.atomic import replace_dir, write_json_atomic
from genrecal.model.families import Family
from genrecal.model.saving import save_processor
from genrecal.train.errors import StageSetupError
from genrecal.train.recalibrator import Recalibrator

DONE = "stage_done.json"
STUDENT_DIR = "student"
RECALIBRATOR_DIR = "recalibrator"


def _fresh_tmp(final: Path) -> Path:
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def export_student(model: torch.nn.Module, processor: Any, family: Family, directory: str | Path,
                   dtype: torch.dtype | None = None) -> Path:
    """Save the student (weights in ``dtype``, default: as is) and its processor atomically.

    The model is cast in place; call this at the end of training.
    """
    final = Path(directory)
    tmp = _fresh_tmp(final)
    if dtype is not None:
        model.to(dtype=dtype)
    model.save_pretrained(tmp)
    save_processor(processor, family, tmp)
    replace_dir(tmp, final)
    return final


def export_recalibrator(recalibrator: Recalibrator, directory: str | Path) -> Path:
    """Recalibrator.save into ``directory`` atomically."""
    final = Path(directory)
    recalibrator.save(_fresh_tmp(final))
    replace_dir(final.with_name(f".tmp-{final.name}"), final)
    return final


def write_done(stage_dir: str | Path, record: dict[str, Any]) -> Path:
    """Mark a stage finished; ``record`` holds at least ``student`` (a model directory) and
    ``recalibrator`` (a directory or None)."""
    path = Path(stage_dir) / DONE
    return write_json_atomic(path, record, indent=1, sort_keys=True)


def read_done(stage_dir: str | Path) -> dict[str, Any] | None:
    """The record of a finished stage, or None if it has not finished."""
    path = Path(stage_dir) / DONE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise StageSetupError(f"{path} is damaged ({exc}); delete it and re-run the "
                              "stage.") from exc
    if not isinstance(record, dict) or "student" not in record:
        raise StageSetupError(f"{path} lacks the 'student' entry; delete it and re-run the stage.")
    return record
