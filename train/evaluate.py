"""Answer accuracy of any saved VLM (teacher, student, a stage's output) on a held-out split.

Every question of every sample is answered by greedy generation
(:func:`genrecal.model.generate.generate_answers`; earlier answers of a multi-turn sample
come from the data) and scored against the dataset's answer:

* ``exact_match`` (the accuracy): 1 if the answers are equal after
  :func:`~genrecal.model.generate.normalise_answer`: lowercase, whitespace runs collapsed,
  surrounding whitespace and trailing punctuation (``. , ; : ! ?``) removed;
* ``contains``: 1 if the normalised reference occurs in the normalised prediction as whole
  words (``"red"`` in ``"it is red"``, not in ``"reddish"``);
* ``token_f1``: the F1 of the word multisets (``\\w+`` runs of the normalised texts; 1 when
  both are empty, 0 when only one is).

Scores are broken down per question type, read from the sample's metadata: the row's
``types`` list (one type per question, as the synthetic set writes) when it has one entry per
question, else its ``type`` (for every question of the row), else :data:`UNTYPED`.

``answer_nll`` (listed by the config schema) scores the reference under teacher forcing, not
generated text; this module does not compute it and says so.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from genrecal.common.config import EvaluationConfig, Pipeline
from genrecal.data.readers import DatasetRead
from genrecal.data.sample import Sample
from genrecal.model.generate import Generation, answers_match, normalise_answer
from genrecal.train.errors import EvaluationError

__all__ = ["METRICS", "UNTYPED", "EvalResult", "EvalSettings", "Prediction", "TypeScore",
           "evaluate", "evaluate_model_dir", "format_eval", "load_pipeline_model",
           "question_type", "read_pipeline_split", "score_predictions", "summarise",
           "synthetic_root"]

UNTYPED = "untyped"
N_EXAMPLES = 3  # correct and wrong examples each in EvalResult.examples


# ----- metrics ---------------------------------------------------------------------------------
def exact_match(prediction: str, reference: str) -> float:
    return float(answers_match(prediction, reference))


def contains(prediction: str, reference: str) -> float:
    ref = normalise_answer(reference)
    if not ref:
        return float(not normalise_answer(prediction))
    return float(re.search(rf"(?<!\w){re.escape(ref)}(?!\w)", normalise_answer(prediction))
                 is not None)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", normalise_answer(text))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = _words(prediction), _words(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match, "contains": contains, "token_f1": token_f1}


def _check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise EvaluationError(f"metric(s) {unknown} cannot be computed on generated answers; "
                              f"choose from {sorted(METRICS)} (answer_nll needs a teacher-forced "
                              "pass that genrecal eval does not run: remove it from "
                              "evaluation.metrics)")
    return tuple(dict.fromkeys(["exact_match", *metrics]))  # accuracy first, no duplicates


# ----- scoring ---------------------------------------------------------------------------------
def question_type(sample: Sample, turn: int) -> str:
    """The question type of assistant turn ``turn`` (see module docstring)."""
    types, n_answers = sample.meta.get("types"), len(sample.answers)
    if isinstance(types, list) and len(types) == n_answers and isinstance(types[turn], str):
        return types[turn]
    single = sample.meta.get("type")
    return single if isinstance(single, str) and single else UNTYPED


def _question_text(sample: Sample, turn: int) -> str:
    position = [i for i, t in enumerate(sample.turns) if t.role == "assistant"][turn]
    users = [t.text for t in sample.turns[:position] if t.role == "user"]
    return users[-1] if users else ""


@dataclass(frozen=True)
class Prediction:
    """One scored answer: assistant turn ``turn`` of sample ``sample_id``."""

    sample_id: str
    turn: int
    type: str
    question: str
    reference: str
    prediction: str
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def correct(self) -> bool:
        return self.scores.get("exact_match") == 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Prediction":
        return cls(sample_id=str(data["sample_id"]), turn=int(data["turn"]), type=str(data["type"]),
                   question=str(data["question"]), reference=str(data["reference"]),
                   prediction=str(data["prediction"]),
                   scores={k: float(v) for k, v in data.get("scores", {}).items()})


def score_predictions(samples: Sequence[Sample], generations: Sequence[Generation],
                      metrics: Sequence[str] = ("exact_match",)) -> list[Prediction]:
    """Score each generation against its sample's answer (generations name their sample)."""
    names = _check_metrics(metrics)
    by_id = {s.id: s for s in samples}
    out = []
    for gen in generations:
        sample = by_id.get(gen.sample_id)
        if sample is None:
            raise EvaluationError(f"generation for sample '{gen.sample_id}' has no sample among "
                                  f"the {len(by_id)} given; score generations with their samples")
        reference = sample.answers[gen.turn]
        out.append(Prediction(gen.sample_id, gen.turn, question_type(sample, gen.turn),
                              _question_text(sample, gen.turn), reference, gen.text,
                              {m: METRICS[m](gen.text, reference) for m in names}))
    return out


# ----- results ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TypeScore:
    """Mean score per metric over ``n`` questions (of one type, or all of them)."""

    n: int
    scores: dict[str, float]

    @property
    def accuracy(self) -> float:
        return self.scores["exact_match"]

    def to_dict(self) -> dict:
        return {"n": self.n, "accuracy": self.accuracy, "scores": dict(self.scores)}


def _mean_scores(predictions: Sequence[Prediction], metrics: Sequence[str]) -> TypeScore:
    n = len(predictions)
    return TypeScore(n, {m: sum(p.scores[m] for p in predictions) / n for m in metrics})


@dataclass(frozen=True)
class EvalResult:
    """Scores of one model on one split: overall, per question type, and every prediction."""

    model: str
    data: str
    metrics: tuple[str, ...]
    overall: TypeScore
    per_type: dict[str, TypeScore]
    predictions: tuple[Prediction, ...] = field(repr=False)

    @property
    def n(self) -> int:
        return self.overall.n

    @property
    def accuracy(self) -> float:
        return self.overall.accuracy

    @property
    def examples(self) -> list[Prediction]:
        """Up to :data:`N_EXAMPLES` correct and as many wrong predictions, in data order."""
        right = [p for p in self.predictions if p.correct][:N_EXAMPLES]
        wrong = [p for p in self.predictions if not p.correct][:N_EXAMPLES]
        return right + wrong

    def to_dict(self, *, predictions: bool = True) -> dict:
        out = {"model": self.model, "data": self.data, "metrics": list(self.metrics), "n": self.n,
               "accuracy": self.accuracy, "scores": dict(self.overall.scores),
               "per_type": {t: s.to_dict() for t, s in self.per_type.items()},
               "examples": [p.to_dict() for p in self.examples]}
        if predictions:
            out["predictions"] = [p.to_dict() for p in self.predictions]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "EvalResult":
        """Rebuild from ``to_dict()`` output (with predictions); scores are recomputed from them."""
        if "predictions" not in data:
            raise EvaluationError("this evaluation result was saved without its predictions; "
                                  "only a to_dict(predictions=True) result can be loaded back")
        return summarise([Prediction.from_dict(p) for p in data["predictions"]],
                         model=str(data["model"]), data=str(data["data"]),
                         metrics=data["metrics"])


def summarise(predictions: Sequence[Prediction], *, model: str, data: str,
              metrics: Sequence[str] = ("exact_match",)) -> EvalResult:
    """Overall and per-type means of ``predictions`` (each scored with every metric)."""
    names = _check_metrics(metrics)
    if not predictions:
        raise EvaluationError(f"no question to evaluate in {data}; check the split and limit")
    missing = sorted({m for p in predictions for m in names if m not in p.scores})
    if missing:
        raise EvaluationError(f"predictions lack the score(s) {missing}; score them with "
                              f"score_predictions(..., metrics={list(names)})")
    groups: dict[str, list[Prediction]] = {}
    for p in predictions:
        groups.setdefault(p.type, []).append(p)
    return EvalResult(model=model, data=data, metrics=names,
                      overall=_mean_scores(predictions, names),
                      per_type={t: _mean_scores(groups[t], names) for t in sorted(groups)},
                      predictions=tuple(predictions))


def format_eval(result: EvalResult) -> str:
    """A small text table: one row per question type, then the overall row."""
    header = f"{'type':<12}{'n':>6}" + "".join(f"{m:>13}" for m in result.metrics)
    rows = [f"{t:<12}{s.n:>6}" + "".join(f"{s.scores[m]:>13.3f}" for m in result.metrics)
            for t, s in [*result.per_type.items(), ("all", result.overall)]]
    rule = "-" * len(header)
    return "\n".join([f"model: {result.model}", f"data:  {result.data}", header, rule,
                      *rows[:-1], rule, rows[-1]])


# ----- evaluation ------------------------------------------------------------------------------
def evaluate(loaded, samples: Sequence[Sample], *, max_new_tokens: int, batch_size: int,
             turn: str = "all", metrics: Sequence[str] = ("exact_match",), data: str = "",
             progress: bool = True) -> EvalResult:
    """Generate greedily for ``samples`` with ``loaded`` and score the answers."""
    from genrecal.model.generate import generate_answers

    names = _check_metrics(metrics)
    if not samples:
        raise EvaluationError(f"no sample to evaluate in {data or 'the data given'}; check the "
                              "split and limit")
    generations = generate_answers(loaded, samples, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, turn=turn, progress=progress)
    return summarise(score_predictions(samples, generations, names), model=str(loaded.source),
                     data=data, metrics=names)


@dataclass(frozen=True)
class EvalSettings:
    """What ``genrecal eval`` runs with: a pipeline's ``evaluation`` block, or these defaults
    (those of the config schema), overridden by command-line options."""

    split: str = "test"
    max_new_tokens: int = 64
    batch_size: int = 8
    limit: int | None = None
    metrics: tuple[str, ...] = ("exact_match", "token_f1")
    turn: str = "all"

    @classmethod
    def resolve(cls, evaluation: EvaluationConfig | None = None, **overrides) -> "EvalSettings":
        """Settings from an ``EvaluationConfig`` (or None), then every override not None."""
        base = cls()
        if evaluation is not None:
            base = cls(split=evaluation.split, max_new_tokens=evaluation.max_new_tokens,
                       batch_size=evaluation.batch_size, limit=evaluation.limit,
                       metrics=tuple(evaluation.metrics))
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


# ----- pipelines -------------------------------------------------------------------------------
def synthetic_root(pipeline: Pipeline) -> Path:
    """Where a pipeline's synthetic VQA set lives: ``<pipeline output>/data/synthetic``."""
    from genrecal.data import synthetic_dir

    return synthetic_dir(pipeline.output_dir)


def read_pipeline_split(pipeline: Pipeline, split: str, *, limit: int | None = None) -> DatasetRead:
    """Split ``split`` of a pipeline's data: its sources of that split, then the synthetic set
    (generated under :func:`synthetic_root` if missing or stale); at most ``limit`` samples in
    all (:func:`genrecal.data.read_split`)."""
    from genrecal.data import read_split

    data = pipeline.data
    if split not in data.splits():
        raise EvaluationError(f"pipeline '{pipeline.name}' has no data for split '{split}'; its "
                              f"data gives {sorted(data.splits())}. Pick one of those or add a "
                              f"source with split: {split}")
    read = read_split(data, split, output_dir=pipeline.output_dir, limit=limit)
    return DatasetRead(samples=read.samples, skips=read.skips,
                       source=f"pipeline {pipeline.name}, split {split}")


def load_pipeline_model(pipeline: Pipeline, role: str, *, source: str | Path | None = None,
                        device: str | None = None, dtype: str | None = None):
    """Load the pipeline's ``role`` model (or the checkpoint ``source``) with that role's
    dtype / device / device_map; a tiny model of the pipeline is built first if missing."""
    from genrecal.model.loading import load_vlm
    from genrecal.model.tiny import model_dir_for

    spec = pipeline.teacher if role == "teacher" else pipeline.student
    where = source if source is not None else model_dir_for(spec, pipeline.model_location(role))
    return load_vlm(where, family=spec.family if source is None else None,
                    dtype=dtype or spec.dtype, device=device or spec.device or "cpu",
                    device_map=spec.device_map if device is None else None,
                    trust_remote_code=spec.trust_remote_code,
                    revision=spec.revision if source is None else None)


def _role_of(pipeline: Pipeline, model_dir: Path) -> str:
    """``teacher`` if ``model_dir`` is the pipeline's teacher checkpoint, else ``student``."""
    teacher = Path(pipeline.model_location("teacher"))
    same = teacher.exists() and teacher.resolve() == model_dir.resolve()
    return "teacher" if same else "student"


def _model_dir(path: str | Path) -> Path:
    """``path``, or its ``student/`` sub-directory when ``path`` is a stage's output."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "student" / "config.json").is_file():
        return path / "student"
    return path


def evaluate_model_dir(model_dir: str | Path, *, pipeline: Pipeline | None = None,
                       data: str | Path | None = None, settings: EvalSettings = EvalSettings(),
                       device: str | None = None, dtype: str | None = None,
                       progress: bool = True) -> EvalResult:
    """Evaluate the checkpoint ``model_dir`` on ``data`` (a dataset file or folder) or, without
    ``data``, on the pipeline's split ``settings.split``."""
    if data is None and pipeline is None:
        raise EvaluationError("nothing to evaluate on: pass a dataset (--data PATH) or a pipeline "
                              "(--pipeline NAME) whose evaluation split is used")
    read, label = _eval_data(pipeline, data, settings)
    loaded = _load_for_eval(_model_dir(model_dir), pipeline, device=device, dtype=dtype)
    return evaluate(loaded, read.samples, max_new_tokens=settings.max_new_tokens,
                    batch_size=settings.batch_size, turn=settings.turn, metrics=settings.metrics,
                    data=label, progress=progress)


def _eval_data(pipeline: Pipeline | None, data: str | Path | None,
               settings: EvalSettings) -> tuple[DatasetRead, str]:
    """The samples to evaluate on, and a label naming them."""
    from genrecal.data import read_dataset

    if data is None:
        read = read_pipeline_split(pipeline, settings.split, limit=settings.limit)
        return read, read.source
    split = None if Path(data).is_file() else settings.split  # a file is its own split
    on_error = pipeline.data.on_error if pipeline is not None else "raise"
    read = read_dataset(data, split=split, limit=settings.limit, on_error=on_error)
    return read, f"{data}" + (f" (split {split})" if split else "")


def _load_for_eval(where: Path, pipeline: Pipeline | None, *, device: str | None,
                   dtype: str | None):
    from genrecal.model.loading import load_vlm

    if pipeline is not None:
        return load_pipeline_model(pipeline, _role_of(pipeline, where), source=where,
                                   device=device, dtype=dtype)
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_vlm(where, device=device, dtype=dtype or ("auto" if device != "cpu" else "float32"))
