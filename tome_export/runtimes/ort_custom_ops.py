"""ONNX Runtime implementation of the plugin nodes (``tome_export.BipartiteMerge``, ``.TomesdMerge``).

An onnxruntime-extensions Python custom op whose compute is the eager reference's numpy
twin (``runtimes/merge_numpy.py``: ``bipartite.merge_tokens``, ``tomesd.merge_tokens``
step for step), so plugin-lowered graphs are verified on CPU here and run without torch.
It is a correctness implementation, not a fast one: onnxruntime-extensions copies outputs
through Python lists. TensorRT gets the real plugin (targets for TensorRT, not this module).
"""

from __future__ import annotations

import functools

import numpy as np

from tome_export.contract import BIPARTITE_MODES as PLUGIN_MODES
from tome_export.contract import BIPARTITE_OP_TYPE as PLUGIN_OP_TYPE
from tome_export.contract import PLUGIN_DOMAIN, TOMESD_ATTRIBUTES, TOMESD_OP_TYPE
from tome_export.errors import BackendMissing
from tome_export.runtimes.merge_numpy import bipartite_merge, tomesd_merge


def bipartite_merge_numpy(
    metric: np.ndarray, x: np.ndarray, size: np.ndarray, r: int, protected: int, mode: str = "weighted_mean"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The BipartiteMerge node: exactly ``bipartite.merge_tokens``, in numpy."""
    if mode not in PLUGIN_MODES:
        raise ValueError(f"{PLUGIN_OP_TYPE}: mode {mode!r} is not one of {PLUGIN_MODES}")
    return bipartite_merge(metric, x, size, r, protected)


def tomesd_merge_numpy(
    metric: np.ndarray, x: np.ndarray, h: int, w: int, sx: int, sy: int, r: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The TomesdMerge node: exactly ``tomesd.merge_tokens``, in numpy."""
    return tomesd_merge(metric, x, h, w, sx, sy, r, seed)


@functools.cache
def custom_ops_library() -> str:
    """Registers the Python op once and returns the extensions library path for
    ``SessionOptions.register_custom_ops_library``."""
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    except ImportError:
        raise BackendMissing(
            f"running {PLUGIN_DOMAIN}.{PLUGIN_OP_TYPE} nodes on ONNX Runtime needs onnxruntime-extensions: "
            "pip install 'tome-export[plugin]'"
        ) from None

    # "domain::op_type" puts the op in our domain instead of ai.onnx.contrib.
    onnx_op(
        op_type=f"{PLUGIN_DOMAIN}::{PLUGIN_OP_TYPE}",
        inputs=[PyCustomOpDef.dt_float] * 3,
        outputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64],
        attrs={"r": PyCustomOpDef.dt_int64, "protected": PyCustomOpDef.dt_int64, "mode": PyCustomOpDef.dt_string},
    )(bipartite_merge_numpy)
    onnx_op(
        op_type=f"{PLUGIN_DOMAIN}::{TOMESD_OP_TYPE}",
        inputs=[PyCustomOpDef.dt_float] * 2,
        outputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64],
        attrs={name: PyCustomOpDef.dt_int64 for name in TOMESD_ATTRIBUTES},
    )(tomesd_merge_numpy)
    return get_library_path()
