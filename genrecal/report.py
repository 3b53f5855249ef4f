"""The report of ``genrecal run``: results table, cache cost, phase times, plots.

:func:`build_report` gathers a JSON-serialisable dict from the evaluation results the run wrote
(``<output>/eval/*.json``), the cache summary and the phases' outcomes; :func:`write_report`
writes it as ``results.json`` and ``results.md`` with two plots into ``<output>/report``:
``loss_curves.png`` (loss per optimizer step of every stage, one line per seed) and
``accuracy.png`` (exact-match accuracy per row and question type, mean with the seeds' std as
error bars).

Table: one row per model (:attr:`genrecal.plan.RunPlan.rows`), columns ``all`` (exact match over every
question) and one per question type; each cell is the mean over seeds +- the sample standard
deviation (ddof 1; none with a single value: the teacher is shared by every seed).

``results.json`` contract (any tool may read it): ``rows``: ``[{name, mean, std, per_seed,
per_type}, ...]`` (more keys may follow); ``comparisons``: ``[{a, b, mean_diff, ci_low,
ci_high, n_seeds}]`` (paired over seeds, 95% CI, :mod:`genrecal.statistics`); ``teacher``:
``{accuracy, per_type}``; ``phases``: ``[{name, seconds, ...}]``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from genrecal.plan import (COMPARISONS, GRACE_VARIANTS, ROW_TITLES, RunPlan, sft_stage,
                           student_training_stages)
from genrecal.statistics import Comparison, paired_comparison

OVERALL = "all"


def _stats(values: Sequence[float]) -> dict[str, Any]:
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "values": values}


def _eval_file(plan: RunPlan, row: str, seed: int | None) -> Path:
    name = row if seed is None else f"{row}-seed-{seed}"
    return plan.eval_file(name)


def _row(plan: RunPlan, row: str) -> dict[str, Any]:
    """One row: ``name`` (its title), ``mean``, ``std``, ``per_seed`` (accuracy over every
    question) and ``per_type`` ({type: {mean, std, values}}); the teacher has one value."""
    seeds = [None] if row == "teacher" else list(plan.seeds)
    results = [json.loads(_eval_file(plan, row, seed).read_text(encoding="utf-8")) for seed in seeds]
    types = sorted({t for r in results for t in r["per_type"]})
    per_type = {t: _stats([r["per_type"][t]["accuracy"] for r in results if t in r["per_type"]])
                for t in types}
    overall = _stats([r["accuracy"] for r in results])
    return {"name": plan.title(row), "mean": overall["mean"], "std": overall["std"],
            "per_seed": overall["values"], "per_type": per_type, "row": row,
            "title": plan.title(row), "seeds": seeds, "n_questions": results[0]["n"],
            OVERALL: overall}


def _comparisons(plan: RunPlan, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Paired differences with 95% CIs (genrecal.statistics) for the pairs in :data:`COMPARISONS`
    that the run has, then every ``run.variants`` row against GenRecal."""
    by_row = {r["row"]: r for r in rows}
    pairs = [*COMPARISONS, *((row, "student_genrecal") for row in plan.variant_rows)]
    out = []
    for a, b in pairs:
        b = next((x for x in ((b,) if isinstance(b, str) else b) if x in by_row), None)
        if a in by_row and b is not None:  # b: a row, or the first of alternatives the run has
            out.append(paired_comparison(by_row[a]["name"], by_row[b]["name"], by_row[a]["per_seed"],
                                         by_row[b]["per_seed"]).to_dict())
    return out


def _variants(plan: RunPlan, phases, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per ``run.variants`` row: its settings, accuracy and the cache it read (bytes per input
    token, the question_hidden codec: how a lossy hidden-state codec is judged)."""
    by_row = {r["row"]: r for r in rows}
    out = []
    for row, variant in zip(plan.variant_rows, plan.pipeline.run.variants):
        cache = _step_details(phases, plan.variant_cache_step(row))
        out.append({"name": variant.name, "row": row,
                    "changes": {k: v for k, v in variant.to_dict().items()
                                if v is not None and k != "name"},
                    "mean": by_row[row]["mean"], "std": by_row[row]["std"],
                    "question_hidden_codec": plan.variant_cache(row)["codecs"]["question_hidden"],
                    "cache_bytes_per_input_token": cache.get("bytes_per_input_token")})
    return out


def _definitions(plan: RunPlan) -> dict[str, str]:
    if plan.companion is not None:
        companion = {k: v for k, v in _definitions(plan.grace_plan).items() if k in GRACE_VARIANTS}
        companion = {k: f"{v}; a same-tokenizer student ({plan.companion.student.label}) of the "
                        f"companion pipeline {plan.companion.name!r}, on the same teacher and data"
                     for k, v in companion.items()}
        return {**_own_definitions(plan), **companion}
    return _own_definitions(plan)


def _own_definitions(plan: RunPlan) -> dict[str, str]:
    pipe = plan.pipeline
    if plan.is_grace:
        stage = pipe.stages[0]
        quant = f"{stage.quantize.bits}-bit, group {stage.quantize.group_size}"
        return {
            "teacher": "the teacher the cache was extracted from" + (
                " (after teacher_finetune)" if pipe.teacher_finetune else ""),
            "student_init": "the student as built / loaded, before any training",
            "grace_bf16": "the grace stage without QAT: CE + beta*GDKD + omega*RCKA",
            "grace_int4": f"the grace stage with QAT ({quant}), evaluated as its real INT4 export "
                          "(compressed-tensors pack-quantized, loaded by transformers)",
            "qat_int4": f"QAT ({quant}) with CE alone (a finetune stage with the grace stage's "
                        "schedule and trainables), evaluated as its INT4 export",
            "seeds": "seed k = the tiny student's init seed and the stage's seed (data order); "
                     "mean +- sample std over seeds",
        }
    training = student_training_stages(pipe)
    sft = sft_stage(pipe)
    length = f"{sft['steps']} steps" if sft.get("steps") else f"{sft['epochs']} epochs"
    stages = " -> ".join(s.name for s in pipe.stages)
    return {
        "teacher": "the teacher the cache was extracted from" + (
            " (after teacher_finetune)" if pipe.teacher_finetune else ""),
        "student_init": "the student as built / loaded, before any training",
        "student_sft": f"one finetune stage with the pipeline's finetune settings for {length} = "
                       f"the sum over the stages that train the student "
                       f"({', '.join(s.name for s in training)}), same initial student, same seed, "
                       + (f"on the labels of the first {pipe.run.labelled} train samples"
                          if pipe.run.labelled else "on the labels") + "; no teacher",
        "student_genrecal": f"the student after {stages}"
                            + (" on the teacher's answers" if plan.uses_answers else ""),
        **({"student_sft_answers": "the SFT baseline's stage on the teacher's answers to the whole "
                                   "train split (sequence-level KD); no cache, no Recalibrator"}
           if plan.uses_answers else {}),
        "seeds": "seed k = the tiny student's init seed and every stage's seed (data order, "
                 "Recalibrator init); mean +- sample std over seeds",
    }


def _phase_dict(phase) -> dict[str, Any]:
    return {"name": phase.name, "title": phase.title, "seconds": phase.seconds,
            "compute_seconds": phase.compute_seconds, "reused": phase.reused,
            "steps": [{"step": s.step, "title": s.title, "action": s.action, "seconds": s.seconds,
                       "compute_seconds": s.compute_seconds} for s in phase.steps]}


def _step_details(phases, step_id: str) -> dict[str, Any]:
    for phase in phases:
        for step in phase.steps:
            if step.step == step_id:
                return dict(step.details)
    return {}


def build_report(plan: RunPlan, phases, seconds: float) -> dict[str, Any]:
    """The report dict of a finished run (see the module docstring)."""
    rows = [_row(plan, row) for row in plan.rows]
    types = sorted({t for r in rows for t in r["per_type"]})
    teacher = next(r for r in rows if r["row"] == "teacher")
    return {"pipeline": plan.pipeline.name, "summary": plan.pipeline.summary(),
            "split": plan.split, "seeds": list(plan.seeds), "types": types, "rows": rows,
            "comparisons": _comparisons(plan, rows),
            **({"variants": _variants(plan, phases, rows)} if plan.variant_rows else {}),
            "teacher": {"accuracy": teacher["mean"],
                        "per_type": {k: v["mean"] for k, v in teacher["per_type"].items()}},
            "definitions": _definitions(plan), "data": _step_details(phases, "data"),
            "cache": _step_details(phases, "cache"),
            "phases": [_phase_dict(p) for p in phases], "seconds": seconds}


# ----- text ------------------------------------------------------------------------------------
def _cell(stats: dict[str, Any] | None) -> str:
    if stats is None:
        return "-"
    if stats["std"] is None:
        return f"{stats['mean']:.3f}"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def format_table(report: dict[str, Any]) -> str:
    """The results table in Markdown."""
    columns = [OVERALL, *report["types"]]
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in report["rows"]:
        cells = [_cell(row[OVERALL])] + [_cell(row["per_type"].get(t)) for t in report["types"]]
        lines.append(f"| {row['title']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_variants(report: dict[str, Any]) -> str:
    """The ablation rows against GenRecal (paired over seeds) with their cache's bytes/token."""
    diffs = {c["a"]: c for c in report["comparisons"] if c["b"] == ROW_TITLES["student_genrecal"]}
    lines = ["| variant | accuracy | minus GenRecal, 95% CI | z_ql codec | cache B/token |",
             "|---|---|---|---|---|"]
    for v in report["variants"]:
        c = diffs[v["name"]]
        ci = "" if c["ci_low"] is None else f" [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"
        size = v["cache_bytes_per_input_token"]
        lines.append(f"| {v['name']} | {_cell({'mean': v['mean'], 'std': v['std']})} | "
                     f"{c['mean_diff']:+.3f}{ci} | {v['question_hidden_codec']} | "
                     f"{'' if size is None else f'{size:.1f}'} |")
    return "\n".join(lines)


def format_phases(report: dict[str, Any]) -> str:
    """Phase times in Markdown: this run's wall seconds (with parallel jobs phases overlap: from
    a phase's first step's start to its last step's end) and the seconds its steps took when
    computed (summed over steps)."""
    lines = ["| phase | this run, wall (s) | computed in, summed over steps (s) | state |",
             "|---|---|---|---|"]
    for p in report["phases"]:
        state = "reused" if p["reused"] else ", ".join(sorted({s["action"] for s in p["steps"]})) \
            or "not configured"
        lines.append(f"| {p['title']} | {p['seconds']:.1f} | {p['compute_seconds']:.1f} | {state} |")
    lines.append(f"| **total wall time of this run** | {report['seconds']:.1f} | | |")
    return "\n".join(lines)


def _cache_lines(cache: dict[str, Any]) -> list[str]:
    if not cache:
        return ["(no cache summary)"]
    bpt = cache.get("bytes_per_input_token")
    lines = [f"{cache['samples']} samples, {cache['tokens']} teacher tokens, "
             f"{cache['skipped']} skipped; validate_cache: {cache['problems']} problems; "
             f"{bpt:.1f} bytes per input token (tensors + records)" if bpt else "",
             "", "| feature | codec | bytes | bytes per row | ratio to raw |", "|---|---|---|---|---|"]
    for name, f in cache.get("features", {}).items():
        ratio = f"{f['ratio_to_raw']:.3f}" if f.get("ratio_to_raw") is not None else "-"
        per_row = f"{f['bytes_per_row']:.1f}" if f.get("bytes_per_row") is not None else "-"
        lines.append(f"| {name} | {f.get('codec', '-')} | {f.get('bytes', 0)} | {per_row} | {ratio} |")
    return lines


def format_markdown(report: dict[str, Any]) -> str:
    """The whole report as a Markdown document."""
    seeds = ", ".join(str(s) for s in report["seeds"])
    out = [f"# genrecal run {report['pipeline']}", "", f"`{report['summary']}`", "",
           f"Exact-match accuracy on the {report['split']} split, mean ± sample std over seeds {seeds} "
           "(the teacher is shared by every seed).", "", format_table(report), ""]
    if report.get("comparisons"):
        out += ["## Paired differences", "",
                *(f"- {Comparison(**c).sentence()}" for c in report["comparisons"]), ""]
    if report.get("variants"):
        out += ["## Ablations of GenRecal (run.variants)", "", format_variants(report), ""]
    out += ["## Rows", ""]
    out += [f"- **{ROW_TITLES.get(k, k)}**: {v}" for k, v in report["definitions"].items()]
    out += ["", "## Data", "", ", ".join(f"{k}: {v} samples" for k, v in report["data"].items()),
            "", "## Teacher cache", "", *_cache_lines(report["cache"]), "", "## Phases", "",
            format_phases(report), "", "## Plots", "", "![loss curves](loss_curves.png)", "",
            "![accuracy](accuracy.png)", ""]
    return "\n".join(out)


# ----- plots -----------------------------------------------------------------------------------
def _stage_curves(plan: RunPlan) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Panel title -> line label -> (step, loss) points, from each stage's metrics.jsonl."""
    from genrecal.train.loop import METRICS
    from genrecal.train.metrics import read_metrics

    panels: dict[str, dict[str, list]] = {}
    tp = plan.teacher_pipeline()
    if tp is not None:
        panels["teacher finetune"] = {"teacher": _points(read_metrics(
            Path(tp.stage_dir("finetune")) / METRICS))}
    for seed in plan.seeds:
        if plan.is_grace:  # one panel per variant: GRACE bf16 / int4, QAT-only int4
            for variant in GRACE_VARIANTS:
                pipe = plan.grace_pipeline(seed, variant)
                records = read_metrics(Path(pipe.stage_dir(pipe.stages[0].name)) / METRICS)
                panels.setdefault(plan.title(variant), {})[f"seed {seed}"] = _points(records)
            continue
        seed_pipe = plan.seed_pipeline(seed)
        for stage in seed_pipe.stages:
            records = read_metrics(Path(seed_pipe.stage_dir(stage.name)) / METRICS)
            panels.setdefault(stage.name, {})[f"seed {seed}"] = _points(records)
        sft = plan.sft_pipeline(seed)
        panels.setdefault("SFT on labels", {})[f"seed {seed}"] = _points(
            read_metrics(Path(sft.stage_dir("finetune")) / METRICS))
        if plan.uses_answers:
            answers = plan.sft_answers_pipeline(seed)
            panels.setdefault("SFT on teacher answers", {})[f"seed {seed}"] = _points(
                read_metrics(Path(answers.stage_dir("finetune")) / METRICS))
        if plan.companion is not None:
            for variant in GRACE_VARIANTS:
                pipe = plan.grace_plan.grace_pipeline(seed, variant)
                panels.setdefault(plan.title(variant), {})[f"seed {seed}"] = _points(
                    read_metrics(Path(pipe.stage_dir(pipe.stages[0].name)) / METRICS))
    return panels


def _points(records: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records
            if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(plan: RunPlan, path: Path) -> Path:
    """One panel per stage (teacher finetune, the pipeline's stages, SFT only), loss vs step."""
    plt = _pyplot()
    panels = _stage_curves(plan)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), dpi=100,
                             squeeze=False)
    try:
        for ax, (title, lines) in zip(axes[0], panels.items()):
            for label, points in lines.items():
                if points:
                    ax.plot(*zip(*points), label=label, linewidth=1.2)
            ax.set_title(title)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("training loss (mean per token)")
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def plot_accuracy(report: dict[str, Any], path: Path) -> Path:
    """Grouped bars: per column (all, each type), one bar per row with the seeds' std."""
    plt = _pyplot()
    columns = [OVERALL, *report["types"]]
    rows = report["rows"]
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(1.6 * len(columns) + 2, 3.8), dpi=100)
    try:
        for i, row in enumerate(rows):
            stats = [row[OVERALL], *(row["per_type"].get(t) for t in columns[1:])]
            xs = [c + (i - (len(rows) - 1) / 2) * width for c in range(len(columns))]
            ax.bar(xs, [s["mean"] if s else 0 for s in stats], width,
                   yerr=[(s["std"] or 0) if s else 0 for s in stats], capsize=2, label=row["title"])
        ax.set_xticks(range(len(columns)), columns)
        ax.set_ylabel("exact-match accuracy")
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def write_report(report: dict[str, Any], out_dir: str | Path, plan: RunPlan) -> list[Path]:
    """Write results.json, results.md, loss_curves.png and accuracy.png into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / "results.md").write_text(format_markdown(report), encoding="utf-8")
    return [out / "results.json", out / "results.md",
            plot_loss_curves(plan, out / "loss_curves.png"), plot_accuracy(report, out / "accuracy.png")]
