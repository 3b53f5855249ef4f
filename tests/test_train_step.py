"""One training step (genrecal.train.step): trainable groups, losses vs a float64 reference,
token-correct normalisation across micro-batches, batch validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from train_batches import D_TEACHER, V_TEACHER, collate, encode, make_samples, teacher_head

from genrecal.common.config import AlignStage, DistillStage, FinetuneStage, Losses, TrainSwitches
from genrecal.store.artifacts import TeacherEmbeddings
from genrecal.model.loading import load_vlm
from genrecal.train.errors import BatchError, LossInputError, StageSetupError
from genrecal.common.config import RecalibratorConfig
from genrecal.train.recalibrator import Recalibrator
from genrecal.train.step import (LossSpec, StageModel, TeacherSide, TokenCounts, batch_to,
                                 configure_trainables, run_step, student_part_params)


@pytest.fixture(scope="module")
def encoded(tiny_student_dir, tmp_path_factory):
    student = load_vlm(tiny_student_dir)
    return encode(student, make_samples(4, tmp_path_factory.mktemp("step_images")))


@pytest.fixture
def student(tiny_student_dir):
    return load_vlm(tiny_student_dir)


def _batch(student, encoded, indices=(0, 1, 2), **kw):
    return collate(encoded, list(indices), student.tokenizer.pad_token_id, **kw)


def _model(student, stage, answer_input="hidden", embeddings=None):
    spec = LossSpec.for_stage(stage, answer_input)
    rec = teacher = None
    if stage.name != "finetune":
        rec = Recalibrator.from_student(student.model, D_TEACHER, RecalibratorConfig(
            blocks=1, answer_input=answer_input), seed=3)
        teacher = TeacherSide.from_artifacts(teacher_head(), embeddings)
    configure_trainables(student.model, student.family, rec, stage.trains)
    return StageModel(student.model, student.family, spec, rec, teacher)


ALIGN = AlignStage(name="align", steps=1)
DISTILL = DistillStage(name="distill", steps=1)
FINETUNE = FinetuneStage(name="finetune", steps=1)
WIDE = DistillStage(name="distill", steps=1, trains=TrainSwitches(
    recalibrator=True, vision_encoder=True, projector=True, student_embeddings=True))

# Expected trainable student parameters of the tiny LLaVA student, by name prefix (written
# out independently of step.student_part_params).
LLAVA_PREFIXES = {
    "vision_encoder": ("model.vision_tower.",), "projector": ("model.multi_modal_projector.",),
    "student_body": ("model.language_model.layers.", "model.language_model.norm."),
    "student_embeddings": ("model.language_model.embed_tokens.",), "student_head": ("lm_head.",)}
# LLaVA reads the vision tower's penultimate layer: its last layer and post-norm get no gradient.
LLAVA_UNUSED = ("model.vision_tower.encoder.layers.1.", "model.vision_tower.post_layernorm.")


def _expected_student(switches: TrainSwitches) -> set[str]:
    return {p for part, prefixes in LLAVA_PREFIXES.items() if getattr(switches, part)
            for p in prefixes}


@pytest.mark.parametrize("stage", [ALIGN, DISTILL, FINETUNE, WIDE], ids=lambda s: s.name + (
    "-wide" if s.trains.vision_encoder else ""))
def test_gradients_reach_exactly_the_trainables(student, encoded, stage):
    model = _model(student, stage)
    out = run_step(model, _batch(student, encoded))
    out.total.backward()
    prefixes = _expected_student(stage.trains)
    for name, p in student.model.named_parameters():
        trains = name.startswith(tuple(prefixes))
        assert p.requires_grad == trains, name
        if trains and not name.startswith(LLAVA_UNUSED):
            assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
        if not trains:
            assert p.grad is None, name
    if model.recalibrator is not None:
        for name, p in model.recalibrator.named_parameters():
            assert p.requires_grad == bool(stage.trains.recalibrator)
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if model.teacher is not None:
        head = model.teacher.head.weight
        assert not head.requires_grad and head.grad is None


def test_part_params_cover_every_family(tiny_vlm_dir):
    for kind in ("qwen2_vl", "gemma3"):
        vlm = load_vlm(tiny_vlm_dir(kind))
        parts = student_part_params(vlm.model, vlm.family)
        covered = set().union(*parts.values())
        assert {id(p) for p in vlm.model.parameters()} == covered, kind
        if kind == "qwen2_vl":  # the merger is the projector, not the vision encoder
            merger = {id(p) for p in vlm.model.model.visual.merger.parameters()}
            assert parts["projector"] == merger and not merger & parts["vision_encoder"]


def test_tied_head_and_embeddings_must_switch_together(tiny_vlm_dir):
    vlm = load_vlm(tiny_vlm_dir("gemma3"))
    with pytest.raises(StageSetupError, match="tied"):
        configure_trainables(vlm.model, vlm.family, None,
                             TrainSwitches(student_body=True, student_head=True))
    names = [n for n, _ in configure_trainables(vlm.model, vlm.family, None, TrainSwitches(
        student_head=True, student_embeddings=True))]
    assert names == ["student.model.language_model.embed_tokens.weight"]


# ---------------------------------------------------------------------------------------------
# Losses against an independent float64 reference (one unpadded sample and turn at a time)
# ---------------------------------------------------------------------------------------------

def _ce_kl(head, z_rows, r_rows, ids):
    """Sums over rows of CE(head(r), ids) and KL(head(z) || head(r)) in float64."""
    w, b = head.weight.double(), head.bias.double()
    t, s = z_rows.double() @ w.T + b, r_rows.double() @ w.T + b
    log_p, log_q = F.log_softmax(t, -1), F.log_softmax(s, -1)
    ce = F.cross_entropy(s, ids, reduction="sum")
    return ce, (log_p.exp() * (log_p - log_q)).sum()


def _reference_sums(student, model, encoded, indices):
    """Per-term loss sums computed per sample (unpadded) and per turn (one Recalibrator row)."""
    ref = dict.fromkeys(("ar", "kl", "reg_ce", "reg_kl", "ce_student"), 0.0)
    batch = _batch(student, encoded, indices)
    for b, i in enumerate(indices):
        inputs = encoded[i].inputs
        with torch.no_grad():
            out = student.model(**inputs, output_hidden_states=True)
            z = out.hidden_states[-1]
        labels = batch.student_labels[b, :z.shape[1]]
        ref["ce_student"] += float(F.cross_entropy(out.logits[0].double(), labels,
                                                   ignore_index=-100, reduction="sum"))
        for start, turn in zip(batch.student_answer_starts[b], batch.teacher[b]):
            n = turn.answer_ids.numel()
            ones = lambda k: torch.ones(1, k, dtype=torch.bool)  # noqa: E731
            with torch.no_grad():
                rec = model.recalibrator(z[:, :start], ones(start), turn.window[None, 1:], ones(n))
                reg = model.recalibrator.forward_teacher_only(
                    turn.question[None], ones(turn.question.shape[0]), turn.window[None, 1:],
                    ones(n))
            for (ce_key, kl_key), out_r in ((("ar", "kl"), rec), (("reg_ce", "reg_kl"), reg)):
                r_win = torch.cat([out_r.r_q[0, -1:], out_r.r_a[0, :-1]])
                ce, kl = _ce_kl(model.teacher.head, turn.window[:n], r_win, turn.answer_ids)
                ref[ce_key] += float(ce)
                ref[kl_key] += float(kl)
    return ref, batch


def test_losses_match_a_float64_reference(student, encoded):
    model = _model(student, DISTILL)
    ref, batch = _reference_sums(student, model, encoded, [0, 1, 3])
    out = run_step(model, batch)
    assert set(out.sums) == set(ref)
    for term, value in ref.items():
        assert float(out.sums[term]) == pytest.approx(value, rel=2e-4), term
    counts = TokenCounts.of_batch(batch)
    assert counts.teacher == sum(t.answer_ids.numel() for turns in batch.teacher for t in turns)
    assert counts.student == int((batch.student_labels != -100).sum())
    means = {k: ref[k] / counts.of_term(k) for k in ref}
    assert out.total.item() == pytest.approx(LossSpec.for_stage(DISTILL).total(means), rel=2e-4)


def test_loss_weights_and_temperature_come_from_the_config(student, encoded):
    batch = _batch(student, encoded)
    base = run_step(_model(student, ALIGN), batch)
    stage = AlignStage(name="align", steps=1, losses=Losses(ar=2.0, kl=0.5, reg=0.0))
    out = run_step(_model(student, stage), batch)
    assert set(out.sums) == {"ar", "kl"}
    assert float(out.sums["ar"]) == pytest.approx(float(base.sums["ar"]), rel=1e-5)
    n = out.tokens.teacher
    expected = (2.0 * out.sums["ar"] + 0.5 * out.sums["kl"]) / n
    assert out.total.item() == pytest.approx(float(expected), rel=1e-6)
    hot = run_step(_model(student, AlignStage(name="align", steps=1,
                                              losses=Losses(temperature=4.0))), batch)
    assert float(hot.sums["kl"]) < float(base.sums["kl"])  # softer distributions, smaller KL
    assert float(hot.sums["ar"]) == pytest.approx(float(base.sums["ar"]), rel=1e-5)


def test_finetune_is_student_ce_only_and_needs_no_teacher(student, encoded):
    spec = LossSpec.for_stage(FINETUNE)
    assert spec.genrecal is None and spec.ce_student == 1.0
    out = run_step(_model(student, FINETUNE), _batch(student, encoded, teacher=False))
    assert set(out.sums) == {"ce_student"}
    assert out.total.item() == pytest.approx(float(out.sums["ce_student"]) / out.tokens.student)


def test_spec_rejects_reg_without_ar_and_kl():
    with pytest.raises(LossInputError, match="ar/kl"):
        LossSpec.for_stage(AlignStage(name="align", steps=1, losses=Losses(ar=0, kl=0, reg=1)))


# ---------------------------------------------------------------------------------------------
# Normalisation over micro-batches
# ---------------------------------------------------------------------------------------------

def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_micro_batches_with_global_denominators_equal_one_big_batch(student, encoded):
    model = _model(student, DISTILL)
    parts = [_batch(student, encoded, [0, 1]), _batch(student, encoded, [2, 3])]
    whole = _batch(student, encoded, [0, 1, 2, 3])
    run_step(model, whole).total.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    counts = TokenCounts.of_batch(parts[0]) + TokenCounts.of_batch(parts[1])
    assert counts == TokenCounts.of_batch(whole)
    for part in parts:
        run_step(model, part, counts).total.backward()
    got = _grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_empty_batch_gives_zero_loss_and_zero_gradients(student, encoded):
    model = _model(student, ALIGN)
    batch = _batch(student, encoded)
    empty = dataclasses.replace(batch, ids=[], student_inputs={},
                                student_labels=torch.zeros(0, 0, dtype=torch.long),
                                student_answer_starts=[], teacher=[])
    out = run_step(model, empty)
    out.total.backward()
    assert out.total.item() == 0.0 and out.sums == {}
    assert all(p.grad is not None and not p.grad.any() for p in model.recalibrator.parameters())


def test_bf16_autocast_on_cpu_is_close_to_fp32(student, encoded):
    model = _model(student, DISTILL)
    batch = _batch(student, encoded)
    full = run_step(model, batch).total.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run_step(model, batch)
    out.total.backward()
    assert out.total.dtype == torch.float32
    assert out.total.item() == pytest.approx(full, rel=0.05)


def test_embedding_answer_input_reads_teacher_embeddings(student, encoded):
    gen = torch.Generator().manual_seed(1)
    table = TeacherEmbeddings(ids=torch.arange(V_TEACHER), rows=torch.randn(V_TEACHER, D_TEACHER,
                                                                            generator=gen))
    model = _model(student, ALIGN, answer_input="embedding", embeddings=table)
    batch = _batch(student, encoded)
    hidden = run_step(_model(student, ALIGN), batch)
    emb = run_step(model, batch)
    assert float(emb.sums["ar"]) != pytest.approx(float(hidden.sums["ar"]))
    partial = TeacherEmbeddings(ids=torch.arange(3), rows=table.rows[:3])
    model = _model(student, ALIGN, answer_input="embedding", embeddings=partial)
    with pytest.raises(BatchError, match="no cached teacher embedding"):
        run_step(model, batch)


# ---------------------------------------------------------------------------------------------
# Bad batches
# ---------------------------------------------------------------------------------------------

def _bad(batch, **changes):
    return dataclasses.replace(batch, **changes)


def test_bad_batches_name_the_sample(student, encoded):
    model = _model(student, ALIGN)
    batch = _batch(student, encoded, [0, 1])
    turns = batch.teacher
    cases = [
        (_bad(batch, teacher=None), "needs teacher turns"),
        (_bad(batch, teacher=[turns[0], turns[1][:1]]), "'s1': 2 student answer starts"),
        (_bad(batch, student_answer_starts=[[0], batch.student_answer_starts[1]]),
         "'s0' turn 0: student answer start 0"),
        (_bad(batch, teacher=[[dataclasses.replace(turns[0][0], window=turns[0][0].window[1:])],
                              turns[1]]), "'s0' turn 0: teacher window"),
        (_bad(batch, teacher=[[dataclasses.replace(turns[0][0], question=None)], turns[1]]),
         "no cached teacher question"),
    ]
    for bad, message in cases:
        with pytest.raises(BatchError, match=message):
            run_step(model, bad)


def test_stage_model_checks_its_parts(student):
    rec = Recalibrator.from_student(student.model, D_TEACHER + 1, RecalibratorConfig(blocks=1))
    with pytest.raises(StageSetupError, match="d_teacher"):
        StageModel(student.model, student.family, LossSpec.for_stage(ALIGN), rec,
                   TeacherSide.from_artifacts(teacher_head()))
    with pytest.raises(StageSetupError, match="Recalibrator and the teacher head"):
        StageModel(student.model, student.family, LossSpec.for_stage(ALIGN))
    with pytest.raises(StageSetupError, match="no Recalibrator"):
        configure_trainables(student.model, student.family, None, ALIGN.trains)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_distill_step_on_cuda_with_bf16_autocast(tiny_student_dir, encoded):
    student = load_vlm(tiny_student_dir, device="cuda")
    rec = Recalibrator.from_student(student.model, D_TEACHER, RecalibratorConfig(blocks=1))
    configure_trainables(student.model, student.family, rec, DISTILL.trains)
    model = StageModel(student.model, student.family, LossSpec.for_stage(DISTILL), rec,
                       TeacherSide.from_artifacts(teacher_head(), device="cuda"))
    batch = batch_to(_batch(student, encoded), "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = run_step(model, batch)
    out.total.backward()
    assert torch.isfinite(out.total) and out.total.device.type == "cuda"
    assert all(p.grad is not None for p in rec.parameters())
