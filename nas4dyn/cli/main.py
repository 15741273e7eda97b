"""Entry point of the `nas4dyn` command: verb dispatch and the one-line error contract.

Each verb module exposes ``add_parser(subparsers)``, which registers its parser and sets ``run`` (a function
of the parsed args returning an exit code). Errors a user can cause (:class:`Nas4dynError`, a missing file)
print one line on stderr and exit 2; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from nas4dyn import __version__
from nas4dyn.errors import Nas4dynError

VERBS = ("spaces", "train", "profile", "search", "export", "evaluate", "analyze")


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with one line (its default prints the whole usage first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"nas4dyn: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nas4dyn", description="Neural architecture search for dynamic convolutional networks.")
    parser.add_argument("--version", action="version", version=f"nas4dyn {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True
    for verb in VERBS:
        module = importlib.import_module(f"nas4dyn.cli.{verb}")
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.run(args) or 0)
    except (Nas4dynError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        if debug:
            traceback.print_exc()
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"nas4dyn {args.verb}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nas4dyn {args.verb}: interrupted", file=sys.stderr)
        return 130
