"""Teacher-answers mode (genrecal.extract.answers) and the `genrecal answers` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from genrecal import cli
from genrecal.common import config
from genrecal.extract.answers import (ANSWER_SOURCE_KEY, REFERENCE_KEY, choose_answer,
                                      write_teacher_answers)
from genrecal.extract.errors import AnswersError
from genrecal.data import make_synthetic_vqa, read_dataset
from genrecal.model.generate import answers_match, generate_answers
from genrecal.model.loading import load_vlm

REPO = Path(__file__).resolve().parents[1]
GREEDY = config.GenerateAnswers(max_new_tokens=3, temperature=0.0, replace="always")


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return load_vlm(tiny_teacher_dir)


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Six synthetic rows, half of them multi-turn, under tmp_path/data."""
    root = tmp_path / "data"
    make_synthetic_vqa(root, n_train=6, n_test=0, image_size=32, seed=2, multi_turn_fraction=0.5)
    return root / "train.jsonl"


def test_choose_answer_rules():
    assert choose_answer("red", "blue", "always") == ("blue", "teacher")
    assert choose_answer("red", "Red.", "if_correct") == ("Red.", "teacher")
    assert choose_answer("red", "blue", "if_correct") == ("red", "reference")
    assert choose_answer("red", "  ", "always") == ("red", "reference")
    assert choose_answer("red", "a <image> b", "always") == ("red", "reference")
    with pytest.raises(AnswersError, match="replace='sometimes'"):
        choose_answer("red", "red", "sometimes")


def test_always_writes_the_teacher_answers_next_to_the_data(teacher, dataset):
    read = read_dataset(dataset)
    out = dataset.parent / "teacher" / "train.jsonl"
    report = write_teacher_answers(teacher, read, out, GREEDY, batch_size=4, progress=False)
    generated = generate_answers(teacher, read.samples, max_new_tokens=3, batch_size=4,
                                 turn="all", progress=False)
    again = read_dataset(out, image_root=report.source_entry()["image_root"])
    assert [s.id for s in again.samples] == [s.id for s in read.samples]
    n_answers = sum(len(s.answers) for s in read.samples)
    assert (report.samples, report.answers) == (6, n_answers) and n_answers > 6
    assert report.replaced + report.kept == n_answers and report.replace == "always"
    # the images lie outside teacher/: the root is the deepest folder holding them all
    assert Path(report.image_root) == (dataset.parent / "images" / "train").resolve()
    answers = iter(g.text for g in generated)
    for old, new in zip(read.samples, again.samples):
        assert new.images == old.images and new.meta["types"] == old.meta["types"]
        assert [t for t in new.turns if t.role != "assistant"] == \
               [t for t in old.turns if t.role != "assistant"]
        expected = [choose_answer(ref, next(answers), "always") for ref in old.answers]
        assert new.answers == [a for a, _ in expected]
        assert new.meta[ANSWER_SOURCE_KEY] == [s for _, s in expected]
        assert new.meta[REFERENCE_KEY] == old.answers
    assert report.kept == report.unusable  # under "always" only unusable answers are kept


def test_output_inside_the_data_root_uses_relative_image_paths(teacher, dataset):
    out = dataset.parent / "teacher_train.jsonl"
    report = write_teacher_answers(teacher, read_dataset(dataset, limit=2), out, GREEDY,
                                   progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["image"] == "images/train/000000.png"
    assert "image_root" not in report.source_entry()
    assert [s.id for s in read_dataset(out).samples] == ["train-000000", "train-000001"]


def test_if_correct_keeps_only_matching_teacher_answers(teacher, dataset, tmp_path):
    """References of rows 0, 2, 4 are set to the teacher's own greedy answer (single-turn rows,
    so the answer is not part of the prompt): those, and only those, take the teacher's."""
    rows = [json.loads(line) for line in dataset.read_text().splitlines()]
    for row in rows:  # single-turn rows: the reference never enters the prompt
        row["conversations"] = row["conversations"][:2]
        row["types"] = row["types"][:1]
    crafted = dataset.with_name("crafted.jsonl")
    crafted.write_text("".join(json.dumps(r) + "\n" for r in rows))
    read = read_dataset(crafted)
    greedy = generate_answers(teacher, read.samples, max_new_tokens=3, batch_size=1,
                              progress=False)
    assert all(g.text.strip() for g in greedy[::2])  # usable as references
    for i in range(0, len(rows), 2):
        rows[i]["conversations"][1]["value"] = greedy[i].text.upper() + "."  # normalised equal
    crafted.write_text("".join(json.dumps(r) + "\n" for r in rows))
    read = read_dataset(crafted)
    options = config.GenerateAnswers(max_new_tokens=3, replace="if_correct")
    out = tmp_path / "data" / "answered.jsonl"
    report = write_teacher_answers(teacher, read, out, options, batch_size=3, progress=False)
    matches = [answers_match(g.text, s.answers[0]) for g, s in zip(greedy, read.samples)]
    assert matches[::2] == [True] * 3 and report.matched == sum(matches) >= 3
    assert (report.replaced, report.kept) == (sum(matches), 6 - sum(matches))
    again = read_dataset(out)
    for g, old, new, ok in zip(greedy, read.samples, again.samples, matches):
        assert new.meta[ANSWER_SOURCE_KEY] == ["teacher" if ok else "reference"]
        assert new.answers == [g.text if ok else old.answers[0]]
        assert new.meta[REFERENCE_KEY] == old.answers


def test_bad_outputs_are_refused(teacher, dataset, tmp_path, make_sample):
    read = read_dataset(dataset, limit=1)
    with pytest.raises(AnswersError, match=r"\.jsonl file"):
        write_teacher_answers(teacher, read, tmp_path / "answers.json", GREEDY, progress=False)
    with pytest.raises(AnswersError, match="outside the image root"):
        write_teacher_answers(teacher, read, tmp_path / "a.jsonl", GREEDY,
                              image_root=tmp_path / "elsewhere", progress=False)
    with pytest.raises(AnswersError, match="replace='never'"):
        write_teacher_answers(teacher, read, tmp_path / "a.jsonl",
                              config.GenerateAnswers.model_construct(replace="never"))
    literal = make_sample(("user", ("What is <image> here?",)), ("assistant", ("x",)), images=(),
                          sample_id="literal")
    with pytest.raises(AnswersError, match="'literal'.*'<image>'"):
        write_teacher_answers(teacher, type(read)([literal], [], "x"), tmp_path / "a.jsonl",
                              GREEDY, progress=False)
    assert not (tmp_path / "a.jsonl").exists()
    empty = type(read)(samples=[], skips=[], source="empty.jsonl")
    with pytest.raises(AnswersError, match="empty.jsonl holds no valid sample"):
        write_teacher_answers(teacher, empty, tmp_path / "a.jsonl", GREEDY, progress=False)


def test_answers_command_writes_a_readable_source(tmp_path, tiny_teacher_dir, monkeypatch):
    demo = config.get_pipeline("demo", REPO / "pipelines.yaml").to_dict()
    demo["output"] = str(tmp_path / "run")
    # The fixture's own spec (kit defaults): another spec would rebuild the shared fixture dir.
    demo["teacher"]["tiny"] = {"kind": "qwen2_vl", "path": str(tiny_teacher_dir)}
    demo["data"]["synthetic"] = {"n_train": 4, "n_test": 2, "image_size": 32, "seed": 0}
    demo["cache"]["generate_answers"] = {"max_new_tokens": 2, "replace": "always"}
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump({"pipelines": {"demo": demo}}, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.app, ["answers", "demo", "--file", str(path), "--limit", "3"])
    assert result.exit_code == 0, result.output
    entry = json.loads(result.stdout.split("use it as a data source: ")[1])
    assert entry["path"] == str(tmp_path / "run" / "data" / "teacher_answers" / "train.jsonl")
    again = read_dataset(entry["path"], image_root=entry.get("image_root"))
    assert [s.id for s in again.samples] == [f"train-{i:06d}" for i in range(3)]
    assert "3 samples" in result.stdout and "replace=always" in result.stdout
