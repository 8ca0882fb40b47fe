"""The errors tome-export raises on purpose, and how the CLI reports them.

Every one derives from :class:`TomeExportError`, so a library caller can catch "any
tome-export error"; each class carries the CLI's exit status (``exit_code``): 2 for bad
input, 1 for a failed verification, 3 for a missing optional backend. The CLI prints the
message as one line. :func:`first_line` is the one way to turn a foreign exception (a
converter's, torch.export's) into such a line. Nothing heavy is imported here: the
runtime side uses this module too.
"""

from __future__ import annotations


class TomeExportError(Exception):
    """Base of every error tome-export raises on purpose; ``exit_code`` is the CLI's status."""

    exit_code = 1


class UserError(TomeExportError):
    """Bad input: the message says what is wrong and what to do. Exit status 2."""

    exit_code = 2


class VerificationError(TomeExportError):
    """The exported model does not match the eager reference. Exit status 1."""

    exit_code = 1


class BackendMissing(TomeExportError):
    """An optional backend (TensorRT, Core ML, CUDA) is not installed. Exit status 3."""

    exit_code = 3


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first non-empty line of ``exc``'s message (its class name when empty), cut at ``limit``."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    line = lines[0].strip() if lines else type(exc).__name__
    return line if limit is None else line[:limit]


__all__ = ["BackendMissing", "TomeExportError", "UserError", "VerificationError", "first_line"]
