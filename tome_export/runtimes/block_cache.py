"""The block cache of the dynamic-loading runner: which blocks are resident, loading them verified.

A block is one ONNX graph plus its weights file (``graph_passes.split``). Loading reads
both files from inside the bundle folder (no symlinks), hashes exactly those bytes against
the manifest and builds the ONNX Runtime session from them — on every load, so a file
changed between runs (mtime restored or not) is caught. Resident blocks count their
weights and peak activations against the budget; when room is needed the most recently
used block goes first (with blocks run in a cycle, it is the one needed again last).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import time
from dataclasses import dataclass
from pathlib import Path

from tome_export.bundle.integrity import open_inside
from tome_export.bundle.manifest import BundleError, check_relative_path
from tome_export.errors import first_line
from tome_export.runtimes.memory import drop_from_page_cache, release_freed_memory


class BlockFileError(BundleError):
    """A block file is missing, escapes the bundle or differs from the manifest."""


@dataclass(frozen=True)
class BlockSpec:
    artifact: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    bytes: int  # weights
    files: dict  # relative path → sha256 (graph and weights)
    activation_bytes: int = 0  # peak live intermediates, from the split pass
    weights: str | None = None  # the weights file (a key of ``files``)

    @property
    def cost(self) -> int:
        """What the block counts against the budget while resident."""
        return self.bytes + self.activation_bytes

    @classmethod
    def from_entry(cls, entry: dict) -> BlockSpec:
        files = dict(entry["sha256"])
        for name in files:
            check_relative_path(name, "dynamic_loading block")
        for key in ("artifact", "weights"):
            if entry.get(key) is not None and entry[key] not in files:
                raise BlockFileError(f"block {key} {entry[key]!r} is hashed nowhere in its sha256 table; re-export")
        return cls(
            entry["artifact"],
            tuple(entry["inputs"]),
            tuple(entry["outputs"]),
            int(entry["bytes"]),
            files,
            int(entry.get("activation_bytes", 0)),
            entry.get("weights"),
        )


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


def read_block_file(root: Path, relative: str, expected_sha256: str, verify: bool = True) -> bytes:
    """A block file's bytes from inside ``root``, checked against its sha256 (the bytes then used)."""
    try:
        fd = open_inside(root, relative)
    except BundleError as exc:
        text = str(exc)
        if " is missing" in text:
            raise BlockFileError(f"block file {relative} is missing from {root}; re-export the bundle") from None
        raise BlockFileError(text) from None
    with os.fdopen(fd, "rb") as handle:
        data = handle.read()
    if verify and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise BlockFileError(
            f"block file {relative} in {root} was modified (sha256 differs from the manifest); re-export the bundle"
        )
    return data


class BlockCache:
    """Resident block sessions under a byte budget; ``load`` builds one from verified bytes."""

    def __init__(
        self,
        root: Path,
        blocks: list[BlockSpec],
        budget_bytes: int,
        providers: tuple[str, ...],
        intra_op_threads: int | None,
        drop_page_cache: bool,
        verify_files: bool = True,
    ) -> None:
        self.root, self.blocks, self.budget_bytes = root, blocks, budget_bytes
        self.providers, self.intra_op_threads = providers, intra_op_threads
        # After unloading, ask the kernel to drop the block's file pages too: on a device the
        # page cache competes for the same memory, so the next load really reads storage.
        self.drop_page_cache = drop_page_cache
        self.verify_files = verify_files
        self.sessions: dict[int, object] = {}  # None: being loaded (counted as resident already)
        self.recent: list[int] = []  # resident blocks, least recently used first

    def load(self, index: int) -> tuple[object, float]:
        """(session, seconds) for block ``index``: read, hash and open its files."""
        from tome_export.runtimes.onnxruntime import OnnxRuntimeRunner

        start = time.perf_counter()
        spec = self.blocks[index]
        data = {
            name: read_block_file(self.root, name, digest, self.verify_files) for name, digest in spec.files.items()
        }
        folder = posixpath.dirname(spec.artifact)
        external = {posixpath.relpath(n, folder or "."): b for n, b in data.items() if n != spec.artifact}
        try:
            runner = OnnxRuntimeRunner(
                data[spec.artifact],
                providers=self.providers,
                options=block_session_options(self.intra_op_threads),
                external_files=external,
                plugin_ops=False,
            )
        except Exception as exc:
            raise BlockFileError(f"cannot load block file {spec.artifact}: {first_line(exc)}") from None
        return runner, time.perf_counter() - start

    def resident_bytes(self) -> int:
        return sum(self.blocks[i].cost for i in self.sessions)

    def make_room(self, needed: int, keep: set[int]) -> bool:
        """Unload blocks (most recently used first, never those in ``keep``) until ``needed`` fits."""
        while self.resident_bytes() + needed > self.budget_bytes:
            victims = [i for i in reversed(self.recent) if i not in keep]
            if not victims:
                return False
            self.unload(victims[0])
        return True

    def unload(self, index: int) -> None:
        session = self.sessions.pop(index, None)
        if index in self.recent:
            self.recent.remove(index)
        if session is not None:
            del session
            release_freed_memory()
            if self.drop_page_cache:
                for relative in self.blocks[index].files:
                    drop_from_page_cache(self.root / relative)

    def touch(self, index: int) -> None:
        if index in self.recent:
            self.recent.remove(index)
        self.recent.append(index)

    def forget(self, index: int) -> None:
        """Drop a block counted as resident whose load did not finish."""
        self.sessions.pop(index, None)
        if index in self.recent:
            self.recent.remove(index)

    def unload_all(self) -> None:
        for index in list(self.sessions):
            self.unload(index)
