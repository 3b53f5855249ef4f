"""Settings the schema accepts do what they say in training: the paper's NPE ablation
(``recalibrator.reassign_positions: false``) and its L_reg ablations (``losses.reg_terms``).

The align stage trains from a real extracted cache (tiny qwen2_vl teacher, llava_qwen2 student).
"""

from __future__ import annotations

import pytest
import torch

from extract_support import make_pipeline, pipeline_dict
from genrecal.common.config import Pipeline
from genrecal.common.errors import ConfigError
from genrecal.extract.job import job_from_pipeline
from genrecal.extract.pipeline import run_extract
from genrecal.store.reader import CacheReader
from genrecal.train.data import teacher_turns
from genrecal.train.loop import LoopOptions, run_stages
from genrecal.train.recalibrator import Recalibrator
from genrecal.train.step import LossSpec


@pytest.fixture(scope="module")
def base(tiny_vlm_dir, tmp_path_factory):
    """A pipeline dict whose cache is extracted (answer and question rows of 8 samples)."""
    root = tmp_path_factory.mktemp("settings")
    spec = pipeline_dict(tiny_vlm_dir("qwen2_vl"), "qwen2_vl", root,
                         features={"answer_hidden": True, "question_hidden": "all"})
    spec["student"]["tiny"]["path"] = str(tiny_vlm_dir("llava_qwen2"))
    spec["stages"] = [{"name": "align", "steps": 2, "batch_size": 2, "precision": "fp32",
                       "lr_start": 1e-3, "lr_end": 1e-4, "warmup": 0}]
    run_extract(job_from_pipeline(make_pipeline("x", spec)).with_overrides(progress=False))
    return root, spec


def _train(base, out: str, *, recalibrator: dict | None = None, losses: dict | None = None):
    root, spec = base
    spec = {**spec, "output": str(root / out), "recalibrator": {**spec["recalibrator"], **(recalibrator or {})}}
    spec["stages"] = [{**spec["stages"][0], **({"losses": losses} if losses else {})}]
    pipe = make_pipeline(out, spec)
    (result,) = run_stages(pipe, options=LoopOptions(progress=False, num_workers=0, save_every=None))
    return pipe, result


def test_turns_carry_the_teacher_positions(base):
    root, spec = base
    for cached in CacheReader(spec["cache"]["location"]):
        for k, turn in enumerate(teacher_turns(cached, len(cached.spans.answers))):
            start, end = cached.spans.answers[k]
            assert turn.answer_start == start and turn.answer_ids.numel() == end - start
            assert torch.equal(turn.answer_ids, cached.input_ids[start:end])
            assert (turn.question_positions < start).all() and (turn.question_positions.diff() > 0).all()
            assert turn.question_positions.shape[0] == turn.question.shape[0]


def test_npe_ablation_trains_with_the_original_positions(base, monkeypatch):
    seen = []
    forward = Recalibrator.forward

    def spy(self, z_qs, q_mask, answer_input, a_mask, q_positions=None, a_positions=None):
        seen.append((q_positions, a_positions, a_mask))
        return forward(self, z_qs, q_mask, answer_input, a_mask, q_positions, a_positions)

    monkeypatch.setattr(Recalibrator, "forward", spy)
    _, kept = _train(base, "npe-off", recalibrator={"reassign_positions": False})
    assert kept.finished and kept.step == 2
    q_pos, a_pos, a_mask = seen[0]
    assert q_pos is not None and a_pos is not None
    assert torch.equal(q_pos[0], torch.arange(q_pos.shape[1]))  # student question: 0..s_k-1
    first = a_pos[:, 0:1]
    steps = torch.arange(a_pos.shape[1]).unsqueeze(0)
    assert torch.equal(a_pos[a_mask], (first + steps)[a_mask])  # teacher answer: s_k, s_k+1, ...
    assert (first > 0).all()  # teacher positions, not reset to follow the question
    assert Recalibrator.load(str(kept.out_dir / "recalibrator"),
                             _student(base)).cfg.reassign_positions is False
    seen.clear()
    _, reset = _train(base, "npe-on")
    assert seen[0][0] is None and seen[0][1] is None
    losses = [r["loss"] for r in kept.records], [r["loss"] for r in reset.records]
    assert losses[0] != losses[1]  # the positions change what the Recalibrator computes


def _student(base):
    from genrecal.model.loading import load_vlm

    return load_vlm(base[1]["student"]["tiny"]["path"]).model


@pytest.mark.parametrize("terms, on, off", [("ce", "reg_ce", "reg_kl"), ("kl", "reg_kl", "reg_ce")])
def test_reg_terms_select_the_regulariser_ablation(base, terms, on, off):
    pipe, result = _train(base, f"reg-{terms}", losses={"reg_terms": terms})
    spec = LossSpec.for_stage(pipe.stage("align"))
    assert getattr(spec.genrecal, on) == 1.0 and getattr(spec.genrecal, off) == 0.0
    assert all(r[on] > 0 for r in result.records)
    assert all(not r.get(off) for r in result.records)


def test_reg_terms_both_by_default_and_bad_values_are_refused(base):
    root, spec = base
    pipe = make_pipeline("d", spec)
    weights = LossSpec.for_stage(pipe.stage("align")).genrecal
    assert weights.reg_ce == weights.reg_kl == 1.0
    bad = {**spec, "name": "bad", "stages": [{**spec["stages"][0], "losses": {"reg_terms": "mse"}}]}
    with pytest.raises(ConfigError, match=r"stages\[0\]\.losses\.reg_terms"):
        Pipeline.from_dict(bad)
