"""The timing harness every bench/*.py script uses, so they all measure the same way.

- :func:`interleaved` times named variants round-robin in one process (warm-up first; the
  order rotates every round), so load changes on a shared machine hit every variant alike;
- :class:`Timing` keeps the samples and gives median / p10 / p90 in ms; :func:`medians`,
  :func:`p90s` and :func:`ratios` turn a set of timings into what the JSON reports;
- :func:`ort_runner` builds ONNX Runtime sessions whose worker threads do not spin
  (``session.intra_op.allow_spinning=0`` and ``session.inter_op.allow_spinning=0``): with
  several sessions taking turns on few cores, a spinning idle pool steals the next run's CPU;
- :func:`emit` prints the result as ONE JSON object, last on stdout (progress goes to stderr
  through :func:`log`).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SPIN_OFF = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}


@dataclass
class Timing:
    """Timed samples of one variant, in milliseconds."""

    samples_ms: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.samples_ms, q))

    @property
    def median_ms(self) -> float:
        return self.percentile(50)

    @property
    def p10_ms(self) -> float:
        return self.percentile(10)

    @property
    def p90_ms(self) -> float:
        return self.percentile(90)


def interleaved(
    variants: Mapping[str, Callable[[], Any]],
    runs: int,
    warmup: int = 3,
    *,
    sync: Callable[[], None] | None = None,
    elapsed_s: Callable[[str, Any], float] | None = None,
) -> dict[str, Timing]:
    """Time every variant ``runs`` times, round-robin, after ``warmup`` untimed rounds.

    The starting variant rotates each round so none always runs right after the same one.
    ``sync`` runs before starting and before stopping the clock (``torch.cuda.synchronize``
    for GPU work). ``elapsed_s(name, returned)`` replaces the wall clock with a time the
    variant reports itself (e.g. a runner's own stats); it may also collect extra data.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be ≥ 1 and warmup ≥ 0, got runs={runs}, warmup={warmup}")
    names = list(variants)
    timings = {name: Timing() for name in names}
    for round_index in range(warmup + runs):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if sync:
                sync()
            start = time.perf_counter()
            returned = variants[name]()
            if sync:
                sync()
            seconds = time.perf_counter() - start
            if round_index >= warmup:
                timings[name].samples_ms.append(1e3 * (elapsed_s(name, returned) if elapsed_s else seconds))
    return timings


def medians(timings: Mapping[str, Timing], digits: int = 3, scale: float = 1.0) -> dict[str, float]:
    """Median per variant, in ms times ``scale`` (1e-3 for seconds), rounded."""
    return {name: round(t.median_ms * scale, digits) for name, t in timings.items()}


def p90s(timings: Mapping[str, Timing], digits: int = 3) -> dict[str, float]:
    return {name: round(t.p90_ms, digits) for name, t in timings.items()}


def ratios(values: Mapping[str, float], base: str, digits: int = 3) -> dict[str, float]:
    """``{"name/base": value / values[base]}`` for every other variant."""
    return {f"{name}/{base}": round(v / values[base], digits) for name, v in values.items() if name != base}


def ort_runner(model, threads: int | None = None, providers: tuple[str, ...] = ("CPUExecutionProvider",)):
    """The shipped :class:`OnnxRuntimeRunner` (plugin ops registered when the graph needs them)
    with spinning off for both thread pools; ``model`` is a ModelProto, bytes or a path."""
    from tome_export.runtimes.onnxruntime import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(model, providers=providers, intra_op_threads=threads, spinning=False)
    applied = session_config(runner.session)
    wrong = {key: applied.get(key) for key, value in SPIN_OFF.items() if applied.get(key) != value}
    if wrong:  # a benchmark with spinning on would not say so: refuse
        raise RuntimeError(f"ONNX Runtime session built with spinning settings {wrong}, want {SPIN_OFF}")
    return runner


def ort_profiling_session(path, threads: int | None, prefix: str):
    """An ONNX Runtime CPU session with its profiler on and spinning off (per-op breakdowns)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    for key, value in SPIN_OFF.items():
        options.add_session_config_entry(key, value)
    options.enable_profiling = True
    options.profile_file_prefix = prefix
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def session_config(session) -> dict[str, str | None]:
    """The spinning entries an InferenceSession was built with (None: not set, ORT's default: spin)."""
    options = session.get_session_options()
    config = {}
    for key in SPIN_OFF:
        try:
            config[key] = options.get_session_config_entry(key)
        except RuntimeError:  # not set
            config[key] = None
    return config


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.machine()}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def emit(result: dict) -> None:
    """Print ``result`` as one JSON object on the last line of stdout."""
    sys.stderr.flush()
    print(json.dumps(result), flush=True)


def repo_on_path() -> Path:
    """Make ``samples`` / ``tome_export`` / ``bench`` importable when run as ``python bench/x.py``."""
    repo = Path(__file__).resolve().parent.parent
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    return repo
