"""Stopping signals as exceptions, so every ``finally`` and context manager cleans up.

Python turns SIGINT into ``KeyboardInterrupt`` but dies on SIGTERM and SIGHUP without
running cleanups: a killed export would leave its ``.partial`` folder, a killed ``tune`` or
``profile`` its temporary exports. :func:`raising` makes all three raise :class:`Interrupted`
(a ``KeyboardInterrupt`` carrying the exit code 128 + N) in the main thread while it is
active; :func:`blocked` holds them off while a cleanup must not be cut half-way.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """A signal (SIGINT, SIGTERM, SIGHUP) stopped the command; ``exit_code`` is 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def raising() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` inside the block (main thread
    only: Python delivers signals there); the previous handlers come back after it."""
    if not _in_main_thread():
        yield
        return

    def stop(signum, frame):
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, stop) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def blocked() -> Iterator[None]:
    """The stopping signals wait until the block has run (they are delivered after it)."""
    if not hasattr(signal, "pthread_sigmask") or not _in_main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
