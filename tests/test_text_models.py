"""Text-only teachers and students (issue 13): the tiny text kinds, their families and
processors, span finding, the teacher forward and extraction, generation, a training step, and
the config rules of a text pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer

from genrecal.common.config import (AlignStage, DistillStage, FinetuneStage, RecalibratorConfig,
                                    get_pipeline)
from genrecal.common.errors import ConfigError
from genrecal.common.vocabulary import TEXT_FAMILY_NAMES, TINY_KINDS
from genrecal.data.sample import Sample, Turn, content_hash
from genrecal.extract.job import Codecs, Features, TeacherSource, feature_specs
from genrecal.extract.pipeline import batch_sample_features
from genrecal.extract.teacher import Teacher
from genrecal.model.encoding import encode_sample
from genrecal.model.families import get_family
from genrecal.model.generate import generate_answers
from genrecal.model.loading import load_vlm
from genrecal.model.padding import pad_batch
from genrecal.model.teacher_forward import hidden_rows, teacher_forward
from genrecal.model.text_processor import TextProcessor
from genrecal.model.tiny import TEXT_KINDS, build_tiny_vlm, tiny_spec
from genrecal.store.errors import SpanError
from genrecal.train.data import pad_student, pad_token_id, student_labels
from genrecal.train.recalibrator import Recalibrator
from genrecal.train.step import (LossSpec, StageModel, TeacherSide, configure_trainables, run_step,
                                 student_part_params)

EOT = {"qwen2_text": "<|im_end|>", "llama_text": "</s>"}
MODEL_CLASS = {"qwen2_text": "Qwen2ForCausalLM", "llama_text": "LlamaForCausalLM"}


def text_sample(*turns, sample_id: str = "t") -> Sample:
    turn_objs = tuple(Turn(role, tuple(parts)) for role, parts in turns)
    return Sample(id=sample_id, turns=turn_objs, images=(), content_hash=content_hash(turn_objs, []))


@pytest.fixture
def samples():
    """Two text samples of different lengths (the batch needs padding), one with two turns."""
    return [
        text_sample(("user", ("Scene: a red circle at the top left.\nWhat colour is the circle? "
                              "Answer with one word.",)), ("assistant", ("red",)), sample_id="a"),
        text_sample(("system", ("You answer briefly.",)),
                    ("user", ("Scene: a blue square at the left, a green triangle at the top "
                              "right.\nWhat shape is blue? Answer with one word.",)),
                    ("assistant", ("square",)), ("user", ("How many triangles are there?",)),
                    ("assistant", ("1",)), sample_id="b"),
    ]


# ----- the kinds ---------------------------------------------------------------------------------
def test_text_kinds_are_registered_as_text_families():
    assert set(TEXT_KINDS) == {"qwen2_text", "llama_text"}
    assert {TINY_KINDS[k] for k in TEXT_KINDS} == set(TEXT_FAMILY_NAMES)
    for kind in TEXT_KINDS:
        family = get_family(TINY_KINDS[kind])
        assert family.text_only and family.auto_class == "AutoModelForCausalLM"
        assert family.model_class == MODEL_CLASS[kind]
        spec = tiny_spec(kind)
        assert spec.head_dim == 64  # vLLM's CPU backend serves head_dim 64, not 16 / 32
    assert tiny_spec("llama_text", hidden_size=64, num_heads=1, num_kv_heads=1).head_dim == 64


@pytest.mark.parametrize("kind", TEXT_KINDS)
def test_round_trip_through_from_pretrained(kind, tiny_vlm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = tiny_vlm_dir(kind)
    vlm = load_vlm(directory)
    assert type(vlm.model).__name__ == MODEL_CLASS[kind] and not vlm.model.training
    assert isinstance(vlm.processor, TextProcessor) and vlm.processor.chat_template
    assert vlm.family.image_token_ids(vlm.model.config) == ()
    config = json.loads((directory / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"]) == (128, 2)
    # the plain transformers path loads the same model and tokenizer
    plain = AutoModelForCausalLM.from_pretrained(directory)
    for (name, a), (_, b) in zip(vlm.model.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name
    text = "Scene: a yellow triangle at the bottom right. What colour is the triangle?"
    raw = Tokenizer.from_file(str(directory / "tokenizer.json"))
    assert AutoTokenizer.from_pretrained(directory).encode(text, add_special_tokens=False) \
        == vlm.tokenizer.encode(text, add_special_tokens=False) == raw.encode(text, add_special_tokens=False).ids
    # a save of the processor loads back with the same template
    out = directory.parent / f"{kind}-processor"
    vlm.processor.save_pretrained(out)
    assert TextProcessor.from_pretrained(out).chat_template == vlm.processor.chat_template


@pytest.mark.parametrize("kind", TEXT_KINDS)
def test_forward_and_head_reproduce_the_logits(kind, loaded, samples):
    vlm = loaded(kind)
    encoded = encode_sample(vlm, samples[1])
    assert set(encoded.inputs) == {"input_ids", "attention_mask"}
    with torch.no_grad():
        out = vlm.model(**encoded.inputs, output_hidden_states=True)
    assert out.logits.shape == (1, len(encoded.input_ids), vlm.model.config.vocab_size)
    z = vlm.family.final_hidden(vlm.model, out.hidden_states)
    raw = z.double() @ vlm.family.lm_head(vlm.model).weight.double().T
    expected = vlm.family.logit_transform(vlm.model).apply(raw)
    # float32 logits of a d=128 dot product against their float64 twin: |error| <~ 128 * 2^-24 * max|term|
    torch.testing.assert_close(expected, out.logits.double(), rtol=0, atol=2e-5)


def test_text_tokenizers_differ(loaded):
    qwen, llama = loaded("qwen2_text").tokenizer, loaded("llama_text").tokenizer
    assert len(qwen) != len(llama)
    assert "<|im_end|>" in qwen.get_vocab() and "<|im_end|>" not in llama.get_vocab()
    assert [llama.get_vocab()[t] for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    text = "What colour is the circle?"
    assert qwen.decode(qwen.encode(text)) == text
    assert qwen.encode(text, add_special_tokens=False) != llama.encode(text, add_special_tokens=False)


def test_parameter_groups_cover_a_text_model(loaded):
    vlm = loaded("llama_text")
    parts = student_part_params(vlm.model, vlm.family)
    assert parts["vision_encoder"] == parts["projector"] == set()
    assert set().union(*parts.values()) == {id(p) for p in vlm.model.parameters()}


# ----- spans ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", TEXT_KINDS)
def test_spans_of_a_multi_turn_text_sample(kind, loaded, samples):
    vlm = loaded(kind)
    sample = samples[1]
    encoded = encode_sample(vlm, sample)
    ids, spans, tok = encoded.input_ids, encoded.spans, vlm.tokenizer
    assert spans.images == () and spans.n_turns == 2
    for (start, end), answer in zip(spans.answers, sample.answers):
        assert tok.decode(ids[start:end]) in (answer + EOT[kind], " " + answer + EOT[kind])
        assert tok.convert_ids_to_tokens(ids[end - 1]) == EOT[kind]
    user_texts = [t.text for t in sample.turns if t.role == "user"]
    for (start, end), text in zip(spans.questions, user_texts):
        assert text.strip() in tok.decode(ids[start:end])


@pytest.mark.parametrize("kind", TEXT_KINDS)
def test_an_image_is_refused(kind, loaded, make_sample):
    sample = make_sample(("user", (0, "What colour is the circle?")), ("assistant", ("red",)))
    with pytest.raises(SpanError, match="text-only"):
        encode_sample(loaded(kind), sample)


# ----- teacher forward, extraction, generation ----------------------------------------------------
def _teacher(vlm) -> Teacher:
    head = vlm.family.lm_head(vlm.model)
    source = TeacherSource(location="unused", family=vlm.family.model_type, dtype="float32")
    return Teacher(vlm=vlm, source=source, device=torch.device("cpu"), head_weight=head.weight.detach(),
                   head_bias=None if head.bias is None else head.bias.detach(),
                   transform=vlm.family.logit_transform(vlm.model))


@pytest.mark.parametrize("kind", TEXT_KINDS)
def test_teacher_forward_reads_the_plain_forward(kind, loaded, samples):
    vlm = loaded(kind)
    encoded = [encode_sample(vlm, s) for s in samples]
    pad = pad_token_id(vlm.tokenizer)
    states = teacher_forward(vlm.model, vlm.family, [e.inputs for e in encoded], pad, penultimate=True)
    with torch.inference_mode():
        out = vlm.model(**pad_batch([e.inputs for e in encoded], pad, "right"),
                        output_hidden_states=True, use_cache=False)
    # the same padded batch through the same kernels: exact
    assert torch.equal(states.final, out.hidden_states[-1])
    assert torch.equal(states.penultimate, out.hidden_states[-2])
    answer, question = hidden_rows(states.final[1], encoded[1].spans, 0, question="text")
    n_answer = sum(e - s + 1 for s, e in encoded[1].spans.answers)
    assert answer.shape == (n_answer, 128) and question.shape == (sum(e - s for s, e in encoded[1].spans.questions), 128)


@pytest.mark.parametrize("kind", TEXT_KINDS)
def test_extraction_of_text_samples(kind, loaded, samples):
    vlm = loaded(kind)
    teacher = _teacher(vlm)
    config = Features.from_dict({"answer_hidden": True, "question_hidden": "text",
                                 "logit_stats": {"top_k": 4, "temperature": 2.0}})
    specs = {s.name: s for s in feature_specs(config, Codecs(), hidden_size=teacher.hidden_size,
                                              vocab_size=teacher.vocab_size)}
    assert set(specs) == {"answer_hidden", "question_hidden", "logit_stats"}
    items = [(s, encode_sample(vlm, s)) for s in samples]
    for (sample, enc), got in zip(items, batch_sample_features(teacher, specs, items)):
        windows = sum(e - s + 1 for s, e in enc.spans.answers)  # token before each answer .. its end
        targets = sum(e - s for s, e in enc.spans.answers)
        assert got.values["answer_hidden"].shape == (windows, 128)
        assert got.values["question_hidden"].shape == (sum(e - s for s, e in enc.spans.questions), 128)
        stats = got.values["logit_stats"]
        assert stats.topk_ids.shape == (targets, 4) and stats.lse.shape == (targets,)


@pytest.mark.parametrize("kind", TEXT_KINDS)
def test_a_text_model_runs_as_the_online_teacher(kind, loaded, samples):
    from genrecal.train.data import TeacherRequest
    from genrecal.train.online import OnlineSettings, OnlineTeacher

    vlm = loaded(kind)
    requests = [TeacherRequest(s.id, s.content_hash, enc, n_turns=len(enc.spans.answers))
                for s, enc in ((s, encode_sample(vlm, s)) for s in samples)]
    records = OnlineTeacher(vlm, OnlineSettings(question="text", round_to="bf16")).records(requests)
    for record, request in zip(records, requests):
        spans = request.encoded.spans
        assert record.sample_id == request.sample_id
        assert record.answer_hidden.shape == (sum(e - s + 1 for s, e in spans.answers), 128)
        assert record.question_hidden.shape == (sum(e - s for s, e in spans.questions), 128)


@pytest.mark.parametrize("kind", TEXT_KINDS)
def test_batched_generation_equals_one_at_a_time(kind, loaded, samples):
    vlm = loaded(kind)
    batched = generate_answers(vlm, samples, max_new_tokens=5, batch_size=2, turn="all", progress=False)
    single = generate_answers(vlm, samples, max_new_tokens=5, batch_size=1, turn="all", progress=False)
    assert batched == single and len(batched) == 3
    assert any(g.text for g in batched)


# ----- a training step ------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [AlignStage(name="align", steps=1), DistillStage(name="distill", steps=1),
                                   FinetuneStage(name="finetune", steps=1)], ids=lambda s: s.name)
def test_a_train_step_on_a_text_pair(stage, loaded, samples):
    """The text teacher's real states feed the Recalibrator of the text student of the other
    family and tokenizer; every trainable parameter gets a finite, non-zero gradient."""
    from genrecal.store.artifacts import TeacherHead
    from genrecal.train.data import TeacherTurn, TrainBatch

    teacher, student = loaded("qwen2_text"), loaded("llama_text")
    t_enc = [encode_sample(teacher, s) for s in samples]
    states = teacher_forward(teacher.model, teacher.family, [e.inputs for e in t_enc],
                             pad_token_id(teacher.tokenizer), penultimate=False)
    turns = []
    for b, enc in enumerate(t_enc):
        rows, question = [], []
        for k, (start, end) in enumerate(enc.spans.answers):
            window = states.final[b, start - 1:end].clone()
            q0, q1 = enc.spans.questions[k]
            rows.append(TeacherTurn(window=window, answer_ids=torch.tensor(enc.input_ids[start:end]),
                                    question=states.final[b, q0:q1].clone()))
        turns.append(rows)
    s_enc = [encode_sample(student, s) for s in samples]
    labels = [student_labels(e.inputs["input_ids"][0], e.spans.answers, len(e.spans.answers)) for e in s_enc]
    inputs, padded = pad_student([e.inputs for e in s_enc], labels, pad_token_id(student.tokenizer))
    batch = TrainBatch(ids=[s.id for s in samples], student_inputs=inputs, student_labels=padded,
                       student_answer_starts=[[a for a, _ in e.spans.answers] for e in s_enc],
                       teacher=turns if stage.name != "finetune" else None)
    head = teacher.family.lm_head(teacher.model)
    rec = side = None
    if stage.name != "finetune":
        rec = Recalibrator.from_student(student.model, 128, RecalibratorConfig(blocks=1), seed=0)
        side = TeacherSide.from_artifacts(TeacherHead(weight=head.weight.detach().clone(), bias=None,
                                                      transform=teacher.family.logit_transform(teacher.model)), None)
    trainables = configure_trainables(student.model, student.family, rec, stage.trains)
    model = StageModel(student.model, student.family, LossSpec.for_stage(stage, "hidden"), rec, side)
    out = run_step(model, batch)
    assert torch.isfinite(out.total) and float(out.total.detach()) > 0
    out.total.backward()
    assert trainables
    for name, param in trainables:
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert any(float(p.grad.abs().sum()) > 0 for _, p in trainables)
    student.model.zero_grad(set_to_none=True)
    for p in student.model.parameters():
        p.requires_grad_(False)


# ----- config ---------------------------------------------------------------------------------------
def _demo_text(tmp_path, **changes):
    import yaml

    from pathlib import Path

    demo = get_pipeline("demo-text", Path(__file__).resolve().parents[1] / "pipelines.yaml").to_dict()
    demo.pop("name")
    for dotted, value in changes.items():
        node = demo
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump({"pipelines": {"demo-text": demo}}, sort_keys=False))
    return path


def test_demo_text_is_a_valid_text_pipeline(tmp_path):
    pipe = get_pipeline("demo-text", _demo_text(tmp_path))
    assert pipe.teacher.family == "qwen2" and pipe.student.family == "llama"
    assert pipe.data.synthetic.modality == "text" and not pipe.cache.features.visual_gram


def test_visual_gram_is_refused_for_a_text_teacher(tmp_path):
    path = _demo_text(tmp_path, **{"cache.features.visual_gram": True})
    with pytest.raises(ConfigError) as err:
        get_pipeline("demo-text", path)
    assert "pipelines.demo-text.cache.features.visual_gram: must be false" in str(err.value)
    assert "text-only" in str(err.value)


def test_image_data_is_refused_for_text_models(tmp_path):
    path = _demo_text(tmp_path, **{"data.synthetic.modality": "image"})
    with pytest.raises(ConfigError, match=r"pipelines\.demo-text\.data\.synthetic\.modality"):
        get_pipeline("demo-text", path)


def test_a_text_student_builds_with_head_dim_64(tmp_path):
    out = build_tiny_vlm("llama_text", tmp_path / "s", vocab_size=600, hidden_size=64, num_heads=1,
                         num_kv_heads=1)
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] == 64
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_jitter_is_refused_for_the_text_set(tmp_path):
    """The text set names places in words: a pixel jitter would do nothing, so it is refused."""
    path = _demo_text(tmp_path, **{"data.synthetic.jitter": 1})
    with pytest.raises(ConfigError, match=r"pipelines\.demo-text\.data\.synthetic\.jitter: .*"
                                          r"leave jitter out for modality: text"):
        get_pipeline("demo-text", path)
