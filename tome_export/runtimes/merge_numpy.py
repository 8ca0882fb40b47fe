"""The plugin nodes' semantics in numpy: what ONNX Runtime runs for ``tome_export.*`` nodes.

``bipartite_merge`` is ``merging.bipartite.merge_tokens`` and ``tomesd_merge`` is
``merging.tomesd.merge_tokens``, step for step (stable descending sort = TopK's tie-break,
first index on equal maxima, additions in index order), so a plugin-lowered bundle runs
where only onnxruntime(-extensions) and numpy are installed. tests/test_adversarial_runtime.py
checks both against the torch reference.
"""

from __future__ import annotations

import functools
import random

import numpy as np


def _norm(values: np.ndarray) -> np.ndarray:
    return np.sqrt(np.sum(values * values, axis=-1, keepdims=True, dtype=values.dtype))


def _best(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max, first index of the max) along the last axis; zeros when it is empty (then r = 0)."""
    if scores.shape[-1] == 0:
        return np.zeros(scores.shape[:-1], scores.dtype), np.zeros(scores.shape[:-1], np.int64)
    node_idx = scores.argmax(axis=-1)
    return np.take_along_axis(scores, node_idx[..., None], axis=-1)[..., 0], node_idx


def _ranked(node_max: np.ndarray, node_idx: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unm_idx ascending, src_idx by descending score, dst_idx), as the torch reference."""
    edge_idx = np.argsort(-node_max, axis=-1, kind="stable")
    src_idx = edge_idx[:, :r]
    unm_idx = np.sort(edge_idx[:, r:], axis=-1)
    dst_idx = np.take_along_axis(node_idx, src_idx, axis=-1)
    return unm_idx, src_idx, dst_idx


def bipartite_merge(
    metric: np.ndarray, x: np.ndarray, size: np.ndarray, r: int, protected: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x_out (B, N-r, C), size_out (B, N-r, 1), slot (B, N) int64) — ToMe bipartite soft matching."""
    batch, num_tokens, _ = metric.shape
    p, r = int(protected), int(r)
    if not 0 <= p <= num_tokens or not 0 <= r <= max(0, (num_tokens - p) // 2):
        raise ValueError(f"r={r}, protected={p} out of range for {num_tokens} tokens")
    body = metric[:, p:]
    body = body / _norm(body)
    a, b = body[:, 0::2], body[:, 1::2]
    scores = a @ np.swapaxes(b, -1, -2)
    node_max, node_idx = _best(scores)
    unm_idx, src_idx, dst_idx = _ranked(node_max, node_idx, r)

    channels = x.shape[-1]
    z = np.concatenate([x[:, p:] * size[:, p:], size[:, p:]], axis=-1)
    za, zb = z[:, 0::2], z[:, 1::2].copy()
    for i in range(batch):
        np.add.at(zb[i], dst_idx[i], za[i, src_idx[i]])
    merged = np.concatenate([np.take_along_axis(za, unm_idx[..., None], axis=1), zb], axis=1)
    merged_size = merged[..., channels:]
    merged_x = merged[..., :channels] / merged_size

    kept, num_a, num_b = unm_idx.shape[1], a.shape[1], b.shape[1]
    slot_a = np.empty((batch, num_a), dtype=np.int64)
    np.put_along_axis(slot_a, unm_idx, p + np.arange(kept)[None].repeat(batch, 0), axis=1)
    np.put_along_axis(slot_a, src_idx, p + kept + dst_idx, axis=1)
    body_slot = np.empty((batch, num_tokens - p), dtype=np.int64)
    body_slot[:, 0::2] = slot_a
    body_slot[:, 1::2] = p + kept + np.arange(num_b)
    slot = np.concatenate([np.broadcast_to(np.arange(p), (batch, p)), body_slot], axis=1)
    out_x = np.concatenate([x[:, :p], merged_x], axis=1).astype(x.dtype, copy=False)
    out_size = np.concatenate([size[:, :p], merged_size], axis=1).astype(size.dtype, copy=False)
    return out_x, out_size, slot


@functools.lru_cache(maxsize=64)
def partition(h: int, w: int, sx: int, sy: int, seed: int = -1) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(sources, destinations) of the tomesd grid: ``merging.tomesd.partition``, without torch."""
    rng = random.Random(seed) if seed >= 0 else None
    destinations = set()
    for cy in range(h // sy):
        for cx in range(w // sx):
            offset = rng.randrange(sx * sy) if rng else 0
            destinations.add((cy * sy + offset // sx) * w + cx * sx + offset % sx)
    sources = tuple(t for t in range(h * w) if t not in destinations)
    return sources, tuple(sorted(destinations))


def tomesd_merge(
    metric: np.ndarray, x: np.ndarray, h: int, w: int, sx: int, sy: int, r: int, seed: int = -1
) -> tuple[np.ndarray, np.ndarray]:
    """(merged (B, N-r, C), slot (B, N) int64) — tomesd's 2-D strided merge."""
    batch, num_tokens, channels = x.shape
    h, w, sx, sy, r, seed = (int(v) for v in (h, w, sx, sy, r, seed))
    if h * w != num_tokens or sx < 1 or sy < 1:
        raise ValueError(f"a {h}x{w} grid (strides {sx}, {sy}) does not hold {num_tokens} tokens")
    sources, destinations = partition(h, w, sx, sy, seed)
    if not 0 <= r <= len(sources):
        raise ValueError(f"r={r} out of range for {len(sources)} source tokens")
    a_idx, b_idx = np.asarray(sources, dtype=np.int64), np.asarray(destinations, dtype=np.int64)
    metric_a, metric_b = metric[:, a_idx], metric[:, b_idx]
    scores = metric_a @ np.swapaxes(metric_b / _norm(metric_b), -1, -2)
    row_max, node_idx = _best(scores)
    node_max = row_max / _norm(metric_a)[..., 0]
    unm_idx, src_idx, dst_idx = _ranked(node_max, node_idx, r)

    num_a, num_b = a_idx.size, b_idx.size
    kept = num_a - r
    xa, sums = x[:, a_idx], x[:, b_idx].copy()
    counts = np.ones((batch, num_b, 1), dtype=x.dtype)
    for i in range(batch):
        np.add.at(sums[i], dst_idx[i], xa[i, src_idx[i]])
        np.add.at(counts[i], dst_idx[i], np.ones((r, 1), dtype=x.dtype))
    merged = np.concatenate([np.take_along_axis(xa, unm_idx[..., None], axis=1), sums / counts], axis=1)
    slot_a = np.empty((batch, num_a), dtype=np.int64)
    np.put_along_axis(slot_a, unm_idx, np.arange(kept)[None].repeat(batch, 0), axis=1)
    np.put_along_axis(slot_a, src_idx, kept + dst_idx, axis=1)
    slot = np.empty((batch, num_tokens), dtype=np.int64)
    slot[:, a_idx] = slot_a
    slot[:, b_idx] = kept + np.arange(num_b)
    return merged.astype(x.dtype, copy=False), slot
