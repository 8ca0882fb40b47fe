"""ONNX Runtime runner (CPU; CUDA when onnxruntime-gpu is installed).

Owns :class:`OnnxRuntimeRunner`: one session per model (plugin-op library registered when
the graph uses the plugin domain, optional profiling, spinning on or off), run on dicts of
numpy arrays.

Imports only onnxruntime and numpy at use (``onnx`` only when handed an ``onnx.ModelProto``),
so deployed apps run bundles without torch or onnx. A model given as bytes may reference
external data only through ``external_files`` (verified bytes kept in memory): ONNX Runtime
is pointed at a folder that does not exist for any other external reference, so a graph
can't make it read a file nobody checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tome_export.contract import PLUGIN_DOMAIN

NO_EXTERNAL_FOLDER = "/nonexistent/tome-export-external-data-comes-from-memory"


def uses_plugin_domain(model: Any) -> bool:
    """Whether a graph (ModelProto, bytes or path) needs the ``tome_export`` custom ops."""
    if hasattr(model, "opset_import"):  # an onnx.ModelProto
        return any(o.domain == PLUGIN_DOMAIN for o in model.opset_import)
    data = model if isinstance(model, (bytes, bytearray, memoryview)) else Path(model).read_bytes()
    # A cheap over-approximation (the name as bytes): registering the library is harmless.
    return PLUGIN_DOMAIN.encode() in bytes(data)


def restrict_external_data(options, external_files: Mapping[str, bytes] | None) -> list:
    """Serve external data only from ``external_files``; returns the buffers (alive until the
    session is created)."""
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", NO_EXTERNAL_FOLDER)
    buffers = []
    if external_files:
        names = list(external_files)
        buffers = [np.frombuffer(external_files[n], dtype=np.uint8) for n in names]
        options.add_external_initializers_from_files_in_memory(names, buffers, [b.size for b in buffers])
    return buffers


class OnnxRuntimeRunner:
    """Loads an ONNX model once and runs it on dicts of numpy arrays."""

    name = "onnxruntime"

    def __init__(
        self,
        model: Any,
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
        intra_op_threads: int | None = None,
        profile_prefix: str | None = None,
        plugin_ops: bool | None = None,
        spinning: bool = True,
        external_files: Mapping[str, bytes] | None = None,
        options=None,
    ) -> None:
        """``model``: a path, serialized bytes or an ``onnx.ModelProto``.
        ``plugin_ops``: register the ``tome_export`` custom-op library (the ``plugin``
        lowering's nodes); ``None`` registers it when the graph may use that domain.
        ``spinning=False``: idle worker threads sleep at once — for several sessions taking
        turns on few cores (benchmarks), where spinning threads steal the next run's CPU.
        ``external_files``: for bytes, the external-data files by the name the graph uses."""
        import onnxruntime as ort

        from tome_export.errors import BackendMissing

        options = options or ort.SessionOptions()
        if hasattr(model, "SerializeToString"):
            wanted = uses_plugin_domain(model) if plugin_ops is None else plugin_ops
            model = model.SerializeToString()
        else:
            wanted = uses_plugin_domain(model) if plugin_ops is None else plugin_ops
        library_missing = None
        if wanted:
            from tome_export.runtimes.ort_custom_ops import custom_ops_library

            try:
                options.register_custom_ops_library(custom_ops_library())
            except BackendMissing as exc:
                if plugin_ops:
                    raise
                library_missing = exc  # maybe the name only appeared in the graph: try without
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        buffers = None
        if isinstance(model, (bytes, bytearray, memoryview)):
            buffers = restrict_external_data(options, external_files)
            model = bytes(model)
        else:
            model = str(model)
        available = set(ort.get_available_providers())
        missing = [p for p in providers if p not in available]
        if missing:
            raise BackendMissing(f"ONNX Runtime here lacks {', '.join(missing)}; for CUDA install 'tome-export[gpu]'")
        try:
            self.session = ort.InferenceSession(model, options, providers=list(providers))
        except Exception:
            if library_missing is not None:
                raise library_missing from None
            raise
        # ONNX Runtime copies in-memory external data into its own tensors (measured: RSS drops
        # by the weights' size when these buffers go, outputs unchanged): don't hold a second copy.
        del buffers
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(None, feeds)
        return dict(zip(self.output_names, outputs))

    def end_profiling(self) -> str:
        return self.session.end_profiling()
