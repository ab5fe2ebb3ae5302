"""The ``lazymar`` command line. Each subcommand lives in a module of :mod:`lazymar.commands` with a
``register(subparsers)`` function that adds its parser and sets ``func``."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

COMMAND_MODULES = (
    "lazymar.commands.generation",  # sample, eval, train
    "lazymar.commands.recording",  # record, merge-stats
    "lazymar.commands.cache",  # bench, flops
    "lazymar.commands.derive",  # derive, sweep
    "lazymar.commands.quality",  # search-quality
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lazymar", description="lazymar: token and condition redundancy in MAR image generators, and caches.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as err:  # our errors name their cause in one line
        print(f"lazymar {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
