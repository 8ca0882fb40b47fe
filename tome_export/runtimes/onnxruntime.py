"""ONNX Runtime runner (CPU; CUDA when onnxruntime-gpu is installed).

Owns :class:`OnnxRuntimeRunner`: one session per model (plugin-op library registered when
the graph uses the plugin domain, optional profiling, spinning on or off), run on dicts of
numpy arrays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx


def _uses_plugin_domain(model: str | Path | bytes | onnx.ModelProto) -> bool:
    from tome_export.exporter.plugin_lowering import uses_plugin_domain

    if isinstance(model, bytes):
        model = onnx.load_from_string(model)
    elif not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return uses_plugin_domain(model)


class OnnxRuntimeRunner:
    """Loads an ONNX model once and runs it on dicts of numpy arrays."""

    name = "onnxruntime"

    def __init__(
        self,
        model: str | Path | bytes | onnx.ModelProto,
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
        intra_op_threads: int | None = None,
        profile_prefix: str | None = None,
        plugin_ops: bool | None = None,
        spinning: bool = True,
    ) -> None:
        """``plugin_ops``: register the ``tome_export`` custom-op library (the ``plugin``
        lowering's nodes); ``None`` registers it when the graph uses that domain.
        ``spinning=False``: idle worker threads sleep at once — for several sessions taking
        turns on few cores (benchmarks), where spinning threads steal the next run's CPU."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        if plugin_ops is None:
            plugin_ops = _uses_plugin_domain(model)
        if plugin_ops:
            from tome_export.runtimes.ort_custom_ops import custom_ops_library

            options.register_custom_ops_library(custom_ops_library())
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        if isinstance(model, onnx.ModelProto):
            model = model.SerializeToString()
        elif isinstance(model, Path):
            model = str(model)
        available = set(ort.get_available_providers())
        missing = [p for p in providers if p not in available]
        if missing:
            from tome_export.errors import BackendMissing

            raise BackendMissing(f"ONNX Runtime here lacks {', '.join(missing)}; for CUDA install 'tome-export[gpu]'")
        self.session = ort.InferenceSession(model, options, providers=list(providers))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(None, feeds)
        return dict(zip(self.output_names, outputs))

    def end_profiling(self) -> str:
        return self.session.end_profiling()
