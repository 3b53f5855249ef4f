"""The processor of a text-only family: its tokenizer and chat template, with a VLM processor's face.

A text-only LLM (``Qwen2ForCausalLM``, ``LlamaForCausalLM``...) has no ``ProcessorMixin``:
its checkpoint carries a tokenizer with a chat template and nothing else. The rest of genrecal
speaks to a model's input side as a VLM processor (``processor.tokenizer``,
``processor.apply_chat_template``, ``processor(text=..., images=..., return_tensors="pt")``,
``processor.chat_template``, ``save_pretrained``). :class:`TextProcessor` gives the tokenizer
that face, so encoding, span finding, generation, the teacher pass and export treat a text model
as a VLM without images, through the same code path.

Messages arrive in the transformers multimodal format (``content`` a list of ``{"type":
"text", "text": ...}`` parts, :meth:`genrecal.data.sample.Sample.to_messages`). Real text
checkpoints' chat templates expect ``content`` to be a string, so the text parts of each
message are joined into one string before the template runs; an image part is refused
(:class:`~genrecal.store.errors.SpanError`): a text model cannot see it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from genrecal.store.errors import SpanError

__all__ = ["TextProcessor", "flatten_text_messages"]


def flatten_text_messages(messages: list[dict]) -> list[dict]:
    """``messages`` with each list-of-parts ``content`` joined into one string.

    Raises SpanError if a message holds an image (or any non-text) part."""
    out = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            kinds = sorted({str(part.get("type")) for part in content if part.get("type") != "text"})
            if kinds:
                raise SpanError(f"message {i} ({message.get('role')}) holds {kinds} part(s), but "
                                "the model is text-only: it has no image input. Use a dataset "
                                "without images for a text-only teacher / student")
            content = "".join(str(part.get("text", "")) for part in content)
        out.append({**message, "content": content})
    return out


class TextProcessor:
    """A text-only family's processor: ``tokenizer`` plus ``chat_template``.

    tokenizer: a transformers tokenizer (``TokenizersBackend`` / ``PreTrainedTokenizerFast``);
    chat_template: the template used to render conversations (default: the tokenizer's own).
    """

    #: No token of a text model carries image features.
    image_token_ids: tuple[int, ...] = ()
    #: No image processor: code that looks for one (``getattr(p, "image_processor", None)``) finds none.
    image_processor = None

    def __init__(self, tokenizer: Any, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template if chat_template is not None else tokenizer.chat_template

    def __repr__(self) -> str:
        return f"TextProcessor(tokenizer={type(self.tokenizer).__name__}, vocab={len(self.tokenizer)})"

    @classmethod
    def from_pretrained(cls, where: str | Path, **hub: Any) -> "TextProcessor":
        """The tokenizer of a checkpoint (``AutoTokenizer.from_pretrained(where, **hub)``)."""
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(where), **hub))

    def apply_chat_template(self, messages: list[dict], **kwargs: Any):
        """The tokenizer's ``apply_chat_template`` with this processor's template, on messages
        whose text parts are joined (:func:`flatten_text_messages`)."""
        kwargs.setdefault("chat_template", self.chat_template)
        return self.tokenizer.apply_chat_template(flatten_text_messages(messages), **kwargs)

    def __call__(self, text=None, images=None, **kwargs: Any):
        """Tokenise ``text`` (a string or a list of them) as the tokenizer does; returns a
        ``BatchFeature`` (``input_ids``, ``attention_mask``). ``images`` must be empty."""
        from transformers import BatchFeature

        if images is not None and any(_non_empty(images)):
            raise SpanError("a text-only model was given images; use a dataset without images "
                            "for a text-only teacher / student")
        encoded = self.tokenizer(text, **kwargs)
        return BatchFeature(data=dict(encoded), tensor_type=kwargs.get("return_tensors"))

    def decode(self, *args: Any, **kwargs: Any):
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args: Any, **kwargs: Any):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def save_pretrained(self, out_dir: str | Path) -> None:
        """The tokenizer files, saved with this processor's chat template (the tokenizer's own
        template is restored after)."""
        own = self.tokenizer.chat_template
        self.tokenizer.chat_template = self.chat_template or own
        try:
            self.tokenizer.save_pretrained(str(out_dir))
        finally:
            self.tokenizer.chat_template = own


def _non_empty(images) -> list[bool]:
    """Per entry of ``images`` (one image, a list per prompt...), whether it holds an image."""
    if isinstance(images, (list, tuple)):
        return [bool(x) if isinstance(x, (list, tuple)) else x is not None for x in images]
    return [images is not None]
