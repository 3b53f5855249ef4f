"""The teacher side of the teacher pass: loading, one forward per batch, identity, artifacts.

One forward pass gives everything the cache needs (docs/method.md §1.5, §2.4):
the post-norm ``z`` and the output of block L-2, read by
:func:`genrecal.model.teacher_forward.teacher_forward`, the forward that online training
runs too.

Teacher artifacts (:func:`write_artifacts`): config, the processor's files (tokenizer, chat
template, image processor), lm_head weight + bias + LogitTransform, and the input-embedding
rows of every token id that occurs in a cached answer. Rows for answer ids rather than the
whole matrix: GenRecal's embedding answer input only ever looks up teacher answer tokens, and
a 150k x 8192 embedding would add 2.5 GB to every cache.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from genrecal.extract.errors import ExtractSetupError
from genrecal.extract.job import TeacherSource
from genrecal.store.artifacts import write_teacher_artifacts
from genrecal.store.fingerprint import (teacher_fingerprint, weight_files, weights_identity_files,
                                        weights_identity_tensors)
from genrecal.store.schema import TeacherFingerprint
from genrecal.model.loading import LoadedVLM, load_vlm
from genrecal.store.logit_transform import LogitTransform
from genrecal.model.teacher_forward import to_model


@dataclass(frozen=True)
class Teacher:
    """A loaded teacher: the VLM, where its inputs go, and its head.

    head_weight: [V, d] (model dtype, model device); head_bias: [V] or None.
    """

    vlm: LoadedVLM
    source: TeacherSource
    device: torch.device
    head_weight: torch.Tensor
    head_bias: torch.Tensor | None
    transform: LogitTransform

    @property
    def model(self) -> torch.nn.Module:
        return self.vlm.model

    @property
    def family(self):
        return self.vlm.family

    @property
    def hidden_size(self) -> int:
        return int(self.head_weight.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.head_weight.shape[0])

    @property
    def pad_id(self) -> int:
        tok = self.vlm.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return int(pad or 0)


def resolve_device(requested: str | None, device_map, local_rank: int, world: int) -> str | None:
    """The device for the teacher's inputs: None with a device_map, ``cuda:<local rank>`` under
    torchrun when ``cuda`` is requested (or available and nothing is requested), else as given."""
    if device_map is not None:
        return None
    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and world > 1:
        return f"cuda:{local_rank}"
    return device


def load_teacher(source: TeacherSource, *, device: str | None = "cpu", device_map=None) -> Teacher:
    """Load the teacher in eval mode on ``device`` (or spread by ``device_map``)."""
    vlm = load_vlm(source.location, family=source.family, dtype=source.dtype,
                   device=device or "cpu", device_map=device_map,
                   trust_remote_code=source.trust_remote_code, revision=source.revision)
    head = vlm.family.lm_head(vlm.model)
    transform = vlm.family.logit_transform(vlm.model)
    first = next(vlm.model.parameters()).device
    return Teacher(vlm=vlm, source=source, device=torch.device(device) if device else first,
                   head_weight=head.weight.detach(),
                   head_bias=None if head.bias is None else head.bias.detach(), transform=transform)


# ----------------------------------------------------------------------------- forward


def to_device(teacher: Teacher, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Move a padded batch to the teacher's device; float inputs (pixels) take its dtype."""
    return to_model(teacher.model, batch)


def bare_forward(teacher: Teacher, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The teacher's plain forward (last-position logits only): the benchmark's baseline."""
    return teacher.model(**batch, logits_to_keep=1, use_cache=False).logits


# ----------------------------------------------------------------------------- identity


def processor_files(teacher: Teacher) -> dict[str, bytes]:
    """The files that rebuild the teacher's processor: tokenizer, chat template, image processor.

    Video-slot processors (Qwen2-VL) are saved as their parts, the way the tiny kit writes them
    (transformers cannot save them without torchvision).
    """
    processor = teacher.vlm.processor
    with tempfile.TemporaryDirectory(prefix="genrecal-processor-") as tmp:
        if teacher.family.video_slot:
            processor.tokenizer.save_pretrained(tmp)
            processor.image_processor.save_pretrained(tmp)
            if processor.chat_template:
                Path(tmp, "chat_template.jinja").write_text(processor.chat_template)
        else:
            processor.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def fingerprint(teacher: Teacher, files: dict[str, bytes]) -> TeacherFingerprint:
    """The teacher fingerprint: config dict, weight files (or the tensors), processor files."""
    paths = weight_files(teacher.source.location, teacher.source.revision)
    weights = (weights_identity_files(paths) if paths
               else weights_identity_tensors(teacher.model.state_dict()))
    return teacher_fingerprint(teacher.model.config.to_dict(), weights, files)


# ----------------------------------------------------------------------------- artifacts


def write_artifacts(storage, teacher: Teacher, files: dict[str, bytes],
                    answer_ids: torch.Tensor | None) -> list[str]:
    """Write the teacher artifacts into the cache (see the module docstring).

    answer_ids: int64 [m] unique token ids seen in cached answers, or None for no embedding rows.
    """
    rows = None
    if answer_ids is not None:
        embedding = teacher.model.get_input_embeddings().weight
        bad = answer_ids[(answer_ids < 0) | (answer_ids >= embedding.shape[0])]
        if bad.numel():
            raise ExtractSetupError(f"answer token ids {bad[:5].tolist()} are outside the teacher's "
                                    f"input embedding ({embedding.shape[0]} rows); the cache was "
                                    "written with another tokenizer: re-extract it")
        rows = embedding.detach()[answer_ids.to(embedding.device)].cpu()
    return write_teacher_artifacts(
        storage, config=teacher.model.config.to_dict(), tokenizer_files=files,
        lm_head_weight=teacher.head_weight, lm_head_bias=teacher.head_bias,
        logit_transform=teacher.transform, embedding_ids=answer_ids, embedding_rows=rows)

