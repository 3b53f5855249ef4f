"""The teacher fingerprint: stable under irrelevant changes, different under relevant ones."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from genrecal.store.fingerprint import (
    config_hash, fingerprint_mismatches, teacher_fingerprint, tokenizer_hash, weights_identity_files,
    weights_identity_tensors,
)


def test_config_hash_ignores_paths_and_versions_at_any_depth():
    a = {"hidden_size": 8, "_name_or_path": "/a", "text_config": {"vocab": 3, "transformers_version": "5.0"}}
    b = {"text_config": {"transformers_version": "5.9", "vocab": 3}, "hidden_size": 8, "_name_or_path": "/b"}
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash({**a, "text_config": {"vocab": 4}})


def test_tokenizer_hash_from_dir_equals_mapping_and_sees_changes(tmp_path):
    files = {"tokenizer.json": b'{"v": 1}', "special_tokens_map.json": b"{}"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    assert tokenizer_hash(tmp_path) == tokenizer_hash(files)
    assert tokenizer_hash(files) != tokenizer_hash({**files, "tokenizer.json": b'{"v": 2}'})
    assert tokenizer_hash({"ab": b"c"}) != tokenizer_hash({"a": b"bc"})  # length-prefixed
    with pytest.raises(FileNotFoundError):
        tokenizer_hash(tmp_path / "absent")


def test_weights_identity_of_files(tmp_path):
    w = {"lm_head.weight": torch.arange(40000, dtype=torch.float32).reshape(200, 200)}
    path = tmp_path / "model.safetensors"
    save_file(w, path)
    first = weights_identity_files([path])
    assert weights_identity_files([str(path)]) == first
    data = bytearray(path.read_bytes())
    data[-5] ^= 1  # the last block is always sampled
    path.write_bytes(bytes(data))
    assert weights_identity_files([path]) != first


def test_weights_identity_of_tensors():
    a = {"w": torch.ones(3, 2, dtype=torch.bfloat16), "b": torch.zeros(())}
    assert weights_identity_tensors(a) == weights_identity_tensors(dict(reversed(list(a.items()))))
    assert weights_identity_tensors(a) != weights_identity_tensors({**a, "b": torch.ones(())})
    assert weights_identity_tensors(a) != weights_identity_tensors({**a, "w": torch.ones(2, 3, dtype=torch.bfloat16)})


def test_mismatches_name_each_component():
    fp = teacher_fingerprint({"a": 1}, "w" * 64, {"t": b"x"})
    other = teacher_fingerprint({"a": 2}, "w" * 64, {"t": b"x"})
    assert fingerprint_mismatches(fp, other) == [("config", fp.config, other.config)]
    assert fingerprint_mismatches(fp, {"tokenizer": fp.tokenizer}) == []
    assert fp.digest != other.digest
    with pytest.raises(ValueError, match="unknown components"):
        fingerprint_mismatches(fp, {"model": "x"})
