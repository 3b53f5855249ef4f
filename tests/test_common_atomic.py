"""Crash-safe local writes: no partial file or directory is ever visible at the target."""

import json

from genrecal.common.atomic import replace_dir, write_json_atomic, write_text_atomic


def test_text_and_json_replace_the_target_and_leave_no_temporary(tmp_path):
    target = tmp_path / "sub" / "f.json"
    write_text_atomic(target, "old")
    write_json_atomic(target, {"b": 1, "a": 2}, sort_keys=True)
    assert json.loads(target.read_text()) == {"a": 2, "b": 1}
    assert target.read_text() == '{"a": 2, "b": 1}'
    assert [p.name for p in target.parent.iterdir()] == ["f.json"]


def test_replace_dir_swaps_in_the_new_tree_and_removes_the_old(tmp_path):
    out, new = tmp_path / "model", tmp_path / ".model.build"
    out.mkdir(); (out / "stale.txt").write_text("old")
    new.mkdir(); (new / "weights.txt").write_text("new")
    replace_dir(new, out, prefix=".tmp-old-")
    assert sorted(p.name for p in out.iterdir()) == ["weights.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_replace_dir_into_an_absent_target(tmp_path):
    new = tmp_path / ".x.build"; new.mkdir(); (new / "a").write_text("1")
    replace_dir(new, tmp_path / "x")
    assert (tmp_path / "x" / "a").read_text() == "1" and not new.exists()
