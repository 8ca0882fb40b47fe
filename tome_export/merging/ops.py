"""The merge as one ``torch.library`` custom op.

torch.export sees a single node with a static output shape (its fake kernel), and the
exporter gives it an ONNX translation per lowering (see ``exporter/lowerings.py``).
Eagerly it runs the reference implementation in ``bipartite.py``.
"""

from __future__ import annotations

import torch

from tome_export.merging import bipartite, pinning

OP_NAMESPACE = "tome_export"


@torch.library.custom_op(f"{OP_NAMESPACE}::bipartite_merge", mutates_args=())
def bipartite_merge(
    metric: torch.Tensor, x: torch.Tensor, size: torch.Tensor, r: int, protected: int, b_first: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe merge of ``x``/``size`` by similarity of ``metric``; returns (x, size, slot).

    ``b_first``: the body after the ``protected`` prefix alternates B, A (the official
    ToMe split of a class-token model, see ``bipartite.split_for``)."""
    forced = pinning.active()
    if forced is not None:
        # Decision-pinned verification: merge as the backend decided (see pinning.py).
        decision = forced.next(metric, r, protected, b_first)
        merged_x, merged_size = bipartite.merge_weighted(decision, x, size)
        return merged_x, merged_size, bipartite.slots(decision)
    return bipartite.merge_tokens(metric, x, size, r, protected, b_first)


@bipartite_merge.register_fake
def _bipartite_merge_fake(metric, x, size, r, protected, b_first=False):
    batch, num_tokens, channels = x.shape
    out = num_tokens - r
    return (
        x.new_empty(batch, out, channels),
        size.new_empty(batch, out, 1),
        x.new_empty(batch, num_tokens, dtype=torch.int64),
    )


def merge_op_overloads() -> list:
    """Every custom op of the ``tome_export`` namespace that appears in exported graphs.

    Methods that add ops register them under the same namespace; a lowering must
    translate each one it meets."""
    namespace = getattr(torch.ops, OP_NAMESPACE)
    packets = [getattr(namespace, name) for name in dir(namespace) if not name.startswith("_")]
    return [packet.default for packet in packets if hasattr(packet, "default")]
