"""Run a model split into blocks (``graph_passes.split``) within a memory budget on ONNX Runtime.

This module owns the run loop: blocks run in order; while block i computes, block i+1 is
loaded on a background thread (when the budget has room for both); ``run()`` records
per-block load / wait / compute times and peak resident memory (process RSS sampled on a
thread, next to the RSS before any block was loaded). Which blocks stay resident and how a
block is loaded and verified is ``block_cache``; RSS and giving memory back is ``memory``.
Needs only onnxruntime and numpy.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tome_export.errors import UserError
from tome_export.runtimes.block_cache import BlockCache, BlockFileError, BlockSpec, block_session_options
from tome_export.runtimes.memory import RssSampler

__all__ = ["BlockFileError", "BlockSpec", "BlockTiming", "DynamicRunner", "RunStats", "block_session_options"]


@dataclass
class BlockTiming:
    index: int
    load_s: float = 0.0  # time spent loading (on the loader thread when prefetched)
    wait_s: float = 0.0  # time the run waited for the block to be ready
    compute_s: float = 0.0
    loaded: bool = False  # False: it was resident already


@dataclass
class RunStats:
    total_s: float
    blocks: list[BlockTiming]
    peak_rss_bytes: int
    baseline_rss_bytes: int
    peak_resident_block_bytes: int
    budget_bytes: int

    @property
    def peak_rss_over_baseline(self) -> int:
        return self.peak_rss_bytes - self.baseline_rss_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "peak_rss_over_baseline": self.peak_rss_over_baseline}


class DynamicRunner:
    """``DynamicRunner.from_manifest(bundle_dir, manifest).run(feeds) -> {output: array}``."""

    def __init__(
        self,
        root: str | Path,
        blocks: list[BlockSpec],
        outputs: list[str],
        budget_bytes: int,
        prefetch: bool = True,
        verify_files: bool = True,
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
        intra_op_threads: int | None = None,
        drop_page_cache: bool = True,
    ) -> None:
        """``verify_files=False`` skips hashing on load (benchmarks of bundles you made only)."""
        self.root = Path(root)
        self.blocks = blocks
        self.outputs = list(outputs)
        self.budget_bytes = int(budget_bytes)
        self.prefetch = prefetch
        too_big = [(i, b) for i, b in enumerate(blocks) if b.cost > self.budget_bytes]
        if too_big:
            i, b = too_big[0]
            raise UserError(
                f"block {i} ({b.artifact}) needs {b.cost / 1e6:.1f} MB (weights and activations), more than the "
                f"{self.budget_bytes / 1e6:.1f} MB budget; raise the budget or split again"
            )
        self.cache = BlockCache(
            self.root, blocks, self.budget_bytes, providers, intra_op_threads, drop_page_cache, verify_files
        )
        self._pending: dict[int, Future] = {}  # prefetches, possibly of the next run's first block
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="block-loader")
        # Values still needed after block i (graph outputs kept to the end).
        self._keep_after = []
        for i in range(len(blocks)):
            later = {n for b in blocks[i + 1 :] for n in b.inputs}
            self._keep_after.append(later | set(self.outputs))
        self.last_stats: RunStats | None = None
        self._baseline_rss = RssSampler.now()

    @classmethod
    def from_manifest(
        cls, bundle_dir: str | Path, manifest: dict, variant: str | None = None, **options
    ) -> DynamicRunner:
        """The runner for a bundle's ``dynamic_loading`` section (or that of ``variants[variant]``)."""
        variants = manifest.get("variants") or {}
        holder = manifest if variant is None else variants.get(variant, {})
        section = holder.get("dynamic_loading") if isinstance(holder, dict) else None
        if not section:
            where = "the manifest" if variant is None else f"variant {variant!r}"
            raise UserError(f"{where} of {bundle_dir} has no dynamic_loading section; export with --dynamic-loading")
        try:
            options.setdefault("budget_bytes", section["budget_bytes"])
            blocks = [BlockSpec.from_entry(e) for e in section["blocks"]]
            outputs = list(section["outputs"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BlockFileError(
                f"{bundle_dir}: malformed dynamic_loading section ({type(exc).__name__}: {exc}); re-export"
            ) from None
        return cls(bundle_dir, blocks, outputs, **options)

    @property
    def _sessions(self) -> dict:
        return self.cache.sessions

    def unload_all(self) -> None:
        self.cache.unload_all()

    # -- running ----------------------------------------------------------------------
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        timings = [BlockTiming(i) for i in range(len(self.blocks))]
        env = dict(feeds)
        peak_resident = 0
        cache, pending = self.cache, self._pending
        count = len(self.blocks)
        start = time.perf_counter()
        with RssSampler() as rss:
            try:
                for i, spec in enumerate(self.blocks):
                    wait_start = time.perf_counter()
                    if i in pending:
                        cache.sessions[i], timings[i].load_s = pending.pop(i).result()
                        timings[i].loaded = True
                    elif i not in cache.sessions:
                        cache.make_room(spec.cost, keep=set())
                        cache.sessions[i], timings[i].load_s = cache.load(i)
                        timings[i].loaded = True
                    timings[i].wait_s = time.perf_counter() - wait_start
                    cache.touch(i)
                    # Next block, cyclically: after the last block, the next run's first one
                    # (denoising calls the model again) loads while this run finishes.
                    nxt = (i + 1) % count
                    if self.prefetch and count > 1 and nxt not in cache.sessions:
                        if cache.make_room(self.blocks[nxt].cost, keep={i}):
                            pending[nxt] = self._pool.submit(cache.load, nxt)
                            # Count it as resident from now: its memory is being allocated.
                            cache.sessions[nxt] = None
                            cache.touch(nxt)
                    peak_resident = max(peak_resident, cache.resident_bytes())
                    compute_start = time.perf_counter()
                    # No local reference to the session: unloading must really free it.
                    names = list(spec.outputs)
                    values = cache.sessions[i].session.run(names, {n: env[n] for n in spec.inputs})
                    timings[i].compute_s = time.perf_counter() - compute_start
                    env.update(zip(names, values))
                    for name in [n for n in env if n not in self._keep_after[i]]:
                        del env[name]
            except BaseException:
                self._drop_pending()  # don't leave a half-loaded block counted as resident
                raise
        self.last_stats = RunStats(
            time.perf_counter() - start, timings, rss.peak, self._baseline_rss, peak_resident, self.budget_bytes
        )
        return {name: env[name] for name in self.outputs}

    def _drop_pending(self) -> None:
        for index, future in list(self._pending.items()):
            future.cancel()
            try:
                future.result()
            except Exception:  # the load's own error; the run's error is the one to report
                pass
            self._pending.pop(index)
            self.cache.forget(index)

    def close(self) -> None:
        self._drop_pending()
        self.cache.unload_all()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> DynamicRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
