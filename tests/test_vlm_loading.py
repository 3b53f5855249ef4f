"""load_vlm on every family: round trip, forward with images, logits from the final hidden state."""

from __future__ import annotations

import inspect
import json
import shutil
from dataclasses import replace

import pytest
import torch

from genrecal.store.errors import ModelLoadError
from genrecal.model.encoding import encode_sample
from genrecal.model.families import FAMILIES, get_family
from genrecal.model.loading import load_vlm
from genrecal.model.tiny import GEMMA3_SOFTCAP, KINDS, VLM_KINDS, tiny_spec

KIND_FAMILY = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "llava_qwen2": "llava",
               "llava_llama": "llava", "gemma3": "gemma3", "internvl": "internvl"}


def _two_image_sample(make_sample):
    return make_sample(("user", (0, "How many circles are there?")), ("assistant", ("Two.",)),
                       ("user", ("And in this one?", 1)), ("assistant", ("3",)),
                       images=((40, 56), (64, 32)))


def _forward(vlm, encoded):
    captured = {}
    norm = vlm.family.final_norm(vlm.model)
    handle = norm.register_forward_hook(
        lambda module, args, out: captured.update(pre=args[0].detach(), post=out.detach()))
    try:
        with torch.no_grad():
            out = vlm.model(**encoded.inputs, output_hidden_states=True)
    finally:
        handle.remove()
    return out, captured


@pytest.mark.parametrize("kind", sorted(VLM_KINDS))
def test_round_trip_forward_and_head_reproduces_logits(kind, loaded, make_sample):
    vlm = loaded(kind)
    assert vlm.family is FAMILIES[KIND_FAMILY[kind]]
    assert not vlm.model.training
    encoded = encode_sample(vlm, _two_image_sample(make_sample))
    out, captured = _forward(vlm, encoded)
    n = len(encoded.input_ids)
    assert out.logits.shape == (1, n, vlm.model.config.get_text_config().vocab_size)
    # hidden_states[-1] IS the final norm's output (post-norm), and the norm is not a no-op
    assert torch.equal(out.hidden_states[-1], captured["post"])
    assert not torch.allclose(captured["pre"], captured["post"], atol=1e-3)
    z = vlm.family.final_hidden(vlm.model, out.hidden_states)
    raw = z.double() @ vlm.family.lm_head(vlm.model).weight.double().T
    expected = vlm.family.logit_transform(vlm.model).apply(raw)
    torch.testing.assert_close(expected, out.logits.double(), rtol=0, atol=2e-5)


def test_gemma3_vlm_ignores_configured_softcap(loaded, make_sample):
    """transformers' Gemma3ForConditionalGeneration does not soft-cap: the family must not either."""
    vlm = loaded("gemma3")
    assert vlm.model.config.get_text_config().final_logit_softcapping == GEMMA3_SOFTCAP
    assert vlm.family.logit_transform(vlm.model).softcap is None
    encoded = encode_sample(vlm, _two_image_sample(make_sample))
    out, _ = _forward(vlm, encoded)
    capped = replace(vlm.family, softcap_attr="final_logit_softcapping")
    transform = capped.logit_transform(vlm.model)
    assert transform.softcap == GEMMA3_SOFTCAP
    raw = vlm.family.lm_head(vlm.model)(out.hidden_states[-1])
    # a soft-cap would change these logits measurably: the test above would catch it
    assert (transform.apply(raw) - out.logits).abs().max() > 1e-3
    torch.testing.assert_close(transform.apply(raw), GEMMA3_SOFTCAP * torch.tanh(raw / GEMMA3_SOFTCAP))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_family_modules_for_extra_decoder_blocks(kind, loaded):
    vlm = loaded(kind)
    family, model = vlm.family, vlm.model
    text_config = family.text_config(model.config)
    spec = tiny_spec(kind)
    assert text_config.hidden_size == spec.hidden_size
    layers = family.decoder_layers(model)
    assert len(layers) == spec.num_layers
    assert all(isinstance(layer, family.decoder_layer_class(model)) for layer in layers)
    positions = torch.arange(7).unsqueeze(0)
    position_ids = family.rotary_position_ids(positions)
    assert position_ids.shape == ((3, 1, 7) if family.multimodal_rope else (1, 7))
    x = torch.zeros(1, 7, text_config.hidden_size)
    rotary = family.rotary_embedding(model)
    takes_layer_type = "layer_type" in inspect.signature(rotary.forward).parameters
    assert family.rotary_per_layer_type == takes_layer_type
    cos, sin = family.rotary_cos_sin(rotary, x, position_ids, "full_attention")
    assert cos.shape[-2:] == (7, getattr(text_config, "head_dim", None) or spec.head_dim)
    assert torch.allclose(cos[..., 0, :], torch.ones_like(cos[..., 0, :]))  # position 0: angle 0
    # a new block built from the student's own decoder config runs on these embeddings
    block = family.decoder_layer_class(model)(text_config, layer_idx=len(layers) - 1)
    out = block(x, position_embeddings=(cos, sin), attention_mask=None, position_ids=positions)
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape == x.shape


def test_video_slot_processor_is_assembled_without_torchvision(loaded):
    vlm = loaded("qwen2_vl")
    assert type(vlm.processor).__name__ == "Qwen2VLProcessor"
    assert vlm.processor.video_processor is None
    assert type(vlm.processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert vlm.processor.chat_template == vlm.tokenizer.chat_template


def test_internvl_processor_keeps_its_settings_and_only_context_tokens_carry_features(loaded):
    vlm = loaded("internvl")
    assert type(vlm.processor).__name__ == "InternVLProcessor"
    assert vlm.processor.video_processor is None
    assert type(vlm.processor.image_processor).__name__ == "GotOcr2ImageProcessorPil"
    assert vlm.processor.image_seq_length == vlm.model.config.image_seq_length == 4  # processor_config.json
    # <img> / </img> are image tokens to transformers, but only <IMG_CONTEXT> carries features
    context = vlm.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert set(vlm.processor.image_token_ids) == {context, *vlm.tokenizer.convert_tokens_to_ids(["<img>", "</img>"])}
    assert vlm.family.processor_image_token_ids(vlm.processor) == (context,)
    assert vlm.family.image_token_ids(vlm.model.config) == (context,)


@pytest.mark.parametrize("kind", sorted(VLM_KINDS))
def test_vision_encoder_and_projector(kind, loaded):
    vlm = loaded(kind)
    encoder, projector = vlm.family.vision_encoder(vlm.model), vlm.family.projector(vlm.model)
    encoder_ids = {id(p) for p in encoder.parameters()}
    text_ids = {id(p) for p in vlm.family.text_model(vlm.model).parameters()}
    projector_ids = {id(p) for p in projector.parameters()}
    assert projector_ids and not encoder_ids & text_ids and not projector_ids & text_ids
    # Qwen nests its merger in the encoder; the other families keep them apart
    assert (projector_ids <= encoder_ids) == kind.startswith("qwen")
    # encoder (+ projector) + decoder + head: every parameter of the VLM is in one of them
    everything = encoder_ids | projector_ids | text_ids | {id(vlm.family.lm_head(vlm.model).weight)}
    assert everything == {id(p) for p in vlm.model.parameters()}


def test_teacher_and_student_tokenizers_differ(loaded):
    teacher, student = loaded("qwen2_vl").tokenizer, loaded("llava_qwen2").tokenizer
    assert len(teacher) != len(student)
    assert "<|image_pad|>" in teacher.get_vocab() and "<|image_pad|>" not in student.get_vocab()
    text = "What colour is the circle?"
    assert teacher.decode(teacher.encode(text)) == student.decode(student.encode(text)) == text
    assert teacher.encode(text) != student.encode(text)


# ----- bad loads ----------------------------------------------------------------------------------
def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_vlm(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_vlm("./relative/missing")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_vlm(tmp_path)


def test_file_instead_of_directory(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_vlm(path)


def test_requested_family_mismatch(tiny_vlm_dir):
    with pytest.raises(ModelLoadError, match="Qwen2-VL.*family 'llava'"):
        load_vlm(tiny_vlm_dir("qwen2_vl"), family="llava")


def test_unknown_family(tmp_path):
    with pytest.raises(ModelLoadError, match="unsupported VLM family 'bert'"):
        get_family("bert")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="unsupported VLM family 'bert'.*qwen2_vl"):
        load_vlm(tmp_path)


def test_tokenizer_of_another_model(tiny_vlm_dir, tmp_path):
    broken = shutil.copytree(tiny_vlm_dir("llava_qwen2"), tmp_path / "broken")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_vlm_dir("llava_llama") / name, broken / name)
    with pytest.raises(ModelLoadError, match="image-token id"):
        load_vlm(broken)


def test_image_processor_of_another_family(tiny_vlm_dir, tmp_path):
    broken = shutil.copytree(tiny_vlm_dir("qwen2_vl"), tmp_path / "broken")
    config = json.loads((tiny_vlm_dir("llava_qwen2") / "processor_config.json").read_text())
    (broken / "preprocessor_config.json").write_text(json.dumps(config["image_processor"]))
    with pytest.raises(ModelLoadError, match="CLIPImageProcessorPil image processor"):
        load_vlm(broken)


def test_bad_dtype(tiny_vlm_dir):
    with pytest.raises(ModelLoadError, match="unknown dtype 'float8'"):
        load_vlm(tiny_vlm_dir("llava_qwen2"), dtype="float8")


def test_bfloat16_load(tiny_vlm_dir):
    vlm = load_vlm(tiny_vlm_dir("llava_qwen2"), dtype="bfloat16")
    assert vlm.family.lm_head(vlm.model).weight.dtype == torch.bfloat16
