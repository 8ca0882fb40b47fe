"""Step-by-step progress on stderr; stdout stays free for machine-readable output.

Owns :class:`Progress`: named steps with their duration, a tick for long loops, and a quiet
mode for ``-q`` and library calls.
"""

from __future__ import annotations

import contextlib
import sys
import time


class Progress:
    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def step(self, title: str):
        """Prints ``title…`` when a long step starts and its duration when it ends."""
        if not self.quiet:
            print(f"• {title}…", end="", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            yield self
        except BaseException:
            if not self.quiet:
                print(" failed", file=sys.stderr, flush=True)
            raise
        if not self.quiet:
            print(f" done ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)

    def tick(self, *_args) -> None:
        if not self.quiet:
            print(".", end="", file=sys.stderr, flush=True)
