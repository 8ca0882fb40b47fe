"""ONNX weights outside the graph: models over protobuf's 2 GB limit, and shared weights.

- :func:`externalize`: stream every initializer of an exported (onnx_ir) model into one
  weights file next to the graph, tensor by tensor, so a model over 2 GB is never one
  protobuf message and no second in-memory copy of the weights is made. The graph proto
  that remains is small and references the file (``location`` relative to the graph).
  Used when a model's initializers exceed ``EXTERNAL_DATA_THRESHOLD`` bytes (a parameter:
  tests force the same path with a small threshold).
- :func:`restream`: a graph whose weights are partly inline, partly in an old weights file
  (a precision pass converted some) written again with all of them in a new file, tensor by
  tensor; :func:`relocate` renames the file a graph references.
- :class:`SharedWeightsFile`: several graphs (TDTM's merged and full variants, or the same block of both) point into one
weights file: a tensor whose bytes are already in the file is referenced at its offset
instead of written again, so identical weights are stored once on disk and graphs stay
small. Offsets are page-aligned so ONNX Runtime may memory-map them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import numpy_helper
from onnx.external_data_helper import set_external_data

ALIGN = 4096
MIN_EXTERNAL_BYTES = 1024
# Initializer bytes above which a graph's weights go to an external file: protobuf refuses
# to serialise messages of 2 GiB and more; the graph itself needs some room too.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def ir_initializer_bytes(model) -> int:
    """Total bytes of an onnx_ir model's initializers (main graph and subgraphs)."""
    total = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def externalize(model, weights_path: Path, min_tensor_bytes: int = MIN_EXTERNAL_BYTES):
    """Write ``model``'s (onnx_ir) initializers of at least ``min_tensor_bytes`` to
    ``weights_path``, one tensor at a time, page-aligned; the model's tensors then reference
    that file (relative location = its name, so the graph must be saved next to it).
    Returns the model."""
    import onnx_ir as ir

    weights_path.parent.mkdir(parents=True, exist_ok=True)
    return ir.external_data.unload_from_model(
        model,
        weights_path.parent,
        weights_path.name,
        size_threshold_bytes=min_tensor_bytes,
        alignment=ALIGN,
        align_threshold=0,
    )


def restream(
    model: onnx.ModelProto, base_dir: Path, weights_path: Path, min_tensor_bytes: int = MIN_EXTERNAL_BYTES
) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers of at least ``min_tensor_bytes`` — inline, or in
    external files under ``base_dir`` — are all in the new file ``weights_path`` (written
    here, page-aligned; one tensor in memory at a time besides the inline ones)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    with open(weights_path, "wb") as out:
        for tensor in copy.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in tensor.external_data}
                with open(Path(base_dir) / info["location"], "rb") as source:
                    source.seek(int(info.get("offset", 0)))
                    data = source.read(int(info["length"])) if "length" in info else source.read()
            else:
                data = tensor_bytes(tensor)
                if len(data) < min_tensor_bytes:
                    continue
            offset = -(-out.tell() // ALIGN) * ALIGN
            out.seek(offset)
            out.write(data)
            for name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
                tensor.ClearField(name)
            del tensor.external_data[:]
            tensor.raw_data = data  # set_external_data expects raw_data, then we drop it
            set_external_data(tensor, location=weights_path.name, offset=offset, length=len(data))
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del data
    return copy


def relocate(model: onnx.ModelProto, old: str, new: str) -> None:
    """Point ``model``'s external tensors stored in file ``old`` at file ``new`` (in place)."""
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def external_files(model: onnx.ModelProto) -> list[str]:
    """The external-data locations a graph proto references (relative paths)."""
    files = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            files.update(e.value for e in tensor.external_data if e.key == "location")
    return sorted(files)


def tensor_bytes(tensor: onnx.TensorProto) -> bytes:
    """The tensor's data as raw little-endian bytes (whatever field holds it)."""
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def initializer_nbytes(tensor: onnx.TensorProto) -> int:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in tensor.external_data}
        return int(info.get("length", 0))
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    return numpy_helper.to_array(tensor).nbytes


@dataclass
class SharedWeightsFile:
    """Appends tensors to ``path``, deduplicated by content; ``stored`` vs ``referenced`` bytes."""

    path: Path
    stored_bytes: int = 0
    referenced_bytes: int = 0

    def __post_init__(self) -> None:
        self._index: dict[str, tuple[int, int]] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(b"")

    def _place(self, data: bytes) -> tuple[int, int]:
        key = hashlib.sha256(data).hexdigest()
        if key not in self._index:
            with open(self.path, "r+b") as handle:
                handle.seek(0, os.SEEK_END)
                offset = -(-handle.tell() // ALIGN) * ALIGN
                handle.seek(offset)
                handle.write(data)
            self._index[key] = (offset, len(data))
            self.stored_bytes += len(data)
        self.referenced_bytes += len(data)
        return self._index[key]

    def save(self, model: onnx.ModelProto, model_path: Path, min_bytes: int = MIN_EXTERNAL_BYTES) -> None:
        """Write ``model`` to ``model_path`` with its large initializers in this file."""
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        location = os.path.relpath(self.path, model_path.parent)
        for tensor in copy.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                raise ValueError(f"initializer {tensor.name} is external already; load the model with its data")
            data = tensor_bytes(tensor)
            if len(data) < min_bytes:
                continue
            offset, length = self._place(data)
            for name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
                tensor.ClearField(name)
            tensor.raw_data = data  # set_external_data expects raw_data, then we drop it
            set_external_data(tensor, location=location, offset=offset, length=length)
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
        model_path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(copy, str(model_path))


def save_sharing_weights(
    models: dict[Path, onnx.ModelProto], weights_path: Path, min_bytes: int = MIN_EXTERNAL_BYTES
) -> dict:
    """Save every model of ``models`` with one shared weights file; returns byte counts."""
    store = SharedWeightsFile(weights_path)
    for path, model in models.items():
        store.save(model, path, min_bytes)
    return {
        "file": weights_path.name,
        "stored_bytes": store.stored_bytes,
        "referenced_bytes": store.referenced_bytes,
        "saved_bytes": store.referenced_bytes - store.stored_bytes,
    }
