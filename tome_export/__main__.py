"""``python -m tome_export``: the same command line as ``tome-export`` (:mod:`tome_export.cli`)."""

from tome_export.cli import entry

entry()
