"""One forward pass of a training stage on a TrainBatch -> losses (docs/method.md §1).

A stage trains some of: the Recalibrator and five student parameter groups (see
:data:`STUDENT_PARTS`); :func:`configure_trainables` sets ``requires_grad`` accordingly.
:class:`StageModel` holds the student, the Recalibrator and the frozen teacher side (the
teacher head ``head_l`` and, for ``answer_input="embedding"``, teacher embedding rows: the only
teacher parts ever loaded) and computes the losses of one micro-batch:

* the student runs ONCE over the batch (``output_hidden_states``; ``family.final_hidden`` is
  its post-norm ``z``). CE_s = next-token CE of ``head_s(z)`` against ``student_labels``
  (docs/method.md §1.3, eq. (1.4)), computed chunk by chunk through the student head (equal to the CE of
  the model's own logits, without materialising ``[B, L, V_s]``);
* one Recalibrator row per (sample, assistant turn k) (docs/method.md §1.2):
  question = student ``z[b, :s_k]``, answer input = the cached teacher window minus its first
  row (``z_al``) or the teacher embedding rows of the answer ids; ``genrecal_losses`` gives
  L_ar + L_kl, plus L_reg through ``forward_teacher_only`` on the cached teacher question.

GRACE (docs/method.md §2.1) uses the same student forward: CE = CE_s, L_GDKD (2.6) between the
cached teacher logits (exact from ``z`` and ``head_l``, or from ``logit_stats``) and ``head_s(z)``
at the supervised positions, and L_RCKA (2.9) between the cached teacher Grams and the student's
own block L-2 states (``hidden_states[-2]``) at each image's tokens. The weights beta * w_d(n)
and omega * w_r(n) change per optimizer step (:meth:`StageModel.set_grace_weights`).

Normalisation is token-correct over any set of micro-batches and ranks: the forward returns
per-term SUMS, and ``total = sum_t w_t * sum_t / N_kind(t)`` where ``N`` is the number of
teacher answer tokens (L_ar, L_kl, L_reg), student target tokens (CE_s), the sum of the
confidence gates (L_GDKD, a gated mean) or the number of images RCKA keeps (L_RCKA) of the
whole global batch (``denominators``; default: this micro-batch).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from genrecal.common.config import AlignStage, DistillStage, FinetuneStage, GraceStage, TrainSwitches
from genrecal.model.families import Family
from genrecal.store.logit_stats import LogitStats
from genrecal.train.errors import BatchError, StageSetupError
from genrecal.train.grace_losses import gdkd_exact, gdkd_from_stats, rcka_loss, teacher_logit_stats
from genrecal.train.losses import (DEFAULT_CHUNK_SIZE, DEFAULT_ROW_BLOCK, IGNORE_INDEX,
                                   GenRecalLosses, GenRecalWeights, LmHead, answer_window,
                                   genrecal_losses, student_ce, window_targets)
from genrecal.train.recalibrator import Recalibrator

if TYPE_CHECKING:
    from genrecal.store.artifacts import TeacherEmbeddings, TeacherHead
    from genrecal.train.data import GraceTarget, TeacherTurn, TrainBatch

#: Student parameter groups a stage can train: the switches of TrainSwitches but the
#: Recalibrator's. student_body = decoder layers + final norm.
STUDENT_PARTS = tuple(name for name in TrainSwitches.model_fields if name != "recalibrator")
#: Loss terms normalised by teacher answer tokens / by student target tokens / by the sum of the
#: confidence gates (GRACE's gated mean (2.6)) / by the images RCKA keeps (GRACE (2.9)).
TEACHER_TERMS = ("ar", "kl", "reg_ce", "reg_kl")
STUDENT_TERMS = ("ce_student",)
GRACE_TERMS = ("gdkd", "rcka")
TERMS = TEACHER_TERMS + STUDENT_TERMS + GRACE_TERMS


# ==============================================================================================
# Trainable parameter groups
# ==============================================================================================

def _param_ids(*modules: nn.Module) -> set[int]:
    return {id(p) for m in modules for p in m.parameters()}


def student_part_params(model: nn.Module, family: Family) -> dict[str, set[int]]:
    """Parameter ids of each of :data:`STUDENT_PARTS` (a tied tensor is in two parts)."""
    text = family.text_model(model)
    vision, projector = family.vision_encoder(model), family.projector(model)
    projector_ids = _param_ids(projector)
    return {"vision_encoder": _param_ids(vision) - projector_ids,
            "projector": projector_ids,
            "student_body": _param_ids(text.layers, text.norm),
            "student_embeddings": _param_ids(text.embed_tokens),
            "student_head": _param_ids(family.lm_head(model))}


def _student_switch(name: str, param: nn.Parameter, parts: dict[str, set[int]],
                    switches: TrainSwitches) -> bool:
    """Whether one student parameter trains; its groups must agree (tied weights)."""
    owners = [part for part, ids in parts.items() if id(param) in ids]
    if not owners:
        raise StageSetupError(
            f"student parameter {name!r} belongs to none of the groups {STUDENT_PARTS}, so the "
            "stage cannot decide whether it trains; this model layout is not supported "
            "(extend genrecal.train.step.student_part_params).")
    values = {getattr(switches, part) for part in owners}
    if len(values) > 1:
        raise StageSetupError(
            f"student parameter {name!r} is shared by {owners} (tied weights), but trains."
            f"{owners[0]}={getattr(switches, owners[0])} and trains.{owners[1]}="
            f"{getattr(switches, owners[1])}; switch them both on or both off in the stage config.")
    return values.pop()


def configure_trainables(student: nn.Module, family: Family, recalibrator: Recalibrator | None,
                         switches: TrainSwitches) -> list[tuple[str, nn.Parameter]]:
    """Set ``requires_grad`` on every student / Recalibrator parameter from ``switches``.

    Returns the trainable parameters as ``("student.<name>" | "recalibrator.<name>", param)``
    in a fixed order (Recalibrator first, then the student; tied tensors once).
    """
    if switches.recalibrator and recalibrator is None:
        raise StageSetupError("trains.recalibrator is on but the stage has no Recalibrator; "
                              "only the align and distill stages use one.")
    parts = student_part_params(student, family)
    trainable: list[tuple[str, nn.Parameter]] = []
    if recalibrator is not None:
        for name, param in recalibrator.named_parameters():
            param.requires_grad_(bool(switches.recalibrator))
            if switches.recalibrator:
                trainable.append((f"recalibrator.{name}", param))
    for name, param in student.named_parameters():
        on = _student_switch(name, param, parts, switches)
        param.requires_grad_(on)
        if on:
            trainable.append((f"student.{name}", param))
    return trainable


# ==============================================================================================
# Token counts, loss settings, results
# ==============================================================================================

@dataclass(frozen=True)
class TokenCounts:
    """Loss denominators. teacher: teacher answer tokens (targets of L_ar / L_kl / L_reg; GRACE:
    its supervised tokens); student: student target tokens (``student_labels != -100``, CE_s);
    gate: the sum of GRACE's confidence gates (L_GDKD); images: the images RCKA keeps."""

    teacher: int = 0
    student: int = 0
    gate: float = 0.0
    images: int = 0

    @classmethod
    def of_batch(cls, batch: TrainBatch) -> TokenCounts:
        """Token counts; GRACE's gate and image counts come from :meth:`StageModel.token_counts`."""
        teacher = sum(int(t.answer_ids.numel()) for turns in (batch.teacher or []) for t in turns)
        student = int((batch.student_labels != IGNORE_INDEX).sum())
        return cls(teacher=teacher, student=student)

    def __add__(self, other: TokenCounts) -> TokenCounts:
        return TokenCounts(self.teacher + other.teacher, self.student + other.student,
                           self.gate + other.gate, self.images + other.images)

    def of_term(self, term: str) -> float:
        return {"gdkd": self.gate, "rcka": self.images}.get(
            term, self.student if term in STUDENT_TERMS else self.teacher)

    def to_tensor(self) -> torch.Tensor:
        """[4] float64 (exact for any realistic count), for all-reduce."""
        return torch.tensor([self.teacher, self.student, self.gate, self.images], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> TokenCounts:
        return cls(teacher=int(t[0].item()), student=int(t[1].item()), gate=float(t[2].item()),
                   images=int(t[3].item()))


@dataclass(frozen=True)
class GraceSpec:
    """GRACE's loss settings (docs/method.md §2.1): GDKD temperature, alpha, beta_dkd and teacher
    source (``exact`` or ``logit_stats``), RCKA's min_tokens and whether RCKA is on (omega > 0)."""

    temperature: float
    alpha: float
    beta_dkd: float
    source: str
    min_tokens: int
    rcka: bool


@dataclass(frozen=True)
class LossSpec:
    """Loss weights of a stage (docs/method.md §1.3, §1.4).

    genrecal: L_ar / L_kl / L_reg weights and temperature, None when the stage uses no
    teacher (finetune). ce_student: weight of CE_s (0: off). answer_input: "hidden" (z_al) or
    "embedding" (teacher answer-token embeddings), the Recalibrator's answer input.
    """

    genrecal: GenRecalWeights | None
    ce_student: float = 0.0
    answer_input: str = "hidden"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    row_block: int = DEFAULT_ROW_BLOCK
    grace: GraceSpec | None = None

    @classmethod
    def for_stage(cls, stage: AlignStage | DistillStage | FinetuneStage | GraceStage,
                  answer_input: str = "hidden", **chunks: int) -> LossSpec:
        """From an AlignStage / DistillStage (``stage.losses``), a FinetuneStage (CE_s only) or a
        GraceStage (CE_s weighted ``ce``, L_GDKD, L_RCKA)."""
        if isinstance(stage, GraceStage):
            grace = GraceSpec(temperature=stage.gdkd.temperature, alpha=stage.gdkd.alpha,
                              beta_dkd=stage.gdkd.beta_dkd, source=stage.gdkd.source,
                              min_tokens=stage.rcka.min_tokens, rcka=stage.rcka.omega > 0)
            return cls(genrecal=None, ce_student=stage.ce, answer_input=answer_input, grace=grace,
                       **chunks)
        losses = getattr(stage, "losses", None)
        if losses is None:
            return cls(genrecal=None, ce_student=1.0, answer_input=answer_input, **chunks)
        weights = None
        if losses.ar or losses.kl or losses.reg:
            weights = GenRecalWeights(ar=losses.ar, kl=losses.kl, reg_ce=losses.reg_ce,
                                      reg_kl=losses.reg_kl, temperature=losses.temperature)
        return cls(genrecal=weights, ce_student=losses.ce_student, answer_input=answer_input,
                   **chunks)

    @property
    def uses_reg(self) -> bool:
        return self.genrecal is not None and (self.genrecal.reg_ce > 0 or self.genrecal.reg_kl > 0)

    def weight(self, term: str) -> float:
        """The term's fixed weight; GRACE's gdkd / rcka weights change per step: 1.0 here
        (on), see :meth:`StageModel.term_weights`."""
        if term in STUDENT_TERMS:
            return self.ce_student
        if term in GRACE_TERMS:
            return float(self.grace is not None and (term == "gdkd" or self.grace.rcka))
        return 0.0 if self.genrecal is None else float(getattr(self.genrecal, term))

    def total(self, means: dict[str, float], weights: dict[str, float] | None = None) -> float:
        """The weighted loss from per-term means (what the optimizer minimised); ``weights``
        overrides the fixed weights (GRACE's per-step ones, :meth:`StageModel.term_weights`)."""
        weights = weights or {}
        return sum(weights.get(term, self.weight(term)) * value for term, value in means.items())


@dataclass(frozen=True)
class LossBreakdown:
    """Losses of one micro-batch.

    total: differentiable 0-dim float tensor, ``sum_t w_t * sums[t] / denominators(t)``.
    sums: detached 0-dim tensors, per-term sums over this micro-batch's tokens (terms of
    :data:`TERMS` that the stage computes). tokens: this micro-batch's token counts.
    """

    total: torch.Tensor
    sums: dict[str, torch.Tensor]
    tokens: TokenCounts

    def means(self) -> dict[str, float]:
        """Per-term means over this micro-batch's tokens of the term's kind."""
        return {k: float(v) / max(self.tokens.of_term(k), 1) for k, v in self.sums.items()}


@dataclass(frozen=True)
class TeacherSide:
    """The frozen teacher parts a GenRecal stage reads: head_l and optional embedding rows."""

    head: LmHead
    embeddings: TeacherEmbeddings | None = None

    @classmethod
    def from_artifacts(cls, head: TeacherHead, embeddings: TeacherEmbeddings | None = None,
                       device: torch.device | str = "cpu") -> TeacherSide:
        bias = None if head.bias is None else head.bias.to(device)
        lm_head = LmHead(weight=head.weight.to(device), bias=bias, transform=head.transform)
        return cls(head=lm_head, embeddings=embeddings)

    @property
    def hidden_size(self) -> int:
        return int(self.head.weight.shape[1])


# ==============================================================================================
# Batch -> Recalibrator rows
# ==============================================================================================

@dataclass(frozen=True)
class RecalRows:
    """One row per (sample, turn), padded; masks are bool, True at real tokens.

    z_q [R, Nq, d_s] student question features; answer_input [R, Na, d_l]; answer_ids [R, Na]
    long; z_window [R, Na + 1, d_l] cached teacher window; question [R, Nql, d_l] or None.
    Original positions, long, only when the Recalibrator keeps them (``reassign_positions`` False,
    the NPE ablation), else None: q_positions [R, Nq] (student positions 0..s_k-1),
    a_positions [R, Na] (teacher positions s_k..e_k-1 of the answer tokens), question_positions
    [R, Nql] (teacher positions of the cached question rows).
    """

    z_q: torch.Tensor
    q_mask: torch.Tensor
    answer_input: torch.Tensor
    a_mask: torch.Tensor
    answer_ids: torch.Tensor
    z_window: torch.Tensor
    question: torch.Tensor | None
    question_mask: torch.Tensor | None
    q_positions: torch.Tensor | None = None
    a_positions: torch.Tensor | None = None
    question_positions: torch.Tensor | None = None


def _turns(batch: TrainBatch, seq_len: int) -> list[tuple[int, int, TeacherTurn]]:
    """(sample index, answer start s_k, teacher turn) for every turn; checks the pairing."""
    if batch.teacher is None or len(batch.teacher) != len(batch.ids):
        raise BatchError(f"batch {batch.ids}: this stage needs teacher turns for every sample "
                         f"(got {None if batch.teacher is None else len(batch.teacher)} lists for "
                         f"{len(batch.ids)} samples); build the loader with the teacher cache.")
    rows = []
    for b, (starts, turns) in enumerate(zip(batch.student_answer_starts, batch.teacher)):
        if len(starts) != len(turns) or not turns:
            raise BatchError(f"sample {batch.ids[b]!r}: {len(starts)} student answer starts but "
                             f"{len(turns)} teacher turns; the loader must keep n_turns = min of "
                             "both (> 0) on each side.")
        for k, (start, turn) in enumerate(zip(starts, turns)):
            if not 1 <= start < seq_len:
                raise BatchError(f"sample {batch.ids[b]!r} turn {k}: student answer start "
                                 f"{start} outside [1, {seq_len}); the question must be non-empty "
                                 "and the answer inside the sequence.")
            _check_turn(batch.ids[b], k, turn)
            rows.append((b, int(start), turn))
    return rows


def _check_turn(sample_id: str, k: int, turn: TeacherTurn) -> None:
    n_answer = int(turn.answer_ids.numel())
    if turn.answer_ids.dim() != 1 or n_answer == 0 or turn.window.dim() != 2 \
            or turn.window.shape[0] != n_answer + 1:
        raise BatchError(f"sample {sample_id!r} turn {k}: teacher window "
                         f"{tuple(turn.window.shape)} must be [Na + 1, d_l] for answer_ids "
                         f"{tuple(turn.answer_ids.shape)} = [Na], Na > 0; the cache record and "
                         "the loader disagree.")
    q = turn.question
    if q is not None and (q.dim() != 2 or q.shape[0] == 0 or q.shape[1] != turn.window.shape[1]):
        raise BatchError(f"sample {sample_id!r} turn {k}: teacher question "
                         f"{tuple(q.shape)} must be [Nq > 0, {turn.window.shape[1]}].")


def _pad(tensors: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad [n_i, ...] tensors -> ([R, max n, ...], bool mask [R, max n])."""
    lengths = torch.tensor([t.shape[0] for t in tensors])
    padded = pad_sequence(tensors, batch_first=True).to(device)
    mask = torch.arange(padded.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    return padded, mask.to(device)


def _answer_input(turn: TeacherTurn, teacher: TeacherSide, mode: str, where: str) -> torch.Tensor:
    if mode == "hidden":
        return turn.window[1:]
    if teacher.embeddings is None:
        raise StageSetupError("recalibrator.answer_input is 'embedding' but no teacher "
                              "embeddings were loaded; load them with load_teacher_embeddings.")
    try:
        return teacher.embeddings.lookup(turn.answer_ids)
    except KeyError as exc:
        raise BatchError(f"{where}: {exc.args[0]}") from None


def build_rows(z: torch.Tensor, batch: TrainBatch, teacher: TeacherSide, answer_input: str,
               with_question: bool, with_positions: bool = False) -> RecalRows:
    """Slice the student features per turn and pad the teacher tensors (docs/method.md §1.2).

    z: [B, Ls, d_s] student post-norm features of the batch (float); with_positions: also the
    original position ids (:class:`RecalRows`).
    """
    rows = _turns(batch, z.shape[1])
    device = z.device
    index = torch.tensor([b for b, _, _ in rows], device=device)
    starts = torch.tensor([s for _, s, _ in rows], device=device)
    n_q = int(starts.max())
    z_q = z[:, :n_q][index]
    q_mask = torch.arange(n_q, device=device).unsqueeze(0) < starts.unsqueeze(1)
    where = [f"sample {batch.ids[b]!r}" for b, _, _ in rows]
    a_in, a_mask = _pad([_answer_input(t, teacher, answer_input, w)
                         for (_, _, t), w in zip(rows, where)], device)
    answer_ids, _ = _pad([t.answer_ids.long() for _, _, t in rows], device)
    z_window, _ = _pad([t.window for _, _, t in rows], device)
    question = question_mask = None
    if with_question:
        question, question_mask = _pad([_question(t, w) for (_, _, t), w in zip(rows, where)],
                                       device)
    positions = {}
    if with_positions:
        positions["q_positions"] = torch.arange(n_q, device=device).expand(len(rows), -1)
        positions["a_positions"], _ = _pad([t.answer_start + torch.arange(t.answer_ids.numel())
                                            for _, _, t in rows], device)
        if with_question:
            positions["question_positions"], _ = _pad([_question_positions(t, w) for (_, _, t), w
                                                       in zip(rows, where)], device)
    return RecalRows(z_q=z_q, q_mask=q_mask, answer_input=a_in, a_mask=a_mask,
                     answer_ids=answer_ids, z_window=z_window, question=question,
                     question_mask=question_mask, **positions)


def _question_positions(turn: TeacherTurn, where: str) -> torch.Tensor:
    if turn.question_positions is None:
        raise BatchError(f"{where}: recalibrator.reassign_positions is false but the teacher turn "
                         "carries no question positions; build it with genrecal.train.data.teacher_turns.")
    return turn.question_positions.long()


def _check_same_inputs(batch: TrainBatch, targets: list[GraceTarget]) -> None:
    """GRACE needs one input for both models: the student's input ids equal the cached ones."""
    ids = batch.student_inputs["input_ids"]
    for b, target in enumerate(targets):
        n = int(target.input_ids.numel())
        mine = ids[b, :n].to(target.input_ids.device)
        if n > ids.shape[1] or not torch.equal(mine, target.input_ids) or \
                int(batch.student_inputs["attention_mask"][b].sum()) != n:
            raise BatchError(f"sample {batch.ids[b]!r}: the student's input ids differ from the ones "
                             "the teacher cache holds; GRACE needs teacher and student to share the "
                             "tokenizer and chat template. Extract the cache with a teacher of the "
                             "student's tokenizer, or use the GenRecal stages for this pair.")


def _question(turn: TeacherTurn, where: str) -> torch.Tensor:
    if turn.question is None:
        raise BatchError(f"{where}: L_reg is on (losses.reg > 0) but the batch has no cached "
                         "teacher question features; extract with cache.features."
                         "question_hidden 'all' or 'text', or set losses.reg: 0.")
    return turn.question


# ==============================================================================================
# The stage model
# ==============================================================================================

def batch_to(batch: TrainBatch, device: torch.device | str,
             dtype: torch.dtype | None = None) -> TrainBatch:
    """The batch with its student tensors on ``device``; floating student inputs (pixel values)
    cast to ``dtype`` (the student's parameter dtype). Teacher tensors move in build_rows."""
    def move(t: torch.Tensor) -> torch.Tensor:
        cast = dtype if dtype is not None and t.is_floating_point() else None
        return t.to(device=device, dtype=cast, non_blocking=True)
    inputs = {k: move(v) if isinstance(v, torch.Tensor) else v
              for k, v in batch.student_inputs.items()}
    return dataclasses.replace(batch, student_inputs=inputs,
                               student_labels=batch.student_labels.to(device, non_blocking=True))


class StageModel(nn.Module):
    """Student + Recalibrator + frozen teacher side of one stage (a DDP-wrappable module).

    ``forward(batch, denominators)`` returns a dict of tensors (DDP flattens its outputs):
    ``"total"`` (differentiable) and ``"sum.<term>"`` (detached); use :func:`run_step`.
    """

    def __init__(self, student: nn.Module, family: Family, spec: LossSpec,
                 recalibrator: Recalibrator | None = None, teacher: TeacherSide | None = None):
        super().__init__()
        if spec.genrecal is not None and (recalibrator is None or teacher is None):
            raise StageSetupError("the GenRecal losses need a Recalibrator and the teacher "
                                  "head; pass both (or use a finetune stage).")
        if teacher is not None and recalibrator is not None \
                and teacher.hidden_size != recalibrator.d_teacher:
            raise StageSetupError(
                f"the teacher head has width {teacher.hidden_size} but the Recalibrator was "
                f"built for d_teacher={recalibrator.d_teacher}; rebuild it from this cache.")
        if spec.grace is not None and spec.grace.source == "exact" and teacher is None:
            raise StageSetupError("GRACE with gdkd.source 'exact' needs the cached teacher head; "
                                  "load it with load_teacher_head (or use gdkd.source: logit_stats).")
        self.student = student
        self.recalibrator = recalibrator
        self.family = family
        self.spec = spec
        self.teacher = teacher
        self.grace_weights = {"gdkd": 0.0, "rcka": 0.0}  # beta * w_d(n), omega * w_r(n) of (2.1)

    # -- GRACE -------------------------------------------------------------------------------

    def set_grace_weights(self, gdkd: float, rcka: float) -> None:
        """The weights of L_GDKD and L_RCKA for the coming optimizer step (docs/method.md (2.1))."""
        self.grace_weights = {"gdkd": float(gdkd), "rcka": float(rcka)}

    def term_weights(self) -> dict[str, float]:
        """Every term's weight in the current step (GRACE's change per step)."""
        weights = {t: self.spec.weight(t) for t in TERMS}
        if self.spec.grace is not None:
            weights.update({t: self.grace_weights[t] * weights[t] for t in GRACE_TERMS})
        return weights

    def student_head(self) -> LmHead:
        """``head_s``: the student's lm_head (weight, bias) and logit transform."""
        lm_head = self.family.lm_head(self.student)
        return LmHead(weight=lm_head.weight, bias=lm_head.bias,
                      transform=self.family.logit_transform(self.student))

    @torch.no_grad()
    def token_counts(self, batch: TrainBatch) -> TokenCounts:
        """The loss denominators of ``batch`` (on the training device). GRACE: fills each
        target's confidence gate (2.5) from the teacher's T=1 entropy over the student's
        vocabulary (cached, or from ``z`` and ``head_l`` for the exact source) and counts
        the images RCKA keeps (teacher side: at least ``min_tokens`` tokens)."""
        counts = TokenCounts.of_batch(batch)
        grace = self.spec.grace
        if grace is None or not batch.ids:
            return counts
        vocab = int(self.family.lm_head(self.student).weight.shape[0])
        gate_sum, images = 0.0, 0
        for (target,) in batch.teacher:
            if grace.source == "exact":
                entropy = teacher_logit_stats(target.hidden, self.teacher.head, target.answer_ids,
                                              top_k=1, temperature=grace.temperature,
                                              vocab_size=vocab).entropy
            else:
                entropy = target.stats.entropy
            target.gate = torch.exp(-entropy.float() / torch.log(torch.tensor(float(vocab))))
            gate_sum += float(target.gate.sum())
            images += sum(e - s >= grace.min_tokens for s, e in target.image_spans) if grace.rcka else 0
        return dataclasses.replace(counts, gate=gate_sum, images=images)

    def forward(self, batch: TrainBatch,
                denominators: TokenCounts | None = None) -> dict[str, torch.Tensor]:
        counts = denominators or self.token_counts(batch)  # GRACE: gates and images too
        if not batch.ids:  # every sample skipped: a zero loss that still reaches every
            return {"total": self._zero_loss()}  # trainable (DDP expects their gradients)
        z, penultimate = self.student_features(batch, penultimate=self.spec.grace is not None
                                               and self.spec.grace.rcka)
        total = z.new_zeros((), dtype=torch.float32)
        sums: dict[str, torch.Tensor] = {}
        if self.spec.ce_student > 0:
            sums["ce_student"] = self._student_ce(z, batch.student_labels)
            total = total + self.spec.ce_student * sums["ce_student"] / max(counts.student, 1)
        if self.spec.genrecal is not None:
            out = self._genrecal(z, batch)
            total = total + out.total / max(counts.teacher, 1)
            sums.update({t: getattr(out, t) for t in TEACHER_TERMS if getattr(out, t) is not None})
        if self.spec.grace is not None:
            grace = self._grace(z, penultimate, batch)
            sums.update(grace)
            total = total + self.grace_weights["gdkd"] * grace["gdkd"] / max(counts.gate, 1e-12)
            if "rcka" in grace:
                total = total + self.grace_weights["rcka"] * grace["rcka"] / max(counts.images, 1)
        return {"total": total, **{f"sum.{k}": v.detach().float() for k, v in sums.items()}}

    def _zero_loss(self) -> torch.Tensor:
        trainable = [p for p in self.parameters() if p.requires_grad]
        return sum((p.sum() * 0.0 for p in trainable), torch.zeros((), dtype=torch.float32))

    def student_features(self, batch: TrainBatch, penultimate: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Post-norm last hidden states z [B, Ls, d_s] and, if asked, the output of block L-2
        [B, Ls, d_s] (``hidden_states[-2]``, GRACE's RCKA); no graph when the student is frozen."""
        trains = any(p.requires_grad for p in self.student.parameters())
        with torch.set_grad_enabled(trains and torch.is_grad_enabled()):
            out = self.student(**batch.student_inputs, output_hidden_states=True,
                               use_cache=False, logits_to_keep=1)
        z = self.family.final_hidden(self.student, out.hidden_states)
        return z, out.hidden_states[-2] if penultimate else None

    def _student_ce(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum over target tokens of CE(head_s(z_t), labels_t) (docs/method.md §1.3, eq. (1.4))."""
        return student_ce(z, labels, head=self.student_head(), reduction="sum",
                          chunk_size=self.spec.chunk_size, row_block=self.spec.row_block)

    def _grace(self, z: torch.Tensor, penultimate: torch.Tensor | None,
               batch: TrainBatch) -> dict[str, torch.Tensor]:
        """GRACE's sums (docs/method.md §2.1): ``gdkd`` = sum_i g_i * DKD_i over the supervised
        positions (the numerator of (2.6)), ``rcka`` = sum over kept images of (1 - CKA).

        z: [B, Ls, d_s] student post-norm states; penultimate: [B, Ls, d_s] block L-2 output
        (RCKA on) or None. Teacher and student read the same input ids, so the supervised
        positions (``student_labels != -100``) are the cached target rows, in the same order.
        """
        grace, labels = self.spec.grace, batch.student_labels
        targets = [target for (target,) in batch.teacher]
        _check_same_inputs(batch, targets)
        mask = labels != IGNORE_INDEX  # [B, Ls]; row order (b, t) = the cached rows' order
        rows, ids = z[mask], labels[mask]  # [N, d_s], [N]
        gate = torch.cat([t.gate for t in targets]).to(rows.device)  # [N], filled by token_counts
        settings = dict(temperature=grace.temperature, alpha=grace.alpha, beta_dkd=grace.beta_dkd,
                        chunk_size=self.spec.chunk_size, row_block=self.spec.row_block)
        if grace.source == "exact":
            z_t = torch.cat([t.hidden for t in targets]).to(rows.device)
            out = gdkd_exact(z_t, self.teacher.head, rows, self.student_head(), ids, **settings)
        else:
            stats = LogitStats(**{k: torch.cat([getattr(t.stats, k) for t in targets]).to(rows.device)
                                  for k in targets[0].stats.to_dict()})
            out = gdkd_from_stats(stats, rows, self.student_head(), ids, **settings)
        sums = {"gdkd": (gate * out.dkd).sum()}
        if grace.rcka:
            grams, states = [], []
            for b, target in enumerate(targets):
                for (start, end), gram in zip(target.image_spans, target.grams or []):
                    if end - start >= grace.min_tokens:
                        grams.append(gram.to(rows.device))
                        states.append(penultimate[b, start:end].float())
            kept = rcka_loss(grams, states, grace.min_tokens)
            sums["rcka"] = kept.loss * kept.n_images_used  # skipped (degenerate) images add 0
        return sums

    def _genrecal(self, z: torch.Tensor, batch: TrainBatch) -> GenRecalLosses:
        """L_ar + L_kl (+ L_reg) summed over teacher answer tokens (docs/method.md §1)."""
        spec, rec = self.spec, self.recalibrator
        keep_positions = not rec.cfg.reassign_positions  # NPE ablation: the original positions
        rows = build_rows(z, batch, self.teacher, spec.answer_input, spec.uses_reg, keep_positions)
        out = rec(rows.z_q, rows.q_mask, rows.answer_input, rows.a_mask, rows.q_positions, rows.a_positions)
        r_window, _ = answer_window(out.r_q, rows.q_mask, out.r_a, rows.a_mask)
        r_teacher = None
        if spec.uses_reg:
            out_t = rec.forward_teacher_only(rows.question, rows.question_mask, rows.answer_input,
                                             rows.a_mask, rows.question_positions, rows.a_positions)
            r_teacher, _ = answer_window(out_t.r_q, rows.question_mask, out_t.r_a, rows.a_mask)
        return genrecal_losses(self.teacher.head, rows.z_window, r_window,
                               window_targets(rows.answer_ids, rows.a_mask),
                               r_teacher_window=r_teacher, weights=spec.genrecal,
                               reduction="sum", chunk_size=spec.chunk_size,
                               row_block=spec.row_block)


def run_step(model: nn.Module, batch: TrainBatch,
             denominators: TokenCounts | None = None) -> LossBreakdown:
    """Forward one micro-batch through a StageModel (or a DDP wrapper of one).

    denominators: token counts of the whole global batch (all micro-batches, all ranks); None
    normalises by this micro-batch alone. Call ``.total.backward()`` on the result.
    """
    out = model(batch, denominators)
    sums = {k.removeprefix("sum."): v for k, v in out.items() if k.startswith("sum.")}
    return LossBreakdown(total=out["total"], sums=sums, tokens=TokenCounts.of_batch(batch))
