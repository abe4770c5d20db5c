"""`lpipes init`: write a commented node.toml (interactive wizard or flags)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="write a node configuration (interactive wizard, or flags for scripts)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError
