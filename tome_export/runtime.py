"""Run a bundle: ``tome_export.runtime.load(BUNDLE).run(inputs)``, whatever the backend inside.

``load`` checks the manifest's schema version and every artifact's sha256 before any
backend sees a file, so a tampered or incomplete bundle fails with the file's name.
Backends register by the manifest's ``target`` (``onnx`` → ONNX Runtime); TensorRT and
Core ML targets plug in with :func:`register_backend`. Bundles with ``dynamic_loading``
are handed to ``tome_export.runtimes.dynamic.DynamicRunner``; bundles with ``variants``
(TDTM: merged for some denoising steps, full for others) pick the artifact per ``step``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tome_export.bundle import verify_bundle
from tome_export.errors import BackendMissing, UserError


class Runner(Protocol):
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


# A backend opens one artifact of a bundle: (artifact path, manifest, providers) → Runner.
Backend = Callable[[Path, dict, tuple[str, ...] | None], Runner]
BACKENDS: dict[str, Backend] = {}


def register_backend(target: str, backend: Backend) -> None:
    """Make bundles whose manifest says ``"target": target`` loadable."""
    BACKENDS[target] = backend


def _onnxruntime_backend(artifact: Path, manifest: dict, providers: tuple[str, ...] | None) -> Runner:
    from tome_export.devices import profiles
    from tome_export.runtimes.onnxruntime import OnnxRuntimeRunner

    if providers is None:
        device = profiles().get(manifest.get("device", "cpu"))
        providers = tuple(device.providers) if device and device.providers else ("CPUExecutionProvider",)
    return OnnxRuntimeRunner(artifact, providers=providers)


register_backend("onnx", _onnxruntime_backend)


@dataclass
class Session:
    """A loaded bundle. ``run(inputs)`` takes a dict by input name, or a list/array in order."""

    bundle_dir: Path
    manifest: dict
    providers: tuple[str, ...] | None = None
    _runners: dict[str, Runner] = field(default_factory=dict, repr=False)

    @property
    def input_names(self) -> list[str]:
        return [spec["name"] for spec in self.manifest.get("inputs", [])]

    @property
    def output_names(self) -> list[str]:
        return [spec["name"] for spec in self.manifest.get("outputs", [])]

    @property
    def variants(self) -> dict:
        return self.manifest.get("variants") or {}

    def variant_for_step(self, step: int) -> str:
        """The variant whose ``steps: [start, stop)`` holds ``step``."""
        for name, spec in self.variants.items():
            start, stop = spec["steps"]
            if start <= step < stop:
                return name
        ranges = ", ".join(f"{n} {s['steps']}" for n, s in self.variants.items())
        raise UserError(f"step {step} is in no variant of {self.bundle_dir} ({ranges})")

    def _runner(self, artifact: str) -> Runner:
        if artifact not in self._runners:
            target = self.manifest.get("target", "onnx")
            if target not in BACKENDS:
                raise BackendMissing(
                    f"no runtime backend for target {target!r} of {self.bundle_dir}; "
                    f"this installation runs: {', '.join(sorted(BACKENDS))}"
                )
            self._runners[artifact] = BACKENDS[target](self.bundle_dir / artifact, self.manifest, self.providers)
        return self._runners[artifact]

    def _feeds(self, inputs: Any) -> dict[str, np.ndarray]:
        if isinstance(inputs, Mapping):
            feeds = dict(inputs)
        else:
            values = [inputs] if isinstance(inputs, np.ndarray) else list(inputs)
            if len(values) != len(self.input_names):
                raise UserError(f"{self.bundle_dir} takes {len(self.input_names)} inputs, got {len(values)}")
            feeds = dict(zip(self.input_names, values))
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise UserError(f"missing input(s) {', '.join(missing)}; the bundle takes {', '.join(self.input_names)}")
        for spec in self.manifest.get("inputs", []):
            value = np.asarray(feeds[spec["name"]], dtype=spec.get("dtype", "float32"))
            expected = spec.get("shape")
            if expected and all(isinstance(d, int) for d in expected) and list(value.shape) != list(expected):
                raise UserError(
                    f"input {spec['name']!r} has shape {list(value.shape)}; this bundle was exported for "
                    f"{expected} (re-export with --input-shape)"
                )
            feeds[spec["name"]] = value
        return feeds

    def run(self, inputs: Any, step: int | None = None, variant: str | None = None) -> dict[str, np.ndarray]:
        """Run the model; with ``variants`` give the denoising ``step`` (or a variant name)."""
        holder, variant = self.manifest, None if not self.variants else variant
        if self.variants:
            if variant is None:
                if step is None:
                    raise UserError(
                        f"{self.bundle_dir} has variants ({', '.join(self.variants)}); pass step= or variant="
                    )
                variant = self.variant_for_step(step)
            if variant not in self.variants:
                raise UserError(f"no variant {variant!r} in {self.bundle_dir}; it has {', '.join(self.variants)}")
            holder = self.variants[variant]
        feeds = self._feeds(inputs)
        # A variant split for dynamic loading has its own blocks; the main artifact's
        # blocks sit at the manifest's top level.
        if holder.get("dynamic_loading") or (holder is not self.manifest and self._top_level_blocks(holder)):
            key = f"dynamic:{variant}"
            if key not in self._runners:
                name = variant if holder.get("dynamic_loading") else None
                self._runners[key] = _dynamic_session(self.bundle_dir, self.manifest, name)
            return self._runners[key].run(feeds)
        return self._runner(holder["artifact"]).run(feeds)

    def _top_level_blocks(self, holder: dict) -> bool:
        return bool(self.manifest.get("dynamic_loading")) and holder.get("artifact") == self.manifest.get("artifact")


def _dynamic_session(bundle_dir: Path, manifest: dict, variant: str | None = None):
    try:
        from tome_export.runtimes.dynamic import DynamicRunner
    except ImportError:
        raise BackendMissing(
            f"{bundle_dir} uses dynamic loading (manifest key 'dynamic_loading'), which needs "
            "tome_export.runtimes.dynamic; this tome-export lacks it, upgrade tome-export"
        ) from None
    return DynamicRunner.from_manifest(bundle_dir, manifest, variant=variant)


def load(bundle: str | Path, providers: tuple[str, ...] | None = None):
    """Open a bundle folder after checking its manifest and checksums.

    Returns a :class:`Session`; ``.run(inputs, step=…)`` picks the TDTM variant for a
    denoising step and hands split bundles to the dynamic-loading runner."""
    bundle_dir = Path(bundle)
    manifest = verify_bundle(bundle_dir)
    if not manifest.get("artifact") and not manifest.get("variants"):
        raise UserError(f"{bundle_dir}/manifest.json names no artifact to run (key 'artifact' or 'variants')")
    return Session(bundle_dir, manifest, providers)


__all__ = ["BACKENDS", "Session", "load", "register_backend"]
