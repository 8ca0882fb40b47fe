"""Run a model split into blocks (``graph_passes.split``) within a memory budget on ONNX Runtime.

Blocks run in order. While block i computes, block i+1 is loaded on a background thread
(when the budget has room for both); blocks stay resident while the budget allows and are
unloaded otherwise, most recently used first — with blocks run in a cycle, that is the one
needed again last. Each block file's sha256 (from the manifest) is checked when it is
loaded. ``run()`` records per-block load / wait / compute times and peak resident memory
(process RSS, sampled on a thread, next to the RSS before any block was loaded).
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tome_export.bundle import sha256_file
from tome_export.errors import UserError, first_line


class BlockFileError(UserError):
    """A block file is missing or differs from the manifest."""


@dataclass(frozen=True)
class BlockSpec:
    artifact: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    bytes: int  # weights
    files: dict  # relative path → sha256 (graph and weights)
    activation_bytes: int = 0  # peak live intermediates, from the split pass

    @property
    def cost(self) -> int:
        """What the block counts against the budget while resident."""
        return self.bytes + self.activation_bytes

    @classmethod
    def from_entry(cls, entry: dict) -> BlockSpec:
        return cls(
            entry["artifact"],
            tuple(entry["inputs"]),
            tuple(entry["outputs"]),
            int(entry["bytes"]),
            entry["sha256"],
            int(entry.get("activation_bytes", 0)),
        )


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


class _RssSampler:
    """Samples this process's RSS every ``interval`` s; ``peak`` is the largest seen."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self._process = psutil.Process()
        self.interval = interval
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def now(self) -> int:
        return self._process.memory_info().rss

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def _read_through(path: Path) -> None:
    """Read a file to bring it into the page cache (cheap on CPU: no hashing)."""
    buffer = bytearray(1 << 22)
    with open(path, "rb", buffering=0) as handle:
        while handle.readinto(buffer):
            pass


def _drop_from_page_cache(path: Path) -> None:
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _release_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise; RSS would not drop)."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def block_session_options(intra_op_threads: int | None = None):
    """Session options for blocks — also what an unsplit run must use to match them bit for bit.

    Resident memory should be the block's weights: no second, prepacked copy of them and no
    arena that keeps activation memory after a block is unloaded.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.enable_cpu_mem_arena = False
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    return options


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
        self.root = Path(root)
        # After unloading, ask the kernel to drop the block's file pages too: on a device the
        # page cache competes for the same memory, so the next load really reads storage.
        self.drop_page_cache = drop_page_cache
        self.blocks = blocks
        self.outputs = list(outputs)
        self.budget_bytes = int(budget_bytes)
        self.prefetch = prefetch
        self.verify_files = verify_files
        self.providers = providers
        self.intra_op_threads = intra_op_threads
        too_big = [(i, b) for i, b in enumerate(blocks) if b.cost > self.budget_bytes]
        if too_big:
            i, b = too_big[0]
            raise UserError(
                f"block {i} ({b.artifact}) needs {b.cost / 1e6:.1f} MB (weights and activations), more than the "
                f"{self.budget_bytes / 1e6:.1f} MB budget; raise the budget or split again"
            )
        self._sessions: dict[int, object] = {}
        self._verified: dict[str, tuple[int, int]] = {}  # relative path → (size, mtime) last hashed
        self._pending: dict[int, Future] = {}  # prefetches, possibly of the next run's first block
        self._recent: list[int] = []  # resident blocks, least recently used first
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="block-loader")
        # Values still needed after block i (graph outputs kept to the end).
        self._keep_after = []
        for i in range(len(blocks)):
            later = {n for b in blocks[i + 1 :] for n in b.inputs}
            self._keep_after.append(later | set(self.outputs))
        self.last_stats: RunStats | None = None
        self._baseline_rss = _RssSampler().now()

    @classmethod
    def from_manifest(
        cls, bundle_dir: str | Path, manifest: dict, variant: str | None = None, **options
    ) -> DynamicRunner:
        """The runner for a bundle's ``dynamic_loading`` section (or that of ``variants[variant]``)."""
        holder = manifest if variant is None else manifest.get("variants", {}).get(variant, {})
        section = holder.get("dynamic_loading")
        if not section:
            where = "the manifest" if variant is None else f"variant {variant!r}"
            raise UserError(f"{where} of {bundle_dir} has no dynamic_loading section; export with --dynamic-loading")
        options.setdefault("budget_bytes", section["budget_bytes"])
        blocks = [BlockSpec.from_entry(e) for e in section["blocks"]]
        return cls(bundle_dir, blocks, section["outputs"], **options)

    # -- loading ----------------------------------------------------------------------
    def _check_files(self, spec: BlockSpec) -> None:
        """Each file exists and matches its sha256; re-hashed whenever its size or mtime changed."""
        for relative, expected in spec.files.items():
            path = self.root / relative
            try:
                stat = path.stat()
            except OSError:
                raise BlockFileError(
                    f"block file {relative} is missing from {self.root}; re-export the bundle"
                ) from None
            if not self.verify_files or self._verified.get(relative) == (stat.st_size, stat.st_mtime_ns):
                _read_through(path)  # IO only: the session's memory-mapped weights then fault in cheaply
                continue
            if sha256_file(path) != expected:
                raise BlockFileError(
                    f"block file {relative} in {self.root} was modified (sha256 differs from the manifest); "
                    "re-export the bundle"
                )
            self._verified[relative] = (stat.st_size, stat.st_mtime_ns)

    def _load(self, index: int) -> tuple[object, float]:
        import onnxruntime as ort

        start = time.perf_counter()
        spec = self.blocks[index]
        self._check_files(spec)
        options = block_session_options(self.intra_op_threads)
        try:
            session = ort.InferenceSession(str(self.root / spec.artifact), options, providers=list(self.providers))
        except Exception as exc:
            raise BlockFileError(f"cannot load block file {spec.artifact}: {first_line(exc)}") from None
        return session, time.perf_counter() - start

    def _resident_bytes(self) -> int:
        return sum(self.blocks[i].cost for i in self._sessions)

    def _make_room(self, needed: int, keep: set[int]) -> bool:
        """Unload blocks (most recently used first, never those in ``keep``) until ``needed`` fits."""
        while self._resident_bytes() + needed > self.budget_bytes:
            victims = [i for i in reversed(self._recent) if i not in keep]
            if not victims:
                return False
            self._unload(victims[0])
        return True

    def _unload(self, index: int) -> None:
        session = self._sessions.pop(index, None)
        if index in self._recent:
            self._recent.remove(index)
        if session is not None:
            del session
            _release_freed_memory()
            if self.drop_page_cache:
                for relative in self.blocks[index].files:
                    _drop_from_page_cache(self.root / relative)

    def _touch(self, index: int) -> None:
        if index in self._recent:
            self._recent.remove(index)
        self._recent.append(index)

    def unload_all(self) -> None:
        for index in list(self._sessions):
            self._unload(index)

    # -- running ----------------------------------------------------------------------
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        timings = [BlockTiming(i) for i in range(len(self.blocks))]
        env = dict(feeds)
        peak_resident = 0
        pending = self._pending
        count = len(self.blocks)
        start = time.perf_counter()
        with _RssSampler() as rss:
            try:
                for i, spec in enumerate(self.blocks):
                    wait_start = time.perf_counter()
                    if i in pending:
                        self._sessions[i], timings[i].load_s = pending.pop(i).result()
                        timings[i].loaded = True
                    elif i not in self._sessions:
                        self._make_room(spec.cost, keep=set())
                        self._sessions[i], timings[i].load_s = self._load(i)
                        timings[i].loaded = True
                    timings[i].wait_s = time.perf_counter() - wait_start
                    self._touch(i)
                    # Next block, cyclically: after the last block, the next run's first one
                    # (denoising calls the model again) loads while this run finishes.
                    nxt = (i + 1) % count
                    if self.prefetch and count > 1 and nxt not in self._sessions:
                        if self._make_room(self.blocks[nxt].cost, keep={i}):
                            pending[nxt] = self._pool.submit(self._load, nxt)
                            # Count it as resident from now: its memory is being allocated.
                            self._sessions[nxt] = None
                            self._touch(nxt)
                    peak_resident = max(peak_resident, self._resident_bytes())
                    compute_start = time.perf_counter()
                    # No local reference to the session: unloading must really free it.
                    names = list(spec.outputs)
                    values = self._sessions[i].run(names, {n: env[n] for n in spec.inputs})
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
            self._sessions.pop(index, None)
            if index in self._recent:
                self._recent.remove(index)

    def close(self) -> None:
        self._drop_pending()
        self.unload_all()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> DynamicRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
