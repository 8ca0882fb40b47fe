"""INT8 ONNX graphs: ONNX Runtime's static (QDQ) and dynamic quantization, merge metric excluded.

- :func:`quantize_onnx` — ``quantize_static`` (QDQ, calibrated on given feeds) or
  ``quantize_dynamic`` (int8 weights, activations quantized per run) on a ``ModelProto``;
  ``trt=True`` makes the QDQ graph TensorRT for RTX accepts: symmetric int8 weights and
  activations, bias left float (TensorRT's parser rejects DequantizeLinear on int32, ONNX
  Runtime's default bias quantization).
- :func:`quantize_qdq` — the path-to-path TensorRT form the trt target calls.
- :func:`fake_quantize_weights` — weights rounded to per-channel symmetric int8 and back,
  what Core ML's ``linear_quantize_weights`` does to them: the ONNX stand-in that verifies a
  weight-quantized Core ML model.

The merge's nodes (``exclude``; default the metric region of ``graph_passes/fp16.py``) are
never quantized, so merge decisions see unquantized scores.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

QUANTIZED_OPS = ("MatMul", "Conv", "Gemm")


def _reader(calibration: Iterable[dict[str, np.ndarray]]):
    from onnxruntime.quantization import CalibrationDataReader

    class Feeds(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(list(calibration))

        def get_next(self):
            return next(self.feeds, None)

    return Feeds()


def quantize_onnx(
    model: onnx.ModelProto,
    mode: str = "static",
    calibration: Iterable[dict[str, np.ndarray]] = (),
    exclude: Iterable[str] | None = None,
    trt: bool = False,
) -> onnx.ModelProto:
    """An int8 copy of ``model``: ``mode`` ``"static"`` (QDQ, calibrated) or ``"dynamic"``.

    ``exclude``: node names never quantized (default: the merge metric's nodes)."""
    if exclude is None:
        from tome_export.graph_passes.fp16 import metric_nodes

        exclude = [model.graph.node[i].name for i in sorted(metric_nodes(model))]
    exclude = list(exclude)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs advice ("consider pre-processing") on the root logger
    try:
        return _quantize(model, mode, calibration, exclude, trt)
    finally:
        root.setLevel(level)


def _quantize(model: onnx.ModelProto, mode: str, calibration, exclude: list[str], trt: bool) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    with tempfile.TemporaryDirectory(prefix="tome-int8-") as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(model, str(source))
        if mode == "dynamic":
            quantize_dynamic(
                str(source),
                str(target),
                weight_type=QuantType.QInt8,
                op_types_to_quantize=list(QUANTIZED_OPS),
                nodes_to_exclude=exclude,
            )
        elif mode == "static":
            options = {"ActivationSymmetric": True, "WeightSymmetric": True}
            if trt:
                options["QuantizeBias"] = False
            quantize_static(
                str(source),
                str(target),
                _reader(calibration),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                per_channel=not trt,
                op_types_to_quantize=list(QUANTIZED_OPS),
                nodes_to_exclude=exclude,
                extra_options=options,
            )
        else:
            raise ValueError(f"unknown int8 mode {mode!r}")
        return onnx.load(str(target))


def quantize_qdq(model_path: str | Path, out_path: str | Path, calibration: Iterable[dict[str, np.ndarray]]) -> dict:
    """Write a TensorRT-ready int8 QDQ copy of ``model_path`` calibrated on ``calibration``; returns a summary."""
    from tome_export.graph_passes.fp16 import metric_nodes

    model = onnx.load(str(model_path))
    excluded = [model.graph.node[i].name for i in sorted(metric_nodes(model))]
    quantized = quantize_onnx(model, "static", calibration, excluded, trt=True)
    onnx.save_model(quantized, str(out_path))
    return {
        "dequantize_nodes": sum(n.op_type == "DequantizeLinear" for n in quantized.graph.node),
        "metric_nodes_excluded": len(excluded),
    }


def fake_quantize_weights(
    model: onnx.ModelProto, exclude: Iterable[str] = (), bits: int = 8
) -> tuple[onnx.ModelProto, int]:
    """(copy with the float weights of MatMul/Gemm/Conv nodes outside ``exclude`` rounded to
    per-output-channel symmetric ``bits``-bit integers and back, number of tensors rounded)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    skip = set(exclude)
    weights = {
        name: (node.op_type, position)
        for node in model.graph.node
        if node.op_type in QUANTIZED_OPS and node.name not in skip
        for position, name in enumerate(node.input[:2])
    }
    levels = 2 ** (bits - 1) - 1
    rounded = 0
    for tensor in model.graph.initializer:
        op_type, position = weights.get(tensor.name, (None, None))
        if op_type is None or tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        array = numpy_helper.to_array(tensor)
        if array.ndim < 2:
            continue
        # output channels: axis 0 of Conv/Gemm weights, the last axis of a MatMul's right operand
        axis = array.ndim - 1 if op_type == "MatMul" and position == 1 else 0
        reduce = tuple(a for a in range(array.ndim) if a != axis)
        scale = np.abs(array).max(axis=reduce, keepdims=True) / levels
        scale[scale == 0] = 1.0
        array = (np.clip(np.round(array / scale), -levels, levels) * scale).astype(np.float32)
        tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
        rounded += 1
    return model, rounded


__all__ = ["QUANTIZED_OPS", "fake_quantize_weights", "quantize_onnx", "quantize_qdq"]
