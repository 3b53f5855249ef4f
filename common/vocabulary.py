"""The names the pipeline config speaks in, each defined once: families, tiny-kit kinds, cache
features and their codecs, stage types, quantisable modules, metrics.

Torch-free and at the bottom of the package graph, so that every layer (the config, the cache
format, model knowledge, the trainer) imports them from here; the registries built from them
(:data:`genrecal.model.families.FAMILIES`, :data:`genrecal.model.tiny.KINDS`) check at import
that they cover exactly these names.
"""

from __future__ import annotations

#: VLM families (transformers ``model_type``) that a teacher or student may declare; the
#: registry genrecal.model.families.FAMILIES holds one Family for each.
FAMILY_NAMES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "llava", "gemma3", "internvl", "qwen2",
                                  "llama")
#: The text-only families among FAMILY_NAMES (decoder-only LLMs, ``*ForCausalLM``): no image
#: tokens, no vision tower, a tokenizer with a chat template as their processor. A pipeline
#: whose teacher is one of them cannot extract ``visual_gram`` (the config refuses it).
TEXT_FAMILY_NAMES: tuple[str, ...] = ("qwen2", "llama")
#: Kinds of the tiny-VLM kit (genrecal.model.tiny.KINDS) -> the family each one builds.
TINY_KINDS: dict[str, str] = {
    "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "llava_qwen2": "llava",
    "llava_llama": "llava", "gemma3": "gemma3", "internvl": "internvl",
    "qwen2_text": "qwen2", "llama_text": "llama",
}
#: Storage codecs the cache accepts per cached feature (genrecal.store.codecs implements them).
FEATURE_CODECS: dict[str, tuple[str, ...]] = {
    "answer_hidden": ("bf16", "fp8_e4m3", "int8"),
    "question_hidden": ("bf16", "fp8_e4m3", "int8"),
    "visual_gram": ("f32", "bf16"),
    "logit_stats": ("f32", "bf16"),
}
#: Stage types, in the only order in which they may appear in a pipeline.
STAGE_ORDER: tuple[str, ...] = ("align", "distill", "finetune", "grace")
#: Stages that train through the Recalibrator with the GenRecal losses (they read the cache).
GENRECAL_STAGES: tuple[str, ...] = ("align", "distill")
#: Stages the trainer runs (genrecal.train.loop): every stage type.
TRAINER_STAGES: tuple[str, ...] = ("align", "distill", "finetune", "grace")
#: Decoder linears that GRACE's QAT may fake-quantise (docs/method.md §2.3).
QUANT_MODULES: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)
#: Evaluation metrics.
METRICS: tuple[str, ...] = ("exact_match", "contains", "token_f1", "answer_nll")
