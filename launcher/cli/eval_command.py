"""`ithaca eval`: not written yet (issue in progress)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError
