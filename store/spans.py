"""Image / question / answer spans of a chat-formatted token sequence.

All spans are half-open ``(start, end)`` ranges into ``input_ids``:

- ``images[i]``: the run of image-feature tokens of the i-th image reference;
- ``answers[k]``: assistant turn k's tokens, INCLUDING the end-of-turn token
  (``<|im_end|>``, ``</s>``, ``<end_of_turn>``...) and EXCLUDING the assistant header;
- ``questions[k]``: everything from the end of answer k-1 (or 0) to the start of answer k
  (system prompt, user text, image tokens, assistant header).

The *answer window* of turn k (docs/method.md §1.2) is every position from the
last token before the answer through its last token: ``(answers[k][0] - 1, answers[k][1])``.
"""

from __future__ import annotations

from dataclasses import dataclass

Range = tuple[int, int]
SPAN_KINDS = ("images", "questions", "answers")


@dataclass(frozen=True)
class Spans:
    """Image / question / answer spans of one sequence, validated on construction.

    Construction raises ``ValueError`` if a range is reversed, empty (images, answers) or
    overlaps the one before it, or if ``questions`` do not tile the sequence up to the answers
    (``questions[k] == (end of answer k-1 or 0, start of answer k)``). Consistency with a given
    sequence length is checked separately by :meth:`problems`, which reports instead of raising.
    """

    images: tuple[Range, ...] = ()
    questions: tuple[Range, ...] = ()
    answers: tuple[Range, ...] = ()

    def __post_init__(self):
        for name in SPAN_KINDS:
            object.__setattr__(self, name, _as_pairs(name, getattr(self, name)))
        _check_ranges("images", self.images, allow_empty=False)
        _check_ranges("answers", self.answers, allow_empty=False)
        _check_ranges("questions", self.questions, allow_empty=True)
        _check_turns(self.questions, self.answers)

    @property
    def n_turns(self) -> int:
        return len(self.answers)

    def answer_window(self, k: int) -> Range:
        """Positions whose next token is an answer token, plus the answer tokens (docs/method.md §1.2)."""
        start, end = self.answers[k]
        return start - 1, end

    def problems(self, seq_len: int) -> list[str]:
        """Every way these (well-formed) spans are inconsistent with a ``seq_len``-token sequence.

        Reports instead of raising, for writers and validators that list every problem at once.
        """
        out = [f"{kind} span [{s}, {e}) ends past the sequence [0, {seq_len})"
               for kind in SPAN_KINDS for s, e in getattr(self, kind) if e > seq_len]
        if self.answers and self.answers[0][0] < 1:
            out.append("an answer starts at token 0: no position before it to predict it from")
        if not self.answers:
            out.append("no answer span: nothing to distil")
        return out

    def to_dict(self) -> dict:
        return {name: [list(r) for r in getattr(self, name)] for name in SPAN_KINDS}

    @classmethod
    def from_dict(cls, data: dict) -> "Spans":
        """Inverse of :meth:`to_dict`: exactly the keys images, questions, answers."""
        if set(data) != set(SPAN_KINDS):
            raise ValueError(f"Spans.from_dict: expected keys {sorted(SPAN_KINDS)}, got {sorted(data)}")
        return cls(**{name: data[name] for name in SPAN_KINDS})

    @classmethod
    def coerce(cls, spans: "Spans | dict") -> "Spans":
        """A :class:`Spans` as is, or one built from a dict ``{"images": [[s, e], ...], ...}``.

        Missing keys mean no span of that kind; unknown keys and malformed spans raise ValueError.
        """
        if isinstance(spans, Spans):
            return spans
        if not isinstance(spans, dict):
            raise ValueError(f"spans must be a Spans or a dict, got {type(spans).__name__}")
        unknown = set(spans) - set(SPAN_KINDS)
        if unknown:
            raise ValueError(f"spans: unknown keys {sorted(unknown)}; expected images/questions/answers")
        return cls(**{name: spans.get(name) or () for name in SPAN_KINDS})


def _as_pairs(kind: str, ranges) -> tuple[Range, ...]:
    out = []
    for item in ranges:
        if len(item) != 2:
            raise ValueError(f"{kind} span {item!r} is not a [start, end) pair")
        out.append((int(item[0]), int(item[1])))
    return tuple(out)


def _check_ranges(name: str, ranges: tuple[Range, ...], *, allow_empty: bool) -> None:
    previous_end = 0
    for i, (start, end) in enumerate(ranges):
        too_small = end < start if allow_empty else end <= start
        if start < previous_end or too_small:
            raise ValueError(f"Spans.{name}[{i}] = {(start, end)} is empty, reversed or overlaps "
                             f"the range before it (ends at {previous_end})")
        previous_end = end


def _check_turns(questions: tuple[Range, ...], answers: tuple[Range, ...]) -> None:
    if len(questions) != len(answers):
        raise ValueError(f"Spans: {len(questions)} questions but {len(answers)} answers")
    previous_end = 0
    for k, (question, answer) in enumerate(zip(questions, answers)):
        if question != (previous_end, answer[0]):
            raise ValueError(f"Spans.questions[{k}] = {question} must be {(previous_end, answer[0])}: "
                             "from the end of the previous answer (or 0) to the start of answer k")
        previous_end = answer[1]


def image_runs(input_ids: list[int], image_token_ids: tuple[int, ...]) -> list[Range]:
    """Maximal runs of consecutive image-token ids, in order."""
    wanted = set(image_token_ids)
    runs: list[Range] = []
    start = None
    for pos, token in enumerate([*input_ids, None]):
        if token in wanted and start is None:
            start = pos
        elif token not in wanted and start is not None:
            runs.append((start, pos))
            start = None
    return runs


def end_of_turn_after(input_ids: list[int], start: int, eot_id: int) -> int | None:
    """Index just past the first ``eot_id`` at or after ``start``; None if there is none."""
    for pos in range(start, len(input_ids)):
        if input_ids[pos] == eot_id:
            return pos + 1
    return None
