"""The one teacher forward (genrecal.model.teacher_forward) for every tiny-kit family.

What extraction and online training read must be what the model's own forward computes: the
hooks read the final norm's output and the input of the last block, and this is compared with
``outputs.hidden_states`` of a plain ``model(**batch, output_hidden_states=True)`` over the SAME
padded batch (same shapes, same kernels: exact, no tolerance). Every family is then run as the
teacher of extraction and of online mode with each optional feature on and off; with
``output_hidden_states=[-1]`` a LLaVA projector lost its ``vision_feature_layer`` and crashed.
"""

from __future__ import annotations

import pytest
import torch

from genrecal.extract.job import Codecs, Features, TeacherSource, feature_specs
from genrecal.extract.pipeline import batch_sample_features
from genrecal.extract.teacher import Teacher
from genrecal.model.encoding import encode_sample
from genrecal.model.teacher_forward import hidden_rows, teacher_forward
from genrecal.model.tiny import VLM_KINDS
from genrecal.train.data import TeacherRequest, pad_token_id
from genrecal.train.online import OnlineSettings, OnlineTeacher

KIND_NAMES = sorted(VLM_KINDS)  # the text kinds: tests/test_text_models.py


@pytest.fixture
def two_samples(make_sample):
    """Two samples of different token lengths (the batch needs padding), one with two turns."""
    first = make_sample(("user", (0, "What colour is the square?")), ("assistant", ("Red.",)))
    second = make_sample(("user", (0, "How many shapes are there in this picture?")),
                         ("assistant", ("Three shapes.",)), ("user", ("And the circle?",)),
                         ("assistant", ("It is blue.",)))
    return [first, second]


def _teacher(vlm) -> Teacher:
    head = vlm.family.lm_head(vlm.model)
    source = TeacherSource(location="unused", family=vlm.family.model_type, dtype="float32")
    return Teacher(vlm=vlm, source=source, device=torch.device("cpu"), head_weight=head.weight.detach(),
                   head_bias=None if head.bias is None else head.bias.detach(),
                   transform=vlm.family.logit_transform(vlm.model))


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_hooks_read_what_the_plain_forward_returns(kind, loaded, two_samples):
    vlm = loaded(kind)
    encoded = [encode_sample(vlm, s) for s in two_samples]
    assert len({len(e.input_ids) for e in encoded}) == 2
    pad = pad_token_id(vlm.tokenizer)
    states = teacher_forward(vlm.model, vlm.family, [e.inputs for e in encoded], pad, penultimate=True)
    plain = teacher_forward(vlm.model, vlm.family, [e.inputs for e in encoded], pad, penultimate=False)
    assert plain.penultimate is None and torch.equal(plain.final, states.final)
    from genrecal.model.padding import pad_batch

    with torch.inference_mode():
        out = vlm.model(**pad_batch([e.inputs for e in encoded], pad, "right"), output_hidden_states=True,
                        use_cache=False)
    assert torch.equal(states.final, out.hidden_states[-1])  # transformers 5: the final norm's output
    assert torch.equal(states.penultimate, out.hidden_states[-2])  # output of block L-2
    assert states.offsets == [0, 0]
    with torch.inference_mode():  # the head reads z: the same [B, N, d] matmul as the model's own
        logits = vlm.family.logit_transform(vlm.model).apply(vlm.family.lm_head(vlm.model)(states.final))
    assert torch.equal(logits, out.logits)
    answer, question = hidden_rows(states.final[0], encoded[0].spans, 0, question="all")
    assert not answer.is_inference() and question is not None and question.shape[1] == answer.shape[1]


FEATURE_SETS = {
    "genrecal default (no grams, no logit stats)": dict(answer_hidden=True, question_hidden="all"),
    "all on": dict(answer_hidden=True, question_hidden="text", visual_gram=True,
                   logit_stats={"top_k": 4, "temperature": 2.0}),
    "grams only": dict(answer_hidden=False, question_hidden="none", visual_gram=True),
}


@pytest.mark.parametrize("features", sorted(FEATURE_SETS))
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_every_family_extracts_with_each_feature_set(kind, features, loaded, two_samples):
    vlm = loaded(kind)
    teacher = _teacher(vlm)
    config = Features.from_dict({"input_embeddings": False, "visual_gram": False, "logit_stats": None,
                                 **FEATURE_SETS[features]})
    specs = {s.name: s for s in feature_specs(config, Codecs(), hidden_size=teacher.hidden_size,
                                              vocab_size=teacher.vocab_size)}
    items = [(s, encode_sample(vlm, s)) for s in two_samples]
    out = batch_sample_features(teacher, specs, items)
    for (sample, enc), got in zip(items, out):
        assert set(got.values) == set(specs)
        if "visual_gram" in specs:
            assert [tuple(g.shape) for g in got.values["visual_gram"]] == [(e - s, e - s) for s, e in enc.spans.images]
        if "answer_hidden" in specs:
            assert got.values["answer_hidden"].shape[1] == teacher.hidden_size


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_every_family_runs_as_the_online_teacher(kind, loaded, two_samples):
    vlm = loaded(kind)
    requests = []
    for sample in two_samples:
        enc = encode_sample(vlm, sample)
        requests.append(TeacherRequest(sample.id, sample.content_hash, enc, n_turns=len(enc.spans.answers)))
    records = OnlineTeacher(vlm, OnlineSettings(question="all", round_to="bf16")).records(requests)
    alone = OnlineTeacher(vlm, OnlineSettings(question="all", round_to="bf16", micro_batch=1)).records(requests)
    for record, single, request in zip(records, alone, requests):
        assert record.sample_id == request.sample_id
        assert record.answer_hidden.shape[0] == sum(e - s + 1 for s, e in request.encoded.spans.answers)
        assert record.question_hidden is not None
        # one bf16 step at most between two batchings (see tests/test_train_online.py)
        torch.testing.assert_close(record.answer_hidden, single.answer_hidden, rtol=2 ** -7, atol=1e-6)
