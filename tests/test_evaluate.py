"""Answer evaluation (genrecal.train.evaluate) and the `genrecal eval` command."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from genrecal import cli
from genrecal.common import config
from genrecal.data import make_synthetic_vqa, read_dataset
from genrecal.data.synthetic import QUESTION_TYPES
from genrecal.model.generate import Generation, answers_match
from genrecal.train.errors import EvaluationError
from genrecal.train.evaluate import (UNTYPED, EvalResult, EvalSettings, contains,
                                     evaluate_model_dir, exact_match, format_eval,
                                     question_type, read_pipeline_split, score_predictions,
                                     summarise, synthetic_root, token_f1)

REPO = Path(__file__).resolve().parents[1]


# ----- metrics ---------------------------------------------------------------------------------
def test_exact_match_and_contains():
    assert exact_match("Red.", "red") == 1.0 and exact_match("red circle", "red") == 0.0
    assert contains("It is RED.", "red") == 1.0
    assert contains("reddish", "red") == 0.0 and contains("blue", "red") == 0.0
    assert contains("two circles, left", "Two Circles") == 1.0


def _f1_reference(pred: list[str], ref: list[str]) -> float:
    """Independent F1: count overlaps by removing matched words one at a time."""
    remaining, common = list(ref), 0
    for word in pred:
        if word in remaining:
            remaining.remove(word)
            common += 1
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


@pytest.mark.parametrize("pred, ref", [
    ("the red circle", "red circle"), ("red red blue", "red blue blue"), ("a b c", "d e"),
    ("Left.", "left"), ("1 2 3 4", "4 3 2 1"),
])
def test_token_f1_against_an_independent_count(pred, ref):
    expected = _f1_reference(pred.lower().rstrip(".").split(), ref.lower().split())
    assert token_f1(pred, ref) == pytest.approx(expected, abs=1e-12)


def test_token_f1_of_empty_answers():
    assert token_f1("", "") == 1.0 and token_f1("...", "red") == 0.0 and token_f1("red", "") == 0.0


# ----- scoring ---------------------------------------------------------------------------------
@pytest.fixture
def typed_samples(make_sample):
    def sample(sid, answers, **meta):
        turns = []
        for i, answer in enumerate(answers):
            turns += [("user", ((0,) if i == 0 else ()) + (f"Question {i}?",)),
                      ("assistant", (answer,))]
        made = make_sample(*turns, images=((32, 32),), sample_id=sid)
        made.meta.update(meta)
        return made

    return [sample("a", ["red"], type="colour", types=["colour"]),
            sample("b", ["2", "left"], type="count", types=["count", "position"]),
            sample("c", ["circle", "blue"], type="shape"),             # no types: row type
            sample("d", ["top"], types=["position", "extra"]),          # wrong length, no type
            sample("e", ["green"])]


def test_question_type_rules(typed_samples):
    a, b, c, d, e = typed_samples
    assert question_type(a, 0) == "colour"
    assert (question_type(b, 0), question_type(b, 1)) == ("count", "position")
    assert (question_type(c, 0), question_type(c, 1)) == ("shape", "shape")
    assert question_type(d, 0) == UNTYPED and question_type(e, 0) == UNTYPED


def _hand_made(typed_samples):
    texts = {("a", 0): "Red.", ("b", 0): "3", ("b", 1): " LEFT ", ("c", 0): "circle",
             ("c", 1): "dark blue", ("d", 0): "top!", ("e", 0): "green"}
    return [Generation(sid, turn, 10, text) for (sid, turn), text in texts.items()]


def test_per_type_breakdown_of_hand_made_predictions(typed_samples):
    preds = score_predictions(typed_samples, _hand_made(typed_samples),
                              ["exact_match", "contains"])
    result = summarise(preds, model="m", data="d", metrics=["exact_match", "contains"])
    assert result.n == 7 and result.accuracy == pytest.approx(5 / 7)
    assert {t: (s.n, s.accuracy) for t, s in result.per_type.items()} == {
        "colour": (1, 1.0), "count": (1, 0.0), "position": (1, 1.0), "shape": (2, 0.5),
        UNTYPED: (2, 1.0)}
    assert result.per_type["shape"].scores["contains"] == 1.0  # "dark blue" contains "blue"
    assert [p.question for p in preds[:3]] == ["Question 0?", "Question 0?", "Question 1?"]
    assert preds[2].reference == "left" and preds[2].correct


def test_result_round_trips_and_prints(typed_samples):
    preds = score_predictions(typed_samples, _hand_made(typed_samples), ["exact_match", "token_f1"])
    result = summarise(preds, model="m", data="d", metrics=["token_f1"])
    assert result.metrics == ("exact_match", "token_f1")  # accuracy always first
    data = json.loads(json.dumps(result.to_dict()))
    again = EvalResult.from_dict(data)
    assert again.to_dict() == result.to_dict()
    wrong = [e for e in data["examples"] if not e["scores"]["exact_match"]]
    assert len(data["examples"]) == 3 + 2 and len(wrong) == 2  # 3 of 5 correct, both wrong
    table = format_eval(result)
    assert table.splitlines()[-1].split()[:3] == ["all", "7", f"{5 / 7:.3f}"]
    with pytest.raises(EvaluationError, match="without its predictions"):
        EvalResult.from_dict(result.to_dict(predictions=False))


def test_bad_metrics_and_inputs_are_reported(typed_samples):
    gens = _hand_made(typed_samples)
    with pytest.raises(EvaluationError, match="answer_nll"):
        score_predictions(typed_samples, gens, ["answer_nll"])
    with pytest.raises(EvaluationError, match="'zzz'"):
        score_predictions(typed_samples, [Generation("zzz", 0, 1, "x")])
    with pytest.raises(EvaluationError, match="no question"):
        summarise([], model="m", data="empty.jsonl")
    preds = score_predictions(typed_samples, gens)
    with pytest.raises(EvaluationError, match="token_f1"):
        summarise(preds, model="m", data="d", metrics=["token_f1"])


# ----- end to end ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    make_synthetic_vqa(root, n_train=2, n_test=8, image_size=32, seed=1, multi_turn_fraction=0.5)
    return root


def _check_consistent(result: EvalResult, samples) -> None:
    assert result.n == sum(len(s.answers) for s in samples) == len(result.predictions)
    assert sum(s.n for s in result.per_type.values()) == result.n
    assert set(result.per_type) <= set(QUESTION_TYPES)
    recomputed = [answers_match(p.prediction, p.reference) for p in result.predictions]
    assert result.accuracy == pytest.approx(sum(recomputed) / result.n)
    for qtype, score in result.per_type.items():
        mine = [ok for ok, p in zip(recomputed, result.predictions) if p.type == qtype]
        assert score.n == len(mine) and score.accuracy == pytest.approx(sum(mine) / len(mine))
    by_id = {s.id: s for s in samples}
    assert all(p.reference == by_id[p.sample_id].answers[p.turn] for p in result.predictions)
    assert Counter(p.type for p in result.predictions) == Counter(
        t for s in samples for t in s.meta["types"])


@pytest.mark.parametrize("kind", ["qwen2_vl", "llava_qwen2"])
def test_eval_on_a_synthetic_split(kind, tiny_vlm_dir, synthetic):
    settings = EvalSettings(max_new_tokens=3, batch_size=4, metrics=("exact_match", "token_f1"))
    result = evaluate_model_dir(tiny_vlm_dir(kind), data=synthetic, settings=settings,
                                progress=False)
    _check_consistent(result, read_dataset(synthetic, split="test").samples)
    assert result.model == str(tiny_vlm_dir(kind)) and "split test" in result.data


def test_settings_resolve_pipeline_values_then_overrides():
    evaluation = config.EvaluationConfig(split="val", max_new_tokens=9, batch_size=3, limit=5,
                                         metrics=["exact_match", "contains"])
    settings = EvalSettings.resolve(evaluation, batch_size=2, split=None, turn="last")
    assert settings == EvalSettings(split="val", max_new_tokens=9, batch_size=2, limit=5,
                                    metrics=("exact_match", "contains"), turn="last")
    assert EvalSettings.resolve(None, max_new_tokens=4) == EvalSettings(max_new_tokens=4)


@pytest.fixture
def pipeline_file(tmp_path, tiny_teacher_dir, tiny_student_dir) -> Path:
    """The demo pipeline, outputs in tmp_path, tiny models from the session fixtures."""
    demo = config.get_pipeline("demo", REPO / "pipelines.yaml").to_dict()
    demo["output"] = str(tmp_path / "run")
    # The fixtures' own spec (kit defaults): another spec would rebuild the shared fixture dirs.
    demo["teacher"]["tiny"] = {"kind": "qwen2_vl", "path": str(tiny_teacher_dir)}
    demo["student"]["tiny"] = {"kind": "llava_qwen2", "path": str(tiny_student_dir)}
    demo["student"].pop("family", None)  # the kind says it
    demo["data"]["synthetic"] = {"n_train": 3, "n_test": 5, "image_size": 32, "seed": 0}
    demo["evaluation"] = {"split": "test", "max_new_tokens": 2, "batch_size": 4,
                          "metrics": ["exact_match", "token_f1"]}
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump({"pipelines": {"demo": demo}}, sort_keys=False))
    return path


def test_pipeline_split_reads_the_synthetic_set(pipeline_file):
    pipe = config.get_pipeline("demo", pipeline_file)
    read = read_pipeline_split(pipe, "test")
    assert [s.id for s in read.samples] == [f"test-{i:06d}" for i in range(5)]
    assert (synthetic_root(pipe) / "test.jsonl").is_file()
    assert len(read_pipeline_split(pipe, "train", limit=2).samples) == 2
    with pytest.raises(EvaluationError, match="no data for split 'val'.*'test', 'train'"):
        read_pipeline_split(pipe, "val")


def test_eval_command_with_a_pipeline(pipeline_file, tiny_student_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(cli.app, ["eval", str(tiny_student_dir), "--pipeline", "demo",
                                          "--file", str(pipeline_file), "--limit", "3",
                                          "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["model"] == str(tiny_student_dir) and data["metrics"] == ["exact_match", "token_f1"]
    assert {p["sample_id"] for p in data["predictions"]} == {f"test-{i:06d}" for i in range(3)}
    assert "all" in result.stdout and "token_f1" in result.stdout
    _check_consistent(EvalResult.from_dict(data), read_dataset(
        tmp_path / "run" / "data" / "synthetic", split="test", limit=3).samples)


def test_eval_command_reports_missing_data(tiny_student_dir):
    result = CliRunner().invoke(cli.app, ["eval", str(tiny_student_dir)])
    assert result.exit_code == cli.EXIT_USER_ERROR
    assert "--data PATH" in result.output
