"""The tiny-VLM kit: real classes, family-style tokenizers, determinism, speed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from genrecal.model.loading import load_vlm
from genrecal.model.tiny import KINDS, build_tiny_vlm, tiny_spec


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_same_seed_gives_identical_files(tmp_path):
    first = build_tiny_vlm("llava_qwen2", tmp_path / "a", seed=3)
    second = build_tiny_vlm("llava_qwen2", tmp_path / "b", seed=3)
    assert _files(first) == _files(second)
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(_files(first))


def test_other_seed_changes_weights_and_tokenizer_ids(tmp_path):
    a = build_tiny_vlm("qwen2_vl", tmp_path / "a", seed=0, hidden_size=32)
    b = build_tiny_vlm("qwen2_vl", tmp_path / "b", seed=1, hidden_size=32)
    weights_a, weights_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert not torch.equal(weights_a["lm_head.weight"], weights_b["lm_head.weight"])
    vocab_a = json.loads((a / "tokenizer.json").read_text())["model"]["vocab"]
    vocab_b = json.loads((b / "tokenizer.json").read_text())["model"]["vocab"]
    assert vocab_a.keys() == vocab_b.keys() and vocab_a != vocab_b


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_real_classes_and_requested_sizes(kind, tiny_vlm_dir):
    vlm = load_vlm(tiny_vlm_dir(kind))
    family = vlm.family
    assert type(vlm.model).__name__ == family.model_class
    assert type(vlm.model).__module__.startswith(f"transformers.models.{family.model_type}.")
    spec = tiny_spec(kind)
    text = family.text_config(vlm.model.config)
    assert (text.hidden_size, text.num_hidden_layers) == (spec.hidden_size, spec.num_layers)
    assert text.vocab_size == max(spec.vocab_size, len(vlm.tokenizer))
    assert len(vlm.tokenizer) <= text.vocab_size
    text_cls = type(family.text_model(vlm.model)).__name__
    expected_text = {"llava_qwen2": "Qwen2Model", "llava_llama": "LlamaModel"}.get(kind)
    assert expected_text is None or text_cls == expected_text


def test_size_overrides_and_bad_arguments(tmp_path):
    out = build_tiny_vlm("gemma3", tmp_path / "g", hidden_size=32, num_layers=3, vocab_size=700)
    config = json.loads((out / "config.json").read_text())["text_config"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (32, 3, 700)
    with pytest.raises(ValueError, match="unknown tiny VLM kind 'gpt2'"):
        build_tiny_vlm("gpt2", tmp_path / "x")
    with pytest.raises(ValueError, match="must divide"):
        build_tiny_vlm("llava_qwen2", tmp_path / "y", hidden_size=30)


def test_family_styles_differ(tiny_vlm_dir):
    tokenizers = {kind: load_vlm(tiny_vlm_dir(kind)).tokenizer for kind in
                  ("qwen2_vl", "llava_qwen2", "llava_llama", "gemma3", "internvl")}
    vocab = {kind: tok.get_vocab() for kind, tok in tokenizers.items()}
    assert {"<|im_start|>", "<|vision_start|>", "<|image_pad|>"} <= vocab["qwen2_vl"].keys()
    assert {"<|im_start|>", "<image>"} <= vocab["llava_qwen2"].keys()
    assert [vocab["llava_llama"][t] for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert {"<start_of_turn>", "<image_soft_token>"} <= vocab["gemma3"].keys()
    assert {"<|im_start|>", "<img>", "</img>", "<IMG_CONTEXT>"} <= vocab["internvl"].keys()
    # the same word has a different id in every kind (ids are shuffled per kind)
    word_ids = {kind: tok.encode("circle", add_special_tokens=False)
                for kind, tok in tokenizers.items()}
    assert len({tuple(ids) for ids in word_ids.values()}) == len(word_ids)


@pytest.mark.parametrize("kind", ["llava_llama", "gemma3"])
def test_metaspace_tokenizers_cover_the_vqa_vocabulary(kind, tiny_vlm_dir):
    tok = load_vlm(tiny_vlm_dir(kind)).tokenizer
    text = "How many triangles are there? 3. Where is the blue square? left"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text



def test_ensure_tiny_vlm_builds_once_reuses_and_rebuilds_on_a_changed_spec(tmp_path):
    from genrecal.model.tiny import SPEC_FILE, ensure_tiny_vlm

    out = tmp_path / "models" / "student"
    assert ensure_tiny_vlm("llava_qwen2", out, seed=1, hidden_size=32) == out
    weights = out / "model.safetensors"
    stamp = weights.stat().st_mtime_ns, weights.stat().st_ino
    ensure_tiny_vlm("llava_qwen2", out, seed=1, hidden_size=32)  # same spec: kept as is
    assert (weights.stat().st_mtime_ns, weights.stat().st_ino) == stamp
    before = load_file(weights)
    ensure_tiny_vlm("llava_qwen2", out, seed=2, hidden_size=32)  # another seed: rebuilt
    assert json.loads((out / SPEC_FILE).read_text())["seed"] == 2
    after = load_file(weights)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in out.parent.iterdir()) == ["student"]  # no temp dirs left


def test_ensure_tiny_vlm_rebuilds_an_incomplete_directory(tmp_path):
    from genrecal.model.tiny import ensure_tiny_vlm

    out = ensure_tiny_vlm("llava_qwen2", tmp_path / "m", hidden_size=32)
    (out / "tokenizer.json").unlink()
    ensure_tiny_vlm("llava_qwen2", out, hidden_size=32)
    assert (out / "tokenizer.json").is_file()
    assert load_vlm(out).family.model_type == "llava"


def test_model_dir_for_passes_sources_through_and_ensures_tiny_models(tmp_path):
    from types import SimpleNamespace

    from genrecal.model.tiny import model_dir_for, tiny_vlm_is_complete

    hub = SimpleNamespace(tiny=None, source="org/model")
    assert str(model_dir_for(hub, "org/model")) == "org/model"
    assert not (tmp_path / "org").exists()
    kwargs = {"seed": 4, "hidden_size": 32}
    tiny = SimpleNamespace(tiny=SimpleNamespace(kind="llava_qwen2", build_kwargs=lambda: kwargs))
    where = model_dir_for(tiny, tmp_path / "t")
    assert tiny_vlm_is_complete(where, tiny_spec("llava_qwen2", seed=4, hidden_size=32))
    assert not tiny_vlm_is_complete(where, tiny_spec("llava_qwen2", seed=5, hidden_size=32))


# ----- the Qwen kinds' rotary layout and init scale (what lets the demo teacher learn the task)
@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("hidden_size", [64, 128, 256])
def test_qwen_mrope_tells_image_rows_and_columns_apart(kind, hidden_size):
    """Image tokens differ only in their h / w rotary positions; the first pair of the h and of
    the w block must turn far enough per row / column to be told apart (the old theta 1e4 with a
    16/24/24 split turned <0.004 rad per column), without wrapping over a 4-token-wide grid."""
    import math

    spec = tiny_spec(kind, hidden_size=hidden_size)
    text = KINDS[kind].build_config(spec, lambda token: 1).text_config
    rope = text.rope_parameters
    t, h, w = rope["mrope_section"]
    half = spec.head_dim // 2
    assert t + h + w == half and min(t, h, w) >= 1
    freq = [rope["rope_theta"] ** (-i / half) for i in range(half)]
    fastest_row, fastest_column = freq[t], freq[t + h]
    assert 0.45 <= fastest_column <= fastest_row and 3 * fastest_row < math.pi
    assert freq[-1] < 0.2  # slow pairs remain for matching content across a prompt


def test_qwen_init_scales_with_width(tmp_path):
    """Weights start at std 1/sqrt(width) (not transformers' 0.02, sized for ~2500-wide towers)
    in the decoder and the vision tower, so attention is not stuck uniform at init."""
    out = build_tiny_vlm("qwen2_vl", tmp_path / "q", hidden_size=128)
    weights = load_file(out / "model.safetensors")
    q_proj = next(v for k, v in weights.items() if k.endswith("layers.0.self_attn.q_proj.weight"))
    qkv = next(v for k, v in weights.items() if k.endswith("blocks.0.attn.qkv.weight"))
    assert q_proj.std().item() == pytest.approx(128 ** -0.5, rel=0.05)
    assert qkv.std().item() == pytest.approx(32 ** -0.5, rel=0.05)


def test_ensure_tiny_vlm_rebuilds_what_an_older_kit_built(tmp_path):
    from genrecal.model.tiny import KIT_REVISION, SPEC_FILE, ensure_tiny_vlm, tiny_vlm_is_complete

    out = ensure_tiny_vlm("llava_qwen2", tmp_path / "m", hidden_size=32)
    record = json.loads((out / SPEC_FILE).read_text())
    assert record["kit_revision"] == KIT_REVISION
    (out / SPEC_FILE).write_text(json.dumps({**record, "kit_revision": KIT_REVISION - 1}))
    assert not tiny_vlm_is_complete(out, tiny_spec("llava_qwen2", hidden_size=32))
    ensure_tiny_vlm("llava_qwen2", out, hidden_size=32)
    assert json.loads((out / SPEC_FILE).read_text())["kit_revision"] == KIT_REVISION
