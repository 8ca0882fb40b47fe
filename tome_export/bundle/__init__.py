"""The output folder of an export: artifacts plus ``manifest.json`` — written safely, read as untrusted.

- :mod:`~tome_export.bundle.manifest`: parse and validate a manifest (``BundleError``);
- :mod:`~tome_export.bundle.integrity`: read a bundle's files inside its folder, checksummed,
  from the bytes that are used;
- :mod:`~tome_export.bundle.writer`: write a bundle into a partial folder, rename it into
  place, never replace what tome-export didn't write;
- here: :func:`verify_bundle` (every artifact at once) and :func:`preprocessing_for`.
"""

from __future__ import annotations

from pathlib import Path

from tome_export.bundle.integrity import check_artifact, read_verified, sha256_file
from tome_export.bundle.manifest import MANIFEST, SCHEMA_VERSION, TOOL, BundleError, read_manifest
from tome_export.bundle.writer import BundleWriter


def verify_bundle(bundle: str | Path) -> dict:
    """Reads and validates the manifest, then checks every artifact's place, size and sha256.

    Raises BundleError naming the first missing, altered or escaping file; returns the manifest.
    Files are checked again, from the bytes used, whenever the runtime loads them."""
    manifest = read_manifest(bundle)
    for name in manifest["artifacts"]:
        check_artifact(Path(bundle), manifest, name)
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


__all__ = [
    "MANIFEST",
    "SCHEMA_VERSION",
    "TOOL",
    "BundleError",
    "BundleWriter",
    "preprocessing_for",
    "read_manifest",
    "read_verified",
    "sha256_file",
    "verify_bundle",
]
