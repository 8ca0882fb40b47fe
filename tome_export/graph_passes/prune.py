"""Drop graph outputs and whatever only they needed (the merge-decision outputs, once
verification has read them), with onnx-ir's dead-node removal."""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass


def drop_outputs(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy of ``model`` without the outputs ``names`` and their dead nodes."""
    ir_model = ir.serde.deserialize_model(model)
    outputs = ir_model.graph.outputs
    for value in [v for v in outputs if v.name in names]:
        outputs.remove(value)
    RemoveUnusedNodesPass()(ir_model)
    return ir.serde.serialize_model(ir_model)
