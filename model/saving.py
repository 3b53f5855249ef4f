"""Save a VLM processor in the form :func:`genrecal.model.loading.load_vlm` loads back.

Families without a video slot save with ``processor.save_pretrained``. Processors with a video
slot (Qwen2-VL, Qwen2.5-VL, InternVL) cannot: without torchvision their video processor is
absent, and ``ProcessorMixin.save_pretrained`` expects every slot filled. They are saved as
their parts instead -- the tokenizer (carrying the processor's chat template), the image
processor and ``processor_config.json`` holding the processor's own settings (such as
InternVL's ``image_seq_length``) -- which is what ``load_vlm`` reassembles
(:func:`genrecal.model.loading.assemble_without_video`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from genrecal.model.families import Family

__all__ = ["PROCESSOR_CONFIG", "save_processor"]

#: transformers' file name for a processor's own settings (``transformers.utils.PROCESSOR_NAME``).
PROCESSOR_CONFIG = "processor_config.json"
_SLOTS = ("image_processor", "tokenizer", "video_processor")


def save_processor(processor: Any, family: Family, out_dir: str | Path) -> None:
    """Write ``processor``'s files into ``out_dir`` so that ``load_vlm(out_dir)`` rebuilds it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not family.video_slot:  # a text-only family's TextProcessor: the tokenizer + template
        processor.save_pretrained(out)
        return
    _save_tokenizer_with_template(processor, out)
    processor.image_processor.save_pretrained(out)
    settings = {k: v for k, v in processor.to_dict().items() if k not in _SLOTS}
    (out / PROCESSOR_CONFIG).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n",
                                        encoding="utf-8")


def _save_tokenizer_with_template(processor: Any, out: Path) -> None:
    """The tokenizer, saved with the processor's chat template (its own is restored after)."""
    tokenizer = processor.tokenizer
    own_template = tokenizer.chat_template
    tokenizer.chat_template = processor.chat_template or own_template
    try:
        tokenizer.save_pretrained(out)
    finally:
        tokenizer.chat_template = own_template
