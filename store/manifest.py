"""``manifest.json``, the commit point of a cache: reading it, refusing what this genrecal cannot
read (unknown format version, schema failure, unsafe paths, edits after commit) and checking
whose teacher it names.

The writer (:func:`genrecal.store.writer.commit_cache`) writes it last; the reader, the
artifacts, inspect and validate read it through here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from pydantic import ValidationError

from genrecal.store.errors import CacheFormatError, CacheIntegrityError, FingerprintMismatchError
from genrecal.store.fingerprint import fingerprint_mismatches
from genrecal.store.schema import FORMAT_VERSION, MANIFEST, RANKS_DIR, Manifest, TeacherFingerprint
from genrecal.store.storage import CacheStorage

__all__ = ["check_teacher", "check_version", "load_manifest"]


def _raw_manifest(storage: CacheStorage) -> dict:
    if not storage.exists(MANIFEST):
        ranks = storage.list_dir(RANKS_DIR)
        hint = (f"writers have committed shards ({', '.join(ranks)}) but the cache was never committed: run "
                f"genrecal.store.writer.commit_cache({storage.url!r})" if ranks else
                "this is not a genrecal teacher cache (or the path is wrong)")
        raise CacheFormatError(f"{storage.where(MANIFEST)} does not exist: {hint}")
    try:
        raw = json.loads(storage.read_bytes(MANIFEST))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheFormatError(f"{storage.where(MANIFEST)} is not valid JSON ({exc}); "
                               f"re-run the commit step or restore the manifest") from exc
    if not isinstance(raw, dict):
        raise CacheFormatError(f"{storage.where(MANIFEST)} is not a JSON object")
    return raw


def check_version(raw: dict, where: str) -> None:
    """Raise unless ``raw["format_version"]`` is the supported :data:`FORMAT_VERSION`."""
    found = raw.get("format_version")
    if found != FORMAT_VERSION:
        raise CacheFormatError(
            f"{where}: cache format version {found!r} is not supported; this genrecal reads format "
            f"version {FORMAT_VERSION}. Use the genrecal release that wrote the cache, or re-extract it.")


def load_manifest(storage: CacheStorage, check_digest: bool = True) -> Manifest:
    """Parse and check ``manifest.json``: version, schema (safe paths included), digest."""
    raw = _raw_manifest(storage)
    where = storage.where(MANIFEST)
    check_version(raw, where)
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "\n".join(f"  - {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise CacheFormatError(f"{where} does not match the cache schema:\n{problems}\n"
                               f"Run `genrecal validate {storage.url}`; re-commit or re-extract the cache.") from None
    unsafe = manifest.unsafe_paths()
    if unsafe:
        lines = "\n".join(f"  - {w}: {p!r}" for w, p, _ in unsafe)
        raise CacheFormatError(f"{where} names paths outside the cache root:\n{lines}\n"
                               f"Refusing to read it; the manifest was tampered with: re-commit or re-extract.")
    if check_digest and manifest.digest != manifest.content_digest():
        raise CacheIntegrityError(
            f"{where} was modified after commit (its digest {manifest.digest[:16]}... does not match its "
            f"content {manifest.content_digest()[:16]}...). Re-run commit_cache to rebuild it from the rank "
            f"shard lists, or restore the original file.")
    return manifest


def check_teacher(manifest: Manifest, expected: TeacherFingerprint | Mapping, where: str) -> None:
    """Raise :class:`FingerprintMismatchError` naming each differing component, both values."""
    diffs = fingerprint_mismatches(manifest.teacher, expected)
    if diffs:
        lines = "\n".join(f"  - {k}: cache has {found}, expected {want}" for k, found, want in diffs)
        raise FingerprintMismatchError(
            f"{where} was written for another teacher than expected:\n{lines}\n"
            f"Use the cache extracted with this teacher (config, weights, tokenizer), or re-extract.")
