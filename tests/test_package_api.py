"""The re-exported public API of genrecal.model / genrecal.data, and its import cost."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import genrecal.data as data
import genrecal.model as model


ORIGINS = {
    "genrecal.model": {"load_vlm": "loading", "LoadedVLM": "loading", "encode_sample": "encoding",
                           "Encoded": "encoding", "get_family": "families",
                           "FAMILIES": "families", "build_tiny_vlm": "tiny",
                           "generate_answers": "generate", "Generation": "generate",
                           "save_processor": "saving"},
    "genrecal.data": {"read_dataset": "readers", "iter_dataset": "readers", "DatasetRead": "readers",
                            "Skip": "problems", "make_synthetic_vqa": "synthetic", "Sample": "sample",
                            "Turn": "sample", "ensure_synthetic": "pipeline_data",
                            "read_split": "pipeline_data", "synthetic_dir": "pipeline_data"},
}


@pytest.mark.parametrize("package", [model, data], ids=lambda p: p.__name__)
def test_every_exported_name_is_the_defining_modules_object(package):
    origins = ORIGINS[package.__name__]
    assert sorted(package.__all__) == sorted(origins)
    for name, module in origins.items():
        defining = importlib.import_module(f"{package.__name__}.{module}")
        assert getattr(package, name) is getattr(defining, name), name
    assert set(package.__all__) <= set(dir(package))


def test_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        model.nope  # noqa: B018


@pytest.mark.parametrize("statement", ["import genrecal.data",
                                       "import genrecal.model",
                                       "import genrecal.common.config",
                                       "from genrecal.store.spans import Spans",
                                       "import genrecal.store.schema"])
def test_importing_stays_light(statement):
    code = f"{statement}; import sys; print(sorted({{'torch', 'transformers'}} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
