"""The ToMe merge (match + size-weighted merge + slots) as ONE Triton kernel.

One program per batch element walks four phases separated by block barriers, so the
whole merge is a single launch — what a TensorRT ahead-of-time plugin needs (it embeds
exactly one compiled kernel) and what cuts launches against the ~10 unfused PyTorch ops.
The outputs double as scratch between phases (node_max in ``size_out``, ranks in
``x_out``, best-match index in ``slot``), so the kernel needs no workspace.

Semantics are ``bipartite.merge_tokens``: cosine similarity of the metric, each A token's
best B token (first on ties), the ``r`` strongest edges merge (stable order: lower index
first on ties), unmerged A tokens keep ascending order, B tokens follow.

Calling convention (TensorRT AOT plugins): input pointers, int32 scalars, output pointers.
Runs under ``TRITON_INTERPRET=1`` on CPU tensors (that is how CI tests it) and on CUDA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import triton
import triton.language as tl

if TYPE_CHECKING:  # torch only for the launcher: the bundled kernel needs Triton alone
    import torch

BLOCK_TOKENS = 32
BLOCK_DIM = 32


@triton.jit
def bipartite_merge_kernel(
    metric_ptr,
    x_ptr,
    size_ptr,
    num_tokens,
    dim,
    channels,
    r,
    protected,
    x_out_ptr,
    size_out_ptr,
    slot_ptr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    batch = tl.program_id(0).to(tl.int64)
    p = protected
    num_a = (num_tokens - p + 1) // 2
    num_b = (num_tokens - p) // 2
    kept = num_a - r
    num_out = num_tokens - r
    metric = metric_ptr + batch * num_tokens * dim
    x = x_ptr + batch * num_tokens * channels
    size = size_ptr + batch * num_tokens
    x_out = x_out_ptr + batch * num_out * channels
    size_out = size_out_ptr + batch * num_out
    slot = slot_ptr + batch * num_tokens
    rows = tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)

    # Phase 1: each A token's best B token by cosine similarity → node_max, node_idx.
    for a0 in range(0, num_a, BLOCK_T):
        ia = a0 + rows
        a_tok = p + 2 * ia
        a_ok = ia < num_a
        best = tl.full([BLOCK_T], float("-inf"), tl.float32)
        best_idx = tl.zeros([BLOCK_T], tl.int64)
        a_sq = tl.zeros([BLOCK_T], tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            d_ok = d0 + cols < dim
            va = tl.load(
                metric + a_tok[:, None] * dim + d0 + cols[None, :], mask=a_ok[:, None] & d_ok[None, :], other=0.0
            )
            a_sq += tl.sum(va * va, axis=1)
        for b0 in range(0, num_b, BLOCK_T):
            ib = b0 + rows
            b_tok = p + 2 * ib + 1
            b_ok = ib < num_b
            dots = tl.zeros([BLOCK_T, BLOCK_T], tl.float32)
            b_sq = tl.zeros([BLOCK_T], tl.float32)
            for d0 in range(0, dim, BLOCK_D):
                d_ok = d0 + cols < dim
                va = tl.load(
                    metric + a_tok[:, None] * dim + d0 + cols[None, :], mask=a_ok[:, None] & d_ok[None, :], other=0.0
                )
                vb = tl.load(
                    metric + b_tok[:, None] * dim + d0 + cols[None, :], mask=b_ok[:, None] & d_ok[None, :], other=0.0
                )
                b_sq += tl.sum(vb * vb, axis=1)
                # IEEE fp32: TF32 would flip near-tie decisions against the reference.
                dots += tl.dot(va, tl.trans(vb), input_precision="ieee")
            scores = dots / (tl.sqrt(a_sq)[:, None] * tl.sqrt(b_sq)[None, :])
            scores = tl.where(a_ok[:, None] & b_ok[None, :], scores, float("-inf"))
            block_max = tl.max(scores, axis=1)
            block_arg = tl.argmax(scores, axis=1).to(tl.int64) + b0
            better = block_max > best  # strict: the first maximum wins, like torch.max
            best_idx = tl.where(better, block_arg, best_idx)
            best = tl.where(better, block_max, best)
        tl.store(size_out + ia, best, mask=a_ok)
        tl.store(slot + a_tok, best_idx, mask=a_ok)
    tl.debug_barrier()

    # Phase 2: rank of every A edge in a stable descending sort, by counting.
    for a0 in range(0, num_a, BLOCK_T):
        ia = a0 + rows
        a_ok = ia < num_a
        vi = tl.load(size_out + ia, mask=a_ok, other=0.0)
        rank = tl.zeros([BLOCK_T], tl.int32)
        for j0 in range(0, num_a, BLOCK_T):
            ij = j0 + rows
            vj = tl.load(size_out + ij, mask=ij < num_a, other=float("-inf"))
            beats = (vj[None, :] > vi[:, None]) | ((vj[None, :] == vi[:, None]) & (ij[None, :] < ia[:, None]))
            beats = beats & (ij[None, :] < num_a)
            rank += tl.sum(beats.to(tl.int32), axis=1)
        tl.store(x_out + ia, rank.to(tl.float32), mask=a_ok)
    tl.debug_barrier()

    # Phase 3: slots. Kept A tokens go to p + (#kept before them); merged ones to their B slot.
    for a0 in range(0, num_a, BLOCK_T):
        ia = a0 + rows
        a_tok = p + 2 * ia
        a_ok = ia < num_a
        is_src = tl.load(x_out + ia, mask=a_ok, other=0.0) < r
        kept_before = tl.zeros([BLOCK_T], tl.int32)
        for j0 in range(0, a0 + BLOCK_T, BLOCK_T):
            ij = j0 + rows
            kept_j = (tl.load(x_out + ij, mask=ij < num_a, other=0.0) >= r) & (ij < num_a)
            before = kept_j[None, :] & (ij[None, :] < ia[:, None])
            kept_before += tl.sum(before.to(tl.int32), axis=1)
        node_idx = tl.load(slot + a_tok, mask=a_ok, other=0)
        value = tl.where(is_src, p + kept + node_idx, (p + kept_before).to(tl.int64))
        tl.store(slot + a_tok, value, mask=a_ok)
    for b0 in range(0, num_b, BLOCK_T):
        ib = b0 + rows
        tl.store(slot + p + 2 * ib + 1, (p + kept + ib).to(tl.int64), mask=ib < num_b)
    for t0 in range(0, p, BLOCK_T):
        it = t0 + rows
        tl.store(slot + it, it.to(tl.int64), mask=it < p)
    tl.debug_barrier()

    # Phase 4: place protected and kept tokens, start B sums with their own value·size,
    # add merged A tokens (atomics: several may share a B token), then divide.
    for t0 in range(0, num_tokens, BLOCK_T):
        it = t0 + rows
        t_ok = it < num_tokens
        target = tl.load(slot + it, mask=t_ok, other=0)
        is_b = ((it - p) % 2 == 1) & (it >= p)
        placed = t_ok & (target < p + kept)  # protected and kept A tokens: a copy
        starts_b = t_ok & is_b
        s = tl.load(size + it, mask=t_ok, other=0.0)
        tl.store(size_out + target, s, mask=placed | starts_b)
        for c0 in range(0, channels, BLOCK_D):
            c_ok = c0 + cols < channels
            v = tl.load(x + it[:, None] * channels + c0 + cols[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0)
            v = tl.where(starts_b[:, None], v * s[:, None], v)
            tl.store(
                x_out + target[:, None] * channels + c0 + cols[None, :],
                v,
                mask=(placed | starts_b)[:, None] & c_ok[None, :],
            )
    tl.debug_barrier()
    for t0 in range(0, num_tokens, BLOCK_T):
        it = t0 + rows
        t_ok = it < num_tokens
        target = tl.load(slot + it, mask=t_ok, other=0)
        is_a = ((it - p) % 2 == 0) & (it >= p)
        merged = t_ok & is_a & (target >= p + kept)
        s = tl.load(size + it, mask=t_ok, other=0.0)
        tl.atomic_add(size_out + target, s, mask=merged)
        for c0 in range(0, channels, BLOCK_D):
            c_ok = c0 + cols < channels
            v = tl.load(x + it[:, None] * channels + c0 + cols[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0)
            tl.atomic_add(
                x_out + target[:, None] * channels + c0 + cols[None, :],
                v * s[:, None],
                mask=merged[:, None] & c_ok[None, :],
            )
    tl.debug_barrier()
    for o0 in range(p + kept, num_out, BLOCK_T):
        io = o0 + rows
        o_ok = io < num_out
        s = tl.load(size_out + io, mask=o_ok, other=1.0)
        for c0 in range(0, channels, BLOCK_D):
            c_ok = c0 + cols < channels
            ptrs = x_out + io[:, None] * channels + c0 + cols[None, :]
            mask = o_ok[:, None] & c_ok[None, :]
            tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) / s[:, None], mask=mask)


def merge_tokens_triton(
    metric: torch.Tensor, x: torch.Tensor, size: torch.Tensor, r: int, protected: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the fused kernel: same contract as ``bipartite.merge_tokens`` (fp32)."""
    import torch

    batch, num_tokens, channels = x.shape
    dim = metric.shape[-1]
    metric, x, size = (t.contiguous().float() for t in (metric, x, size))
    x_out = torch.empty(batch, num_tokens - r, channels, device=x.device, dtype=torch.float32)
    size_out = torch.empty(batch, num_tokens - r, 1, device=x.device, dtype=torch.float32)
    slot = torch.empty(batch, num_tokens, device=x.device, dtype=torch.int64)
    bipartite_merge_kernel[(batch,)](
        metric,
        x,
        size,
        num_tokens,
        dim,
        channels,
        r,
        protected,
        x_out,
        size_out,
        slot,
        BLOCK_T=BLOCK_TOKENS,
        BLOCK_D=BLOCK_DIM,
    )
    return x_out, size_out, slot
