"""`nas4dyn profile` — not implemented yet."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="(not implemented yet)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    raise SystemExit("nas4dyn profile: error: not implemented yet")
