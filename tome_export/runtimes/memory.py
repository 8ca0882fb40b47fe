"""Memory accounting for the dynamic-loading runner: process RSS, and giving memory back.

RSS comes from psutil when it is installed, else from ``/proc/self/statm`` (Linux), so a
deployed app needs only onnxruntime and numpy. ``RssSampler`` samples it on a thread and
keeps the peak; ``release_freed_memory`` and ``drop_from_page_cache`` make an unloaded
block's memory really leave the process (glibc heap, kernel page cache).
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path


def rss_bytes() -> int:
    """This process's resident set size in bytes (0 where it can't be told)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return psutil.Process().memory_info().rss
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return 0


class RssSampler:
    """Samples this process's RSS every ``interval`` s while entered; ``peak`` is the largest seen."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def now() -> int:
        return rss_bytes()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def drop_from_page_cache(path: Path) -> None:
    """Ask the kernel to drop a file's cached pages (the next load really reads storage)."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


_MALLOC_TRIM = None


def release_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise; RSS would not drop)."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)
