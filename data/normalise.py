"""From a parsed row (:class:`Draft`) to a validated :class:`Sample`, whatever the format.

Normalisation rules shared by every format:

* roles ``human``/``user`` -> ``user``, ``gpt``/``assistant`` -> ``assistant``,
  ``system`` -> ``system``; any other role is an error;
* every text piece is stripped of surrounding whitespace and empty pieces are dropped, so
  ``"<image>\\nWhat?"`` (LLaVA) and ``[{"type": "image"}, {"type": "text", "text": "What?"}]``
  (messages) give the same parts ``(0, "What?")``;
* there is at least one assistant turn, no assistant turn is empty or whitespace-only and
  no assistant turn holds an image (answers are text);
* the image references in the turns are ``0, 1, ...`` in order, one per image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from genrecal.data.images import ImageRef, ImageResolver
from genrecal.data.problems import RowProblem
from genrecal.data.sample import Part, Sample, Turn, content_hash

ROLE_ALIASES: dict[str, str] = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class Draft:
    """A row parsed by a format reader, before image resolution and validation."""

    turns: tuple[Turn, ...]
    images: tuple[ImageRef, ...]
    meta: dict = field(default_factory=dict)


def normalise_role(raw: object) -> str:
    role = ROLE_ALIASES.get(raw.strip().lower()) if isinstance(raw, str) else None
    if role is None:
        raise RowProblem(f"unknown role {raw!r}",
                         f"use one of {', '.join(sorted(ROLE_ALIASES))}")
    return role


def clean_parts(parts: list[Part]) -> tuple[Part, ...]:
    """Strip every text piece and drop the empty ones; image indices are kept as they are."""
    out: list[Part] = []
    for part in parts:
        if isinstance(part, str):
            part = part.strip()
            if not part:
                continue
        out.append(part)
    return tuple(out)


def check_answers(turns: tuple[Turn, ...]) -> None:
    answers = [t for t in turns if t.role == "assistant"]
    if not answers:
        raise RowProblem("no assistant turn (the sample has no answer)",
                         "add an assistant ('gpt') turn with the answer, or drop the sample")
    for turn in answers:
        if any(isinstance(p, int) for p in turn.parts):
            raise RowProblem("an assistant turn contains an image",
                             "put images in user turns; answers must be text")
        if not turn.text.strip():
            raise RowProblem("empty or whitespace-only answer",
                             "write the answer text in every assistant turn, or drop the sample")


def check_image_refs(turns: tuple[Turn, ...], n_images: int) -> None:
    refs = [p for t in turns for p in t.parts if isinstance(p, int)]
    if len(refs) != n_images:
        raise RowProblem(f"{len(refs)} image placeholder(s) for {n_images} image(s)",
                         "put exactly one image placeholder in the text per listed image")
    if refs != list(range(n_images)):
        raise RowProblem(f"image references {refs} are not 0..{n_images - 1} in order",
                         "reference each image once, in the order the images are listed")


def build_sample(draft: Draft, sample_id: str, source: str, resolver: ImageResolver) -> Sample:
    """Validate ``draft``, resolve and verify its images, hash it: the final :class:`Sample`."""
    check_answers(draft.turns)
    check_image_refs(draft.turns, len(draft.images))
    resolved = [resolver.resolve(ref) for ref in draft.images]
    paths = tuple(path for path, _ in resolved)
    digest = content_hash(draft.turns, [data for _, data in resolved])
    return Sample(id=sample_id, turns=draft.turns, images=paths, content_hash=digest,
                  source=source, meta=dict(draft.meta))
