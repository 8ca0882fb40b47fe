"""TensorRT merge plugin: a quickly deployable plugin (``tensorrt.plugin``) with an AOT kernel.

``tome_export::BipartiteMerge`` — the node the ``plugin`` lowering emits (domain
``tome_export``, op_type ``BipartiteMerge``). ``@trtp.register`` gives output shapes and
types; ``@trtp.aot_impl`` compiles the fused Triton kernel to PTX at build time so the
engine carries it and runs from C++ / trtexec without Python.

Importing this module needs only Triton; ``register_merge_plugin()`` needs TensorRT ≥ 10.8.
Copied next to ``build_engine.py`` into bundles (the fallback import below), so a Jetson can
build without tome-export installed. The registration is NOT verified here (no TensorRT);
``compile_merge_kernel`` is (PTX for sm_80/87/90 on a CPU machine).
"""

# No ``from __future__ import annotations``: tensorrt.plugin reads the annotations of the
# decorated functions at runtime (number of outputs, attribute types), as in NVIDIA's samples.
from typing import List, Tuple  # noqa: UP035  (typing forms as the tensorrt.plugin docs use)

try:
    from tome_export.kernels.triton_merge import BLOCK_DIM, BLOCK_TOKENS, bipartite_merge_kernel
except ImportError:  # inside a bundle: triton_merge.py sits beside this file
    from triton_merge import BLOCK_DIM, BLOCK_TOKENS, bipartite_merge_kernel

PLUGIN_NAMESPACE = "tome_export"
PLUGIN_NAME = "BipartiteMerge"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
# Calling convention for AOT plugins: input pointers, int32 scalars, output pointers.
KERNEL_SIGNATURE = {
    "metric_ptr": "*fp32",
    "x_ptr": "*fp32",
    "size_ptr": "*fp32",
    "num_tokens": "i32",
    "dim": "i32",
    "channels": "i32",
    "r": "i32",
    "protected": "i32",
    "x_out_ptr": "*fp32",
    "size_out_ptr": "*fp32",
    "slot_ptr": "*i64",
    "BLOCK_T": "constexpr",
    "BLOCK_D": "constexpr",
}


def compile_merge_kernel(capability: tuple[int, int] | None = None):
    """Compile the fused merge kernel; ``capability`` (8, 7) targets a GPU not present here."""
    import triton

    source = triton.compiler.ASTSource(
        fn=bipartite_merge_kernel,
        signature=KERNEL_SIGNATURE,
        constexprs={"BLOCK_T": BLOCK_TOKENS, "BLOCK_D": BLOCK_DIM},
    )
    if capability is None:
        return triton.compile(source)
    from triton.backends.compiler import GPUTarget

    return triton.compile(source, target=GPUTarget("cuda", capability[0] * 10 + capability[1], 32))


_REGISTERED = False


def register_merge_plugin() -> None:
    """Register shape/type, format and AOT implementation with TensorRT (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import tensorrt as trt
    import tensorrt.plugin as trtp

    @trtp.register(PLUGIN_ID)
    def merge_desc(
        metric: trtp.TensorDesc, x: trtp.TensorDesc, size: trtp.TensorDesc, r: int, protected: int, mode: str
    ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:  # noqa: UP006
        x_out = x.like()
        x_out.shape_expr[1] = x.shape_expr[1] - r
        size_out = size.like()
        size_out.shape_expr[1] = size.shape_expr[1] - r
        slot = trtp.from_shape_expr((x.shape_expr[0], x.shape_expr[1]), dtype=trt.int64)
        return x_out, size_out, slot

    @trtp.autotune(PLUGIN_ID)
    def merge_autotune(metric, x, size, outputs) -> List[trtp.AutoTuneCombination]:  # noqa: UP006
        # fp32 in and out: merge decisions are discrete, fp16 scores flip near-ties.
        return [trtp.AutoTuneCombination("FP32, FP32, FP32, FP32, FP32, INT64")]

    @trtp.aot_impl(PLUGIN_ID)
    def merge_aot(metric, x, size, r: int, protected: int, mode: str, outputs, tactic: int):
        if mode != "weighted_mean":
            raise ValueError(f"{PLUGIN_ID}: mode {mode!r} unsupported (weighted_mean only)")
        kernel = compile_merge_kernel()
        shape_x, shape_m = x.shape_expr, metric.shape_expr
        scalars = trtp.SymIntExprs.from_tuple(
            [trtp.SymInt32(e) for e in (shape_x[1], shape_m[2], shape_x[2], r, protected)]
        )
        launch = trtp.KernelLaunchParams()
        launch.grid_x = shape_x[0]  # one program per batch element
        launch.block_x = kernel.metadata.num_warps * 32
        launch.shared_mem = kernel.metadata.shared
        return kernel.metadata.name.encode(), kernel.asm["ptx"].encode(), launch, scalars

    _REGISTERED = True
