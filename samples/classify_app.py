"""Image classification from a bundle alone: ``python samples/classify_app.py BUNDLE IMAGE``.

Uses only the bundle (manifest + model) through ``tome_export.runtime.load``: the
manifest's ``preprocessing`` says the input size, layout and mean/std. IMAGE is a picture
file (decoded with Pillow when installed) or a ``.npy`` array (H, W, 3) uint8 or float
0..1. Prints the top-5 classes (``--labels FILE`` gives one class name per line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def load_pixels(path: Path, height: int, width: int, crop_pct: float | None = None) -> np.ndarray:
    """(H, W, 3) float32 in 0..1, resized to the model's size."""
    if path.suffix == ".npy":
        pixels = np.load(path)
        if pixels.dtype == np.uint8:
            pixels = pixels.astype(np.float32) / 255.0
        if pixels.shape[:2] != (height, width):
            # Nearest-neighbour resize keeps this sample free of image libraries.
            rows = np.arange(height) * pixels.shape[0] // height
            cols = np.arange(width) * pixels.shape[1] // width
            pixels = pixels[rows][:, cols]
        return pixels.astype(np.float32)
    try:
        from PIL import Image
    except ImportError:
        sys.exit("decoding image files needs Pillow (pip install pillow); or pass a .npy array")
    image = Image.open(path).convert("RGB")
    # Resize the short side to size / crop_pct, then centre-crop: timm's eval transform.
    scale = max(height / image.height, width / image.width) / (crop_pct or 1.0)
    image = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.BICUBIC
    )
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return np.asarray(image.crop((left, top, left + width, top + height)), dtype=np.float32) / 255.0


def preprocess(pixels: np.ndarray, spec: dict | None, batch: int) -> np.ndarray:
    mean = np.asarray(spec.get("mean") or [0.0, 0.0, 0.0], dtype=np.float32) if spec else 0.0
    std = np.asarray(spec.get("std") or [1.0, 1.0, 1.0], dtype=np.float32) if spec else 1.0
    chw = ((pixels - mean) / std).transpose(2, 0, 1)
    return np.repeat(chw[None], batch, axis=0).astype(np.float32)  # the bundle's static batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("image")
    parser.add_argument("--labels", help="text file, one class name per line")
    parser.add_argument("--json", action="store_true", help="print the top-5 as JSON")
    args = parser.parse_args(argv)

    import tome_export.runtime
    from tome_export.errors import UserError

    try:
        session = tome_export.runtime.load(args.bundle)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    spec = session.manifest.get("preprocessing")
    (input_spec,) = session.manifest["inputs"]
    batch, _, height, width = input_spec["shape"]
    batch = batch if isinstance(batch, int) else 1
    crop_pct = ((spec or {}).get("resize") or {}).get("crop_pct")
    pixels = load_pixels(Path(args.image), height, width, crop_pct)
    logits = session.run({input_spec["name"]: preprocess(pixels, spec, batch)})[session.output_names[0]][0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    labels = Path(args.labels).read_text().splitlines() if args.labels else None
    top5 = [
        {"class": int(i), "label": labels[i] if labels and i < len(labels) else None, "probability": float(probs[i])}
        for i in np.argsort(-probs)[:5]
    ]
    if args.json:
        print(json.dumps(top5))
    else:
        for entry in top5:
            print(f"{entry['probability']:7.2%}  {entry['label'] or 'class ' + str(entry['class'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
