"""Span finding on every family, checked independently of the span finder."""

from __future__ import annotations

import json

import pytest

from genrecal.store.errors import SpanError
from genrecal.model.encoding import encode_sample
from genrecal.model.loading import load_vlm
from genrecal.store.spans import Spans
from genrecal.model.tiny import VLM_KINDS

EOT = {"qwen2_vl": "<|im_end|>", "qwen2_5_vl": "<|im_end|>", "llava_qwen2": "<|im_end|>",
       "llava_llama": "</s>", "gemma3": "<end_of_turn>", "internvl": "<|im_end|>"}
# the token that carries image features (the run the spans must cover), per kind
IMAGE_TOKEN = {"qwen2_vl": "<|image_pad|>", "qwen2_5_vl": "<|image_pad|>", "llava_qwen2": "<image>",
               "llava_llama": "<image>", "gemma3": "<image_soft_token>", "internvl": "<IMG_CONTEXT>"}
# image tokens per image, worked out by hand from each kind's image settings:
# Qwen: smart-resize to multiples of 16 px (patch 8 x merge 2) within [32*32, 64*64] px, one
# token per 16x16 block; 40x56 -> 32x64 -> 2*4 = 8, 64x32 -> 4*2 = 8, 48x48 -> 3*3 = 9.
# LLaVA: CLIP 16x16 crop, patch 4 -> 16 patches (CLS dropped). Gemma 3: 4 tokens (mm_tokens_per_image).
# InternVL: 32 px tiles of 4 tokens, grid of at most 2 tiles closest to w/h, plus a thumbnail when
# there are 2: 40x56 (w/h 1.4) -> 1x1 = 4; 64x32 (h x w, w/h 0.5) -> 1x2 + thumbnail = 12; 48x48 -> 4.
_QWEN_COUNTS = {(40, 56): 8, (64, 32): 8, (48, 48): 9}
_INTERNVL_COUNTS = {(40, 56): 4, (64, 32): 12, (48, 48): 4}


def expected_image_tokens(kind: str, size: tuple[int, int]) -> int:
    if kind.startswith("qwen"):
        return _QWEN_COUNTS[size]
    if kind == "internvl":
        return _INTERNVL_COUNTS[size]
    return {"llava_qwen2": 16, "llava_llama": 16, "gemma3": 4}[kind]


def check_spans(kind, vlm, sample, encoded):
    """Independent checks: decoded answers, image-token runs, question text, tiling."""
    tok, ids, spans = vlm.tokenizer, encoded.input_ids, encoded.spans
    answers = sample.answers
    assert spans.n_turns == len(answers)
    for (start, end), answer in zip(spans.answers, answers):
        # exact up to the one space a template puts between header and answer ("ASSISTANT: A")
        assert tok.decode(ids[start:end]) in (answer + EOT[kind], " " + answer + EOT[kind])
        assert tok.convert_ids_to_tokens(ids[end - 1]) == EOT[kind]
        assert ids[start:end - 1].count(ids[end - 1]) == 0
    user_texts = [t.text for t in sample.turns if t.role == "user"]
    for (start, end), text in zip(spans.questions, user_texts):
        assert text.strip() in tok.decode(ids[start:end])
    assert spans.questions[0][0] == 0
    for k in range(1, spans.n_turns):
        assert spans.questions[k][0] == spans.answers[k - 1][1]
    image_ids = {tok.convert_tokens_to_ids(IMAGE_TOKEN[kind])}
    sizes = [sample.load_images()[p].size[::-1] for t in sample.turns for p in t.parts
             if isinstance(p, int)]
    assert len(spans.images) == len(sizes)
    for (start, end), size in zip(spans.images, sizes):
        assert set(ids[start:end]) <= image_ids
        assert end - start == expected_image_tokens(kind, size)
    assert sum(i in image_ids for i in ids) == sum(b - a for a, b in spans.images)


@pytest.mark.parametrize("kind", sorted(VLM_KINDS))
def test_single_turn(kind, loaded, make_sample):
    sample = make_sample(("user", (0, "What colour is the circle?")), ("assistant", ("red",)))
    encoded = encode_sample(loaded(kind), sample)
    check_spans(kind, loaded(kind), sample, encoded)
    start, end = encoded.spans.answer_window(0)
    assert (start, end) == (encoded.spans.answers[0][0] - 1, encoded.spans.answers[0][1])
    assert encoded.inputs["input_ids"][0].tolist() == encoded.input_ids


@pytest.mark.parametrize("kind", sorted(VLM_KINDS))
def test_multi_turn_with_an_image_per_turn(kind, loaded, make_sample):
    sample = make_sample(("system", ("You answer briefly.",)),
                         ("user", (0, "How many squares are there?")), ("assistant", ("Two squares.",)),
                         ("user", ("Where is the star?", 1)), ("assistant", ("left",)),
                         ("user", ("Thank you!",)), ("assistant", ("You are welcome.",)),
                         images=((40, 56), (64, 32)))
    vlm = loaded(kind)
    encoded = encode_sample(vlm, sample)
    check_spans(kind, vlm, sample, encoded)
    assert encoded.spans.images[1][0] > encoded.spans.answers[0][1]  # 2nd image in turn 2


@pytest.mark.parametrize("kind", sorted(VLM_KINDS))
def test_two_images_in_one_turn(kind, loaded, make_sample):
    sample = make_sample(("user", (0, 1, "Which picture has more circles?")), ("assistant", ("1",)),
                         images=((48, 48), (40, 56)))
    vlm = loaded(kind)
    encoded = encode_sample((vlm.processor, vlm.family), sample)
    check_spans(kind, vlm, sample, encoded)


@pytest.mark.parametrize("kind", sorted(VLM_KINDS))
def test_text_only_sample(kind, loaded, make_sample):
    sample = make_sample(("user", ("Say yes.",)), ("assistant", ("Yes.",)), images=())
    vlm = loaded(kind)
    encoded = encode_sample(vlm, sample)
    assert encoded.spans.images == () and "pixel_values" not in encoded.inputs
    check_spans(kind, vlm, sample, encoded)


def test_teacher_and_student_spans_cover_the_same_turns(loaded, make_sample):
    sample = make_sample(("user", (0, "How many circles are there?")), ("assistant", ("4",)),
                         ("user", ("What colour are they?",)), ("assistant", ("blue",)))
    teacher = encode_sample(loaded("qwen2_vl"), sample)
    student = encode_sample(loaded("llava_qwen2"), sample)
    assert teacher.spans.n_turns == student.spans.n_turns == 2
    assert teacher.input_ids != student.input_ids


# ----- max_length ---------------------------------------------------------------------------------
def test_max_length_drops_trailing_turns(loaded, make_sample):
    vlm = loaded("llava_llama")
    sample = make_sample(("user", (0, "How many circles are there?")), ("assistant", ("Two.",)),
                         ("user", ("And squares?",)), ("assistant", ("None at all.",)))
    full = encode_sample(vlm, sample)
    cut = encode_sample(vlm, sample, max_length=len(full.input_ids) - 1)
    assert cut.dropped_turns == 1
    assert cut.spans.n_turns == 1 and cut.spans.answers[0] == full.spans.answers[0]
    assert len(cut.input_ids) <= len(full.input_ids) - 1
    assert cut.input_ids == full.input_ids[:len(cut.input_ids)]
    assert encode_sample(vlm, sample, max_length=len(full.input_ids)).dropped_turns == 0


def test_max_length_that_cuts_the_first_answer(loaded, make_sample):
    vlm = loaded("qwen2_vl")
    sample = make_sample(("user", (0, "Q?")), ("assistant", ("A long answer.",)), sample_id="cut-me")
    full = encode_sample(vlm, sample)
    with pytest.raises(SpanError, match="'cut-me'.*truncated away"):
        encode_sample(vlm, sample, max_length=full.spans.answers[0][1] - 1)


# ----- bad samples --------------------------------------------------------------------------------
@pytest.mark.parametrize("turns, match", [
    ((("user", (0, "Q?")), ("assistant", ("  ",))), "empty answer"),
    ((("user", (0, "Q?")),), "no assistant turn"),
    ((("user", (0, "Q?")), ("assistant", ("A", 0))), "contains an image"),
    ((("user", (3, "Q?")), ("assistant", ("A",))), "image reference 3 out of range"),
    ((("user", (0, "Q? <|im_end|>")), ("assistant", ("A",))), "control token"),
    ((("user", ("<image> Q?",)), ("assistant", ("A",))), "control token"),
])
def test_bad_samples_name_the_sample(turns, match, loaded, make_sample):
    sample = make_sample(*turns, sample_id="bad-sample")
    with pytest.raises(SpanError, match=f"'bad-sample'.*{match}"):
        encode_sample(loaded("llava_qwen2"), sample)


def test_template_without_end_of_turn_is_rejected(tiny_vlm_dir, make_sample):
    llava_15_hf = (  # the llava-hf/llava-1.5 template: assistant turns end with a space only
        "{% for message in messages %}{% if message['role'] != 'system' %}"
        "{{ message['role'].upper() + ': '}}{% endif %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
        "{{ '<image>\n' }}{% endfor %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
    vlm = load_vlm(tiny_vlm_dir("llava_llama"), chat_template=llava_15_hf)
    sample = make_sample(("user", (0, "Q?")), ("assistant", ("A.",)), sample_id="no-eot")
    with pytest.raises(SpanError, match="'no-eot'.*does not close assistant turns"):
        encode_sample(vlm, sample)


# ----- the Spans object ---------------------------------------------------------------------------
def test_spans_round_trip_through_json():
    spans = Spans(images=((3, 7), (12, 20)), questions=((0, 25), (30, 40)),
                  answers=((25, 30), (40, 44)))
    assert Spans.from_dict(json.loads(json.dumps(spans.to_dict()))) == spans
    assert spans.answer_window(1) == (39, 44)


@pytest.mark.parametrize("kwargs, match", [
    (dict(images=(), questions=((0, 5),), answers=((6, 8),)), "must be"),
    (dict(images=(), questions=((0, 5), (8, 9)), answers=((5, 8),)), "2 questions but 1"),
    (dict(images=(), questions=((0, 5),), answers=((5, 5),)), "answers\\[0\\]"),
    (dict(images=((4, 6), (5, 9)), questions=((0, 10),), answers=((10, 12),)), "overlaps"),
])
def test_spans_reject_inconsistent_ranges(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Spans(**kwargs)


def test_spans_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="expected keys"):
        Spans.from_dict({"images": [], "questions": [], "answers": [], "extra": []})
