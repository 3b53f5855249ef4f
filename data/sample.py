"""The in-memory form of one visual-instruction sample, shared by every reader.

Readers (LLaVA JSON/JSONL, HF messages) normalise their rows into :class:`Sample`;
extract/ and train/ format a sample with each model's own chat template through
:meth:`Sample.to_messages`, the transformers chat-message format.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Role = Literal["system", "user", "assistant"]
Part = str | int  # str: a text piece; int: index into Sample.images


@dataclass(frozen=True)
class Turn:
    """One conversation turn. ``parts`` interleaves text and image references in order."""

    role: Role
    parts: tuple[Part, ...]

    @property
    def text(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))


@dataclass(frozen=True)
class Sample:
    """One sample: a stable id, its turns, its image files and a content hash.

    ``content_hash`` is the sha256 of the image bytes and the text (see :func:`content_hash`);
    the cache records it so the trainer can prove both sides saw the same input.
    """

    id: str
    turns: tuple[Turn, ...]
    images: tuple[Path, ...]
    content_hash: str
    source: str = ""  # the dataset file this sample came from
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def answers(self) -> list[str]:
        return [t.text for t in self.turns if t.role == "assistant"]

    def load_images(self):
        """The images as RGB PIL images, in reference order."""
        from PIL import Image

        out = []
        for path in self.images:
            with Image.open(path) as im:
                out.append(im.convert("RGB"))
        return out

    def to_messages(self, upto_turn: int | None = None) -> list[dict]:
        """Turns in the transformers chat format (``{"role", "content": [parts]}``).

        ``upto_turn`` keeps only ``turns[:upto_turn]`` (prefixes for span finding).
        """
        turns = self.turns if upto_turn is None else self.turns[:upto_turn]
        messages = []
        for turn in turns:
            content = [{"type": "image"} if isinstance(p, int) else {"type": "text", "text": p}
                       for p in turn.parts]
            messages.append({"role": turn.role, "content": content})
        return messages


def content_hash(turns: tuple[Turn, ...], image_bytes: list[bytes]) -> str:
    """sha256 over the image bytes (in order) and the role-tagged text of every turn."""
    h = hashlib.sha256()
    for data in image_bytes:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    for turn in turns:
        h.update(turn.role.encode())
        for part in turn.parts:
            piece = f"<image:{part}>" if isinstance(part, int) else part
            h.update(len(piece.encode()).to_bytes(8, "little"))
            h.update(piece.encode())
    return h.hexdigest()
