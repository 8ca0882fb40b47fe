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
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise UserError(
            f"{bundle} is not a tome-export bundle: not a folder (export one with `tome-export MODEL -o DIR`)"
        )
    path = bundle / MANIFEST
    if not path.is_file():
        raise UserError(f"{bundle} is not a tome-export bundle: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("schema_version"), int):
        raise UserError(f"{path} has no integer schema_version; it is not a tome-export manifest")
    if manifest["schema_version"] > SCHEMA_VERSION:
        raise UserError(
            f"{path} has schema version {manifest['schema_version']}, newer than this tome-export reads "
            f"({SCHEMA_VERSION}); upgrade tome-export"
        )
    if not isinstance(manifest.get("artifacts"), dict):
        raise UserError(f"{path} lists no artifacts; the bundle is incomplete, export it again")
    return manifest


def verify_bundle(bundle: str | Path) -> dict:
    """Reads the manifest and checks every artifact's presence, size and sha256.

    Raises UserError naming the first missing or altered file; returns the manifest."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    for name, entry in manifest["artifacts"].items():
        path = bundle / name
        if not path.is_file():
            raise UserError(f"bundle {bundle} is incomplete: artifact {name} is missing; export it again")
        if "bytes" in entry and path.stat().st_size != entry["bytes"]:
            raise UserError(
                f"bundle {bundle}: artifact {name} has {path.stat().st_size} bytes, manifest says "
                f"{entry['bytes']}; the file was altered or truncated, export it again"
            )
        if sha256_file(path) != entry.get("sha256"):
            raise UserError(
                f"bundle {bundle}: artifact {name} fails its sha256 check; the file was altered, export it again"
            )
    return manifest


def preprocessing_for(model, input_shapes: list[tuple[int, ...]]) -> dict | None:
    """What an app must do to an image before the model: layout, size, scale, mean/std.

    Only for image models (one NCHW input with 1 or 3 channels). mean/std come from the
    model's own declaration (timm's ``pretrained_cfg``); null when it declares none."""
    if len(input_shapes) != 1 or len(input_shapes[0]) != 4 or input_shapes[0][1] not in (1, 3):
        return None
    _, channels, height, width = input_shapes[0]
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    return {
        "kind": "image",
        "layout": "NCHW",
        "color": "RGB" if channels == 3 else "L",
        "size": [height, width],
        "resize": {"interpolation": cfg.get("interpolation"), "crop_pct": cfg.get("crop_pct")}
        if "crop_pct" in cfg or "interpolation" in cfg
        else None,
        "scale": 1 / 255,  # pixel values 0..255 → 0..1 before mean/std
        "mean": list(mean) if mean is not None else None,
        "std": list(std) if std is not None else None,
    }
