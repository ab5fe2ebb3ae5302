"""The ``lazymar`` command line. Each subcommand lives in a module of :mod:`lazymar.commands` with a
``register(subparsers)`` function that adds its parser and sets ``func``.

:func:`main` is the one error boundary: argparse rejects bad values while parsing (exit 2); an expected failure
while running (a :class:`~lazymar.errors.LazymarError`, or an OSError reading or writing a file) becomes one line
``lazymar <command>: error: <what>: <problem>`` and exit 2; Ctrl-C prints "stopped" and exits 130. Any other
exception is a bug and keeps its traceback."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from .errors import LazymarError

COMMAND_MODULES = (
    "lazymar.commands.generation",  # sample, eval, train
    "lazymar.commands.recording",  # record, merge-stats
    "lazymar.commands.cache",  # bench, flops
    "lazymar.commands.derive",  # derive, sweep
    "lazymar.commands.quality",  # search-quality
    "lazymar.commands.download",  # download
)
EXIT_ERROR, EXIT_INTERRUPTED = 2, 130


class UsageError(Exception):
    """A bad command line, found while parsing; its message is argparse's line."""


class Parser(argparse.ArgumentParser):
    """argparse with one line per error (``lazymar <cmd>: error: argument --x: problem``), no usage block;
    subcommand parsers inherit the class."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="lazymar", description="lazymar: token and condition redundancy in MAR image generators, and caches.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def error_line(err: BaseException) -> str:
    """One line for an expected error: OSErrors as 'file: problem', ours as their message."""
    if isinstance(err, OSError) and not isinstance(err, LazymarError):
        what = err.filename if err.filename is not None else ""
        problem = err.strerror or str(err)
        text = f"{what}: {problem}" if what else problem
    else:
        text = str(err)
    return " ".join(text.split())  # one line, whatever the message held


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as err:
        print(" ".join(str(err).split()), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    try:
        return int(args.func(args) or 0)
    except (LazymarError, OSError) as err:
        print(f"lazymar {args.command}: error: {error_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"lazymar {args.command}: stopped", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
