"""genrecal.model: model knowledge: VLM loading, per-family knowledge, sample encoding and spans,
the teacher forward, padding, generation and the tiny-VLM kit.

The public names below are imported lazily (PEP 562): most of them need torch and transformers.
The types the cache stores (:class:`~genrecal.store.spans.Spans`,
:class:`~genrecal.store.logit_transform.LogitTransform`) belong to :mod:`genrecal.store`.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load_vlm": "loading", "LoadedVLM": "loading",
    "encode_sample": "encoding", "Encoded": "encoding",
    "get_family": "families", "FAMILIES": "families",
    "build_tiny_vlm": "tiny",
    "generate_answers": "generate", "Generation": "generate",
    "save_processor": "saving",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
