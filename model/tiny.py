"""Tiny-VLM kit: real transformers VLM classes at toy size, for tests and the demo.

``build_tiny_vlm(kind, out_dir)`` builds a model from the family's REAL config and model classes
(``Qwen2VLConfig`` -> ``Qwen2VLForConditionalGeneration``...) with seeded random weights, a BPE
tokenizer trained here in the family's style (tiny_tokenizers.py), the family's chat template
(tiny_templates.py) and its real image processor at a tiny image size (4-16 image tokens per
image), saves everything with ``save_pretrained`` and returns the directory, which
:func:`genrecal.model.loading.load_vlm` loads like any checkpoint.

Kinds: ``qwen2_vl`` (teacher default: vocab 2000, hidden 256), ``qwen2_5_vl``, ``llava_qwen2``
(student default: vocab 500, hidden 64), ``llava_llama``, ``gemma3`` (with a final-logit
soft-cap) and ``internvl`` (InternViT + pixel-shuffle projector + Qwen2 decoder); text-only
``qwen2_text`` (``Qwen2ForCausalLM``, byte-level BPE, ChatML; vocab 1000, hidden 128, head_dim 64)
and ``llama_text`` (``LlamaForCausalLM``, metaspace BPE with ``<s>`` / ``</s>``, a Llama-2-chat
template; vocab 600), whose processor is a :class:`~genrecal.model.text_processor.TextProcessor`. Same kind + seed + sizes -> byte-identical files.

The build records its resolved :class:`TinySizes` and :data:`KIT_REVISION` in ``tiny_spec.json``;
:func:`ensure_tiny_vlm` (and :func:`model_dir_for`, for a pipeline's model spec) builds only when
a directory lacks a complete model with that record, replacing a stale one atomically (temp dir +
rename).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from genrecal.common.atomic import replace_dir
from genrecal.common.vocabulary import TINY_KINDS
from genrecal.data.synthetic_text import text_corpus_lines
from genrecal.model import tiny_templates as templates
from genrecal.model.families import get_family
from genrecal.model.loading import assemble_without_video
from genrecal.model.saving import save_processor
from genrecal.model.tiny_tokenizers import TokenizerStyle, train_tokenizer

QWEN_VL_STYLE = TokenizerStyle(
    pre_tokenizer="byte_level", leading=(),
    trailing=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
              "<|image_pad|>", "<|video_pad|>"),
    named={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "image_token": "<|image_pad|>",
           "video_token": "<|video_pad|>", "vision_start_token": "<|vision_start|>",
           "vision_end_token": "<|vision_end|>"})
LLAVA_QWEN2_STYLE = TokenizerStyle(
    pre_tokenizer="byte_level", leading=(),
    trailing=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"),
    named={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "image_token": "<image>"})
LLAVA_LLAMA_STYLE = TokenizerStyle(
    pre_tokenizer="metaspace_first", leading=("<unk>", "<s>", "</s>"), trailing=("<image>", "<pad>"),
    named={"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
           "image_token": "<image>"},
    unk_token="<unk>")
QWEN2_TEXT_STYLE = TokenizerStyle(
    pre_tokenizer="byte_level", leading=(), trailing=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    named={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
LLAMA_TEXT_STYLE = TokenizerStyle(
    pre_tokenizer="metaspace_first", leading=("<unk>", "<s>", "</s>"), trailing=("<pad>",),
    named={"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
    unk_token="<unk>")
GEMMA3_STYLE = TokenizerStyle(
    pre_tokenizer="metaspace_never", leading=("<pad>", "<eos>", "<bos>", "<unk>"),
    trailing=("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
              "<image_soft_token>"),
    named={"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>",
           "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
           "image_token": "<image_soft_token>"},
    unk_token="<unk>")
INTERNVL_STYLE = TokenizerStyle(
    pre_tokenizer="byte_level", leading=(),
    trailing=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
              "<video>"),
    named={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "start_image_token": "<img>",
           "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
           "video_token": "<video>"})


@dataclass(frozen=True)
class TinySizes:
    """Resolved sizes of one tiny VLM (text decoder; the vision tower is fixed per kind).

    :func:`tiny_spec` resolves a pipeline's :class:`genrecal.common.config.TinySpec` (sizes
    left out take the kind's default here) into one of these."""

    kind: str
    vocab_size: int
    hidden_size: int
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    seed: int = 0
    tokenizer_seed: int | None = None  # None: ``seed``; equal ones give the same tokenizer

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def intermediate_size(self) -> int:
        return 2 * self.hidden_size


@dataclass(frozen=True)
class _Kind:
    style: TokenizerStyle
    chat_template: str
    defaults: TinySizes
    build_config: Callable[[TinySizes, Callable[[str], int]], object]
    build_image_processor: Callable[[], object]
    build_processor: Callable[[object, object, str], object]


# ----- configs ---------------------------------------------------------------------------------
# M-RoPE of the tiny Qwen2-VL / Qwen2.5-VL decoders. Pair i of the rotary half-dim turns by
# w_i = QWEN_ROPE_THETA ** (-i / half) rad per position step, and transformers gives the pairs to
# the temporal / height / width positions in that order, in contiguous blocks (mrope_section):
# the width block always gets the slowest pairs. Image tokens differ from each other only in
# their h / w positions (all have the same t), so left vs right is visible to attention only
# through the w block's fastest pair, top vs bottom through the h block's.
#   Before (the real models' theta 1e4 and 16/24/24 split, at the demo's head_dim 32 -> 16 pairs,
#   sections [4, 6, 6]): rows w_4..w_9 = 0.1 .. 0.0056 rad, columns w_10..w_15 = 3.2e-3 .. 1.8e-4
#   rad per step: two image columns differ by < 0.0032 rad (cos > 0.99999), left == right.
#   Now (theta 10, sections [2, 3, 11]): rows w_2..w_4 = 0.75, 0.65, 0.56 rad; columns
#   w_5..w_15 = 0.49 .. 0.115 rad per step. The kit's largest grid (64 px: 4 x 4 tokens) spans at
#   most 3 x 0.75 = 2.2 rad of rows and 3 x 0.49 = 1.5 rad of columns in the fastest pairs (< pi,
#   no wrap-around), and the slowest pair (0.115 rad per token, one turn per 55 tokens) still
#   changes slowly over a demo prompt (image to answer ~25 tokens). The t block keeps 1/8 of the
#   pairs (images are single frames; for text every block rotates with the same position).
QWEN_ROPE_THETA = 10.0


def _mrope_section(head_dim: int) -> list[int]:
    """The tiny Qwen decoders' temporal/height/width split of the rotary half-dim: 1/8, 3/16,
    the rest (at least one pair each), so that the first pair of the h block turns by
    >= 10**(-1/8) = 0.75 rad per row and that of the w block by >= 10**(-5/16) = 0.49 rad per
    column (see the comment above; half-dims of 8 .. 32: [1, 1, 6], [2, 3, 11], [4, 6, 22])."""
    half = head_dim // 2
    if half < 3:  # too few pairs for spatial blocks
        return [half, 0, 0]
    t, h = max(1, half // 8), max(1, 3 * half // 16)
    return [t, h, half - t - h]


def _init_range(width: int) -> float:
    """Weight init std 1/sqrt(width). The transformers default (0.02) is sized for towers
    ~2500 wide (0.02 = 1/sqrt(2500)); on the tiny kit's 32-wide vision tower and 128-wide
    decoder it makes every attention logit ~0.01-0.05 at init (q and k entries ~0.1-0.2), so
    softmax stays uniform and the gradient into W_q / W_k (proportional to the other one) is as
    small: the trained vision block stays a mean over the image (each patch gets every object's
    colours added: blur), and the decoder never learns to attend to the queried object."""
    return width ** -0.5


def _text_kwargs(spec: TinySizes) -> dict:
    return dict(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
                num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
                max_position_embeddings=1024)


def _qwen_text(spec: TinySizes, tid) -> dict:
    rope = {"rope_type": "default", "rope_theta": QWEN_ROPE_THETA,
            "mrope_section": _mrope_section(spec.head_dim)}
    return dict(_text_kwargs(spec), rope_parameters=rope, bos_token_id=None,
                initializer_range=_init_range(spec.hidden_size),
                eos_token_id=tid("<|im_end|>"), pad_token_id=tid("<|endoftext|>"))


def _qwen_vision_ids(tid) -> dict:
    return dict(image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
                vision_start_token_id=tid("<|vision_start|>"),
                vision_end_token_id=tid("<|vision_end|>"))


def _qwen2_vl_config(spec: TinySizes, tid):
    from transformers import Qwen2VLConfig

    vision = dict(depth=1, embed_dim=32, hidden_size=spec.hidden_size, num_heads=2, mlp_ratio=2,
                  patch_size=8, spatial_merge_size=2, temporal_patch_size=2,
                  initializer_range=_init_range(32))
    return Qwen2VLConfig(text_config=_qwen_text(spec, tid), vision_config=vision,
                         **_qwen_vision_ids(tid))


def _qwen2_5_vl_config(spec: TinySizes, tid):
    from transformers import Qwen2_5_VLConfig

    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                  out_hidden_size=spec.hidden_size, patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=32, fullatt_block_indexes=[1],
                  initializer_range=_init_range(32))
    return Qwen2_5_VLConfig(text_config=_qwen_text(spec, tid), vision_config=vision,
                            **_qwen_vision_ids(tid))


def _clip_vision():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, image_size=16, patch_size=4, projection_dim=32)


def _llava_config(text_config, tid):
    from transformers import LlavaConfig

    return LlavaConfig(vision_config=_clip_vision(), text_config=text_config,
                       image_token_index=tid("<image>"), image_seq_length=16,
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


def _llava_qwen2_config(spec: TinySizes, tid):
    from transformers import Qwen2Config

    text = Qwen2Config(**_text_kwargs(spec), bos_token_id=None, eos_token_id=tid("<|im_end|>"),
                       pad_token_id=tid("<|endoftext|>"))
    return _llava_config(text, tid)


def _llava_llama_config(spec: TinySizes, tid):
    from transformers import LlamaConfig

    text = LlamaConfig(**_text_kwargs(spec), bos_token_id=tid("<s>"), eos_token_id=tid("</s>"),
                       pad_token_id=tid("<pad>"))
    return _llava_config(text, tid)


GEMMA3_SOFTCAP = 1.0  # small, so the tanh is visibly non-linear on tiny random logits


def _gemma3_config(spec: TinySizes, tid):
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(
        **_text_kwargs(spec), head_dim=spec.head_dim, query_pre_attn_scalar=spec.head_dim,
        sliding_window=16, layer_types=["sliding_attention", "full_attention"] * (spec.num_layers // 2)
        + ["sliding_attention"] * (spec.num_layers % 2), final_logit_softcapping=GEMMA3_SOFTCAP,
        pad_token_id=tid("<pad>"), eos_token_id=[tid("<eos>"), tid("<end_of_turn>")],
        bos_token_id=tid("<bos>"))
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, image_size=32, patch_size=8,
                                vision_use_head=False)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                        boi_token_index=tid("<start_of_image>"), eoi_token_index=tid("<end_of_image>"),
                        image_token_index=tid("<image_soft_token>"))


INTERNVL_IMAGE_SEQ_LENGTH = 4  # (32 px / 8 px patches)^2 * downsample_ratio^2 tokens per tile


def _internvl_config(spec: TinySizes, tid):
    from transformers import InternVLConfig, Qwen2Config

    text = Qwen2Config(**_text_kwargs(spec), bos_token_id=None, eos_token_id=tid("<|im_end|>"),
                       pad_token_id=tid("<|endoftext|>"))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=[32, 32], patch_size=[8, 8])
    return InternVLConfig(text_config=text, vision_config=vision, image_token_id=tid("<IMG_CONTEXT>"),
                          image_seq_length=INTERNVL_IMAGE_SEQ_LENGTH, downsample_ratio=0.5)


# Text-only decoders (Qwen2ForCausalLM, LlamaForCausalLM). head_dim 64 by default (hidden 128, 2
# heads): vLLM's CPU attention backend refuses head_dim 16 / 32, and the pair is meant to be
# servable there as well; plain 1-D RoPE at the Llama / Qwen2 theta 1e4 (32 pairs turn from
# 1 rad down to ~1.3e-4 rad per token), width-scaled init as for the VLM decoders.
TEXT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def _qwen2_text_config(spec: TinySizes, tid):
    from transformers import Qwen2Config

    return Qwen2Config(**_text_kwargs(spec), rope_parameters=dict(TEXT_ROPE), bos_token_id=None,
                       initializer_range=_init_range(spec.hidden_size), tie_word_embeddings=False,
                       eos_token_id=tid("<|im_end|>"), pad_token_id=tid("<|endoftext|>"))


def _llama_text_config(spec: TinySizes, tid):
    from transformers import LlamaConfig

    return LlamaConfig(**_text_kwargs(spec), rope_parameters=dict(TEXT_ROPE),
                       initializer_range=_init_range(spec.hidden_size), tie_word_embeddings=False,
                       bos_token_id=tid("<s>"), eos_token_id=tid("</s>"), pad_token_id=tid("<pad>"))


# ----- image processors and processors ----------------------------------------------------------
def _no_image_processor():
    """Text-only kinds have no image processor."""
    return None


def _text_processor(image_processor, tokenizer, chat_template: str):
    from genrecal.model.text_processor import TextProcessor

    return TextProcessor(tokenizer, chat_template)

def _qwen_image_processor():
    from transformers import Qwen2VLImageProcessorPil

    # 16 px per merged token: 32x32 (4 tokens) .. 64x64 (16 tokens) after smart resize
    return Qwen2VLImageProcessorPil(size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64},
                                    patch_size=8, merge_size=2, temporal_patch_size=2)


def _clip_image_processor():
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})


def _gemma3_image_processor():
    from transformers import Gemma3ImageProcessorPil

    return Gemma3ImageProcessorPil(size={"height": 32, "width": 32})


def _internvl_image_processor():
    from transformers import GotOcr2ImageProcessorPil

    # 32 px tiles, at most 2 of them plus a thumbnail: 4 to 12 image tokens per image
    return GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, max_patches=2)


def _qwen_processor(image_processor, tokenizer, chat_template: str):
    return assemble_without_video(get_family("qwen2_vl"), image_processor, tokenizer, chat_template)


def _qwen2_5_processor(image_processor, tokenizer, chat_template: str):
    return assemble_without_video(get_family("qwen2_5_vl"), image_processor, tokenizer, chat_template)


def _internvl_processor(image_processor, tokenizer, chat_template: str):
    return assemble_without_video(get_family("internvl"), image_processor, tokenizer, chat_template,
                                  image_seq_length=INTERNVL_IMAGE_SEQ_LENGTH)


def _llava_processor(image_processor, tokenizer, chat_template: str):
    from transformers import LlavaProcessor

    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=4,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>", chat_template=chat_template)


def _gemma3_processor(image_processor, tokenizer, chat_template: str):
    from transformers import Gemma3Processor

    return Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                           chat_template=chat_template, image_seq_length=4)


KINDS: dict[str, _Kind] = {
    "qwen2_vl": _Kind(QWEN_VL_STYLE, templates.QWEN_VL, TinySizes("qwen2_vl", 2000, 256),
                      _qwen2_vl_config, _qwen_image_processor, _qwen_processor),
    "qwen2_5_vl": _Kind(QWEN_VL_STYLE, templates.QWEN_VL, TinySizes("qwen2_5_vl", 1500, 128),
                        _qwen2_5_vl_config, _qwen_image_processor, _qwen2_5_processor),
    "llava_qwen2": _Kind(LLAVA_QWEN2_STYLE, templates.LLAVA_QWEN2, TinySizes("llava_qwen2", 500, 64),
                         _llava_qwen2_config, _clip_image_processor, _llava_processor),
    "llava_llama": _Kind(LLAVA_LLAMA_STYLE, templates.LLAVA_VICUNA,
                         TinySizes("llava_llama", 600, 64, num_kv_heads=4),
                         _llava_llama_config, _clip_image_processor, _llava_processor),
    "gemma3": _Kind(GEMMA3_STYLE, templates.GEMMA3, TinySizes("gemma3", 800, 64),
                    _gemma3_config, _gemma3_image_processor, _gemma3_processor),
    "internvl": _Kind(INTERNVL_STYLE, templates.INTERNVL, TinySizes("internvl", 700, 64),
                      _internvl_config, _internvl_image_processor, _internvl_processor),
    "qwen2_text": _Kind(QWEN2_TEXT_STYLE, templates.QWEN2_TEXT,
                        TinySizes("qwen2_text", 1000, 128, num_heads=2, num_kv_heads=2),
                        _qwen2_text_config, _no_image_processor, _text_processor),
    "llama_text": _Kind(LLAMA_TEXT_STYLE, templates.LLAMA_TEXT,
                        TinySizes("llama_text", 600, 128, num_heads=2, num_kv_heads=2),
                        _llama_text_config, _no_image_processor, _text_processor),
}


#: The kinds that build a text-only decoder (no image input), and the vision-language ones.
TEXT_KINDS: tuple[str, ...] = tuple(k for k in KINDS if get_family(TINY_KINDS[k]).text_only)
VLM_KINDS: tuple[str, ...] = tuple(k for k in KINDS if k not in TEXT_KINDS)

SPEC_FILE = "tiny_spec.json"  # the resolved TinySizes a directory was built from
#: Bumped whenever a kind's config changes (2: Qwen M-RoPE theta / sections and width-scaled init),
#: so that directories built by an older kit are rebuilt instead of reused.
KIT_REVISION = 2


def _spec_record(spec: TinySizes) -> dict:
    """What ``tiny_spec.json`` holds: the resolved sizes and the kit revision."""
    return {**asdict(spec), "kit_revision": KIT_REVISION}


# ----- build -----------------------------------------------------------------------------------
def tiny_spec(kind: str, *, seed: int = 0, **sizes) -> TinySizes:
    """The kind's default :class:`TinySizes` with ``sizes`` (those not None) and ``seed`` applied."""
    if kind not in KINDS:
        raise ValueError(f"unknown tiny VLM kind '{kind}'; choose one of {sorted(KINDS)}")
    spec = replace(KINDS[kind].defaults, seed=seed, **{k: v for k, v in sizes.items() if v is not None})
    if spec.hidden_size % spec.num_heads or spec.num_heads % spec.num_kv_heads:
        raise ValueError(f"tiny {kind}: hidden_size {spec.hidden_size} must divide by num_heads "
                         f"{spec.num_heads}, which must divide by num_kv_heads {spec.num_kv_heads}")
    return spec


def build_tiny_vlm(kind: str, out_dir: str | Path, *, seed: int = 0, vocab_size: int | None = None,
                   hidden_size: int | None = None, num_layers: int | None = None,
                   num_heads: int | None = None, num_kv_heads: int | None = None,
                   tokenizer_seed: int | None = None) -> Path:
    """Build, save and return the directory of a tiny ``kind`` VLM (see module docstring).

    ``seed`` draws the weights and, unless ``tokenizer_seed`` is given, trains the tokenizer:
    two kits of one kind, vocabulary size and tokenizer seed share their tokenizer (GRACE's
    same-tokenizer pairs)."""
    spec = tiny_spec(kind, seed=seed, vocab_size=vocab_size, hidden_size=hidden_size,
                     num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                     tokenizer_seed=tokenizer_seed)
    recipe = KINDS[kind]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _hf_tokenizer(recipe, spec)
    model_spec = replace(spec, vocab_size=max(spec.vocab_size, len(tokenizer)))
    model = _random_model(recipe.build_config(model_spec, _id_lookup(tokenizer)), spec.seed)
    model.save_pretrained(out)
    processor = recipe.build_processor(recipe.build_image_processor(), tokenizer, recipe.chat_template)
    save_processor(processor, get_family(model.config), out)
    record = json.dumps(_spec_record(spec), indent=2, sort_keys=True)
    (out / SPEC_FILE).write_text(record + "\n")
    return out


def _hf_tokenizer(recipe: _Kind, spec: TinySizes):
    from transformers import TokenizersBackend

    seed = spec.seed if spec.tokenizer_seed is None else spec.tokenizer_seed
    extra = text_corpus_lines(seed) if get_family(TINY_KINDS[spec.kind]).text_only else ()
    backend = train_tokenizer(recipe.style, spec.vocab_size, seed=seed, salt=spec.kind,
                              extra_lines=extra)
    tokenizer = TokenizersBackend(tokenizer_object=backend, **recipe.style.named)
    tokenizer.chat_template = recipe.chat_template
    return tokenizer


def _id_lookup(tokenizer) -> Callable[[str], int]:
    def lookup(token: str) -> int:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token != tokenizer.unk_token and token_id == tokenizer.unk_token_id):
            raise KeyError(f"tiny tokenizer has no token {token!r}")
        return int(token_id)
    return lookup


def _random_model(config, seed: int):
    import transformers

    auto = getattr(transformers, get_family(config).auto_class)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_config(config)
    return model.eval()


# ----- build once ------------------------------------------------------------------------------
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def tiny_vlm_is_complete(out_dir: str | Path, spec: TinySizes) -> bool:
    """Whether ``out_dir`` holds a whole tiny model (config, weights, tokenizer) built from
    ``spec`` by this kit revision (as recorded in its ``tiny_spec.json``)."""
    out = Path(out_dir)
    whole = ((out / "config.json").is_file() and any((out / f).is_file() for f in _WEIGHT_FILES)
             and all((out / f).is_file() for f in _TOKENIZER_FILES))
    return whole and _recorded_spec(out) == _spec_record(spec)


def _recorded_spec(out: Path) -> dict | None:
    try:
        return json.loads((out / SPEC_FILE).read_text())
    except (OSError, ValueError):
        return None


def ensure_tiny_vlm(kind: str, out_dir: str | Path, **kwargs: Any) -> Path:
    """``out_dir`` holding a tiny ``kind`` VLM built with ``kwargs`` (those of
    :func:`build_tiny_vlm`): kept when already complete with the same spec, else (re)built in
    a sibling temporary directory that then replaces ``out_dir``, so readers never see half a
    model."""
    out = Path(out_dir).expanduser()
    if tiny_vlm_is_complete(out, tiny_spec(kind, **kwargs)):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would otherwise become the model directory's mode
    try:
        build_tiny_vlm(kind, tmp, **kwargs)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def model_dir_for(spec: Any, location: str | Path) -> Path:
    """Where a model spec's checkpoint is: ``location`` itself for a ``source`` model, the
    ensured tiny model at ``location`` (:func:`ensure_tiny_vlm`) for a ``tiny`` one.

    ``spec`` is duck-typed: ``.tiny`` is None or has ``.kind`` and ``.build_kwargs()``
    (``genrecal.common.config.ModelSpec``); ``location`` is ``Pipeline.model_location(role)``."""
    if spec.tiny is None:
        return Path(location)
    return ensure_tiny_vlm(spec.tiny.kind, location, **spec.tiny.build_kwargs())
