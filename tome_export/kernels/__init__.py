"""GPU kernels for the merge op, written in Triton: :mod:`triton_merge` is the fused ToMe merge
the TensorRT plugin (``targets/trt_plugin.py``) compiles ahead of time. Imported only where a
GPU build needs it; nothing here is imported by ``import tome_export``."""
