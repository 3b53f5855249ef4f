"""Format a :class:`~genrecal.data.sample.Sample` for one VLM and find its spans.

The sample goes through the model's OWN chat template (``processor.apply_chat_template`` on
``sample.to_messages()``) and processor (image tokens expanded by the processor itself), so a
teacher and a student see the same conversation in their own tokenisation.

Span finding is exact and template-agnostic (no per-template string patterns):

1. the full conversation is rendered and tokenised once (``input_ids``);
2. for assistant turn k the conversation is rendered again with that turn's text replaced by a
   sentinel; the text before the sentinel is the question prefix (it must be a string prefix
   of the full rendering), and what follows the sentinel tells which end-of-turn token the
   template closes the turn with (one of :attr:`Family.end_of_turn`);
3. the prefix (trailing spaces removed: tokenizers attach a space to the word after it) is
   tokenised with the images it references; its ids must be a prefix of ``input_ids``, and
   their count is the answer's first token;
4. the answer ends just past the first end-of-turn token after its start.

Image spans are the runs of image-token ids (one run per image reference, checked).
Text that contains a control token of the tokenizer (``<image>``, ``<|im_end|>``...) is
rejected, so user text can neither inject image placeholders nor close a turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from genrecal.data.sample import Sample
from genrecal.store.errors import SpanError
from genrecal.model.families import Family
from genrecal.store.spans import Spans, end_of_turn_after, image_runs

SENTINEL = "\ue000genrecal-answer\ue001"  # private-use code points: never in real text


@dataclass(frozen=True)
class Encoded:
    """One sample encoded for one model.

    inputs: what ``model(**inputs)`` takes (``input_ids`` int64 ``[1, N]``, ``attention_mask``,
    ``pixel_values``...); input_ids: the same ids as a list; spans: see :class:`Spans`;
    dropped_turns: trailing assistant turns removed to fit ``max_length``.
    """

    inputs: dict[str, torch.Tensor]
    input_ids: list[int]
    spans: Spans
    dropped_turns: int = 0


@dataclass(frozen=True)
class _Conversation:
    """A validated sample: messages, images in reference order, images before each turn."""

    sample_id: str
    messages: list[dict] = field(repr=False)
    images: list = field(repr=False)
    refs_before: tuple[int, ...]

    def upto(self, n_turns: int) -> "_Conversation":
        n_images = self.refs_before[n_turns] if n_turns < len(self.messages) else len(self.images)
        return _Conversation(self.sample_id, self.messages[:n_turns], self.images[:n_images],
                             self.refs_before[:n_turns])

    def assistant_turns(self) -> list[int]:
        return [t for t, m in enumerate(self.messages) if m["role"] == "assistant"]


def encode_sample(loaded_or_pair, sample: Sample, *, max_length: int | None = None) -> Encoded:
    """Encode ``sample`` with a :class:`LoadedVLM` or a ``(processor, family)`` pair.

    ``max_length`` keeps whole trailing turns out until the sequence fits; SpanError (naming the
    sample id) if even the first answer does not fit, an answer is empty, or the spans cannot be
    located exactly.
    """
    processor, family = _unpack(loaded_or_pair)
    conversation = _prepare(sample, processor)
    encoded = _encode(processor, family, conversation)
    if max_length is None or len(encoded.input_ids) <= max_length:
        return encoded
    return _fit(processor, family, conversation, encoded, max_length)


def _unpack(loaded_or_pair):
    if isinstance(loaded_or_pair, tuple):
        processor, family = loaded_or_pair
    else:
        processor, family = loaded_or_pair.processor, loaded_or_pair.family
    if not isinstance(family, Family):
        raise TypeError(f"encode_sample: expected a LoadedVLM or (processor, Family), got family "
                        f"of type {type(family).__name__}")
    return processor, family


# ----- validation ------------------------------------------------------------------------------
def _prepare(sample: Sample, processor) -> _Conversation:
    _check_turns(sample)
    _check_control_tokens(sample, processor.tokenizer)
    refs, refs_before = _image_references(sample)
    loaded = sample.load_images() if refs else []
    return _Conversation(sample.id, sample.to_messages(), [loaded[i] for i in refs], refs_before)


def _check_turns(sample: Sample) -> None:
    roles = [t.role for t in sample.turns]
    if "assistant" not in roles:
        raise SpanError(f"sample '{sample.id}': no assistant turn, so there is no answer to "
                        "distil; drop the sample or add the answer")
    for k, turn in enumerate(t for t in sample.turns if t.role == "assistant"):
        if not turn.text.strip():
            raise SpanError(f"sample '{sample.id}': assistant turn {k} has an empty answer; "
                            "fill in the answer or drop the sample")
        if any(isinstance(p, int) for p in turn.parts):
            raise SpanError(f"sample '{sample.id}': assistant turn {k} contains an image; "
                            "images are only supported in system/user turns")


def _check_control_tokens(sample: Sample, tokenizer) -> None:
    controls = set(tokenizer.all_special_tokens) | {
        t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    for t, turn in enumerate(sample.turns):
        found = sorted(tok for tok in controls if tok and tok in turn.text)
        if found:
            raise SpanError(f"sample '{sample.id}': turn {t} ({turn.role}) contains the control "
                            f"token(s) {found} as text; remove them from the dataset (they would "
                            "act as image placeholders / turn ends)")


def _image_references(sample: Sample) -> tuple[list[int], tuple[int, ...]]:
    refs: list[int] = []
    before: list[int] = []
    for turn in sample.turns:
        before.append(len(refs))
        for part in turn.parts:
            if isinstance(part, int):
                if not 0 <= part < len(sample.images):
                    raise SpanError(f"sample '{sample.id}': image reference {part} out of range "
                                    f"(the sample has {len(sample.images)} images)")
                refs.append(part)
    return refs, tuple(before)


# ----- encoding --------------------------------------------------------------------------------
def _render(processor, messages: list[dict]) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def _tokenize(processor, text: str, images: list):
    """Processor call mirroring ``apply_chat_template(tokenize=True)`` (no double BOS)."""
    bos = processor.tokenizer.bos_token
    add_special = not (bos is not None and text.startswith(bos))
    return processor(text=text, images=images or None, return_tensors="pt",
                     add_special_tokens=add_special)


def _encode(processor, family: Family, conversation: _Conversation) -> Encoded:
    text = _render(processor, conversation.messages)
    batch = _tokenize(processor, text, conversation.images)
    input_ids = batch["input_ids"][0].tolist()
    answers = tuple(_answer_span(processor, family, conversation, t, text, input_ids)
                    for t in conversation.assistant_turns())
    spans = Spans(images=_image_spans(processor, family, conversation, input_ids),
                  questions=_questions(answers), answers=answers)
    return Encoded(inputs=dict(batch), input_ids=input_ids, spans=spans)


def _questions(answers) -> tuple[tuple[int, int], ...]:
    starts = [0, *(end for _, end in answers[:-1])]
    return tuple((s, a[0]) for s, a in zip(starts, answers))


def _image_spans(processor, family: Family, conversation: _Conversation, input_ids: list[int]):
    runs = image_runs(input_ids, family.processor_image_token_ids(processor))
    if len(runs) != len(conversation.images):
        raise SpanError(f"sample '{conversation.sample_id}': found {len(runs)} runs of image tokens "
                        f"for {len(conversation.images)} image references; the chat template "
                        "places images next to each other without a separator, so their spans "
                        "cannot be told apart")
    return tuple(runs)


def _answer_span(processor, family, conversation, turn: int, text: str, input_ids):
    char_start, eot = _answer_char_start(processor, family, conversation, turn, text)
    start = _prefix_token_count(processor, conversation, turn, text[:char_start].rstrip(" "),
                                input_ids)
    eot_id = _token_id(processor.tokenizer, eot, conversation.sample_id)
    end = end_of_turn_after(input_ids, start, eot_id)
    if end is None:
        raise SpanError(f"sample '{conversation.sample_id}': assistant turn {turn} has no "
                        f"end-of-turn token {eot!r} after its start (token {start})")
    if end - 1 == start:
        raise SpanError(f"sample '{conversation.sample_id}': assistant turn {turn} tokenises to an "
                        "empty answer; fill in the answer or drop the sample")
    return start, end


def _answer_char_start(processor, family, conversation, turn: int, text: str):
    """Char offset of turn's answer in ``text`` and the end-of-turn token closing it."""
    probe = list(conversation.messages)
    probe[turn] = {"role": "assistant", "content": [{"type": "text", "text": SENTINEL}]}
    rendered = _render(processor, probe)
    pos = rendered.find(SENTINEL)
    if pos < 0 or rendered[:pos] != text[:pos]:
        raise SpanError(f"sample '{conversation.sample_id}': the chat template renders the text "
                        f"before assistant turn {turn} differently depending on the answer; "
                        "spans cannot be located (use a template without look-ahead)")
    tail = rendered[pos + len(SENTINEL):].lstrip()
    eot = next((e for e in family.end_of_turn if tail.startswith(e)), None)
    if eot is None:
        raise SpanError(f"sample '{conversation.sample_id}': the chat template does not close "
                        f"assistant turns with an end-of-turn token ({family.end_of_turn}); it "
                        f"renders {tail[:30]!r} after the answer. Load the model with a chat "
                        "template that ends assistant turns (load_vlm(chat_template=...))")
    return pos, eot


def _prefix_token_count(processor, conversation, turn: int, prefix: str, input_ids) -> int:
    images = conversation.images[:conversation.refs_before[turn]]
    prefix_ids = _tokenize(processor, prefix, images)["input_ids"][0].tolist()
    if prefix_ids != input_ids[:len(prefix_ids)]:
        raise SpanError(f"sample '{conversation.sample_id}': the tokens before assistant turn "
                        f"{turn} are not a prefix of the full sequence (a token straddles the "
                        "answer boundary in this chat template); spans cannot be exact")
    return len(prefix_ids)


def _token_id(tokenizer, token: str, sample_id: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise SpanError(f"sample '{sample_id}': end-of-turn token {token!r} is not in the "
                        "tokenizer's vocabulary; the tokenizer and chat template do not match")
    return int(token_id)


# ----- max_length ------------------------------------------------------------------------------
def _fit(processor, family, conversation: _Conversation, encoded: Encoded, max_length: int):
    turns = conversation.assistant_turns()
    for k in range(len(turns) - 1, -1, -1):
        if encoded.spans.answers[k][1] > max_length:
            continue
        shorter = _encode(processor, family, conversation.upto(turns[k] + 1))
        if len(shorter.input_ids) <= max_length:
            return Encoded(shorter.inputs, shorter.input_ids, shorter.spans,
                           dropped_turns=len(turns) - 1 - k)
    raise SpanError(f"sample '{conversation.sample_id}': the first answer ends at token "
                    f"{encoded.spans.answers[0][1]} but max_length is {max_length}; the answer "
                    "would be truncated away. Raise max_length or drop the sample")
