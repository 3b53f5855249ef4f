"""Our calls into transformers raise no deprecation warnings.

transformers 5.24 renamed `past_key_values` to `cache` in `masking_utils.create_causal_mask` /
`create_sliding_window_causal_mask` (the old keyword warns with a FutureWarning and goes in
5.40). The Recalibrator builds its attention masks with those two functions; these tests run
its forward with every deprecation category turned into an error, so the warning cannot come
back unnoticed.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from genrecal.common.config import RecalibratorConfig
from genrecal.train.recalibrator import Recalibrator

transformers = pytest.importorskip("transformers")

D_TEACHER = 24


def _text(**extra):
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=64, bos_token_id=0, eos_token_id=1,
                pad_token_id=2, **extra)


def _student(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "llava_llama":  # full attention only (create_causal_mask)
        cfg = transformers.LlavaConfig(
            text_config=_text(model_type="llama"), image_token_id=5,
            vision_config=dict(model_type="clip_vision_model", hidden_size=16,
                               intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=8, patch_size=4))
        return transformers.LlavaForConditionalGeneration(cfg).eval()
    if family == "gemma3":  # full + sliding-window layers (both mask builders)
        cfg = transformers.Gemma3Config(
            text_config=_text(head_dim=8, sliding_window=3, sliding_window_pattern=2),
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, image_size=8, patch_size=4),
            mm_tokens_per_image=4)
        return transformers.Gemma3ForConditionalGeneration(cfg).eval()
    raise AssertionError(family)


@pytest.mark.parametrize("family", ["llava_llama", "gemma3"])
def test_recalibrator_forward_emits_no_deprecation_warning(family):
    rec = Recalibrator.from_student(_student(family), D_TEACHER,
                                    RecalibratorConfig(blocks=2), seed=0)
    assert set(rec.body.layer_types) == ({"full_attention", "sliding_attention"}
                                         if family == "gemma3" else {"full_attention"})
    gen = torch.Generator().manual_seed(0)
    z_q = torch.randn(2, 4, 32, generator=gen)
    z_a = torch.randn(2, 3, D_TEACHER, generator=gen)
    q_m = torch.ones(2, 4, dtype=torch.bool)
    a_m = torch.ones(2, 3, dtype=torch.bool)
    q_m[1, :2] = False  # padding, so real (not skipped) masks are built
    a_m[1, 2:] = False
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", PendingDeprecationWarning)
        out = rec(z_q, q_m, z_a, a_m)
        rec.forward_teacher_only(torch.randn(2, 5, D_TEACHER, generator=gen),
                                 torch.ones(2, 5, dtype=torch.bool), z_a, a_m)
    assert torch.isfinite(out.r_a).all()
