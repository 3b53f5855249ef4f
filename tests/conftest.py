"""Shared fixtures: tiny VLM checkpoints and a Sample factory with real image files.

- ``tiny_vlm_dir(kind)``: a session-cached tiny checkpoint of any kit kind (seed 0);
- ``tiny_teacher_dir`` / ``tiny_student_dir``: the default pair (qwen2_vl -> llava_qwen2);
- ``make_sample(*turns, images=((h, w), ...), sample_id=...)``: a Sample whose images are
  seeded random PNGs written to a temporary directory, with its real content hash.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from genrecal.data.sample import Sample, Turn, content_hash


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    from genrecal.model.tiny import build_tiny_vlm

    root = tmp_path_factory.mktemp("tiny_vlms")
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = build_tiny_vlm(kind, root / kind, seed=0)
        return built[kind]

    return get


@pytest.fixture(scope="module")
def loaded(tiny_vlm_dir):
    """``loaded(kind)``: the tiny VLM of ``kind`` through load_vlm, loaded once per test module."""
    from genrecal.model.loading import load_vlm

    cache = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = load_vlm(tiny_vlm_dir(kind))
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def tiny_teacher_dir(tiny_vlm_dir) -> Path:
    return tiny_vlm_dir("qwen2_vl")


@pytest.fixture(scope="session")
def tiny_student_dir(tiny_vlm_dir) -> Path:
    return tiny_vlm_dir("llava_qwen2")


def _write_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    from PIL import Image

    height, width = size
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def make_sample(tmp_path):
    """``make_sample(("user", (0, "Q?")), ("assistant", ("A.",)), images=((40, 56),))``."""
    counter = iter(range(1_000_000))

    def make(*turns, images=((40, 56),), sample_id: str | None = None, source: str = "") -> Sample:
        n = next(counter)
        sample_id = sample_id or f"sample-{n}"
        paths = tuple(_write_image(tmp_path / f"{sample_id}-{i}.png", size, seed=1000 * n + i)
                      for i, size in enumerate(images))
        turn_objs = tuple(Turn(role, tuple(parts)) for role, parts in turns)
        digest = content_hash(turn_objs, [p.read_bytes() for p in paths])
        return Sample(id=sample_id, turns=turn_objs, images=paths, content_hash=digest, source=source)

    return make


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The vLLM environment's interpreter (``make venv-vllm``; ``make test`` provisions it):
    ``$GENRECAL_VLLM_PYTHON``, else ``.venv-vllm/bin/python`` of this checkout. Tests that run
    real vLLM skip, naming the make target, only where it is absent."""
    import os

    env = os.environ.get("GENRECAL_VLLM_PYTHON")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
    if not path.is_file():
        pytest.skip(f"no vLLM environment at {path}: `make venv-vllm` creates it (`make test` does)")
    return path
