"""Core ML at reduced precision: fp16 with the merge metric kept fp32, int8 weight quantization.

- :func:`fp16_keeping_metric` — coremltools' ``FP16ComputePrecision`` pass with an op
  selector that leaves the merge metric in fp32: every op on the way back from a decision
  op (``topk``, ``reduce_argmax``) through the similarity (``reduce_max``, ``matmul`` of
  two activations, transposes/slices, the key normalisation) — the MIL form of what
  ``graph_passes/fp16.py`` keeps in the ONNX graph.
- :func:`quantize_weights` — ``coremltools.optimize.coreml.linear_quantize_weights``
  (symmetric int8, per channel): weights only, so the metric (activations) is untouched;
  the ONNX stand-in is verified with the same rounding (``int8_qdq.fake_quantize_weights``).
"""

from __future__ import annotations

# Ops that turn scores into discrete decisions (the dense lowering ranks with comparisons).
DECISION_OPS = ("topk", "reduce_argmax", "argsort", "greater", "greater_equal", "less", "less_equal", "equal")
# Ops the walk back from a decision may cross: similarity, its max, slicing, key normalisation.
METRIC_OPS = (
    *DECISION_OPS,
    "reduce_max",
    "matmul",
    "transpose",
    "slice_by_index",
    "slice_by_size",
    "real_div",
    "reduce_l2_norm",
    "pow",
    "sqrt",
    "reduce_sum",
    "expand_dims",
)


def metric_op_names(ops) -> set[str]:
    """Names of the MIL ops (of one block's ``operations``) on the merge metric path (see the module doc)."""
    ops = list(ops)
    producer = {out.name: op for op in ops for out in op.outputs}
    kept: set[str] = set()
    stack = [op for op in ops if op.op_type in DECISION_OPS]
    while stack:
        op = stack.pop()
        if op.name in kept or op.op_type not in METRIC_OPS:
            continue
        kept.add(op.name)
        for var in op.inputs.values():
            for v in var if isinstance(var, (list, tuple)) else [var]:
                source = producer.get(getattr(v, "name", None))
                # stop at a weight matmul (a projection): the metric starts at its output
                if source is not None and not (source.op_type == "matmul" and _has_const_input(source)):
                    stack.append(source)
    return kept


def _has_const_input(op) -> bool:
    """A matmul with a constant operand (a weight), not a product of two activations."""
    return any(getattr(op.inputs.get(name), "val", None) is not None for name in ("x", "y"))


def fp16_keeping_metric(ct):
    """``compute_precision`` for ``ct.convert``: fp16 except the merge metric path."""
    kept: dict[int, set[str]] = {}

    def selector(op) -> bool:  # True: this op may run in fp16
        block = op.enclosing_block
        if id(block) not in kept:
            kept[id(block)] = metric_op_names(block.operations)
        return op.name not in kept[id(block)]

    return ct.transform.FP16ComputePrecision(op_selector=selector)


def quantize_weights(mlmodel):
    """int8 symmetric per-channel weights (coremltools.optimize)."""
    from coremltools.optimize import coreml as cto

    config = cto.OptimizationConfig(
        global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
    )
    return cto.linear_quantize_weights(mlmodel, config)


__all__ = ["fp16_keeping_metric", "metric_op_names", "quantize_weights"]
