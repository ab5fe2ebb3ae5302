"""The one base class of lazymar's expected errors: bad inputs whose message names the cause in one line.

The CLI turns any :class:`LazymarError` into ``lazymar <command>: error: <message>`` and exit code 2; anything
else that escapes is a bug and keeps its traceback. It subclasses ValueError so that callers that catch
ValueError keep working."""
from __future__ import annotations


class LazymarError(ValueError):
    """An input (argument, file, setting) that lazymar cannot use; the message says which and why."""


class ArgumentError(LazymarError):
    """A command-line value that is out of range or inconsistent with another (found after parsing)."""


class OutputError(LazymarError):
    """An output path that cannot or must not be written (a directory, unwritable, or existing without --force)."""


class NonFiniteError(LazymarError):
    """Non-finite numbers (NaN or inf) where finite ones are required: weights or sampled tokens."""


class SettingsError(LazymarError):
    """Sampling or training settings that cannot work (e.g. a non-finite CFG scale, more steps than tokens)."""
