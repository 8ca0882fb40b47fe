"""The hand-kept TensorRT rules (graph_passes/trt_readiness.py, flavour "rtx") against the real
TensorRT for RTX parser + builder on small graphs, so the list cannot drift from TensorRT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from tome_export.graph_passes.trt_readiness import check_trt_readiness
from tome_export.targets import trt_rtx

pytestmark = pytest.mark.skipif(not trt_rtx.rtx_available(), reason='TensorRT for RTX: pip install "tome-export[trt]"')
F = T.FLOAT


def _graph(nodes, inputs, outputs, inits=()):
    model = h.make_model(h.make_graph(nodes, "g", inputs, outputs, list(inits)), opset_imports=[h.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def _vi(name, dtype, shape):
    return h.make_tensor_value_info(name, dtype, shape)


def _const(name, value, dtype=np.int64):
    return nh.from_array(np.array(value, dtype), name)


def cases():
    x, y, i = _vi("x", F, [2, 8]), _vi("y", F, None), _vi("i", T.INT64, None)
    upd = _const("upd", np.ones((2, 8)), np.float32)
    yield "relu", _graph([h.make_node("Relu", ["x"], ["y"])], [x], [y])
    for sort in (0, 1):
        yield f"topk_sorted{sort}", _graph(
            [h.make_node("TopK", ["x", "k"], ["y", "i"], sorted=sort)], [x], [y, i], [_const("k", [3])]
        )
    yield "topk_k_input", _graph([h.make_node("TopK", ["x", "k"], ["y", "i"])], [x, _vi("k", T.INT64, [1])], [y, i])
    yield "topk_k4000", _graph(
        [h.make_node("TopK", ["x", "k"], ["y", "i"])], [_vi("x", F, [1, 8192])], [y, i], [_const("k", [4000])]
    )
    for red in ("none", "add"):
        yield f"scatternd_{red}", _graph(
            [h.make_node("ScatterND", ["x", "idx", "upd"], ["y"], reduction=red)], [x], [y], [_const("idx", [[0], [1]]), upd]
        )
    for red in ("none", "add", "max"):
        yield f"scatterelements_{red}", _graph(
            [h.make_node("ScatterElements", ["x", "idx", "upd"], ["y"], axis=1, reduction=red)],
            [x], [y], [_const("idx", np.zeros((2, 8))), upd],
        )
    for last in (0, 1):
        yield f"argmax_last{last}", _graph(
            [h.make_node("ArgMax", ["x"], ["y"], axis=1, select_last_index=last)], [x], [_vi("y", T.INT64, None)]
        )
    yield "unique", _graph([h.make_node("Unique", ["x"], ["y"], sorted=1)], [x], [y])
    yield "nonzero", _graph([h.make_node("NonZero", ["x"], ["y"])], [x], [_vi("y", T.INT64, None)])
    yield "bernoulli", _graph([h.make_node("Bernoulli", ["x"], ["y"])], [x], [y])
    yield "bitshift", _graph(
        [h.make_node("BitShift", ["a", "b"], ["y"], direction="LEFT")],
        [_vi("a", T.UINT8, [4]), _vi("b", T.UINT8, [4])], [_vi("y", T.UINT8, None)],
    )
    yield "sequence", _graph(
        [h.make_node("SplitToSequence", ["x"], ["s"], axis=0), h.make_node("SequenceAt", ["s", "p"], ["y"])],
        [x, _vi("p", T.INT64, [])], [y],
    )
    yield "string", _graph([h.make_node("StringNormalizer", ["s"], ["y"])], [_vi("s", T.STRING, [2])], [_vi("y", T.STRING, None)])
    yield "uint16_cast", _graph(
        [h.make_node("Cast", ["x"], ["c"], to=T.UINT16), h.make_node("Cast", ["c"], ["y"], to=F)], [x], [y]
    )
    yield "uint8_cast", _graph(
        [h.make_node("Cast", ["x"], ["c"], to=T.UINT8), h.make_node("Cast", ["c"], ["y"], to=F)], [x], [y]
    )
    yield "float64", _graph([h.make_node("Relu", ["d"], ["y"])], [_vi("d", T.DOUBLE, [2])], [_vi("y", T.DOUBLE, None)])
    yield "custom_domain", _graph([h.make_node("Foo", ["x"], ["y"], domain="acme")], [x], [y])
    yield "cumsum", _graph([h.make_node("CumSum", ["x", "ax"], ["y"])], [x], [y], [_const("ax", 1)])
    yield "einsum", _graph([h.make_node("Einsum", ["x", "x"], ["y"], equation="ij,ij->i")], [x], [y])
    yield "dynamic_input", _graph([h.make_node("Relu", ["x"], ["y"])], [_vi("x", F, ["n", 8])], [y])


def _tensorrt_verdict(path, tmp_path) -> bool:
    """Parses and builds: TensorRT for RTX's parser accepts some graphs its builder refuses (K ≥ 3840)."""
    if not trt_rtx.parse_onnx(path).ok:
        return False
    try:
        trt_rtx.build_engine(path, tmp_path / "g.engine")
    except trt_rtx.EngineBuildError:
        return False
    return True


@pytest.mark.parametrize("name,model", list(cases()), ids=[name for name, _ in cases()])
def test_hand_kept_rules_agree_with_tensorrt_for_rtx(name, model, tmp_path):
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    hand = check_trt_readiness(model, "10.8", flavour="rtx").ready
    assert hand == _tensorrt_verdict(path, tmp_path), f"{name}: hand-kept rules say ready={hand}"


def test_the_set_covers_both_verdicts(tmp_path):
    verdicts = {check_trt_readiness(m, "10.8", flavour="rtx").ready for _, m in cases()}
    assert verdicts == {True, False}
