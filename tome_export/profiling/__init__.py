"""Latency profiling of bundles, a results database across devices, reports and tuning.

- :mod:`measure` measures one bundle as it is (latency, memory, ONNX Runtime per-op
  breakdown with the merge ops' share, fidelity vs unmerged);
- :func:`profile_bundle` (:mod:`sweep`) drives it over batch sizes and merge ratios,
  re-exporting the bundle's source model where a variant differs from the bundle;
- :class:`ResultStore` keeps every record in SQLite (WAL; safe for concurrent writers);
- :mod:`report` prints and plots a comparison across devices; :mod:`tune` picks a ratio;
"""

from tome_export.profiling.stats import latency_stats, medians_consistent
from tome_export.profiling.store import ResultStore, default_db_path
from tome_export.profiling.sweep import profile_bundle

__all__ = ["ResultStore", "default_db_path", "latency_stats", "medians_consistent", "profile_bundle"]
