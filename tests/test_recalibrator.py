"""Tests for genrecal.train.recalibrator (docs/method.md §1.1 forward steps 1-6, §1.2 positions).

Tiny students are built from real transformers config classes with random weights; the
reference computations run the students' own text-model classes (transformers' forward, its
rotary and mask code) on the Recalibrator's blocks.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from genrecal.common.config import RecalibratorConfig
from genrecal.common.errors import ConfigError
from genrecal.model.families import get_family
from genrecal.train.errors import RecalibratorError, TrainError
from genrecal.train.recalibrator import Recalibrator, RecalOut

transformers = pytest.importorskip("transformers")

D_TEACHER = 48
TOL = 1e-5
FAMILIES = ("qwen2_vl", "llava_llama", "llava_qwen2", "gemma3")


def _text_kwargs(**extra):
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, bos_token_id=0, eos_token_id=1,
                pad_token_id=2, initializer_range=0.2)
    base.update(extra)
    return base


def _clip_vision():
    return dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32,
                num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4)


def _build_student(family: str) -> nn.Module:
    torch.manual_seed(1234)
    if family == "qwen2_vl":
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}
        cfg = transformers.Qwen2VLConfig(
            text_config=_text_kwargs(rope_parameters=rope),
            vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2,
                               patch_size=2, spatial_merge_size=2, temporal_patch_size=1))
        return transformers.Qwen2VLForConditionalGeneration(cfg).eval()
    if family in ("llava_llama", "llava_qwen2"):
        text_type = family.split("_")[1]
        extra = {"attn_implementation": "eager"} if text_type == "qwen2" else {}
        cfg = transformers.LlavaConfig(text_config=_text_kwargs(model_type=text_type),
                                       vision_config=_clip_vision(), image_token_id=5, **extra)
        return transformers.LlavaForConditionalGeneration(cfg).eval()
    if family == "gemma3":
        cfg = transformers.Gemma3Config(
            text_config=_text_kwargs(head_dim=8, sliding_window=3, sliding_window_pattern=2),
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, image_size=8, patch_size=4),
            mm_tokens_per_image=4)
        return transformers.Gemma3ForConditionalGeneration(cfg).eval()
    raise AssertionError(family)


_STUDENTS: dict[str, nn.Module] = {}


def student(family: str) -> nn.Module:
    if family not in _STUDENTS:
        _STUDENTS[family] = _build_student(family)
    return _STUDENTS[family]


def text_decoder(model: nn.Module) -> nn.Module:
    """The student's text decoder, where its Family says it is."""
    return get_family(model.config).text_model(model)


def _rec(family: str, **cfg) -> Recalibrator:
    return Recalibrator.from_student(student(family), D_TEACHER, RecalibratorConfig(**cfg), seed=7)


def _inputs(n_q: int, n_a: int, batch: int = 1, seed: int = 0, width_q: int = 32):
    gen = torch.Generator().manual_seed(seed)
    z_q = torch.randn(batch, n_q, width_q, generator=gen)
    z_a = torch.randn(batch, n_a, D_TEACHER, generator=gen)
    return z_q, _ones(batch, n_q), z_a, _ones(batch, n_a)


def _ones(*shape: int) -> torch.Tensor:
    return torch.ones(*shape, dtype=torch.bool)


def _reference_body(rec: Recalibrator, family: str) -> nn.Module:
    """The student's own text-model class holding the RecBody blocks, final norm removed."""
    decoder_cls = type(text_decoder(student(family)))
    ref = decoder_cls(rec.body.config).eval()
    ref.layers.load_state_dict(rec.body.blocks.state_dict())
    ref.norm = nn.Identity()
    return ref


# ------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------

def test_config_defaults_and_round_trip():
    cfg = RecalibratorConfig()
    assert (cfg.blocks, cfg.init, cfg.answer_input, cfg.reassign_positions) == \
        (2, "copy", "hidden", True)
    other = RecalibratorConfig(blocks=1, init="random", answer_input="embedding",
                               reassign_positions=False)
    assert RecalibratorConfig.from_dict(other.to_dict()) == other
    assert RecalibratorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert _rec("llava_llama", blocks=1).cfg == RecalibratorConfig(blocks=1)


@pytest.mark.parametrize("bad", [dict(blocks=0), dict(blocks=1.5), dict(blocks=True),
                                 dict(init="xavier"), dict(answer_input="logits"),
                                 dict(reassign_positions="yes")])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        RecalibratorConfig.from_dict(bad)


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown key 'depth'"):
        RecalibratorConfig.from_dict({"depth": 3})


def test_from_student_refuses_another_config_type():
    from dataclasses import make_dataclass

    legacy = make_dataclass("RecalibratorConfig", [("num_blocks", int, 2)])()
    with pytest.raises(RecalibratorError, match="genrecal.common.config.RecalibratorConfig"):
        Recalibrator.from_student(student("llava_llama"), D_TEACHER, legacy)


def test_error_hierarchy():
    assert issubclass(RecalibratorError, TrainError)


# ------------------------------------------------------------------------------------------
# Construction
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_copy_init_equals_students_last_blocks_without_sharing(family):
    rec = _rec(family)
    layers = text_decoder(student(family)).layers
    assert rec.body.source_layers == [1, 2]
    student_ptrs = {p.data_ptr() for p in student(family).parameters()}
    for block, src in zip(rec.body.blocks, (1, 2)):
        assert type(block) is type(layers[src])
        ref = layers[src].state_dict()
        for name, tensor in block.state_dict().items():
            torch.testing.assert_close(tensor, ref[name], rtol=0, atol=0)
        assert not {p.data_ptr() for p in block.parameters()} & student_ptrs


def test_block_layer_types_follow_source_layers():
    rec = _rec("gemma3")
    student_types = text_decoder(student("gemma3")).config.layer_types
    assert student_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert rec.body.layer_types == ["full_attention", "sliding_attention"]
    assert [b.self_attn.sliding_window for b in rec.body.blocks] == [None, 3]


def test_random_init_is_seeded_and_uses_initializer_range():
    stu = student("llava_llama")
    cfg = RecalibratorConfig(blocks=3, init="random")
    a = Recalibrator.from_student(stu, D_TEACHER, cfg, seed=3)
    b = Recalibrator.from_student(stu, D_TEACHER, cfg, seed=3)
    c = Recalibrator.from_student(stu, D_TEACHER, cfg, seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.body.blocks[0].mlp.up_proj.weight, c.body.blocks[0].mlp.up_proj.weight)
    linears = [m for m in a.body.blocks.modules() if isinstance(m, nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears])
    std = text_decoder(stu).config.initializer_range
    assert abs(weights.std().item() - std) < 0.2 * std
    assert torch.equal(a.body.blocks[0].input_layernorm.weight, torch.ones(32))
    copied = text_decoder(stu).layers[0].mlp.up_proj.weight
    assert not torch.equal(a.body.blocks[0].mlp.up_proj.weight, copied)


def test_construction_keeps_global_rng_and_student_untouched():
    stu = student("qwen2_vl")
    before = {k: v.clone() for k, v in stu.state_dict().items()}
    rng = torch.get_rng_state()
    _rec("qwen2_vl", init="random")
    assert torch.equal(rng, torch.get_rng_state())
    for k, v in stu.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_dimensions_and_dtype():
    rec = Recalibrator.from_student(student("qwen2_vl"), D_TEACHER, dtype=torch.bfloat16)
    assert (rec.d_student, rec.d_teacher) == (32, D_TEACHER)
    assert rec.p_pre.weight.shape == (32, D_TEACHER) and rec.p_post.weight.shape == (D_TEACHER, 32)
    assert isinstance(rec.norm, nn.LayerNorm) and rec.norm.normalized_shape == (D_TEACHER,)
    assert all(p.dtype == torch.bfloat16 for p in rec.parameters())
    assert rec.body.rotary_emb.inv_freq.dtype == torch.float32
    out = rec(*_inputs(3, 2))
    assert out.r_a.dtype == torch.bfloat16 and torch.isfinite(out.r_a).all()


def test_construction_errors():
    with pytest.raises(RecalibratorError, match="blocks=4 exceeds the 3 decoder layers"):
        _rec("qwen2_vl", blocks=4)
    with pytest.raises(RecalibratorError, match="d_teacher"):
        Recalibrator.from_student(student("qwen2_vl"), 0)
    with pytest.raises(RecalibratorError, match="cannot find the text decoder.*no transformers"):
        Recalibrator.from_student(nn.Linear(2, 2), D_TEACHER)
    other = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2,
                                                                  vocab_size=50))
    with pytest.raises(RecalibratorError, match="cannot find the text decoder.*unsupported VLM"):
        Recalibrator.from_student(other, D_TEACHER)
    # a text-only Llama is a supported student (the text family 'llama', issue 13)
    text_only = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_text_kwargs()))
    assert Recalibrator.from_student(text_only, D_TEACHER, RecalibratorConfig(blocks=1)) is not None


# ------------------------------------------------------------------------------------------
# Forward: shapes, reference computation, positions, padding
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_output_shapes_both_paths(family):
    rec = _rec(family)
    z_q, q_m, z_a, a_m = _inputs(5, 4, batch=2)
    out = rec(z_q, q_m, z_a, a_m)
    assert isinstance(out, RecalOut)
    assert out.r_q.shape == (2, 5, D_TEACHER) and out.r_a.shape == (2, 4, D_TEACHER)
    z_ql = torch.randn(2, 7, D_TEACHER)
    tout = rec.forward_teacher_only(z_ql, _ones(2, 7), z_a, a_m)
    assert tout.r_q.shape == (2, 7, D_TEACHER) and tout.r_a.shape == (2, 4, D_TEACHER)


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_students_own_text_model_with_positions_0_to_n(family):
    """RecBody == the student's text-model class on inputs_embeds=x with positions 0..N-1
    (its default; for Qwen2-VL the three mrope components all equal 0..N-1)."""
    rec = _rec(family)
    z_q, q_m, z_a, a_m = _inputs(6, 5, seed=1)
    out = rec(z_q, q_m, z_a, a_m)
    x = torch.cat([z_q, rec.p_pre(z_a)], dim=1)
    n = x.shape[1]
    positions = torch.arange(n)[None]
    if family == "qwen2_vl":
        positions = positions[None].expand(3, 1, n)
    with torch.no_grad():
        h = _reference_body(rec, family)(inputs_embeds=x, position_ids=positions).last_hidden_state
        r = rec.norm(rec.p_post(h))
    torch.testing.assert_close(out.r_q, r[:, :6], rtol=0, atol=TOL)
    torch.testing.assert_close(out.r_a, r[:, 6:], rtol=0, atol=TOL)


def test_teacher_only_path_matches_reference():
    rec = _rec("llava_qwen2")
    gen = torch.Generator().manual_seed(5)
    z_ql = torch.randn(1, 4, D_TEACHER, generator=gen)
    z_al = torch.randn(1, 3, D_TEACHER, generator=gen)
    out = rec.forward_teacher_only(z_ql, _ones(1, 4), z_al, _ones(1, 3))
    with torch.no_grad():
        x = rec.p_pre(torch.cat([z_ql, z_al], dim=1))
        h = _reference_body(rec, "llava_qwen2")(inputs_embeds=x).last_hidden_state
        r = rec.norm(rec.p_post(h))
    torch.testing.assert_close(torch.cat([out.r_q, out.r_a], dim=1), r, rtol=0, atol=TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_question_part_ignores_answer(family):
    rec = _rec(family)
    z_q, q_m, z_a, a_m = _inputs(4, 3, seed=2)
    base = rec(z_q, q_m, z_a, a_m)
    changed = rec(z_q, q_m, z_a + 1.0, a_m)
    torch.testing.assert_close(base.r_q, changed.r_q, rtol=0, atol=0)
    assert (base.r_a - changed.r_a).abs().max() > 1e-3
    moved_q = rec(z_q + 1.0, q_m, z_a, a_m)
    assert (base.r_a - moved_q.r_a).abs().max() > 1e-3


def _padded_batch(family: str):
    """Three samples of different lengths; q rows left-padded, a rows right-padded."""
    lengths = [(5, 4), (2, 6), (7, 1)]
    gen = torch.Generator().manual_seed(11)
    samples = [(torch.randn(1, nq, 32, generator=gen), torch.randn(1, na, D_TEACHER, generator=gen))
               for nq, na in lengths]
    n_q, n_a = max(nq for nq, _ in lengths), max(na for _, na in lengths)
    z_q = torch.full((3, n_q, 32), 9.0)
    z_a = torch.full((3, n_a, D_TEACHER), -9.0)
    q_m = torch.zeros(3, n_q, dtype=torch.bool)
    a_m = torch.zeros(3, n_a, dtype=torch.bool)
    for i, ((nq, na), (sq, sa)) in enumerate(zip(lengths, samples)):
        z_q[i, n_q - nq:], q_m[i, n_q - nq:] = sq[0], True
        z_a[i, :na], a_m[i, :na] = sa[0], True
    return samples, (z_q, q_m, z_a, a_m)


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_invariance(family):
    rec = _rec(family)
    samples, (z_q, q_m, z_a, a_m) = _padded_batch(family)
    out = rec(z_q, q_m, z_a, a_m)
    for i, (sq, sa) in enumerate(samples):
        single = rec(sq, _ones(*sq.shape[:2]), sa, _ones(*sa.shape[:2]))
        torch.testing.assert_close(out.r_q[i][q_m[i]], single.r_q[0], rtol=0, atol=TOL)
        torch.testing.assert_close(out.r_a[i][a_m[i]], single.r_a[0], rtol=0, atol=TOL)
    assert torch.all(out.r_q[~q_m] == 0) and torch.all(out.r_a[~a_m] == 0)


def _reference_out(rec: Recalibrator, family: str, z_q, z_a, positions) -> torch.Tensor:
    """[r_q | r_a] of one unpadded sample from the student's text-model class at ``positions``."""
    with torch.no_grad():
        x = torch.cat([z_q, rec.p_pre(z_a)], dim=1)
        h = _reference_body(rec, family)(inputs_embeds=x, position_ids=positions).last_hidden_state
        return rec.norm(rec.p_post(h))


def test_reassign_positions_false_uses_callers_positions():
    rec = _rec("llava_llama")
    rec_keep = _rec("llava_llama", reassign_positions=False)
    rec_keep.load_state_dict(rec.state_dict())
    z_q, q_m, z_a, a_m = _inputs(4, 3, seed=3)
    reset = rec(z_q, q_m, z_a, a_m)
    contiguous = rec_keep(z_q, q_m, z_a, a_m, torch.arange(4)[None], torch.arange(4, 7)[None])
    torch.testing.assert_close(contiguous.r_a, reset.r_a, rtol=0, atol=TOL)
    a_pos = torch.arange(40, 43)[None]
    gap = rec_keep(z_q, q_m, z_a, a_m, torch.arange(4)[None], a_pos)
    all_pos = torch.cat([torch.arange(4)[None], a_pos], 1)
    expected = _reference_out(rec, "llava_llama", z_q, z_a, all_pos)
    torch.testing.assert_close(torch.cat([gap.r_q, gap.r_a], 1), expected, rtol=0, atol=TOL)
    assert (gap.r_a - reset.r_a).abs().max() > 10 * TOL


def test_reassign_positions_false_accepts_mrope_positions():
    rec = _rec("qwen2_vl")
    rec_keep = _rec("qwen2_vl", reassign_positions=False)
    rec_keep.load_state_dict(rec.state_dict())
    z_q, q_m, z_a, a_m = _inputs(4, 3, seed=4)
    reset = rec(z_q, q_m, z_a, a_m)
    q_pos = torch.arange(4).view(1, 1, 4).expand(3, 1, 4).clone()
    same = rec_keep(z_q, q_m, z_a, a_m, q_pos, torch.arange(4, 7)[None])
    torch.testing.assert_close(same.r_a, reset.r_a, rtol=0, atol=TOL)
    q_pos[1, 0, 1:3] = torch.tensor([2, 0])
    grid = rec_keep(z_q, q_m, z_a, a_m, q_pos, torch.arange(4, 7)[None])
    all_pos = torch.cat([q_pos, torch.arange(4, 7).view(1, 1, 3).expand(3, 1, 3)], dim=2)
    expected = _reference_out(rec, "qwen2_vl", z_q, z_a, all_pos)
    torch.testing.assert_close(torch.cat([grid.r_q, grid.r_a], 1), expected, rtol=0, atol=TOL)
    assert (grid.r_a - reset.r_a).abs().max() > 10 * TOL


def test_position_argument_errors():
    z_q, q_m, z_a, a_m = _inputs(2, 2)
    pos = torch.arange(2)[None]
    with pytest.raises(RecalibratorError, match="reassign_positions is True"):
        _rec("llava_llama")(z_q, q_m, z_a, a_m, pos, pos)
    keep = _rec("llava_llama", reassign_positions=False)
    with pytest.raises(RecalibratorError, match="needs both q_positions and a_positions"):
        keep(z_q, q_m, z_a, a_m, pos)
    with pytest.raises(RecalibratorError, match="mrope"):
        keep(z_q, q_m, z_a, a_m, pos.expand(3, 1, 2), pos)


def test_input_validation_errors():
    rec = _rec("llava_llama")
    z_q, q_m, z_a, a_m = _inputs(3, 2)
    with pytest.raises(RecalibratorError, match=r"z_qs must have shape \[B, N, 32\]"):
        rec(torch.randn(1, 3, 31), q_m, z_a, a_m)
    with pytest.raises(RecalibratorError, match=r"answer_input must have shape \[B, N, 48\]"):
        rec(z_q, q_m, torch.randn(1, 2, 32), a_m)
    with pytest.raises(RecalibratorError, match="q_mask must be a bool tensor"):
        rec(z_q, q_m.long(), z_a, a_m)
    with pytest.raises(RecalibratorError, match="a_mask must be a bool tensor of shape"):
        rec(z_q, q_m, z_a, a_m[:, :1])
    with pytest.raises(RecalibratorError, match="z_ql must have shape"):
        rec.forward_teacher_only(z_q, q_m, z_a, a_m)
    z_q2, q_m2, z_a2, a_m2 = _inputs(3, 2, batch=2)
    q_m2[1], a_m2[1] = False, False
    with pytest.raises(RecalibratorError, match=r"batch rows \[1\] have no real"):
        rec(z_q2, q_m2, z_a2, a_m2)


# ------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3"])
def test_gradients_reach_recalibrator_and_question_features_only(family):
    stu = student(family)
    rec = _rec(family).train()
    _, (z_q, q_m, z_a, a_m) = _padded_batch(family)
    z_q.requires_grad_(True)
    out = rec(z_q, q_m, z_a, a_m)
    (out.r_a.pow(2).sum() + out.r_q.sum()).backward()
    for name, param in rec.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().max() > 0, name
    assert z_q.grad[q_m].abs().sum(dim=-1).gt(0).all()
    assert torch.all(z_q.grad[~q_m] == 0)
    assert all(p.grad is None for p in stu.parameters())


# ------------------------------------------------------------------------------------------
# Save / load
# ------------------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    rec = _rec("gemma3", blocks=1, init="random", answer_input="embedding")
    with torch.no_grad():
        rec.norm.weight.mul_(1.5)
    rec.save(tmp_path)
    meta = json.loads((tmp_path / "recalibrator.json").read_text())
    assert meta["config"] == rec.cfg.to_dict() and meta["d_teacher"] == D_TEACHER
    assert meta["config"] == {"blocks": 1, "init": "random", "answer_input": "embedding",
                              "reassign_positions": True}
    assert meta["source_layers"] == [2] and meta["block_class"] == "Gemma3DecoderLayer"
    loaded = Recalibrator.load(tmp_path, student("gemma3"))
    assert loaded.cfg == rec.cfg
    for (name, a), b in zip(rec.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    inputs = _inputs(4, 3, seed=9)
    torch.testing.assert_close(loaded(*inputs).r_a, rec(*inputs).r_a, rtol=0, atol=0)


def test_save_load_keeps_dtype(tmp_path):
    rec = Recalibrator.from_student(student("llava_llama"), D_TEACHER, dtype=torch.bfloat16)
    loaded = Recalibrator.load(rec.save(tmp_path), student("llava_llama"))
    assert loaded.p_post.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.p_post.weight, rec.p_post.weight)


def test_load_errors(tmp_path):
    with pytest.raises(RecalibratorError, match="is not a saved Recalibrator"):
        Recalibrator.load(tmp_path, student("llava_llama"))
    _rec("llava_llama").save(tmp_path)
    with pytest.raises(RecalibratorError, match="different student.*block_class"):
        Recalibrator.load(tmp_path, student("gemma3"))
    meta_path = tmp_path / "recalibrator.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "dtype": "load"}))
    with pytest.raises(RecalibratorError, match="not a floating torch dtype"):
        Recalibrator.load(tmp_path, student("llava_llama"))
    meta_path.write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(RecalibratorError, match="v1 file"):
        Recalibrator.load(tmp_path, student("llava_llama"))
    meta_path.write_text(json.dumps({**meta, "config": {**meta["config"], "init": "xavier"}}))
    with pytest.raises(RecalibratorError, match="not a valid RecalibratorConfig.*init"):
        Recalibrator.load(tmp_path, student("llava_llama"))
    meta_path.write_text("{not json")
    with pytest.raises(RecalibratorError, match="not valid JSON"):
        Recalibrator.load(tmp_path, student("llava_llama"))


def test_load_refuses_old_config_keys(tmp_path):
    _rec("llava_llama").save(tmp_path)
    meta_path = tmp_path / "recalibrator.json"
    meta = json.loads(meta_path.read_text())
    old = {"num_blocks": 2, "init": "copy", "answer_input": "hidden", "reset_positions": True}
    meta_path.write_text(json.dumps({**meta, "config": old}))
    with pytest.raises(RecalibratorError, match=r"old Recalibrator config keys \['num_blocks', "
                                                r"'reset_positions'\].*'num_blocks' -> 'blocks'"):
        Recalibrator.load(tmp_path, student("llava_llama"))
    renamed = {"blocks": 2, "init": "copy", "answer_input": "hidden", "reassign_positions": True}
    meta_path.write_text(json.dumps({**meta, "config": renamed}))
    assert Recalibrator.load(tmp_path, student("llava_llama")).cfg == RecalibratorConfig()


def test_load_rejects_mismatched_weights(tmp_path):
    rec = _rec("llava_llama")
    rec.save(tmp_path)
    # A different d_teacher in the JSON builds P_pre/P_post of other shapes than the weights.
    meta_path = tmp_path / "recalibrator.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "d_teacher": 40}))
    with pytest.raises(RecalibratorError, match="do not fit a Recalibrator"):
        Recalibrator.load(tmp_path, student("llava_llama"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_padding_invariance_and_bf16_autocast():
    stu = _build_student("qwen2_vl").cuda()
    rec = Recalibrator.from_student(stu, D_TEACHER, seed=7)
    assert rec.p_pre.weight.is_cuda
    samples, batch = _padded_batch("qwen2_vl")
    z_q, q_m, z_a, a_m = (t.cuda() for t in batch)
    out = rec(z_q, q_m, z_a, a_m)
    for i, (sq, sa) in enumerate(samples):
        single = rec(sq.cuda(), _ones(*sq.shape[:2]).cuda(), sa.cuda(), _ones(*sa.shape[:2]).cuda())
        torch.testing.assert_close(out.r_a[i][a_m[i]], single.r_a[0], rtol=0, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast = rec(z_q, q_m, z_a.bfloat16(), a_m)
    assert torch.isfinite(fast.r_a).all()
    assert (fast.r_a.float() - out.r_a).abs().max() < 0.1


# ---------------------------------------------------------------------------------------------
# No deprecated calls into transformers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llava_llama", "gemma3"])
def test_forward_emits_no_deprecation_warning(family):
    """transformers 5.24 renamed `past_key_values` to `cache` in `create_causal_mask` /
    `create_sliding_window_causal_mask` (the old keyword warns, and goes in 5.40). The body
    builds its masks with both (gemma3 has full and sliding-window layers); padding makes them
    real masks. Every deprecation category is an error here."""
    rec = _rec(family, blocks=2)
    z_q, q_m, z_a, a_m = _inputs(4, 3, batch=2)
    q_m[1, :2] = False
    a_m[1, 2:] = False
    with warnings.catch_warnings():
        for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
            warnings.simplefilter("error", category)
        out = rec(z_q, q_m, z_a, a_m)
        rec.forward_teacher_only(torch.randn(2, 5, D_TEACHER), _ones(2, 5), z_a, a_m)
    assert torch.isfinite(out.r_a).all()
