"""Resolving a sample's image references into verified files inside a root.

A reference is either a path (``str``, relative to the image root or absolute inside it)
or the encoded bytes of an image embedded in the dataset (HF ``Image`` structs). Embedded
bytes are written once into a content-addressed folder (``<sha256>.<ext>``, see
:func:`store_image_bytes`), so every :class:`~genrecal.data.sample.Sample` refers to
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

from genrecal.data.problems import RowProblem

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


def verify_image(data: bytes, name: str = "") -> str:
    """Decode ``data`` fully with PIL; return its format name (``"PNG"``...).

    ``name`` says where the bytes come from (the image's path) in the error.
    Raises :class:`RowProblem` if the bytes are not a decodable image.
    """
    from PIL import Image

    buffer = io.BytesIO(data)
    try:
        with Image.open(buffer) as im:
            im.load()
            return im.format or "PNG"
    except Exception as exc:  # PIL: OSError, SyntaxError, ValueError, DecompressionBombError...
        what = f"image {name}" if name else f"embedded image ({len(data)} bytes)"
        # PIL names the in-memory buffer (<_io.BytesIO object at 0x...>): the file is named above
        detail = str(exc).replace(f" {buffer!r}", "").replace(repr(buffer), "the image")
        raise RowProblem(f"{what} cannot be decoded ({type(exc).__name__}: {detail})",
                         "replace the file with a valid image (PNG, JPEG...), or drop the sample"
                         ) from None


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

    The root itself is resolved first (it may be, or lie under, a symbolic link). ``ref`` is
    relative to the root or absolute (inside the root as given or as resolved); its ``..``
    components are normalised and the result must stay inside the root. Folders inside the root
    may be symbolic links to elsewhere (``images -> /data/coco``), as the root's owner arranged
    them; an image file that is itself a link must point inside the root (or inside the folder
    it sits in), so a link to a file outside is refused like ``../x.png``.
    """
    if not ref.strip():
        raise RowProblem("empty image path", "give every image a path relative to the image root")
    given = Path(os.path.abspath(root))
    real_root = given.resolve()
    named = Path(ref)
    if named.is_absolute():
        named = Path(os.path.normpath(named))
        inside = named.is_relative_to(real_root) or named.is_relative_to(given)
    else:
        named = Path(os.path.normpath(real_root / named))
        inside = named.is_relative_to(real_root)
    if not inside:
        raise RowProblem(f"image path {ref!r} resolves to {named}, outside the image root "
                         f"{real_root}",
                         "move the image under the image root or pass the right image_root")
    folder = named.parent.resolve()
    resolved = named.resolve()
    if resolved != folder / named.name and not (resolved.is_relative_to(real_root)
                                                or resolved.is_relative_to(folder)):
        raise RowProblem(f"image path {ref!r} is a symbolic link to {resolved}, outside the "
                         f"image root {real_root}",
                         "copy the image under the image root (or link its folder), or pass the "
                         "right image_root")
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
        verify_image(data, name=f"{ref!r} ({path})" if str(path) != ref else repr(ref))
        return path, data

    def _from_bytes(self, data: bytes) -> tuple[Path, bytes]:
        image_format = verify_image(data)
        return store_image_bytes(self.cache_dir, data, image_format), data
