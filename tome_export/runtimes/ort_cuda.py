"""ONNX Runtime on CUDA with static shapes and CUDA graphs (onnxruntime-gpu).

A merged model's shapes are static, so the whole forward can be captured once as a CUDA
graph and replayed: that removes the per-kernel launch cost that makes merged models slower
than unmerged ones at batch 1. ORT captures only when every node runs on the CUDA EP; if
session creation refuses, this falls back to plain CUDA EP and says so.
NOT verified here: this project's test machines have no GPU and no onnxruntime-gpu.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tome_export.errors import BackendMissing, first_line

CUDA_EP = "CUDAExecutionProvider"
INSTALL_HINT = "pip install 'tome-export[gpu]' (onnxruntime-gpu: CUDA 12/13 and cuDNN 9)"


def require_cuda_provider() -> None:
    """Raise BackendMissing (exit 3) unless ONNX Runtime here has the CUDA execution provider."""
    import onnxruntime as ort

    if CUDA_EP not in ort.get_available_providers():
        raise BackendMissing(
            f"ONNX Runtime here has no {CUDA_EP} (installed: {', '.join(ort.get_available_providers())}); {INSTALL_HINT}"
        )


class CudaGraphRunner:
    """Runs a static-shape ONNX model on CUDA, replaying a captured CUDA graph when possible."""

    name = "onnxruntime-cuda"

    def __init__(
        self, model: Any, cuda_graph: bool = True, tf32: bool = False, device_id: int = 0
    ) -> None:
        import onnxruntime as ort

        require_cuda_provider()
        data = model.SerializeToString() if hasattr(model, "SerializeToString") else model  # ModelProto or bytes
        base = {"device_id": str(device_id), "use_tf32": "1" if tf32 else "0"}
        self.cuda_graph = False
        self.session = None
        if cuda_graph:
            try:
                options = {**base, "enable_cuda_graph": "1"}
                self.session = ort.InferenceSession(data, providers=[(CUDA_EP, options)])
                self.cuda_graph = True
            except Exception as exc:  # some node is not on CUDA: capture is impossible
                self.fallback_reason = first_line(exc)
        if self.session is None:
            self.session = ort.InferenceSession(data, providers=[(CUDA_EP, base), "CPUExecutionProvider"])
        self.device_id = device_id
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._binding = None
        self._inputs: dict = {}

    def _bind(self, feeds: dict[str, np.ndarray]) -> None:
        import onnxruntime as ort

        # CUDA graph replay reads and writes the same device addresses every run.
        binding = self.session.io_binding()
        for name in self.input_names:
            value = ort.OrtValue.ortvalue_from_numpy(feeds[name], "cuda", self.device_id)
            self._inputs[name] = value
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cuda", self.device_id)
        self._binding = binding

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._binding is None:
            self._bind(feeds)
        else:
            for name in self.input_names:
                self._inputs[name].update_inplace(np.ascontiguousarray(feeds[name]))
        self.session.run_with_iobinding(self._binding)
        return dict(zip(self.output_names, self._binding.copy_outputs_to_cpu()))
