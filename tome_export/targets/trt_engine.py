"""Build a TensorRT engine from ONNX with TensorRT's Python API (TensorRT ≥ 10).

Standalone on purpose: bundles ship a copy as ``build_engine.py`` so the engine can be built
on the device it will run on (always on Jetson: engines are per GPU and TensorRT version).
NOT verified here: this project's machines cannot install TensorRT.

    python build_engine.py model.onnx model.plan --fp16 --workspace-mb 2048 --dla-core 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_engine(
    onnx_path: str,
    plan_path: str,
    fp16: bool = True,
    workspace_mb: int = 2048,
    timing_cache: str | None = None,
    dla_core: int | None = None,
    merge_plugin: bool = False,
    int8: bool = False,
) -> Path:
    """Parse ``onnx_path``, build a serialized engine, write ``plan_path``; returns it."""
    import tensorrt as trt

    if merge_plugin:
        try:
            from tome_export.targets.trt_plugin import register_merge_plugin
        except ImportError:  # inside a bundle
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from tome_merge_plugin import register_merge_plugin
        register_merge_plugin()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if int8:  # a QDQ graph (--precision int8): the Q/DQ nodes carry the scales, no calibrator
        config.set_flag(trt.BuilderFlag.INT8)
    if dla_core is not None:
        if builder.num_DLA_cores <= dla_core:
            raise RuntimeError(f"DLA core {dla_core} requested, this device has {builder.num_DLA_cores}")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers DLA can't run go to the GPU
    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see the log above)")
    Path(plan_path).write_bytes(bytes(serialized))
    if cache_path:
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return Path(plan_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a TensorRT engine from a tome-export ONNX graph")
    parser.add_argument("onnx")
    parser.add_argument("plan")
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--workspace-mb", type=int, default=2048)
    parser.add_argument("--timing-cache", default="timing.cache")
    parser.add_argument("--dla-core", type=int, default=None)
    parser.add_argument("--merge-plugin", action="store_true", help="register tome_export::BipartiteMerge")
    parser.add_argument("--int8", action="store_true", help="the graph is int8 QDQ (--precision int8)")
    args = parser.parse_args(argv)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        print("error: TensorRT's Python package is not installed (on Jetson it comes with JetPack)", file=sys.stderr)
        return 3
    path = build_engine(
        args.onnx, args.plan, args.fp16, args.workspace_mb, args.timing_cache, args.dla_core, args.merge_plugin, args.int8
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
