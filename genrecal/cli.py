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
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

import genrecal
from genrecal import config

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
def validate_command(cache: CacheArgument) -> None:
    """Check a teacher cache end to end; print every problem and exit 1 if there is any."""
    from genrecal.store.validate import validate_cache

    problems = validate_cache(cache)
    for problem in problems:
        typer.echo(f"[{problem.code}] {problem.where}: {problem.message}\n    fix: {problem.fix}")
    if problems:
        typer.echo(f"{cache}: {len(problems)} problem(s)", err=True)
        raise typer.Exit(1)
    typer.echo(f"ok: {cache}: {_cache_counts(cache)}, no problem found")


def _cache_counts(cache: str) -> str:
    from genrecal.store.reader import load_manifest
    from genrecal.store.storage import CacheStorage

    manifest = load_manifest(CacheStorage(cache))
    return f"{manifest.counts.samples} samples, {manifest.counts.tokens} tokens in {len(manifest.shards)} shard(s)"


def main() -> None:
    """Console-script entry point."""
    app(prog_name="genrecal")


if __name__ == "__main__":
    main()
