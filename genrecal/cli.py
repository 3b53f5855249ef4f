"""The ``genrecal`` command line (console script entry point: :func:`main`).

One small function per command. A new command is a function decorated with
``@app.command("name")`` (or ``@pipelines_app.command`` for a ``pipelines`` subcommand) that
takes ``ctx: typer.Context`` and ``file: FileOption = None`` and reads its pipeline with
``config.get_pipeline(name, pipelines_file(ctx, file))``. It does not catch errors: any
exception defined in a genrecal ``errors`` module (ConfigError, StoreError, ...) is reported by
:class:`GenrecalGroup` as one line on stderr with exit code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

import genrecal
from genrecal.common import config

#: Exit status of an error reported by genrecal (bad config, bad data, unloadable model...).
EXIT_USER_ERROR = 2


def is_genrecal_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a user-facing error: its class comes from a genrecal errors module."""
    return any(cls.__module__.startswith("genrecal.") and cls.__module__.endswith(".errors")
               for cls in type(exc).__mro__)


class GenrecalGroup(TyperGroup):
    """Root command group: turns genrecal errors into one message and exit code 2."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except Exception as exc:
            if not is_genrecal_error(exc) or ctx.params.get("debug"):
                raise
            typer.echo(f"genrecal: error: {exc}", err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None


@dataclass(frozen=True)
class CliState:
    """Options of the root command, shared with every subcommand through ``ctx.obj``."""

    file: Path | None = None
    debug: bool = False


FileOption = Annotated[Optional[Path], typer.Option(
    "--file", "-f", envvar="GENRECAL_PIPELINES", dir_okay=False, show_default=False,
    help="pipelines.yaml to read (default: ./pipelines.yaml if present, else the packaged one).",
)]

class Backend(str, Enum):
    """The engine that runs the teacher (``--backend``)."""

    hf = "hf"
    vllm = "vllm"


BackendOption = Annotated[Optional[Backend], typer.Option(
    "--backend", show_default=False, case_sensitive=False,
    help="Engine that runs the teacher: hf (transformers, in this process) or vllm (vLLM in its "
         "own environment, `make venv-vllm`). Default: the pipeline's teacher_engine.backend.",
)]

app = typer.Typer(
    cls=GenrecalGroup,
    name="genrecal",
    help="Cross-architecture distillation of vision-language models (GenRecal, GRACE) from a "
         "precomputed teacher cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
pipelines_app = typer.Typer(
    help="List the pipelines of pipelines.yaml; `check` validates them.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(pipelines_app, name="pipelines")


def pipelines_file(ctx: typer.Context, file: Path | None) -> Path | None:
    """The pipelines file a command reads: its own --file, else the nearest group's --file."""
    if file is not None:
        return file
    state = ctx.find_object(CliState)
    return state.file if state is not None else None


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"genrecal {genrecal.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    file: FileOption = None,
    debug: Annotated[bool, typer.Option(
        "--debug", envvar="GENRECAL_DEBUG", help="Show the traceback of an error.")] = False,
    version: Annotated[bool, typer.Option(
        "--version", callback=_show_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """Cross-architecture distillation of vision-language models (GenRecal, GRACE)."""
    ctx.obj = CliState(file=file, debug=debug)


@pipelines_app.callback(invoke_without_command=True)
def pipelines_list(ctx: typer.Context, file: FileOption = None) -> None:
    """List every pipeline: name, teacher -> student, stages."""
    state = ctx.find_object(CliState) or CliState()
    ctx.obj = replace(state, file=pipelines_file(ctx, file))
    if ctx.invoked_subcommand is not None:
        return
    loaded = config.load_pipelines(ctx.obj.file)
    width = max(len(name) for name in loaded.pipelines)
    for name, pipeline in loaded.pipelines.items():
        typer.echo(f"{name:<{width}}  {pipeline.summary()}")


@pipelines_app.command("check")
def pipelines_check(
    ctx: typer.Context,
    name: Annotated[Optional[str], typer.Argument(
        help="Pipeline to validate (default: every pipeline of the file).",
        show_default=False)] = None,
    file: FileOption = None,
) -> None:
    """Validate every pipeline (or NAME); print all problems and exit 2 if any."""
    path = pipelines_file(ctx, file)
    if name is None:
        names = list(config.load_pipelines(path).pipelines)
    else:
        names = [config.get_pipeline(name, path).name]
    typer.echo(f"ok: {config.pipelines_source(path)}: {len(names)} pipeline(s) valid: {', '.join(names)}")


CacheArgument = Annotated[str, typer.Argument(
    metavar="CACHE", show_default=False,
    help="Teacher cache: a local directory or an fsspec URL (s3://..., memory://...).")]


@app.command("inspect")
def inspect_command(
    cache: CacheArgument,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the summary as JSON instead of text.")] = False,
    plots: Annotated[Optional[Path], typer.Option(
        "--plots", file_okay=False, show_default=False,
        help="Also write PNG plots (lengths, bytes per feature, top-k mass) into this directory.")] = None,
) -> None:
    """Summarise a teacher cache: samples, tokens, bytes per feature, distributions."""
    import json

    from genrecal.store.inspect import format_inspect, inspect_cache, write_inspect_plots

    summary = inspect_cache(cache)
    typer.echo(json.dumps(summary, indent=2) if as_json else format_inspect(summary))
    for path in write_inspect_plots(summary, plots) if plots is not None else ():
        typer.echo(f"wrote {path}", err=as_json)  # keep stdout pure JSON with --json


@app.command("validate")
def validate_command(
    ctx: typer.Context,
    cache: CacheArgument,
    against_teacher: Annotated[Optional[int], typer.Option(
        "--against-teacher", min=1, show_default=False,
        help="Also rerun the teacher on N random cached samples and report, per feature, the "
             "largest deviation from the cache.")] = None,
    pipeline: Annotated[Optional[str], typer.Option(
        "--pipeline", "-p", show_default=False,
        help="With --against-teacher: take teacher and data from this pipeline (default: the "
             "locations recorded in the cache).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the --against-teacher draw.")] = 0,
    file: FileOption = None,
) -> None:
    """Check a teacher cache end to end; print every problem and exit 1 if there is any."""
    from genrecal.store.validate import validate_cache

    problems = validate_cache(cache)
    for problem in problems:
        typer.echo(f"[{problem.code}] {problem.where}: {problem.message}\n    fix: {problem.fix}")
    if problems:
        typer.echo(f"{cache}: {len(problems)} problem(s)", err=True)
        raise typer.Exit(1)
    typer.echo(f"ok: {cache}: {_cache_counts(cache)}, no problem found")
    if against_teacher is not None:
        _against_teacher(ctx, cache, against_teacher, pipeline, seed, file)


def _against_teacher(ctx: typer.Context, cache: str, n: int, pipeline: str | None, seed: int,
                     file: Path | None) -> None:
    """Print the --against-teacher report; exit 1 if a cached record no longer matches."""
    from genrecal.extract.fidelity import check_against_teacher
    from genrecal.extract.job import job_from_pipeline

    job = job_from_pipeline(config.get_pipeline(pipeline, pipelines_file(ctx, file))) if pipeline else None
    report = check_against_teacher(cache, n, settings=job.settings if job else None, seed=seed,
                                   device=job.device if job else None,
                                   device_map=job.device_map if job else None)
    typer.echo(report.format())
    if not report.ok:
        raise typer.Exit(1)


def _cache_counts(cache: str) -> str:
    from genrecal.store.manifest import load_manifest
    from genrecal.store.storage import CacheStorage

    manifest = load_manifest(CacheStorage(cache))
    return f"{manifest.counts.samples} samples, {manifest.counts.tokens} tokens in {len(manifest.shards)} shard(s)"


@app.command("train")
def train_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Pipeline to train.", show_default=False)],
    stage: Annotated[Optional[list[str]], typer.Option(
        "--stage", "-s", show_default=False,
        help="Train only this stage (repeatable); default: every stage, in order.")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue from the newest checkpoint; skip finished stages.")] = False,
    save_every: Annotated[int, typer.Option(
        "--save-every", min=1, help="Optimizer steps between checkpoints.")] = 100,
    workers: Annotated[int, typer.Option(
        "--workers", min=0, help="Data loader worker processes per training process.")] = 2,
    memo_mib: Annotated[int, typer.Option(
        "--memo-mib", min=0, help="Keep encoded examples in memory, up to this many MiB per "
                                  "loader process, so later epochs skip encoding and cache reads "
                                  "(small datasets, several epochs).")] = 0,
    online: Annotated[bool, typer.Option(
        "--online", help="Run the teacher live on the training device instead of reading the "
                         "teacher cache (align / distill; needs room for both models).")] = False,
    allow_teacher_mismatch: Annotated[bool, typer.Option(
        "--allow-teacher-mismatch", help="Train on a cache written by another teacher than the "
                                         "pipeline's (refused by default).")] = False,
    file: FileOption = None,
) -> None:
    """Train the align / distill / finetune stages of pipeline NAME (torchrun for DDP)."""
    from genrecal.train.loop import LoopOptions, run_stages

    pipeline = config.get_pipeline(name, pipelines_file(ctx, file))
    options = LoopOptions(save_every=save_every, num_workers=workers,
                          teacher_source="online" if online else "cache",
                          allow_teacher_mismatch=allow_teacher_mismatch, memo_bytes=memo_mib << 20)
    for result in run_stages(pipeline, stage, resume=resume, options=options):
        state = "already finished" if result.skipped else f"{result.step} steps"
        typer.echo(f"{result.stage}: {state} -> {result.out_dir}")


@app.command("eval")
def eval_command(
    ctx: typer.Context,
    model_dir: Annotated[Path, typer.Argument(
        metavar="MODEL_DIR", show_default=False,
        help="Saved model directory (teacher, student, or a stage output holding student/).")],
    pipeline: Annotated[Optional[str], typer.Option(
        "--pipeline", "-p", show_default=False,
        help="Use this pipeline's evaluation split and settings (and its model dtype/device).")] = None,
    data: Annotated[Optional[Path], typer.Option(
        "--data", show_default=False,
        help="Dataset file or folder to evaluate on (instead of the pipeline's data).")] = None,
    split: Annotated[Optional[str], typer.Option(
        "--split", show_default=False,
        help="Split of a dataset folder or of the pipeline's data (default: the pipeline's "
             "evaluation split, else test).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(
        "--max-new-tokens", min=1, show_default=False, help="Answer length cap (default: 64).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", min=1, show_default=False, help="Prompts per generate call (default: 8).")] = None,
    limit: Annotated[Optional[int], typer.Option(
        "--limit", min=1, show_default=False, help="Evaluate the first N samples only.")] = None,
    turns: Annotated[Optional[str], typer.Option(
        "--turns", show_default=False,
        help="Questions to answer per sample: all (earlier answers from the data) or the last "
             "(default: all).")] = None,
    device: Annotated[Optional[str], typer.Option(
        "--device", show_default=False, help="cpu, cuda, cuda:1... (default: the pipeline's, "
        "else cuda if available).")] = None,
    dtype: Annotated[Optional[str], typer.Option(
        "--dtype", show_default=False,
        help="float32, bfloat16, float16 or auto (the checkpoint's) (default: the pipeline's, else float32 on "
        "CPU and the checkpoint's on GPU).")] = None,
    json_out: Annotated[Optional[Path], typer.Option(
        "--json", dir_okay=False, show_default=False,
        help="Also write the result (scores, per-type table, every prediction) as JSON here.")] = None,
    file: FileOption = None,
) -> None:
    """Exact-match accuracy of MODEL_DIR's greedy answers, per question type."""
    import json

    from genrecal.train.evaluate import EvalSettings, evaluate_model_dir, format_eval

    pipe = config.get_pipeline(pipeline, pipelines_file(ctx, file)) if pipeline else None
    settings = EvalSettings.resolve(pipe.evaluation if pipe is not None else None, split=split,
                                    max_new_tokens=max_new_tokens, batch_size=batch_size,
                                    limit=limit, turn=turns)
    result = evaluate_model_dir(model_dir, pipeline=pipe, data=data, settings=settings,
                                device=device, dtype=dtype)
    typer.echo(format_eval(result))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
        typer.echo(f"wrote {json_out}")


@app.command("answers")
def answers_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Pipeline whose teacher answers.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option(
        "--out", dir_okay=False, show_default=False,
        help="JSONL file to write (default: <output>/data/teacher_answers/<split>.jsonl).")] = None,
    limit: Annotated[Optional[int], typer.Option(
        "--limit", min=1, show_default=False, help="Answer the first N samples only.")] = None,
    split: Annotated[str, typer.Option("--split", help="Split of the pipeline's data.")] = "train",
    backend: BackendOption = None,
    file: FileOption = None,
) -> None:
    """Let the teacher of pipeline NAME answer its data; write a new LLaVA JSONL dataset."""
    import json

    from genrecal.extract.answers import teacher_answers_path, write_teacher_answers
    from genrecal.extract.job import engine_settings
    from genrecal.extract.vllm_engine import answers_engine
    from genrecal.train.evaluate import load_pipeline_model, read_pipeline_split

    pipe = config.get_pipeline(name, pipelines_file(ctx, file))
    options = pipe.cache.generate_answers or config.GenerateAnswers()
    settings = engine_settings(pipe, backend.value if backend else None)
    engine = answers_engine(settings, pipe, options)  # vllm: its early errors before the data
    read = read_pipeline_split(pipe, split, limit=limit)
    teacher = load_pipeline_model(pipe, "teacher", device="cpu" if engine else None)
    report = write_teacher_answers(teacher, read, out or teacher_answers_path(pipe, split),
                                   options, batch_size=pipe.cache.batch_size, engine=engine)
    typer.echo(f"wrote {report.path}: {report.samples} samples, {report.answers} answers: "
               f"{report.replaced} from the teacher, {report.kept} references kept "
               f"(replace={report.replace}, {report.matched} teacher answers matched, "
               f"{report.unusable} unusable)")
    typer.echo(f"use it as a data source: {json.dumps(report.source_entry(split))}")


@app.command("extract")
def extract_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Pipeline whose teacher runs.", show_default=False)],
    limit: Annotated[Optional[int], typer.Option(
        "--limit", min=1, show_default=False, help="Extract the first N samples only.")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue an existing cache: extract only the samples it is missing.")] = False,
    out: Annotated[Optional[str], typer.Option(
        "--out", show_default=False, help="Cache location (default: the pipeline's cache.location).")] = None,
    window: Annotated[Optional[int], typer.Option(
        "--window", min=1, show_default=False,
        help="Samples per batch-planning window, the unit dealt to torchrun ranks "
             "(default: 16 x batch size).")] = None,
    backend: BackendOption = None,
    file: FileOption = None,
) -> None:
    """Run the teacher of pipeline NAME over its train data into the teacher cache (torchrun ok)."""
    from genrecal.extract.job import job_from_pipeline
    from genrecal.extract.pipeline import run_extract

    pipe = config.get_pipeline(name, pipelines_file(ctx, file))
    result = run_extract(job_from_pipeline(pipe, out=out, limit=limit, resume=resume, window=window,
                                           backend=backend.value if backend else None))
    typer.echo(result.summary())


@app.command("export")
def export_command(
    checkpoint: Annotated[Path, typer.Argument(
        metavar="CHECKPOINT", show_default=False,
        help="Student directory (a QAT student for int4/int8) or a stage output holding student/.")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", file_okay=False, show_default=False,
        help="Directory to write (replaced if it exists).")],
    fmt: Annotated[Optional[str], typer.Option(
        "--format", show_default=False,
        help="bf16, int4 or int8 (compressed-tensors pack-quantized W4A16 / W8A16); default: "
             "int<bits> for a QAT student, else bf16.")] = None,
    dtype: Annotated[Optional[str], typer.Option(
        "--dtype", show_default=False,
        help="int4/int8: dtype of the unquantised weights and the scales (default: the QAT "
             "scale_dtype).")] = None,
) -> None:
    """Export a trained student as a deployable checkpoint (bf16, or int4 / int8 packed with
    compressed-tensors from the QAT codes and scales, verified bit for bit)."""
    from genrecal.train.export import export_checkpoint

    typer.echo(export_checkpoint(checkpoint, out, fmt, dtype=dtype).summary())


def _parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise typer.BadParameter(f"{text!r}: give distinct integers >= 0, e.g. 0,1,2")
    return seeds


@app.command("run")
def run_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Pipeline to run end to end.")] = "demo",
    seeds: Annotated[str, typer.Option(
        "--seeds", help="Comma-separated seeds: each seeds the student's init and the stages' "
                        "data order; results are mean +- std over them.")] = "0,1,2,3,4",
    threads: Annotated[Optional[int], typer.Option(
        "--threads", min=1, show_default=False,
        help="torch CPU threads per step (default: 1, steadiest for tiny models on a small CPU).")] = None,
    jobs: Annotated[Optional[int], typer.Option(
        "--jobs", min=1, show_default=False,
        help="Steps run side by side in separate processes, each as soon as the steps it reads "
             "from are done (default: CPUs // threads when every model is on the CPU, else 1; "
             "1 runs the phases one after the other in this process).")] = None,
    split: Annotated[Optional[str], typer.Option(
        "--split", show_default=False,
        help="Evaluate every row on this split instead of evaluation.split, e.g. validation "
             "to tune hyper-parameters without looking at the test split (report in "
             "<output>/report-<split>).")] = None,
    file: FileOption = None,
) -> None:
    """Data, models, teacher fine-tuning, cache, training and evaluation of pipeline NAME, then
    a results table in <output>/report; a rerun reuses every finished, still-valid phase."""
    import torch

    from genrecal.report import format_phases, format_table, format_variants
    from genrecal.statistics import Comparison
    from genrecal.runner import run_pipeline

    from transformers.utils import logging as hf_logging

    pipe = config.get_pipeline(name, pipelines_file(ctx, file))
    if split is not None:
        pipe = _with_eval_split(pipe, split)
    companion = config.get_pipeline(pipe.run.grace, pipelines_file(ctx, file)) if pipe.run.grace else None
    from genrecal.runner import RunOptions
    from genrecal.scheduler import default_jobs

    threads = threads or 1
    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()  # weight loading / saving bars; the phases show their own
    on_cpu = all(spec.device_map is None and (spec.device or ("cuda" if torch.cuda.is_available()
                                                               else "cpu")) == "cpu"
                 for p in (pipe, companion) if p is not None for spec in (p.teacher, p.student))
    options = RunOptions(jobs=jobs or default_jobs(threads, on_cpu), threads=threads)
    result = run_pipeline(pipe, _parse_seeds(seeds), options, echo=typer.echo, companion=companion)
    typer.echo("\n" + format_table(result.report) + "\n")
    for comparison in result.report["comparisons"]:
        typer.echo("- " + Comparison(**comparison).sentence())
    if result.report.get("variants"):
        typer.echo("\n" + format_variants(result.report))
    typer.echo("\n" + format_phases(result.report))
    for path in result.files:
        typer.echo(f"wrote {path}")


def _with_eval_split(pipe: config.Pipeline, split: str) -> config.Pipeline:
    if pipe.evaluation is None:
        raise typer.BadParameter(f"pipeline {pipe.name!r} has no evaluation block", param_hint="--split")
    if split not in pipe.data.splits():
        raise typer.BadParameter(f"pipeline {pipe.name!r} has no {split!r} split; its data provides "
                                 f"{sorted(pipe.data.splits())} (a synthetic set has a validation "
                                 "split with data.synthetic.n_validation > 0)", param_hint="--split")
    data = pipe.to_dict()
    data["evaluation"] = {**data["evaluation"], "split": split}
    return config.Pipeline.from_dict(data, source=f"{pipe.name} (--split {split})")


def main() -> None:
    """Console-script entry point."""
    app(prog_name="genrecal")


if __name__ == "__main__":
    main()
