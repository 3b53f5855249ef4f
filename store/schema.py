"""The teacher-cache format, in one place.

A cache is a directory (local path or fsspec URL) laid out as::

    manifest.json                 written last, by :func:`genrecal.store.writer.commit_cache`
    teacher/                      teacher artifacts (config, tokenizer, head, embedding rows)
    ranks/rank-00000.json         one writer's committed shard list (its commit point)
    shards/r00000-00000/          one shard: ``records.arrow`` + ``tensors.zarr/``
    index/sample-ids-<h>.arrow    sorted sample-id index, written at commit

A shard holds one Arrow IPC file of per-sample records (:func:`records_schema`) and one zarr v3
group with a flat ``[rows, width]`` array per feature part; each record carries the start row and
row count of its slice of every feature. Every path named by a manifest is relative and stays
inside the cache root (:func:`check_relpath`).

Positions (docs/method.md §1.2): spans are half-open ``[start, end)`` token ranges
of the teacher's input ids. The *answer window* of an answer span ``[s, e)`` is ``s-1 .. e-1``
(the last token before the answer through its last token); its *target positions* are
``s-1 .. e-2`` (positions whose next token is an answer token).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from genrecal.common.vocabulary import FEATURE_CODECS
from genrecal.store.spans import Spans

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TEACHER_DIR = "teacher"
RANKS_DIR = "ranks"
SHARDS_DIR = "shards"
INDEX_DIR = "index"
RECORDS_FILE = "records.arrow"
TENSORS_DIR = "tensors.zarr"
TMP_PREFIX = ".tmp-"

FEATURES = ("answer_hidden", "question_hidden", "visual_gram", "logit_stats")
HIDDEN_FEATURES = ("answer_hidden", "question_hidden")
STATUSES = ("ok", "truncated")
QuestionSelect = Literal["all", "text"]

_SHARD_NAME = re.compile(r"^r(\d{5})-(\d{5})$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# ----------------------------------------------------------------------------- paths


def check_relpath(path: str) -> str:
    """Return ``path`` if it is a clean relative POSIX path inside a cache root, else raise.

    Rejects absolute paths, drive letters, backslashes, empty / ``.`` / ``..`` components: a
    manifest naming such a path would make the reader touch files outside the cache.
    """
    bad = (not isinstance(path, str) or not path or path.startswith("/") or "\\" in path
           or ":" in path or "\x00" in path)
    parts = [] if bad else path.split("/")
    if bad or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"path {path!r} escapes the cache root or is not a clean relative path "
                         f"(no '..', no absolute path, no empty component, no ':' or '\\')")
    return posixpath.normpath(path)


def shard_name(rank: int, seq: int) -> str:
    """The directory name of a rank's ``seq``-th shard, e.g. ``r00003-00012``."""
    return f"r{rank:05d}-{seq:05d}"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    """``(rank, seq)`` of a shard directory name, or None for anything else (temporaries)."""
    m = _SHARD_NAME.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def rank_log_path(rank: int) -> str:
    return f"{RANKS_DIR}/rank-{rank:05d}.json"


# ----------------------------------------------------------------------------- spans


def answer_window_positions(spans: Spans) -> list[int]:
    """Positions ``s-1 .. e-1`` of every answer span, concatenated in turn order."""
    return [p for s, e in spans.answers for p in range(s - 1, e)]


def answer_target_positions(spans: Spans) -> list[int]:
    """Positions ``s-1 .. e-2`` whose next token is an answer token (logit_stats rows)."""
    return [p for s, e in spans.answers for p in range(s - 1, e - 1)]


def question_positions(spans: Spans, select: str) -> list[int]:
    """Sorted question positions: ``all`` = question spans plus image spans, ``text`` = without images."""
    image = {p for s, e in spans.images for p in range(s, e)}
    question = {p for s, e in spans.questions for p in range(s, e)}
    if select == "all":
        return sorted(question | image)
    if select == "text":
        return sorted(question - image)
    raise ValueError(f"question select {select!r}: expected 'all' or 'text'")


# ----------------------------------------------------------------------------- manifest models


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FeatureSpec(_Model):
    """One cached feature: its codec, the logical dtype it decodes to, and its row width.

    ``width`` is the hidden size for the hidden features, ``k`` (top-k) for ``logit_stats`` and 1
    for ``visual_gram`` (flat upper triangles). ``select`` applies to ``question_hidden`` only,
    ``temperature`` (the T of ``lse_t``) to ``logit_stats`` only.
    """

    name: Literal["answer_hidden", "question_hidden", "visual_gram", "logit_stats"]
    codec: str
    width: int = Field(gt=0)
    dtype: str = "bfloat16"
    select: QuestionSelect | None = None
    temperature: float | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "FeatureSpec":
        if self.codec not in FEATURE_CODECS[self.name]:
            raise ValueError(f"feature {self.name}: codec {self.codec!r} not in {FEATURE_CODECS[self.name]}")
        if (self.name == "question_hidden") != (self.select is not None):
            raise ValueError(f"feature {self.name}: 'select' is required for question_hidden and only for it")
        if (self.name == "logit_stats") != (self.temperature is not None):
            raise ValueError(f"feature {self.name}: 'temperature' is required for logit_stats and only for it")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"feature logit_stats: temperature must be > 0, got {self.temperature}")
        if self.name == "visual_gram" and self.width != 1:
            raise ValueError("feature visual_gram: width must be 1 (flat upper triangles)")
        return self


def answer_hidden(width: int, codec: str = "bf16") -> FeatureSpec:
    return FeatureSpec(name="answer_hidden", codec=codec, width=width)


def question_hidden(width: int, codec: str = "bf16", select: QuestionSelect = "all") -> FeatureSpec:
    return FeatureSpec(name="question_hidden", codec=codec, width=width, select=select)


def visual_gram(codec: str = "f32") -> FeatureSpec:
    return FeatureSpec(name="visual_gram", codec=codec, width=1, dtype="float32")


def logit_stats(k: int, temperature: float, codec: str = "f32") -> FeatureSpec:
    return FeatureSpec(name="logit_stats", codec=codec, width=k, temperature=temperature, dtype="float32")


class FileEntry(_Model):
    """A file of the cache: relative path, size in bytes, sha256 of its content.

    Paths are checked by :meth:`Manifest.unsafe_paths` (the reader refuses, validate reports)
    and again by :class:`~genrecal.store.storage.CacheStorage` on every access.
    """

    path: str
    size: int = Field(ge=0)
    sha256: str

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not _HEX64.match(v):
            raise ValueError(f"sha256 {v!r} is not 64 lowercase hex digits")
        return v


class ShardEntry(_Model):
    """One committed shard: counts, per-feature rows and bytes, and every file with its checksum."""

    name: str
    rank: int = Field(ge=0)
    samples: int = Field(ge=0)
    tokens: int = Field(ge=0)
    feature_rows: dict[str, int]
    feature_bytes: dict[str, int]
    raw_bytes: dict[str, int]
    files: tuple[FileEntry, ...]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if parse_shard_name(v) is None:
            raise ValueError(f"shard name {v!r} is not of the form r<rank:5>-<seq:5>")
        return v

    @property
    def dir(self) -> str:
        return f"{SHARDS_DIR}/{self.name}"


class SkippedSample(_Model):
    sample_id: str
    reason: str
    file: str = ""


class TeacherFingerprint(_Model):
    """Identity of the teacher: sha256 of its config, of its weights identity and of its tokenizer."""

    config: str
    weights: str
    tokenizer: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(f"{self.config}:{self.weights}:{self.tokenizer}".encode()).hexdigest()


class CacheHeader(_Model):
    """What every writer of one cache must agree on."""

    format_version: int
    teacher: TeacherFingerprint
    settings: dict
    features: dict[str, FeatureSpec]

    @model_validator(mode="after")
    def _keys(self) -> "CacheHeader":
        for key, spec in self.features.items():
            if key != spec.name:
                raise ValueError(f"feature key {key!r} does not match its spec name {spec.name!r}")
        return self


class RankLog(_Model):
    """One writer's commit point: atomically replaced after each shard is complete."""

    header: CacheHeader
    rank: int
    created_at: str
    shards: tuple[ShardEntry, ...] = ()
    skipped: tuple[SkippedSample, ...] = ()


class Counts(_Model):
    samples: int
    tokens: int
    feature_rows: dict[str, int]
    skipped: int


class Manifest(_Model):
    """The cache's table of contents (``manifest.json``), written last by commit."""

    format_version: int
    created: dict
    header: CacheHeader
    shards: tuple[ShardEntry, ...]
    counts: Counts
    skipped: tuple[SkippedSample, ...]
    index: FileEntry | None
    artifacts: tuple[FileEntry, ...]
    digest: str = ""

    @property
    def features(self) -> dict[str, FeatureSpec]:
        return self.header.features

    @property
    def teacher(self) -> TeacherFingerprint:
        return self.header.teacher

    def content_digest(self) -> str:
        """sha256 of the canonical JSON of everything but ``digest`` (detects hand edits)."""
        body = self.model_dump(mode="json", exclude={"digest"})
        return hashlib.sha256(canonical_json(body)).hexdigest()

    def file_entries(self) -> list[tuple[str, FileEntry]]:
        """Every file the manifest names, with where it is named (for messages)."""
        out = [(f"shards[{i}].files[{j}]", f) for i, s in enumerate(self.shards) for j, f in enumerate(s.files)]
        out += [(f"artifacts[{j}]", f) for j, f in enumerate(self.artifacts)]
        return out + ([("index", self.index)] if self.index else [])

    def unsafe_paths(self) -> list[tuple[str, str, str]]:
        """``(where, path, why)`` for every named path that would escape the cache root."""
        out = []
        for where, entry in self.file_entries():
            try:
                check_relpath(entry.path)
            except ValueError as exc:
                out.append((where, entry.path, str(exc)))
        return out

    def sealed(self) -> "Manifest":
        return self.model_copy(update={"digest": self.content_digest()})


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# ----------------------------------------------------------------------------- records


_SPAN_LIST = pa.list_(pa.list_(pa.int32(), 2))


def records_schema(features: dict[str, FeatureSpec]) -> pa.Schema:
    """The Arrow schema of a shard's per-sample records for the declared ``features``."""
    fields = [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("image_spans", _SPAN_LIST, nullable=False),
        pa.field("question_spans", _SPAN_LIST, nullable=False),
        pa.field("answer_spans", _SPAN_LIST, nullable=False),
    ]
    for name in FEATURES:
        if name in features:
            fields += [pa.field(f"{name}_start", pa.int64(), nullable=False),
                       pa.field(f"{name}_length", pa.int64(), nullable=False)]
    if "question_hidden" in features:
        fields.append(pa.field("question_hidden_positions", pa.list_(pa.int32()), nullable=False))
    if "visual_gram" in features:
        fields.append(pa.field("visual_gram_n", pa.list_(pa.int32()), nullable=False))
    return pa.schema(fields, metadata={"genrecal_cache_format": str(FORMAT_VERSION)})


def spans_from_record(rec: dict) -> Spans:
    """The :class:`Spans` of a record; raises ValueError if its spans are malformed."""
    return Spans(*(rec[f"{k}_spans"] for k in ("image", "question", "answer")))


def record_span_problems(rec: dict) -> list[str]:
    """Every problem of a (possibly corrupt) record's spans, reported instead of raised."""
    try:
        spans = spans_from_record(rec)
    except (ValueError, TypeError) as exc:
        return [str(exc)]
    return spans.problems(len(rec["input_ids"]))
