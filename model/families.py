"""Per-family knowledge of the supported VLMs, in one frozen :class:`Family` object each.

Everything extract/ and train/ need to know about a model family lives here: which config
attribute holds the image-token id, which tokens close an assistant turn, which processor class
the family uses (and whether that processor has a video slot that transformers can only fill
with torchvision), where the decoder stack, its final norm, its rotary embedding and the
lm_head sit, and how logits are post-processed (:class:`~genrecal.store.logit_transform.LogitTransform`).

Hidden states. In transformers 5 every supported family builds its text model with
``@capture_outputs`` (``tie_last_hidden_states=True``), which overwrites
``outputs.hidden_states[-1]`` with ``last_hidden_state``, i.e. the output of the final norm.
So ``lm_head(hidden_states[-1])`` followed by the family's transform reproduces
``outputs.logits``; ``Family.hidden_state_is_post_norm`` records this per family and
:meth:`Family.final_hidden` applies the norm itself for a family where it is not so.
tests/test_vlm_loading.py checks the identity for every family.

The registry :data:`FAMILIES` is keyed by ``config.model_type``. Besides the VLM families it
holds text-only decoders (Qwen2, Llama: :attr:`Family.text_only`), which every stage handles
as a VLM whose samples hold no images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genrecal.store.errors import ModelLoadError
from genrecal.store.logit_transform import LogitTransform


@dataclass(frozen=True)
class Family:
    """What genrecal knows about one VLM family (one ``config.model_type``).

    Attributes:
        model_type: ``config.model_type`` of the top-level VLM config (the registry key).
        title: human-readable name for messages.
        model_class: class ``AutoModelForImageTextToText`` must return for this family.
        processor_class: the family's processor class name in ``transformers``.
        image_processor_classes: image processor classes accepted for this family.
        video_slot: the processor has a ``video_processor`` slot; without torchvision it is
            assembled from ``AutoImageProcessor`` + ``AutoTokenizer`` with that slot empty.
        end_of_turn: tokens that may close an assistant turn in this family's chat templates,
            in preference order; the template in use decides which one (see spans.py).
        image_token_attr: attribute of the top-level config holding the image-token id.
        processor_image_token_attr: processor attribute holding the id of the token that carries
            image features, for a processor whose ``image_token_ids`` also lists delimiters that
            carry none (InternVL's ``<img>`` / ``</img>``); None: ``image_token_ids`` is exact.
        text_model_path: dotted path from the VLM to its text decoder model.
        lm_head_path: dotted path from the VLM to its output head.
        vision_encoder_path: dotted path from the VLM to its vision encoder; for families whose
            projector sits inside the encoder (Qwen2-VL's ``visual.merger``) it includes it.
        projector_path: dotted path from the VLM to the vision-to-text projector.
        softcap_attr: text-config attribute holding a final-logit soft-cap that the family's
            VLM forward applies (``softcap * tanh(logits / softcap)``); None if it applies none.
        multimodal_rope: rotary embedding takes ``[3, B, N]`` (temporal, height, width)
            position ids (Qwen2-VL M-RoPE) instead of ``[B, N]``.
        rotary_per_layer_type: the rotary embedding's forward takes a third argument, the layer
            type (``full_attention`` / ``sliding_attention``), because each attention type has
            its own frequencies (Gemma 3); see :meth:`rotary_cos_sin`.
        hidden_state_is_post_norm: ``hidden_states[-1]`` already went through the final norm.
        text_only: a decoder-only LLM (``*ForCausalLM``) without vision: no image tokens, no
            vision encoder or projector (both are empty parameter groups), and a
            :class:`~genrecal.model.text_processor.TextProcessor` (tokenizer + chat template)
            as its processor.
        auto_class: the transformers ``Auto*`` class that loads (and builds) the model.
    """

    model_type: str
    title: str
    model_class: str
    processor_class: str
    image_processor_classes: tuple[str, ...]
    video_slot: bool
    end_of_turn: tuple[str, ...]
    image_token_attr: str = "image_token_id"
    processor_image_token_attr: str | None = None
    text_model_path: str = "model.language_model"
    lm_head_path: str = "lm_head"
    vision_encoder_path: str = "model.vision_tower"
    projector_path: str = "model.multi_modal_projector"
    softcap_attr: str | None = None
    multimodal_rope: bool = False
    rotary_per_layer_type: bool = False
    hidden_state_is_post_norm: bool = True
    text_only: bool = False
    auto_class: str = "AutoModelForImageTextToText"

    # ----- token ids -------------------------------------------------------------------------
    def image_token_ids(self, config) -> tuple[int, ...]:
        """The id(s) of the tokens that stand for image features in ``input_ids`` (none for a
        text-only family)."""
        if self.text_only:
            return ()
        value = getattr(config, self.image_token_attr, None)
        if value is None:
            raise ModelLoadError(
                f"{self.title} config has no '{self.image_token_attr}': the checkpoint's config.json is "
                f"incomplete; re-save it with a transformers 5 {self.model_class}")
        return (int(value),)

    def processor_image_token_ids(self, processor) -> tuple[int, ...]:
        """The id(s) of the tokens carrying image features once ``processor`` expanded its
        image placeholders (the model's :meth:`image_token_ids`, seen from the processor)."""
        if self.text_only:
            return ()
        if self.processor_image_token_attr is not None:
            return (int(getattr(processor, self.processor_image_token_attr)),)
        return tuple(int(i) for i in processor.image_token_ids if i is not None)

    # ----- modules ---------------------------------------------------------------------------
    def text_config(self, config):
        """The decoder's config (what the trainer builds extra decoder blocks from)."""
        return config.get_text_config()

    def text_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return _resolve(model, self.text_model_path, self)

    def decoder_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return self.text_model(model).layers

    def decoder_layer_class(self, model: torch.nn.Module) -> type:
        return type(self.decoder_layers(model)[0])

    def final_norm(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.text_model(model).norm

    def rotary_embedding(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.text_model(model).rotary_emb

    def lm_head(self, model: torch.nn.Module) -> torch.nn.Linear:
        return _resolve(model, self.lm_head_path, self)

    def vision_encoder(self, model: torch.nn.Module) -> torch.nn.Module:
        """The vision encoder (including the projector where the family nests it there); an
        empty module for a text-only family (no parameters to train or freeze)."""
        if self.text_only:
            return torch.nn.Module()
        return _resolve(model, self.vision_encoder_path, self)

    def projector(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module mapping vision features into the decoder's embedding space; an empty
        module for a text-only family."""
        if self.text_only:
            return torch.nn.Module()
        return _resolve(model, self.projector_path, self)

    # ----- maths -----------------------------------------------------------------------------
    def logit_transform(self, model: torch.nn.Module) -> LogitTransform:
        """The map from ``lm_head`` output to the model's logits (soft-cap, bias flag)."""
        softcap = None
        if self.softcap_attr is not None:
            softcap = getattr(self.text_config(model.config), self.softcap_attr, None)
        has_bias = self.lm_head(model).bias is not None
        return LogitTransform(scale=1.0, softcap=None if softcap is None else float(softcap),
                              has_bias=has_bias)

    def final_hidden(self, model: torch.nn.Module, hidden_states) -> torch.Tensor:
        """Post-norm last hidden state ``z`` [B, N, d] from ``outputs.hidden_states`` (a tuple)."""
        last = hidden_states[-1]
        return last if self.hidden_state_is_post_norm else self.final_norm(model)(last)

    def rotary_position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """Position ids in the shape this family's rotary embedding takes.

        positions: int64 ``[B, N]``; returns ``[3, B, N]`` (the same positions on the temporal,
        height and width axes, as Qwen2-VL uses for text) for M-RoPE families, else ``[B, N]``.
        """
        if positions.ndim != 2:
            raise ValueError(f"positions must be [B, N], got shape {tuple(positions.shape)}")
        return positions.unsqueeze(0).expand(3, -1, -1) if self.multimodal_rope else positions

    def rotary_cos_sin(self, rotary: torch.nn.Module, x: torch.Tensor, position_ids: torch.Tensor,
                       layer_type: str = "full_attention") -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of this family's rotary embedding module ``rotary`` (the student's or
        a copy of its class) for decoder layers of ``layer_type``.

        x: ``[B, N, d]`` (dtype/device only); position_ids: as :meth:`rotary_position_ids`
        returns them. ``layer_type`` matters only where ``rotary_per_layer_type``.
        """
        if self.rotary_per_layer_type:
            return rotary(x, position_ids, layer_type)
        return rotary(x, position_ids)


def _resolve(model: torch.nn.Module, path: str, family: Family) -> torch.nn.Module:
    obj = model
    for name in path.split("."):
        if not hasattr(obj, name):
            raise ModelLoadError(
                f"{type(model).__name__} has no '{path}' (missing '{name}'): genrecal's {family.title} "
                f"family expects the transformers 5 module layout; check the transformers version")
        obj = getattr(obj, name)
    return obj


_QWEN_IMAGE_PROCESSORS = ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorPil")
_QWEN_VISION = {"vision_encoder_path": "model.visual", "projector_path": "model.visual.merger"}

FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family(model_type="qwen2_vl", title="Qwen2-VL", model_class="Qwen2VLForConditionalGeneration",
               processor_class="Qwen2VLProcessor", image_processor_classes=_QWEN_IMAGE_PROCESSORS,
               video_slot=True, end_of_turn=("<|im_end|>",), multimodal_rope=True, **_QWEN_VISION),
        Family(model_type="qwen2_5_vl", title="Qwen2.5-VL",
               model_class="Qwen2_5_VLForConditionalGeneration", processor_class="Qwen2_5_VLProcessor",
               image_processor_classes=_QWEN_IMAGE_PROCESSORS, video_slot=True,
               end_of_turn=("<|im_end|>",), multimodal_rope=True, **_QWEN_VISION),
        Family(model_type="llava", title="LLaVA", model_class="LlavaForConditionalGeneration",
               processor_class="LlavaProcessor",
               image_processor_classes=("CLIPImageProcessor", "CLIPImageProcessorPil",
                                        "LlavaImageProcessor", "LlavaImageProcessorPil"),
               video_slot=False, end_of_turn=("</s>", "<|im_end|>", "<|eot_id|>")),
        Family(model_type="gemma3", title="Gemma 3", model_class="Gemma3ForConditionalGeneration",
               processor_class="Gemma3Processor",
               image_processor_classes=("Gemma3ImageProcessor", "Gemma3ImageProcessorPil"),
               video_slot=False, end_of_turn=("<end_of_turn>",), rotary_per_layer_type=True,
               # transformers 5.23's Gemma3ForConditionalGeneration returns lm_head(z) as is: it
               # does NOT apply text_config.final_logit_softcapping (only Gemma3ForCausalLM does;
               # released Gemma 3 checkpoints set it to null anyway). So no soft-cap here; the
               # tiny Gemma 3 sets one, and the logit test fails if transformers starts using it.
               softcap_attr=None),
        # InternVLProcessor has a video slot (InternVLVideoProcessor needs torchvision); its
        # image processor is GOT-OCR2's. Only <IMG_CONTEXT> (processor.image_token_id) carries
        # features; the <img> / </img> delimiters in processor.image_token_ids do not.
        Family(model_type="internvl", title="InternVL", model_class="InternVLForConditionalGeneration",
               processor_class="InternVLProcessor",
               image_processor_classes=("GotOcr2ImageProcessor", "GotOcr2ImageProcessorPil"),
               video_slot=True, end_of_turn=("<|im_end|>",),
               processor_image_token_attr="image_token_id"),
        # Text-only decoders (TEXT_FAMILY_NAMES): the whole model is the text model; the chat
        # template decides which end-of-turn token closes a turn (Qwen2-Instruct: ChatML's
        # <|im_end|>; Llama: </s> in the Llama-2 / Vicuna style, <|eot_id|> in Llama 3's).
        Family(model_type="qwen2", title="Qwen2", model_class="Qwen2ForCausalLM",
               processor_class="TextProcessor", image_processor_classes=(), video_slot=False,
               end_of_turn=("<|im_end|>", "<|endoftext|>"), text_model_path="model",
               vision_encoder_path="", projector_path="", text_only=True,
               auto_class="AutoModelForCausalLM"),
        Family(model_type="llama", title="Llama", model_class="LlamaForCausalLM",
               processor_class="TextProcessor", image_processor_classes=(), video_slot=False,
               end_of_turn=("</s>", "<|eot_id|>", "<|im_end|>"), text_model_path="model",
               vision_encoder_path="", projector_path="", text_only=True,
               auto_class="AutoModelForCausalLM"),
    )
}


def get_family(model_type_or_config) -> Family:
    """The :class:`Family` for a ``model_type`` string or a transformers config object."""
    model_type = model_type_or_config if isinstance(model_type_or_config, str) \
        else getattr(model_type_or_config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        raise ModelLoadError(
            f"unsupported VLM family '{model_type}': genrecal supports {sorted(FAMILIES)}; "
            f"use a checkpoint of one of these families (config.json 'model_type')")
    return family
