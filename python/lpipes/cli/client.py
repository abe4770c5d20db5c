"""`lpipes chat` and `lpipes status`: clients of a running node's HTTP API."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="streaming terminal chat against an OpenAI-compatible API")
    p.set_defaults(handler=run_chat)
    p = sub.add_parser("status", help="a node's model, layer span and KV usage")
    p.set_defaults(handler=run_status)


def run_chat(args: argparse.Namespace) -> int:
    raise NotImplementedError


def run_status(args: argparse.Namespace) -> int:
    raise NotImplementedError
