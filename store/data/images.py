"""Resolving a sample's image references into verified files inside a root.

A reference is either a path (``str``, relative to the image root or absolute inside it)
or the encoded bytes of an image embedded in the dataset (HF ``Image`` structs). Embedded
bytes are written once into a content-addressed folder (``<sha256>.<ext>``, see
:func:`store_image_bytes`), so every :class:`~genrecal.store.data.sample.Sample` refers to
its images by path, whatever the dataset format.

Every image is decoded with PIL once when it is read, so a corrupt file fails at read time
with its sample id, not in the middle of an extraction run.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from genrecal.store.data.problems import RowProblem

ImageRef = str | bytes

_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "WEBP": "webp",
               "TIFF": "tif"}


def default_image_cache() -> Path:
    """Where embedded image bytes go when no cache folder is given.

    ``$GENRECAL_IMAGE_CACHE`` if set, else ``$XDG_CACHE_HOME/genrecal/images``
    (``~/.cache/genrecal/images``).
    """
    explicit = os.environ.get("GENRECAL_IMAGE_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "genrecal" / "images"


def verify_image(data: bytes) -> str:
    """Decode ``data`` fully with PIL; return its format name (``"PNG"``...).

    Raises :class:`RowProblem` if the bytes are not a decodable image.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.format or "PNG"
    except Exception as exc:  # PIL: OSError, SyntaxError, ValueError, DecompressionBombError...
        raise RowProblem(f"image cannot be decoded ({type(exc).__name__}: {exc})",
                         "replace the file with a valid image (PNG, JPEG...), or drop the sample")


def store_image_bytes(cache_dir: Path, data: bytes, image_format: str) -> Path:
    """Write ``data`` to ``cache_dir/<sha256>.<ext>`` unless already there; return the path.

    The write is atomic (temporary file + rename), so concurrent readers never see a
    partial image.
    """
    ext = _EXTENSIONS.get(image_format.upper(), image_format.lower())
    target = cache_dir / f"{hashlib.sha256(data).hexdigest()}.{ext}"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def path_inside(root: Path, ref: str) -> Path:
    """The resolved file ``ref`` names under ``root``; refuses anything escaping ``root``.

    ``ref`` is relative to ``root`` or absolute; ``..`` components and symlinks are
    resolved first, so a link pointing outside ``root`` is refused like ``../x.png``.
    """
    if not ref.strip():
        raise RowProblem("empty image path", "give every image a path relative to the image root")
    resolved_root = root.resolve()
    candidate = Path(ref) if Path(ref).is_absolute() else resolved_root / ref
    resolved = candidate.resolve()
    if not resolved.is_relative_to(resolved_root):
        raise RowProblem(f"image path {ref!r} resolves to {resolved}, outside the image root "
                         f"{resolved_root}",
                         "move the image under the image root or pass the right image_root")
    return resolved


@dataclass(frozen=True)
class ImageResolver:
    """Turns image references into ``(path, bytes)`` pairs, verified and inside ``root``.

    ``cache_dir`` receives embedded image bytes (content-addressed); it is only touched
    when a dataset embeds images.
    """

    root: Path
    cache_dir: Path

    def resolve(self, ref: ImageRef) -> tuple[Path, bytes]:
        if isinstance(ref, bytes):
            return self._from_bytes(ref)
        return self._from_path(ref)

    def _from_path(self, ref: str) -> tuple[Path, bytes]:
        path = path_inside(self.root, ref)
        if not path.is_file():
            raise RowProblem(f"image file {ref!r} not found (looked at {path})",
                             "add the file, or pass the image_root the paths are relative to")
        data = path.read_bytes()
        verify_image(data)
        return path, data

    def _from_bytes(self, data: bytes) -> tuple[Path, bytes]:
        image_format = verify_image(data)
        return store_image_bytes(self.cache_dir, data, image_format), data
