"""ONNX Runtime implementation of the plugin nodes (``tome_export.BipartiteMerge``, ``.TomesdMerge``).

An onnxruntime-extensions Python custom op whose compute is the eager reference
(``bipartite.merge_tokens``, ``tomesd.merge_tokens``), so plugin-lowered graphs are verified on CPU here. It is a
correctness implementation, not a fast one: onnxruntime-extensions copies outputs through
Python lists. TensorRT gets the real plugin (targets for TensorRT, not this module).
"""

from __future__ import annotations

import functools

import numpy as np

from tome_export.contract import BIPARTITE_MODES as PLUGIN_MODES
from tome_export.contract import BIPARTITE_OP_TYPE as PLUGIN_OP_TYPE
from tome_export.contract import PLUGIN_DOMAIN, TOMESD_ATTRIBUTES, TOMESD_OP_TYPE
from tome_export.errors import BackendMissing


def bipartite_merge_numpy(
    metric: np.ndarray,
    x: np.ndarray,
    size: np.ndarray,
    r: int,
    protected: int,
    mode: str = "weighted_mean",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The plugin's semantics on numpy arrays: exactly ``bipartite.merge_tokens``."""
    import torch

    from tome_export.merging import bipartite

    if mode not in PLUGIN_MODES:
        raise ValueError(f"{PLUGIN_OP_TYPE}: mode {mode!r} is not one of {PLUGIN_MODES}")
    # One torch thread: ONNX Runtime's own pool is still spinning while this runs, and
    # torch's threads fighting it made a ViT-scale merge ~60× slower on a busy 2-core CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            out_x, out_size, slot = bipartite.merge_tokens(
                torch.from_numpy(np.ascontiguousarray(metric)),
                torch.from_numpy(np.ascontiguousarray(x)),
                torch.from_numpy(np.ascontiguousarray(size)),
                int(r),
                int(protected),
                mode.endswith("_b_first"),
            )
    finally:
        torch.set_num_threads(threads)
    return out_x.numpy(), out_size.numpy(), slot.numpy().astype(np.int64)


def tomesd_merge_numpy(
    metric: np.ndarray, x: np.ndarray, h: int, w: int, sx: int, sy: int, r: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The TomesdMerge node's semantics on numpy arrays: exactly ``tomesd.merge_tokens``."""
    import torch

    from tome_export.merging import tomesd

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see bipartite_merge_numpy
    try:
        with torch.no_grad():
            merged, slot = tomesd.merge_tokens(
                torch.from_numpy(np.ascontiguousarray(metric)),
                torch.from_numpy(np.ascontiguousarray(x)),
                *(int(v) for v in (h, w, sx, sy, r, seed)),
            )
    finally:
        torch.set_num_threads(threads)
    return merged.numpy(), slot.numpy().astype(np.int64)


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
        attrs={
            "r": PyCustomOpDef.dt_int64,
            "protected": PyCustomOpDef.dt_int64,
            "mode": PyCustomOpDef.dt_string,
        },
    )(bipartite_merge_numpy)
    onnx_op(
        op_type=f"{PLUGIN_DOMAIN}::{TOMESD_OP_TYPE}",
        inputs=[PyCustomOpDef.dt_float] * 2,
        outputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64],
        attrs={name: PyCustomOpDef.dt_int64 for name in TOMESD_ATTRIBUTES},
    )(tomesd_merge_numpy)
    return get_library_path()
