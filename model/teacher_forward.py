"""The teacher forward and its per-sample hidden rows: one code path for extraction and online mode.

Both the teacher pass (``genrecal extract``) and the live teacher of ``genrecal train --online``
call :func:`teacher_forward` and :func:`hidden_rows`, so a cached feature and its online twin
come from the same operations on the same padded batch.

The forward is the model's plain forward (``model(**batch)``): nothing in its arguments filters
hidden states. Transformers 5 accepts a list for ``output_hidden_states`` but applies it to the
vision tower too, so a LLaVA projector that reads ``vision_feature_layer`` would get ``None``.
Instead two forward hooks read what the cache needs while the forward runs:

* ``z``, the post-norm last hidden state that the head reads (docs/method.md §1.1):
  the output of the decoder's final norm (:meth:`Family.final_norm`);
* the output of block L-2 (0-based blocks), which GRACE's L_RCKA reads at image positions
  (docs/method.md, GRACE, "L_RCKA"): the input of the last decoder block, i.e.
  ``hidden_states[-2]``.

Only the last position's logits are computed (``logits_to_keep=1``); the logit statistics are
computed from ``z`` and the head, chunked over the vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from genrecal.store.schema import answer_window_positions, question_positions
from genrecal.model.families import Family
from genrecal.model.padding import pad_batch, pad_offsets
from genrecal.store.spans import Spans


@dataclass(frozen=True)
class TeacherStates:
    """One padded batch's teacher states, in the model dtype on its device.

    final: [B, N, d] post-norm ``z``; penultimate: [B, N, d] output of block L-2, or None;
    offsets: index of each sample's first token in the padded batch (right padding: all 0).
    """

    final: torch.Tensor
    penultimate: torch.Tensor | None
    offsets: list[int]


def teacher_forward(model: torch.nn.Module, family: Family, inputs: Sequence[Mapping[str, torch.Tensor]],
                    pad_id: int, *, penultimate: bool) -> TeacherStates:
    """Right-pad ``inputs`` (per-sample processor outputs, batch dim 1), run the teacher once.

    Float inputs (pixels) take the model's dtype; everything goes to the device of the model's
    first parameter. Runs under ``torch.inference_mode()``: the states are inference tensors
    (``index_select`` them outside inference mode to use them in autograd).
    """
    batch = to_model(model, pad_batch(inputs, pad_id, "right"))
    offsets = pad_offsets([int(x["input_ids"].shape[-1]) for x in inputs], "right")
    captured: dict[str, torch.Tensor] = {}

    def keep_final(module, args, output):
        captured["final"] = output

    def keep_penultimate(module, args, kwargs):
        captured["penultimate"] = args[0] if args else kwargs["hidden_states"]

    hooks = [family.final_norm(model).register_forward_hook(keep_final)]
    if penultimate:
        layers = family.decoder_layers(model)
        last = layers[family.text_config(model.config).num_hidden_layers - 1]
        hooks.append(last.register_forward_pre_hook(keep_penultimate, with_kwargs=True))
    try:
        with torch.inference_mode():
            model(**batch, logits_to_keep=1, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return TeacherStates(final=captured["final"], penultimate=captured.get("penultimate"), offsets=offsets)


def to_model(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` on the device of ``model``'s first parameter; float inputs take its dtype."""
    first = next(model.parameters())
    return {k: v.to(first.device, dtype=first.dtype if v.is_floating_point() else v.dtype, non_blocking=True)
            for k, v in batch.items()}


def hidden_rows(final: torch.Tensor, spans: Spans, offset: int, *,
                question: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One sample's cached hidden rows, from its slice of the batch's ``z``.

    final: [N, d] (one padded row of :attr:`TeacherStates.final`); offset: where the sample
    starts in it; question: ``"all"`` / ``"text"`` (:func:`question_positions`) or None.
    Returns (answer rows [n_a, d] at :func:`answer_window_positions`, question rows [n_q, d] or
    None), on ``final``'s device and dtype, as normal tensors (not inference tensors).
    """
    answer = _take(final, answer_window_positions(spans), offset)
    rows = None if question is None else _take(final, question_positions(spans, question), offset)
    return answer, rows


def _take(states: torch.Tensor, positions: list[int], offset: int) -> torch.Tensor:
    """states [N, d] -> [len(positions), d] at ``offset + positions``."""
    index = torch.tensor(positions, dtype=torch.long, device=states.device) + offset
    return states.index_select(0, index)
