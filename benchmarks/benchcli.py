"""The command-line conventions every benchmark shares: ``--smoke`` and ``--json [PATH]``.

``--smoke`` runs the same code paths at the smallest sizes (the suite runs it, so a refactor
that breaks a benchmark fails CI); sizes given explicitly still win. ``--json`` prints the
results as JSON after the table; ``--json PATH`` writes them to PATH instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_smoke_and_json(parser: argparse.ArgumentParser, smoke: dict) -> None:
    """Add ``--smoke`` (whose defaults are ``smoke``) and ``--json [PATH]`` to ``parser``."""
    parser.add_argument("--smoke", action="store_true",
                        help=f"smallest sizes ({smoke}) unless given explicitly: seconds, for CI")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="print the results as JSON too; with PATH, write them to PATH instead")


def parse(parser: argparse.ArgumentParser, smoke: dict, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; under ``--smoke`` the sizes not given default to ``smoke``."""
    if parser.parse_known_args(argv)[0].smoke:
        parser.set_defaults(**smoke)
    return parser.parse_args(argv)


def write_json(result: dict, target: str | None) -> None:
    """``--json``: print (target "-") or write ``result`` (nothing when target is None)."""
    if target == "-":
        print(json.dumps(result, indent=2))
    elif target:
        Path(target).write_text(json.dumps(result, indent=2) + "\n")
