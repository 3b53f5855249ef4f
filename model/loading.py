"""Load a teacher or student VLM (model, processor, tokenizer) through transformers.

``load_vlm`` takes a local directory or a hub id and returns a :class:`LoadedVLM` whose model
is an ``AutoModelForImageTextToText`` in eval mode (``AutoModelForCausalLM`` for a text-only
family, whose processor is a :class:`~genrecal.model.text_processor.TextProcessor`). It works without torchvision: transformers 5
falls back to PIL image processors, and the processors with a video slot (Qwen2-VL,
Qwen2.5-VL), which ``AutoProcessor`` cannot build without torchvision, are assembled from
``AutoImageProcessor`` + ``AutoTokenizer`` with the video slot left empty (see
:func:`assemble_without_video`); :func:`genrecal.model.saving.save_processor`
writes processors back in the form this module loads. Every failure is a :class:`ModelLoadError` with a fix hint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from genrecal.store.errors import ModelLoadError
from genrecal.model.encoding import Encoded, encode_sample
from genrecal.model.families import Family, get_family

__all__ = ["Encoded", "LoadedVLM", "assemble_without_video", "encode_sample", "load_processor",
           "load_vlm"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LoadedVLM:
    model: torch.nn.Module
    processor: object
    tokenizer: object
    family: Family
    source: str


def load_vlm(source: str | Path, *, family: str | None = None, dtype: str = "float32",
             device: str = "cpu", device_map=None, trust_remote_code: bool = False,
             chat_template: str | None = None, revision: str | None = None) -> LoadedVLM:
    """Load model + processor from ``source`` (local directory or hub id).

    family: expected ``model_type`` (e.g. ``"qwen2_vl"``); a mismatch is an error.
    dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"auto"`` (the checkpoint's).
    device / device_map: ``device_map`` (e.g. ``"auto"``) wins over ``device`` when given.
    chat_template: replaces the checkpoint's chat template (e.g. one that ends assistant turns).
    revision: hub branch, tag or commit of ``source`` (None: the default branch); config,
        processor and weights all come from it. Ignored for a local directory.
    """
    hub = _hub_options(trust_remote_code, revision)
    where = _resolve_source(source)
    config = _load_config(where, hub)
    fam = _check_family(get_family(config), family, where)
    processor = load_processor(where, fam, trust_remote_code=trust_remote_code, revision=revision)
    if chat_template is not None:
        processor.chat_template = chat_template
    if fam.text_only and not processor.chat_template:
        raise ModelLoadError(f"'{where}': the {fam.title} tokenizer has no chat template, so "
                             "conversations cannot be rendered; use an instruct / chat checkpoint "
                             "or pass chat_template to load_vlm")
    _check_image_tokens(fam, config, processor, where)
    model = _load_model(where, fam, dtype=dtype, device=device, device_map=device_map, hub=hub)
    return LoadedVLM(model=model, processor=processor, tokenizer=processor.tokenizer,
                     family=fam, source=where)


def _resolve_source(source: str | Path) -> str:
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: it is not a saved transformers "
                                 "model; point to the directory written by save_pretrained")
        return str(path)
    text = str(source)
    if path.exists():
        raise ModelLoadError(f"{path} is a file, not a model directory; pass the directory "
                             "holding config.json")
    if isinstance(source, Path) or not _HUB_ID.match(text):
        raise ModelLoadError(f"model directory {path} does not exist; check the path (or pass a "
                             "hub id such as 'Qwen/Qwen2-VL-2B-Instruct')")
    return text


def _hub_options(trust_remote_code: bool, revision: str | None) -> dict:
    """Keyword arguments every ``from_pretrained`` call of one load shares."""
    return {"trust_remote_code": trust_remote_code,
            **({"revision": revision} if revision is not None else {})}


def _load_config(where: str, hub: dict):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(where, **hub)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot read the config of '{where}': {exc}. For a hub id, make sure "
                             "it is downloaded (HF_HUB_OFFLINE / cache) or use a local "
                             "directory") from exc


def _check_family(found: Family, expected: str | None, where: str) -> Family:
    if expected is not None and get_family(expected) is not found:
        raise ModelLoadError(f"'{where}' is a {found.title} model (model_type '{found.model_type}') "
                             f"but family '{expected}' was requested; fix the family in the "
                             "config or point to the right checkpoint")
    return found


# ----- processor -------------------------------------------------------------------------------
def load_processor(where: str, family: Family, *, trust_remote_code: bool = False,
                   revision: str | None = None):
    """The family's processor for ``where`` (at hub ``revision``), type-checked against the family."""
    hub = _hub_options(trust_remote_code, revision)
    if family.text_only:
        return _text_processor(where, family, hub)
    try:
        processor = (_assemble_without_video(where, family, hub) if family.video_slot
                     else _auto_processor(where, hub))
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        raise ModelLoadError(f"cannot build the {family.title} processor for '{where}': {exc}. "
                             "The directory needs the tokenizer and image processor files "
                             "written by save_pretrained") from exc
    _check_type(processor, family.processor_class, where, "processor")
    _check_type(processor.image_processor, family.image_processor_classes, where, "image processor")
    return processor


def _text_processor(where: str, family: Family, hub: dict):
    """A text-only family's processor: the checkpoint's tokenizer and its chat template."""
    from genrecal.model.text_processor import TextProcessor

    try:
        processor = TextProcessor.from_pretrained(where, **hub)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        raise ModelLoadError(f"cannot load the {family.title} tokenizer of '{where}': {exc}. The "
                             "directory needs the tokenizer files written by save_pretrained") from exc
    return processor


def _auto_processor(where: str, hub: dict):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(where, **hub)


def _assemble_without_video(where: str, family: Family, hub: dict):
    """Build a video-slot processor from the parts saved in ``where`` (see saving.py).

    The chat template is the processor's (``chat_template.jinja`` / legacy
    ``chat_template.json``), else the tokenizer's.
    """
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    image_processor = AutoImageProcessor.from_pretrained(where, **hub)
    tokenizer = AutoTokenizer.from_pretrained(where, **hub)
    cls = getattr(transformers, family.processor_class)
    processor_dict, _ = cls.get_processor_dict(where, **hub)
    chat_template = processor_dict.get("chat_template") or tokenizer.chat_template
    return assemble_without_video(family, image_processor, tokenizer, chat_template,
                                  **_init_settings(cls, processor_dict))


def _init_settings(cls, processor_dict: dict) -> dict:
    """The processor's own ``__init__`` settings (e.g. InternVL's ``image_seq_length``) saved in
    its ``processor_config.json``; the sub-processor slots and the chat template excluded."""
    import inspect

    params = set(inspect.signature(cls.__init__).parameters)
    params -= {"self", "kwargs", "chat_template", "image_processor", "tokenizer", "video_processor"}
    return {k: v for k, v in processor_dict.items() if k in params}


def assemble_without_video(family: Family, image_processor, tokenizer, chat_template: str | None,
                           **processor_kwargs):
    """The family's real processor class built from its parts, with the video slot empty.

    transformers 5.23 type-checks every sub-processor slot against ``VideoProcessorMixin``,
    which is not exported without torchvision, so even ``video_processor=None`` fails in
    ``ProcessorMixin.__init__``. The check is skipped for that one slot on this one instance
    (an instance attribute shadowing the method during ``__init__``); every other slot is
    still checked. ``processor_kwargs`` go to the processor's ``__init__``.
    """
    import transformers
    from transformers.processing_utils import ProcessorMixin

    cls = getattr(transformers, family.processor_class)
    processor = cls.__new__(cls)

    def check(name, argument):
        if name == "video_processor" and argument is None:
            return None
        return ProcessorMixin.check_argument_for_proper_class(processor, name, argument)

    processor.check_argument_for_proper_class = check
    try:
        processor.__init__(image_processor=image_processor, tokenizer=tokenizer,
                           video_processor=None, chat_template=chat_template, **processor_kwargs)
    finally:
        del processor.check_argument_for_proper_class
    return processor


def _check_type(obj, expected: str | tuple[str, ...], where: str, what: str) -> None:
    names = (expected,) if isinstance(expected, str) else expected
    if type(obj).__name__ not in names:
        raise ModelLoadError(f"'{where}' gave a {type(obj).__name__} {what}, expected "
                             f"{' or '.join(names)}; the checkpoint's preprocessor/tokenizer "
                             "config belongs to another model family")


def _check_image_tokens(family: Family, config, processor, where: str) -> None:
    model_ids = set(family.image_token_ids(config))
    processor_ids = set(family.processor_image_token_ids(processor))
    if model_ids != processor_ids:
        raise ModelLoadError(f"'{where}': the model's image-token id(s) {sorted(model_ids)} differ "
                             f"from the processor's {sorted(processor_ids)}; the tokenizer does "
                             "not belong to this model")


# ----- model -----------------------------------------------------------------------------------
def _torch_dtype(dtype: str):
    if dtype == "auto":
        return "auto"
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype '{dtype}'; use one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[dtype]


def _load_model(where: str, family: Family, *, dtype: str, device: str, device_map, hub: dict):
    import transformers

    auto = getattr(transformers, family.auto_class)
    torch_dtype = _torch_dtype(dtype)
    try:
        model = auto.from_pretrained(
            where, dtype=torch_dtype, device_map=device_map, **hub)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load the {family.title} weights from '{where}': {exc}. "
                             "Check that the safetensors files are complete") from exc
    _check_type(model, family.model_class, where, "model")
    if device_map is None:
        model = model.to(device)
    return model.eval()
