"""The log of one ONNX export: ATen rewrites and lowering notes, kept per export.

Translation functions run inside ``torch.onnx.export`` and get no export object, so
``export_onnx`` opens an :class:`ExportLog` with :func:`recording` and the translations
append to :func:`current` — a context variable, so two exports in one process (one after
the other, nested, or in two threads) never see each other's entries. Outside an export
``current()`` is a fresh log nobody reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass
class ExportLog:
    """What one export's translations want recorded in the manifest and said in the log."""

    rewrites: list[dict] = field(default_factory=list)  # {"op", "reduce", "include_self", "became"}
    notes: list[dict] = field(default_factory=list)  # e.g. the dense lowering's cost per merge, with "message"


_CURRENT: ContextVar[ExportLog | None] = ContextVar("tome_export_log", default=None)


@contextmanager
def recording(log: ExportLog) -> Iterator[ExportLog]:
    """Make ``log`` the current export's log for the ``with`` block."""
    token = _CURRENT.set(log)
    try:
        yield log
    finally:
        _CURRENT.reset(token)


def current() -> ExportLog:
    """The log of the export running in this context (a throwaway one outside any export)."""
    log = _CURRENT.get()
    return log if log is not None else ExportLog()


__all__ = ["ExportLog", "current", "recording"]
