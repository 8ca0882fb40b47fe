"""Assertions the adversarial suite shares: one error line, nothing touched outside the output."""

from __future__ import annotations

from pathlib import Path


def tree_state(root: Path, skip: Path | None = None) -> dict:
    """{path: (size, mtime_ns)} of every file under ``root`` (outside ``skip``), to prove nothing changed."""
    state = {}
    for path in sorted(root.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        if path.is_file() and not path.is_symlink():
            info = path.stat()
            state[str(path)] = (info.st_size, info.st_mtime_ns)
    return state


def one_line(text: str) -> str:
    """The single non-empty line of an error output (fails if there are more, or a traceback)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert "Traceback" not in text, text
    assert len(lines) == 1, text
    return lines[0]
