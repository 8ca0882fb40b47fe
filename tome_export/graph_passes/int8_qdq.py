"""INT8 QDQ graphs that TensorRT for RTX accepts: ONNX Runtime's static quantization, float bias.

TensorRT's parser rejects DequantizeLinear on int32 (ONNX Runtime's default bias
quantization), so bias stays float (``QuantizeBias=False``); weights and activations are
symmetric int8 in QDQ format (what TensorRT fuses). The merge metric's nodes (see
``graph_passes/fp16.py``) are excluded: decisions see unquantized scores.

Enough to show INT8 engines build; calibration quality is the precision work's subject.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx


def quantize_qdq(model_path: str | Path, out_path: str | Path, calibration: Iterable[dict[str, np.ndarray]]) -> dict:
    """Write an int8 QDQ copy of ``model_path`` calibrated on ``calibration`` feeds; returns a summary."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from tome_export.graph_passes.fp16 import metric_nodes

    model = onnx.load(str(model_path))
    excluded = [model.graph.node[i].name for i in sorted(metric_nodes(model))]

    class Feeds(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(list(calibration))

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(
        str(model_path),
        str(out_path),
        Feeds(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Conv", "Gemm"],
        nodes_to_exclude=excluded,
        extra_options={"QuantizeBias": False, "ActivationSymmetric": True, "WeightSymmetric": True},
    )
    quantized = onnx.load(str(out_path), load_external_data=False)
    return {
        "dequantize_nodes": sum(n.op_type == "DequantizeLinear" for n in quantized.graph.node),
        "metric_nodes_excluded": len(excluded),
    }
