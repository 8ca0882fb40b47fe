"""The output folder of an export: artifacts plus ``manifest.json``.

Written into a temporary sibling folder and renamed into place at the end, so an error
never leaves a half-written bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from tome_export.errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class BundleWriter:
    """``with BundleWriter(out) as bundle:`` write into ``bundle.path``; commit on exit."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        if self.out.exists() and not (self.out / MANIFEST).is_file():
            raise UserError(f"{self.out} exists and is not a tome-export bundle; choose another -o")
        parent = self.out.resolve().parent
        if not parent.is_dir():
            raise UserError(f"cannot write {self.out}: folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise UserError(f"cannot write {self.out}: folder {parent} is not writable")
        self.path: Path | None = None

    def __enter__(self) -> BundleWriter:
        self.path = Path(
            tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".partial", dir=self.out.resolve().parent)
        )
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        self._commit()

    def write_manifest(self, manifest: dict) -> dict:
        """Adds schema version and the sha256 of every artifact, writes manifest.json."""
        artifacts = {
            str(p.relative_to(self.path)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(self.path.rglob("*"))
            if p.is_file() and p.name != MANIFEST
        }
        full = {"schema_version": SCHEMA_VERSION, **manifest, "artifacts": artifacts}
        (self.path / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")
        return full

    def _commit(self) -> None:
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.path, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def read_manifest(bundle: str | Path) -> dict:
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise UserError(f"{bundle} is not a tome-export bundle: {MANIFEST} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
