"""Batched answer generation for a :class:`~genrecal.model.loading.LoadedVLM` over Samples.

For assistant turn k of a sample the prompt is the conversation up to (not including) that
turn, rendered with the model's OWN chat template and ``add_generation_prompt=True``, with
the images those turns reference. Earlier assistant turns keep the dataset's answers
(teacher-forced history), so every question is asked in the context the data gives it.

Prompts are batched with LEFT padding (the tokenizer's padding side is switched for the call
and restored after it) and images are passed to the processor as one list per prompt, which
every supported family accepts (Qwen2-VL / Qwen2.5-VL get their ``image_grid_thw``, Gemma 3
its per-prompt image count). Left padding with the attention mask gives the same greedy
tokens as one prompt at a time (tests/test_generate.py checks it per family).

Generation stops at the model's ``eos_token_id`` and at the family's end-of-turn tokens
(:attr:`Family.end_of_turn`, those in the vocabulary); the new tokens up to the first stop
token are decoded without special tokens and stripped of surrounding whitespace.

Another engine can answer the same prompts instead of transformers' ``generate``
(:class:`AnswerEngine`, e.g. vLLM in genrecal.extract.vllm_engine): prompts, batching, stop
tokens, answer decoding and progress stay this module's.

The module also defines how a generated answer is compared with a reference
(:func:`normalise_answer`, :func:`answers_match`), shared by evaluation (genrecal.train) and
the teacher-answers mode (genrecal.extract), which must agree on it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

import torch

from genrecal.data.sample import Sample
from genrecal.store.errors import GenerationError
from genrecal.model.encoding import _check_control_tokens

__all__ = ["AnswerEngine", "Generation", "Prompt", "TurnSelection", "answers_match",
           "build_prompts", "generate_answers", "normalise_answer", "selected_turns",
           "stop_token_ids"]

TurnSelection = Literal["last", "all"]
_TRAILING = re.compile(r"[\s.,;:!?]+$")


# ----- answer comparison -----------------------------------------------------------------------
def normalise_answer(text: str) -> str:
    """The form in which answers are compared: lowercase, whitespace runs collapsed to one
    space, surrounding whitespace and trailing punctuation (``. , ; : ! ?``) removed.

    ``"  Red. "`` -> ``"red"``; ``"Two  Circles!"`` -> ``"two circles"``; inner punctuation is
    kept (``"3.5"`` stays ``"3.5"``).
    """
    return _TRAILING.sub("", " ".join(text.lower().split()))


def answers_match(prediction: str, reference: str) -> bool:
    """Exact match of two answers after :func:`normalise_answer`."""
    return normalise_answer(prediction) == normalise_answer(reference)


# ----- prompts ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Generation:
    """One generated answer: ``turn`` is the assistant-turn index k (0-based, assistant turns
    only), ``prompt_tokens`` the prompt's length in tokens (image tokens included, no padding)."""

    sample_id: str
    turn: int
    prompt_tokens: int
    text: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Generation":
        return cls(sample_id=str(data["sample_id"]), turn=int(data["turn"]),
                   prompt_tokens=int(data["prompt_tokens"]), text=str(data["text"]))


@dataclass(frozen=True)
class Prompt:
    """The rendered prompt of assistant turn ``turn`` of a sample, and its images in order
    (loaded, and the files they were read from, for engines that read them themselves)."""

    sample_id: str
    turn: int
    text: str
    images: tuple = field(default=(), repr=False)
    image_files: tuple[str, ...] = ()


def selected_turns(sample: Sample, turn: TurnSelection) -> list[int]:
    """Assistant-turn indices k that ``turn`` selects: the last one, or all of them."""
    if turn not in ("last", "all"):
        raise GenerationError(f"turn={turn!r}: choose 'last' (the final question of each sample) "
                              "or 'all' (every question, earlier answers taken from the data)")
    n_answers = sum(t.role == "assistant" for t in sample.turns)
    if n_answers == 0:
        raise GenerationError(f"sample '{sample.id}' ({sample.source or 'no source'}) has no "
                              "assistant turn, so no question to answer; add the answer turn "
                              "or drop the sample")
    return [n_answers - 1] if turn == "last" else list(range(n_answers))


def build_prompts(loaded, sample: Sample, turn: TurnSelection = "last") -> list[Prompt]:
    """The prompts of ``sample``'s selected assistant turns (see module docstring)."""
    processor = loaded.processor
    _check_control_tokens(sample, processor.tokenizer)
    positions = [i for i, t in enumerate(sample.turns) if t.role == "assistant"]
    images = sample.load_images() if sample.images else []
    prompts = []
    for k in selected_turns(sample, turn):
        upto = positions[k]
        text = processor.apply_chat_template(sample.to_messages(upto_turn=upto), tokenize=False,
                                             add_generation_prompt=True)
        refs = [p for t in sample.turns[:upto] for p in t.parts if isinstance(p, int)]
        prompts.append(Prompt(sample.id, k, text, tuple(images[i] for i in refs),
                              tuple(str(sample.images[i]) for i in refs)))
    return prompts


# ----- tokens ----------------------------------------------------------------------------------
def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def stop_token_ids(loaded) -> list[int]:
    """The model's eos id(s) plus the family's end-of-turn tokens present in the vocabulary."""
    tokenizer = loaded.tokenizer
    ids = _as_list(getattr(loaded.model.generation_config, "eos_token_id", None))
    for token in loaded.family.end_of_turn:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(int(token_id))
    if not ids:
        raise GenerationError(f"'{loaded.source}': neither the generation config nor the tokenizer "
                              f"has an end-of-turn token ({loaded.family.end_of_turn}); generation "
                              "could not stop. Set eos_token_id in generation_config.json")
    return ids


def _pad_token_id(loaded, stop_ids: list[int]) -> int:
    pad = loaded.tokenizer.pad_token_id
    if pad is None:
        pad = getattr(loaded.model.generation_config, "pad_token_id", None)
    return int(pad) if pad is not None else stop_ids[0]


@contextmanager
def _batch_padding(tokenizer, pad_id: int) -> Iterator[None]:
    """Left padding, with ``pad_id`` as the padding token if the tokenizer has none, for the
    duration of the block (the tokenizer is restored after it)."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    try:
        yield
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad


def _encode_batch(loaded, prompts: Sequence[Prompt], pad_id: int):
    """Processor call for a batch: ``input_ids`` / ``attention_mask`` int64 ``[B, N]`` (left
    padded) plus the family's image tensors, on the model's device and dtype."""
    tokenizer = loaded.tokenizer
    texts = [p.text for p in prompts]
    images = [list(p.images) for p in prompts]
    bos = tokenizer.bos_token
    add_special = not (bos is not None and texts[0].startswith(bos))  # the template wrote it
    with _batch_padding(tokenizer, pad_id):
        batch = loaded.processor(text=texts, images=images if any(images) else None, padding=True,
                                 return_tensors="pt", add_special_tokens=add_special)
    return batch.to(loaded.model.device, dtype=loaded.model.dtype)


def _answer_text(tokenizer, new_ids: list[int], stop_ids: list[int]) -> str:
    """Decode ``new_ids`` up to (not including) the first stop token, special tokens removed."""
    stops = set(stop_ids)
    end = next((i for i, t in enumerate(new_ids) if t in stops), len(new_ids))
    return tokenizer.decode(new_ids[:end], skip_special_tokens=True).strip()


def _sampling_kwargs(temperature: float, top_p: float) -> dict:
    """``generate`` options: greedy at temperature 0, else plain temperature + top-p sampling
    (``top_k=0`` switches off any top-k default of the checkpoint's generation config)."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise GenerationError(f"temperature={temperature}, top_p={top_p}: need temperature >= 0 "
                              "(0: greedy) and 0 < top_p <= 1")
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "top_k": 0}


# ----- generation ------------------------------------------------------------------------------
class AnswerEngine(Protocol):
    """An engine other than transformers' ``generate`` that answers a batch of prompts."""

    def answer(self, loaded, prompts: Sequence[Prompt], *, max_new_tokens: int,
               temperature: float, top_p: float, seed: int | None,
               stop_token_ids: Sequence[int]) -> list[tuple[list[int], int]]:
        """Per prompt: the new token ids (a stop token included when one ended the answer) and
        the prompt's length in tokens."""
        ...


def _generate_batch(loaded, prompts: Sequence[Prompt], *, max_new_tokens: int, stop_ids,
                    pad_id: int, sampling: dict) -> list[Generation]:
    batch = _encode_batch(loaded, prompts, pad_id)
    output = loaded.model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                                   pad_token_id=pad_id, **sampling)
    width = batch["input_ids"].shape[1]
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    return [Generation(p.sample_id, p.turn, int(n),
                       _answer_text(loaded.tokenizer, output[i, width:].tolist(), stop_ids))
            for i, (p, n) in enumerate(zip(prompts, lengths))]


def generate_answers(loaded, samples: Sequence[Sample], *, max_new_tokens: int, batch_size: int,
                     turn: TurnSelection = "last", temperature: float = 0.0, top_p: float = 1.0,
                     seed: int | None = None, progress: bool = True,
                     engine: AnswerEngine | None = None) -> list[Generation]:
    """Generate the answer of each selected assistant turn of each sample (see module docstring).

    Returns one :class:`Generation` per (sample, selected turn), in sample order then turn order.
    ``temperature`` 0 is greedy decoding (the default, and what batching leaves unchanged);
    above 0 it samples with ``top_p``, seeded by ``seed`` when given (the global RNG state is
    restored afterwards). Every sample is checked before the first batch runs; images are
    loaded batch by batch. ``engine``: answers each batch instead of ``loaded.model.generate``
    (``batch_size`` prompts per call; greedy at temperature 0, ``seed`` passed to it).
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise GenerationError(f"max_new_tokens={max_new_tokens}, batch_size={batch_size}: both "
                              "must be >= 1")
    sampling = _sampling_kwargs(temperature, top_p)
    total = _check_samples(loaded, samples, turn)
    stop_ids = stop_token_ids(loaded)
    options = dict(max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                   pad_id=_pad_token_id(loaded, stop_ids), sampling=sampling)
    from tqdm.auto import tqdm

    out: list[Generation] = []
    with _seeded(seed), tqdm(total=total, desc="generate", unit="answer",
                             disable=not progress) as bar:
        for batch in _prompt_batches(loaded, samples, turn, batch_size):
            if engine is None:
                out += _generate_batch(loaded, batch, **options)
            else:
                answered = engine.answer(loaded, batch, max_new_tokens=max_new_tokens,
                                         temperature=temperature, top_p=top_p, seed=seed,
                                         stop_token_ids=stop_ids)
                out += [Generation(p.sample_id, p.turn, n,
                                   _answer_text(loaded.tokenizer, ids, stop_ids))
                        for p, (ids, n) in zip(batch, answered, strict=True)]
            bar.update(len(batch))
    return out


def _check_samples(loaded, samples: Sequence[Sample], turn: TurnSelection) -> int:
    """Validate every sample up front; the number of prompts they give."""
    total = 0
    for sample in samples:
        _check_control_tokens(sample, loaded.tokenizer)
        total += len(selected_turns(sample, turn))
    return total


def _prompt_batches(loaded, samples: Sequence[Sample], turn: TurnSelection,
                    batch_size: int) -> Iterator[list[Prompt]]:
    pending: list[Prompt] = []
    for sample in samples:
        pending += build_prompts(loaded, sample, turn)
        while len(pending) >= batch_size:
            yield pending[:batch_size]
            pending = pending[batch_size:]
    if pending:
        yield pending


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield
