"""File access for a cache rooted at a local directory or an fsspec URL.

Every path handed to :class:`CacheStorage` is relative to the cache root and checked by
:func:`genrecal.store.schema.check_relpath`, so nothing read from a manifest can reach outside
the root. On a local filesystem each path is also resolved (symlinks followed, as the OS would)
and refused (:class:`~genrecal.store.errors.CacheFormatError`) if its real path leaves the real
root; a symlink that stays inside the root is allowed. :meth:`CacheStorage.escaping_links` finds
every symlink under a directory that leaves the root, so that a zarr group (whose files zarr
opens itself) is checked before it is opened. fsspec filesystems other than the local one have
no symlinks and are not resolved.

Local writes of single files are atomic (temporary file, fsync, ``os.replace``); on fsspec
filesystems a single-object write is taken as atomic (object stores replace whole objects), and
multi-file steps rely on the per-rank shard list as their commit point.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import secrets
import shutil
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from genrecal.common.atomic import fsync_path
from genrecal.store.errors import CacheFormatError
from genrecal.store.schema import check_relpath

_READ_BLOCK = 1 << 22


class CacheStorage:
    """The files of one cache. ``url``: a local path, ``file://``, ``memory://``, ``s3://``..."""

    def __init__(self, url: str | Path, storage_options: dict | None = None):
        self.url = str(url)
        self.options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(self.url, **self.options)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = root.rstrip("/") or "/"
        self.real_root = os.path.realpath(self.root) if self.local else self.root

    def __repr__(self) -> str:
        return f"CacheStorage({self.url!r})"

    def path(self, rel: str) -> str:
        """The filesystem path of ``rel`` (checked to stay inside the root, symlinks resolved)."""
        path = f"{self.root}/{check_relpath(rel)}"
        if self.local:
            real = os.path.realpath(path)
            if not self._inside(real):
                raise CacheFormatError(self._escape_message([(rel, real)]))
        return path

    def _inside(self, real: str) -> bool:
        root = self.real_root
        return real == root or real.startswith(root if root.endswith(os.sep) else root + os.sep)

    def resolves_outside(self, rel: str) -> str | None:
        """The real path of ``rel`` if it leaves the cache root through a symlink, else None."""
        if not self.local:
            return None
        real = os.path.realpath(f"{self.root}/{check_relpath(rel)}")
        return None if self._inside(real) else real

    def escaping_links(self, rel: str = "") -> list[tuple[str, str]]:
        """``(path, real target)`` of every symlink at or under directory ``rel`` ("" = the whole
        cache) whose target is outside the cache root; paths are relative to the root.

        Symlinks to directories inside the root are followed (once each), so that nothing a
        reader could reach from ``rel`` is missed. Always [] for non-local filesystems.
        """
        if not self.local:
            return []
        if rel:
            real = self.resolves_outside(rel)
            if real is not None:
                return [(rel, real)]
        top = os.path.realpath(f"{self.root}/{check_relpath(rel)}" if rel else self.root)
        found: dict[str, str] = {}
        stack, walked = [top], set()
        while stack:
            base = stack.pop()
            if base in walked or not os.path.isdir(base):
                continue
            walked.add(base)
            for dirpath, dirnames, filenames in os.walk(base):  # never descends into symlinks
                for name in dirnames + filenames:
                    link = os.path.join(dirpath, name)
                    if not os.path.islink(link):
                        continue
                    target = os.path.realpath(link)
                    if not self._inside(target):
                        found[os.path.relpath(link, self.real_root).replace(os.sep, "/")] = target
                    elif os.path.isdir(target):
                        stack.append(target)
        return sorted(found.items())

    def check_no_escape(self, rel: str = "") -> None:
        """Raise :class:`CacheFormatError` if any symlink at or under ``rel`` leaves the root."""
        links = self.escaping_links(rel)
        if links:
            raise CacheFormatError(self._escape_message(links))

    def _escape_message(self, links: list[tuple[str, str]]) -> str:
        lines = "\n".join(f"  - {self.where(rel)} -> {target}" for rel, target in links)
        return (f"cache {self.url}: refusing to follow symlinks out of the cache root {self.real_root}:\n{lines}\n"
                f"A cache must hold its own files: replace each symlink by a copy of its target inside the "
                f"cache (or re-extract the cache); `genrecal validate {self.url}` lists every such path.")

    def where(self, rel: str) -> str:
        """A human-readable location of ``rel`` for messages."""
        return f"{self.url.rstrip('/')}/{rel}"

    # ------------------------------------------------------------------ queries

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    def list_dir(self, rel: str) -> list[str]:
        """Names (not paths) of the entries of directory ``rel``; [] if it does not exist."""
        path = self.path(rel)
        if not self.fs.isdir(path):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False))

    def list_files(self, rel: str) -> list[str]:
        """Relative paths of every file under directory ``rel`` (recursive, sorted)."""
        base = self.path(rel)
        if not self.fs.isdir(base):
            return []
        found = self.fs.find(base)
        return sorted(f"{rel}/{p[len(base):].lstrip('/')}" for p in found)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def sha256(self, rel: str) -> tuple[int, str]:
        """(size, sha256 hex) of file ``rel``, streamed in 4 MiB blocks."""
        h, size = hashlib.sha256(), 0
        if self.local:  # hashed straight from the page cache, no copy
            with open(self.path(rel), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size:
                    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                        view = memoryview(m)
                        for i in range(0, size, _READ_BLOCK):
                            h.update(view[i:i + _READ_BLOCK])
                        view.release()
            return size, h.hexdigest()
        with self.fs.open(self.path(rel), "rb") as f:
            while block := f.read(_READ_BLOCK):
                h.update(block)
                size += len(block)
        return size, h.hexdigest()

    def reader(self, rel: str):
        """``read(offset, nbytes)`` over file ``rel``: slices of a read-only memory map locally
        (no copy; the map lives as long as the function), ranged reads elsewhere."""
        if self.local:
            with open(self.path(rel), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                view = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)) if size else memoryview(b"")
            return lambda offset, nbytes: view[offset:offset + nbytes]
        path = self.path(rel)
        return lambda offset, nbytes: self.fs.cat_file(path, start=offset, end=offset + nbytes)

    def open_arrow(self, rel: str):
        """A random-access pyarrow input for ``rel``: memory-mapped locally, else a buffered file."""
        if self.local:
            return pa.memory_map(self.path(rel), "r")
        return pa.PythonFile(self.fs.open(self.path(rel), "rb"), mode="r")

    def zarr_store(self, rel: str):
        """A read-only zarr store of directory ``rel`` (LocalStore or FsspecStore).

        Locally, zarr opens the files under ``rel`` itself: the directory is first checked to hold
        no symlink leaving the cache root (:class:`CacheFormatError` otherwise).
        """
        from zarr.storage import FsspecStore, LocalStore

        if self.local:
            self.check_no_escape(rel)
            return LocalStore(self.path(rel), read_only=True)
        return FsspecStore.from_url(self.fs.unstrip_protocol(self.path(rel)),
                                    storage_options=self.options or None, read_only=True)

    # ------------------------------------------------------------------ writes

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write (or replace) file ``rel`` atomically."""
        path = self.path(rel)
        if not self.local:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            self.fs.pipe_file(path, bytes(data))
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(os.path.dirname(path))

    def write_tree(self, rel: str, files: dict, while_syncing: Callable[[], Any] | None = None) -> Any:
        """Write every ``files[key]`` to ``rel/key`` (not atomic as a whole).

        Locally ``rel`` must be a new directory that no reader looks at until the caller renames
        it into place (:func:`genrecal.store.shard.write_shard`): each file is written in place
        and fsynced (:meth:`write_new`), then every directory of the tree once, so that all of
        it is on disk before the rename; no file needs a rename of its own. The files are written
        first, then all fsyncs run at once on I/O threads (the filesystem can commit them
        together); all of them finish before this returns. ``files[key]`` is bytes or a list of
        byte strings written one after the other. Elsewhere each file is one object write.
        ``while_syncing``: called while the fsyncs run (after the writes elsewhere); its result is
        returned.
        """
        if not self.local:
            for key, data in files.items():
                self.write_bytes(f"{rel}/{key}", data if isinstance(data, (bytes, bytearray)) else b"".join(data))
            return while_syncing() if while_syncing is not None else None
        dirs, written = set(), []
        for key, data in files.items():
            path = self.write_new(f"{rel}/{key}", data, fsync=False)
            written.append(path)
            dirs.add(os.path.dirname(path))
        top = self.path(rel)
        for path in list(dirs):  # and every directory between them and the tree's root
            while len(path) > len(top):
                path = os.path.dirname(path)
                dirs.add(path)
        # fsyncs wait on the disk, not the CPU: all at once on I/O threads, so the filesystem can
        # commit them together; every one has finished (or raised) before this returns
        targets = written + sorted(dirs, key=len, reverse=True)
        with ThreadPoolExecutor(min(8, len(targets)), thread_name_prefix="cache-fsync") as io:
            syncing = [io.submit(fsync_path, p) for p in targets]
            result = while_syncing() if while_syncing is not None else None
            for done in syncing:
                done.result()
        return result

    def write_new(self, rel: str, data: bytes | list[bytes], fsync: bool = True) -> str:
        """Create local file ``rel`` (it must not exist; its directory is created), write ``data``
        (bytes, or byte strings written one after the other) and (``fsync``) fsync it, without a
        temporary name: for files inside a directory not yet in place. Returns its path."""
        path = self.path(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "xb", buffering=0) as f:
            for piece in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
                view = memoryview(piece)
                while view:  # a raw write may write less than asked
                    view = view[f.write(view):]
            if fsync:
                os.fsync(f.fileno())
        return path

    def rename(self, src: str, dst: str) -> None:
        """Rename directory ``src`` to ``dst`` (atomic on a local filesystem)."""
        if self.local:
            os.rename(self.path(src), self.path(dst))
            fsync_path(os.path.dirname(self.path(dst)))
        else:
            self.fs.mv(self.path(src), self.path(dst), recursive=True)

    def remove(self, rel: str) -> None:
        """Delete file or directory ``rel`` (recursively); no error if it is absent."""
        path = self.path(rel)
        if self.local:
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        elif self.fs.exists(path):
            self.fs.rm(path, recursive=True)


