"""Crash-safe writes on the local filesystem, shared by every package.

A reader never sees half a file or half a directory: a file is written to a sibling temporary
name and renamed over the target (``os.replace``); a finished directory is swapped in the same
way, the previous one moved aside first and deleted after. fsspec (remote) writes go through
:class:`genrecal.store.storage.CacheStorage` instead.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def fsync_path(path: str | os.PathLike) -> None:
    """Flush ``path`` (a file, or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str, *, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary sibling and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | os.PathLike, data: Any, *, fsync: bool = False,
                      **dumps: Any) -> Path:
    """``json.dumps(data, **dumps)`` written with :func:`write_text_atomic`."""
    return write_text_atomic(path, json.dumps(data, **dumps), fsync=fsync)


def replace_dir(new: str | os.PathLike, out: str | os.PathLike, *, prefix: str | None = None) -> None:
    """Move the finished directory ``new`` to ``out``; a previous ``out`` is moved aside into a
    sibling temporary directory (named with ``prefix``, default ``.<out>.old-``) and deleted."""
    new, out = Path(new), Path(out)
    if not out.exists():
        os.replace(new, out)
        return
    old = Path(tempfile.mkdtemp(prefix=prefix or f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)
