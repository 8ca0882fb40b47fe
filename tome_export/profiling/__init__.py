"""Latency profiling of bundles, a results database across devices, reports and tuning.

- :func:`profile_bundle` measures a bundle (latency, throughput per batch size, memory,
  ONNX Runtime per-op breakdown with the merge ops' share, fidelity vs unmerged);
- :class:`ResultStore` keeps every record in SQLite (WAL; safe for concurrent writers);
- :mod:`report` prints and plots a comparison across devices; :mod:`tune` picks a ratio.
"""

from tome_export.profiling.measure import profile_bundle
from tome_export.profiling.stats import latency_stats, medians_consistent
from tome_export.profiling.store import ResultStore, default_db_path

__all__ = ["ResultStore", "default_db_path", "latency_stats", "medians_consistent", "profile_bundle"]
