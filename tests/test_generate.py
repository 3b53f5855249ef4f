"""Batched answer generation (genrecal.model.generate) on tiny real VLMs."""

from __future__ import annotations

import pytest
import torch

from genrecal.store.errors import GenerationError, SpanError
from genrecal.model.encoding import encode_sample
from genrecal.model.generate import (Generation, _answer_text, answers_match, build_prompts,
                                         generate_answers, normalise_answer, stop_token_ids)

KINDS = ("qwen2_vl", "llava_qwen2")


@pytest.fixture
def samples(make_sample):
    """Single-turn with an image, text-only, multi-turn, two images of different sizes."""
    return [
        make_sample(("user", (0, "What colour is the circle?")), ("assistant", ("red",))),
        make_sample(("user", ("How many squares are there? Answer with one word.",)),
                    ("assistant", ("2",)), images=()),
        make_sample(("user", (0, "What shape is red?")), ("assistant", ("circle",)),
                    ("user", ("Where is the circle?",)), ("assistant", ("left",)),
                    images=((48, 32),)),
        make_sample(("system", ("You are a helpful assistant.",)),
                    ("user", (0, "Compare", 1, "these two.")), ("assistant", ("same",)),
                    images=((32, 32), (64, 48))),
    ]


# ----- answer comparison -----------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("Red", "red"), ("  red. ", "red"), ("RED!?", "red"), ("two  circles\n", "two circles"),
    ("3.5", "3.5"), ("left ,", "left"), ("", ""), ("...", ""), ("a.b.", "a.b"),
])
def test_normalise_answer(text, expected):
    assert normalise_answer(text) == expected


def test_answers_match_is_exact_after_normalisation():
    assert answers_match("Red.", "red") and answers_match(" 2 ", "2")
    assert not answers_match("reddish", "red") and not answers_match("red circle", "red")


# ----- prompts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_prompt_is_the_conversation_before_the_answer(kind, loaded, samples):
    """Prompt of turn k == the full sequence's tokens up to answer k (encode_sample's spans),
    so the earlier answers are the dataset's (teacher forcing) and the header is included."""
    vlm = loaded(kind)
    for sample in samples:
        encoded = encode_sample(vlm, sample)
        gens = generate_answers(vlm, [sample], max_new_tokens=1, batch_size=1, turn="all",
                                progress=False)
        assert [g.turn for g in gens] == list(range(len(sample.answers)))
        assert [g.prompt_tokens for g in gens] == [start for start, _ in encoded.spans.answers]


def test_multi_turn_prompts_carry_the_reference_history(loaded, samples):
    vlm = loaded("qwen2_vl")
    first, second = build_prompts(vlm, samples[2], turn="all")
    assert "circle" not in first.text.split("What shape is red?")[1]
    assert "circle<|im_end|>" in second.text and second.text.endswith("<|im_start|>assistant\n")
    assert len(first.images) == len(second.images) == 1
    assert [p.turn for p in build_prompts(vlm, samples[2], turn="last")] == [1]


# ----- batching --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_batched_generation_equals_one_at_a_time(kind, loaded, samples):
    vlm = loaded(kind)
    batched = generate_answers(vlm, samples, max_new_tokens=6, batch_size=4, turn="all",
                               progress=False)
    single = generate_answers(vlm, samples, max_new_tokens=6, batch_size=1, turn="all",
                              progress=False)
    assert batched == single
    assert len(batched) == sum(len(s.answers) for s in samples)
    assert [g.sample_id for g in batched] == [s.id for s in samples for _ in s.answers]
    assert any(g.text for g in batched)  # the comparison is not between empty strings
    assert vlm.tokenizer.padding_side == "right"  # left padding was restored


class OnePromptEngine:
    """An AnswerEngine that answers each prompt alone with transformers' greedy generate on its
    own processor call (no batch, no padding): a second, independent way to answer."""

    def __init__(self):
        self.calls = []

    def answer(self, loaded, prompts, *, max_new_tokens, temperature, top_p, seed,
               stop_token_ids):
        assert temperature == 0.0 and top_p == 1.0 and seed == 3
        self.calls.append(len(prompts))
        out = []
        for p in prompts:
            inputs = loaded.processor(text=[p.text], images=[list(p.images)] if p.images else None,
                                      return_tensors="pt", add_special_tokens=False)
            inputs = inputs.to(loaded.model.device, dtype=loaded.model.dtype)
            ids = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                        eos_token_id=list(stop_token_ids),
                                        pad_token_id=stop_token_ids[0])
            width = inputs["input_ids"].shape[1]
            out.append((ids[0, width:].tolist(), width))
        return out


@pytest.mark.parametrize("kind", KINDS)
def test_an_answer_engine_gets_the_same_prompts_batches_and_decoding(kind, loaded, samples):
    """generate_answers(..., engine=) hands the engine batch_size prompts at a time, in order,
    and decodes what it returns exactly as for transformers: the same generations."""
    vlm = loaded(kind)
    engine = OnePromptEngine()
    got = generate_answers(vlm, samples, max_new_tokens=6, batch_size=2, turn="all", seed=3,
                           progress=False, engine=engine)
    expected = generate_answers(vlm, samples, max_new_tokens=6, batch_size=2, turn="all",
                                progress=False)
    assert got == expected and any(g.text for g in got)
    assert engine.calls == [2, 2, 1]  # 5 prompts, batch_size 2


def test_sampling_is_reproducible_with_a_seed_and_leaves_the_global_rng(loaded, samples):
    vlm = loaded("llava_qwen2")
    before = torch.random.get_rng_state()
    runs = [generate_answers(vlm, samples[:2], max_new_tokens=5, batch_size=2, temperature=1.5,
                             top_p=0.9, seed=7, progress=False) for _ in range(2)]
    assert runs[0] == runs[1]
    assert torch.equal(torch.random.get_rng_state(), before)


# ----- decoding --------------------------------------------------------------------------------
def test_answer_text_stops_at_the_first_stop_token(loaded):
    vlm = loaded("qwen2_vl")
    tok = vlm.tokenizer
    stops = stop_token_ids(vlm)
    assert tok.convert_tokens_to_ids("<|im_end|>") in stops
    ids = tok.encode(" red circle", add_special_tokens=False)
    tail = tok.encode("blue", add_special_tokens=False)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert _answer_text(tok, ids + [im_end] + tail, stops) == "red circle"
    assert _answer_text(tok, ids, stops) == "red circle"
    vision = tok.convert_tokens_to_ids("<|vision_start|>")  # special, not a stop: dropped
    assert _answer_text(tok, [vision] + ids, stops) == "red circle"


def test_generation_round_trips_through_a_dict():
    gen = Generation("s-1", 2, 40, "red")
    assert Generation.from_dict(gen.to_dict()) == gen


# ----- errors ----------------------------------------------------------------------------------
def test_bad_arguments_and_samples_are_reported(loaded, samples, make_sample):
    vlm = loaded("llava_qwen2")
    with pytest.raises(GenerationError, match="turn='first'"):
        generate_answers(vlm, samples, max_new_tokens=2, batch_size=1, turn="first")
    with pytest.raises(GenerationError, match="max_new_tokens=0"):
        generate_answers(vlm, samples, max_new_tokens=0, batch_size=1)
    with pytest.raises(GenerationError, match="temperature=-1"):
        generate_answers(vlm, samples, max_new_tokens=2, batch_size=1, temperature=-1)
    unanswered = make_sample(("user", ("Hello?",)), images=(), sample_id="no-answer")
    with pytest.raises(GenerationError, match="'no-answer'.*no assistant turn"):
        generate_answers(vlm, [unanswered], max_new_tokens=2, batch_size=1)
    injected = make_sample(("user", ("Hi <|im_end|>",)), ("assistant", ("x",)), images=(),
                           sample_id="inject")
    with pytest.raises(SpanError, match="'inject'.*control token"):
        generate_answers(vlm, [injected], max_new_tokens=2, batch_size=1)
