"""Run a bundle: ``tome_export.runtime.load(BUNDLE).run(inputs)``, whatever the backend inside.

A bundle is untrusted input. ``load`` validates the manifest and checks every artifact's
place (a plain relative path inside the folder, no symlinks), size and sha256 before any
backend sees a file; each backend then reads the files it runs through
``bundle.read_verified`` — hashing the very bytes it hands to the runtime, every time it
loads them. Backends are a table by the manifest's ``target`` (``onnx`` → ONNX Runtime);
TensorRT and Core ML targets plug in with :func:`register_backend`. Bundles with
``dynamic_loading`` are handed to ``tome_export.runtimes.dynamic.DynamicRunner``; bundles
with ``variants`` (TDTM: merged for some denoising steps, full for others) pick the
artifact per ``step``. Needs only onnxruntime and numpy (plus onnxruntime-extensions for
plugin-lowered bundles).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tome_export.bundle import BundleError, read_verified, verify_bundle
from tome_export.bundle.integrity import external_files
from tome_export.errors import BackendMissing, UserError, first_line


class InputError(UserError):
    """``Session.run`` got inputs that don't fit the bundle (names, dtypes, shapes). Exit status 2."""


class Runner(Protocol):
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


# A backend opens one artifact of a bundle: (bundle folder, artifact name, manifest,
# providers) → Runner. It must read files with ``bundle.read_verified``.
Backend = Callable[[Path, str, dict, tuple[str, ...] | None], Runner]


def _onnxruntime_backend(bundle_dir: Path, artifact: str, manifest: dict, providers: tuple[str, ...] | None) -> Runner:
    from tome_export.devices import profiles
    from tome_export.runtimes.onnxruntime import PLUGIN_DOMAIN, OnnxRuntimeRunner

    if providers is None:
        device = profiles().get(manifest.get("device") or "cpu")
        providers = tuple(device.providers) if device and device.providers else ("CPUExecutionProvider",)
    graph = read_verified(bundle_dir, manifest, artifact)
    external = {
        local: read_verified(bundle_dir, manifest, name) for local, name in external_files(manifest, artifact, graph)
    }
    plugin = PLUGIN_DOMAIN in (manifest.get("custom_domains") or [])
    try:
        return OnnxRuntimeRunner(graph, providers=providers, plugin_ops=plugin or None, external_files=external)
    except (UserError, BackendMissing):
        raise
    except Exception as exc:
        raise BundleError(f"bundle {bundle_dir}: ONNX Runtime cannot load {artifact}: {first_line(exc, 300)}") from None


BACKENDS: dict[str, Backend] = {"onnx": _onnxruntime_backend}


def register_backend(target: str, backend: Backend) -> None:
    """Make bundles whose manifest says ``"target": target`` loadable."""
    BACKENDS[target] = backend


def _as_array(name: str, value: Any, spec: dict) -> np.ndarray:
    """One input as the dtype and shape the manifest declares, or an InputError."""
    expected = np.dtype(spec.get("dtype", "float32"))
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise InputError(f"input {name!r} is not a rectangular numeric array ({exc})") from None
    if array.dtype.kind not in "biuf":
        raise InputError(f"input {name!r} holds {array.dtype} values; the bundle takes {expected.name}")
    if array.dtype != expected and not np.can_cast(array.dtype, expected, "same_kind"):
        raise InputError(f"input {name!r} is {array.dtype}; the bundle takes {expected.name} (cast it first)")
    shape = spec.get("shape")
    if shape is not None:
        fits = len(shape) == array.ndim and all(not isinstance(d, int) or d == s for d, s in zip(shape, array.shape))
        if not fits:
            raise InputError(
                f"input {name!r} has shape {list(array.shape)}; this bundle was exported for {shape} "
                "(re-export with --input-shape)"
            )
    return np.ascontiguousarray(array, dtype=expected)


@dataclass
class Session:
    """A loaded bundle. ``run(inputs)`` takes a dict by input name, or a list/array in order."""

    bundle_dir: Path
    manifest: dict
    providers: tuple[str, ...] | None = None
    _runners: dict[str, Runner] = field(default_factory=dict, repr=False)

    @property
    def input_names(self) -> list[str]:
        return [spec["name"] for spec in self.manifest.get("inputs") or []]

    @property
    def output_names(self) -> list[str]:
        return [spec["name"] for spec in self.manifest.get("outputs") or []]

    @property
    def variants(self) -> dict:
        return self.manifest.get("variants") or {}

    def variant_for_step(self, step: int) -> str:
        """The variant whose ``steps: [start, stop)`` holds ``step`` (stop null: to the end)."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise InputError(f"step must be an integer denoising step, got {type(step).__name__}")
        for name, spec in self.variants.items():
            start, stop = spec["steps"]
            if start <= step and (stop is None or step < stop):
                return name
        ranges = ", ".join(f"{n} {s['steps']}" for n, s in self.variants.items())
        raise InputError(f"step {step} is in no variant of {self.bundle_dir} ({ranges})")

    def _runner(self, artifact: str) -> Runner:
        if artifact not in self._runners:
            target = self.manifest.get("target") or "onnx"
            if target not in BACKENDS:
                raise BackendMissing(
                    f"no runtime backend for target {target!r} of {self.bundle_dir}; "
                    f"this installation runs: {', '.join(sorted(BACKENDS))}"
                )
            self._runners[artifact] = BACKENDS[target](self.bundle_dir, artifact, self.manifest, self.providers)
        return self._runners[artifact]

    def _feeds(self, inputs: Any) -> dict[str, np.ndarray]:
        names = self.input_names
        if isinstance(inputs, Mapping):
            feeds = dict(inputs)
            extra = [str(k) for k in feeds if k not in names]
            if extra:
                raise InputError(f"unexpected input(s) {', '.join(extra)}; the bundle takes {', '.join(names)}")
        elif isinstance(inputs, (np.ndarray, list, tuple)):
            values = [inputs] if isinstance(inputs, np.ndarray) else list(inputs)
            if len(values) != len(names):
                raise InputError(f"{self.bundle_dir} takes {len(names)} inputs ({', '.join(names)}), got {len(values)}")
            feeds = dict(zip(names, values))
        else:
            raise InputError(f"inputs must be a dict by name or a list in order, not {type(inputs).__name__}")
        missing = [n for n in names if n not in feeds]
        if missing:
            raise InputError(f"missing input(s) {', '.join(missing)}; the bundle takes {', '.join(names)}")
        return {spec["name"]: _as_array(spec["name"], feeds[spec["name"]], spec) for spec in self.manifest["inputs"]}

    def run(self, inputs: Any, step: int | None = None, variant: str | None = None) -> dict[str, np.ndarray]:
        """Run the model; with ``variants`` give the denoising ``step`` (or a variant name)."""
        holder, variant = self.manifest, None if not self.variants else variant
        if self.variants:
            if variant is None:
                if step is None:
                    raise InputError(
                        f"{self.bundle_dir} has variants ({', '.join(self.variants)}); pass step= or variant="
                    )
                variant = self.variant_for_step(step)
            if variant not in self.variants:
                raise InputError(f"no variant {variant!r} in {self.bundle_dir}; it has {', '.join(self.variants)}")
            holder = self.variants[variant]
        feeds = self._feeds(inputs)
        # A variant split for dynamic loading has its own blocks; the main artifact's
        # blocks sit at the manifest's top level.
        if holder.get("dynamic_loading") or (holder is not self.manifest and self._top_level_blocks(holder)):
            key = f"dynamic:{variant}"
            if key not in self._runners:
                name = variant if holder.get("dynamic_loading") else None
                self._runners[key] = _dynamic_session(self.bundle_dir, self.manifest, name)
            runner = self._runners[key]
        else:
            runner = self._runner(holder["artifact"])
        try:
            return runner.run(feeds)
        except UserError:
            raise
        except Exception as exc:  # ONNX Runtime's own complaint about the feeds, in one line
            raise InputError(f"{self.bundle_dir}: the model rejected the inputs: {first_line(exc, 300)}") from None

    def _top_level_blocks(self, holder: dict) -> bool:
        return bool(self.manifest.get("dynamic_loading")) and holder.get("artifact") == self.manifest.get("artifact")


def _dynamic_session(bundle_dir: Path, manifest: dict, variant: str | None = None):
    from tome_export.runtimes.dynamic import DynamicRunner

    return DynamicRunner.from_manifest(bundle_dir, manifest, variant=variant)


def load(bundle: str | Path, providers: tuple[str, ...] | None = None) -> Session:
    """Open a bundle folder after checking its manifest and checksums.

    Returns a :class:`Session`; ``.run(inputs, step=…)`` picks the TDTM variant for a
    denoising step and hands split bundles to the dynamic-loading runner."""
    bundle_dir = Path(bundle)
    manifest = verify_bundle(bundle_dir)
    if not manifest.get("artifact") and not manifest.get("variants"):
        raise BundleError(f"{bundle_dir}/manifest.json names no artifact to run (key 'artifact' or 'variants')")
    if not manifest.get("inputs") or not manifest.get("outputs"):
        raise BundleError(f"{bundle_dir}/manifest.json declares no inputs/outputs; export it again")
    return Session(bundle_dir, manifest, providers)


__all__ = ["BACKENDS", "InputError", "Session", "load", "register_backend"]
