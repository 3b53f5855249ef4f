"""Small BPE tokenizers in the style of each VLM family, trained locally (tokenizers library).

Styles differ the way the real ones do: Qwen-style byte-level BPE with ``<|im_start|>`` /
``<|im_end|>`` / ``<|image_pad|>`` appended after the vocabulary; Llama-style metaspace BPE with
``<unk>`` / ``<s>`` / ``</s>`` at ids 0-2 and ``<image>`` appended; Gemma-style metaspace BPE
(no dummy prefix, newlines isolated) with ``<start_of_turn>`` / ``<end_of_turn>`` /
``<image_soft_token>``. On top of that, the ids of the trained vocabulary are shuffled with a
seed derived from the kind, so two kinds never share an id layout even on the same corpus.
Training is deterministic for a corpus and seed.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from genrecal.data.synthetic import corpus_lines

_GENERIC_ENGLISH = (
    "The quick brown fox jumps over the lazy dog.",
    "A picture is worth a thousand words, and a small model has to learn them one at a time.",
    "Please look carefully at the image before you answer the question.",
    "The object in the middle of the picture is larger than the others.",
    "In the top left corner there is a small shape; in the bottom right corner there is none.",
    "Count the objects one by one: one, two, three, four, five, six, seven, eight, nine, ten.",
    "The numbers 0 1 2 3 4 5 6 7 8 9 10 are written as digits.",
    "Which colour do you see most often? Orange, purple, black, white, pink and brown are rare.",
    "A star, a hexagon, a pentagon, an oval, a diamond and a rectangle are shapes as well.",
    "This is a simple question about the scene, and the answer is short.",
    "The system prompt tells the assistant how to behave; the user asks and the model answers.",
    "USER: what is in the image? ASSISTANT: a shape. user assistant system model",
    "It is not always easy to describe what you see, but it is worth trying.",
    "The center of the image is empty; the shapes are at the left, right, top and bottom.",
    "Yes, there is. No, there is not. I do not know. Maybe.",
)


@dataclass(frozen=True)
class TokenizerStyle:
    """How one family's tokenizer looks.

    pre_tokenizer: ``"byte_level"``, ``"metaspace_first"`` (Llama) or ``"metaspace_never"`` (Gemma).
    leading: special tokens at ids 0..k-1 (trained with the vocabulary).
    trailing: special tokens appended after the vocabulary.
    named: tokenizer attributes (``bos_token``, ``eos_token``, ``image_token``...).
    """

    pre_tokenizer: str
    leading: tuple[str, ...]
    trailing: tuple[str, ...]
    named: dict[str, str] = field(default_factory=dict)
    unk_token: str | None = None


def corpus(seed: int) -> list[str]:
    """Training text: generic English plus the synthetic-VQA vocabulary."""
    return [*_GENERIC_ENGLISH, *corpus_lines(seed)]


def train_tokenizer(style: TokenizerStyle, vocab_size: int, *, seed: int, salt: str,
                    extra_lines: tuple[str, ...] | list[str] = ()) -> Tokenizer:
    """A BPE tokenizer of at most ``vocab_size`` entries (specials included), trained on
    :func:`corpus` plus ``extra_lines`` (the text kinds add their task's descriptions)."""
    tokenizer = Tokenizer(models.BPE(unk_token=style.unk_token))
    tokenizer.pre_tokenizer, tokenizer.decoder = _pre_tokenizer(style), _decoder(style)
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size - len(style.trailing), 1), show_progress=False,
        special_tokens=list(style.leading), initial_alphabet=_alphabet(style))
    tokenizer.train_from_iterator([*corpus(seed), *extra_lines], trainer)
    tokenizer = _shuffle_ids(tokenizer, n_fixed=len(style.leading), seed=f"{salt}:{seed}")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in style.trailing])
    return tokenizer


def _pre_tokenizer(style: TokenizerStyle):
    if style.pre_tokenizer == "byte_level":
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    if style.pre_tokenizer == "metaspace_first":
        return pre_tokenizers.Metaspace(prepend_scheme="first")
    if style.pre_tokenizer == "metaspace_never":
        return pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"),
                                        pre_tokenizers.Metaspace(prepend_scheme="never")])
    raise ValueError(f"unknown pre_tokenizer style '{style.pre_tokenizer}'")


def _decoder(style: TokenizerStyle):
    if style.pre_tokenizer == "byte_level":
        return decoders.ByteLevel()
    scheme = "first" if style.pre_tokenizer == "metaspace_first" else "never"
    return decoders.Metaspace(prepend_scheme=scheme)


def _alphabet(style: TokenizerStyle) -> list[str]:
    if style.pre_tokenizer == "byte_level":
        return pre_tokenizers.ByteLevel.alphabet()
    return sorted(set("".join(chr(c) for c in range(32, 127))) | {"\u2581", "\n"})


def _shuffle_ids(tokenizer: Tokenizer, *, n_fixed: int, seed: str) -> Tokenizer:
    """Permute the ids of the trained (non-leading-special) vocabulary, deterministically."""
    data = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    movable = sorted((t for t, i in vocab.items() if i >= n_fixed), key=vocab.__getitem__)
    ids = list(range(n_fixed, n_fixed + len(movable)))
    random.Random(int(hashlib.sha256(seed.encode()).hexdigest(), 16)).shuffle(ids)
    data["model"]["vocab"] = {**{t: i for t, i in vocab.items() if i < n_fixed},
                              **dict(zip(movable, ids))}
    return Tokenizer.from_str(json.dumps(data))
