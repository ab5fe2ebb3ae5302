"""Subcommands of the ``lazymar`` CLI (see :mod:`lazymar.cli`)."""
