"""Compact the keys/values of each row's accepted tree nodes right after that row's prefix.

For row b, node n = accepted_nodes[b, i] (relative to the tree start cache_lens[b], root first,
-1 padded) moves from position cache_lens[b] + n to cache_lens[b] + i, in place, for every layer
and KV head. cache_lens is not changed: the caller advances it by the number of accepted nodes.

Overlap: destination i can be the source of an earlier slot j < i (path [0, 2, 5] reads position
2 for slot 1 and writes position 2 from slot 2). The kernel therefore gives every (layer, row,
KV head) to one program, which loads all its accepted sources, then (after a barrier across its
threads) stores the destinations.
Moves that would leave the cache (bad lengths or indices) are skipped rather than written out of
bounds, so no host-side check of the lengths is needed.
"""

import torch
import triton
import triton.language as tl

from msn_kernels.dispatch import use_triton


@triton.jit
def _compact_kv_kernel(
    K, V, CacheLens, Accepted, Hkv, B, S, M, stride_acc_b,
    stride_kl, stride_kb, stride_kh, stride_ks,
    stride_vl, stride_vb, stride_vh, stride_vs,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)  # over (layer, row, KV head)
    kvh = pid % Hkv
    b = (pid // Hkv) % B
    layer = (pid // (Hkv * B)).to(tl.int64)
    cache_len = tl.load(CacheLens + b).to(tl.int32)
    slots = tl.arange(0, BLOCK_M)
    node = tl.load(Accepted + b.to(tl.int64) * stride_acc_b + slots, mask=slots < M, other=-1)
    node = node.to(tl.int32)
    src = cache_len + node
    dst = cache_len + slots
    # dst >= slots is cache_len >= 0, kept per lane: the interpreter mishandles scalar & vector.
    move = (slots < M) & (node >= 0) & (node != slots) & (dst >= slots) & (src < S) & (dst < S)
    offs_d = tl.arange(0, HEAD_DIM)
    k_base = K + layer * stride_kl + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + layer * stride_vl + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
    k_base += offs_d[None, :]
    v_base += offs_d[None, :]
    k = tl.load(k_base + src[:, None] * stride_ks, mask=move[:, None])
    v = tl.load(v_base + src[:, None] * stride_vs, mask=move[:, None])
    # A thread's store may hit the source row another thread has yet to read: all loads of the
    # program complete before any store.
    tl.debug_barrier()
    tl.store(k_base + dst[:, None] * stride_ks, k, mask=move[:, None])
    tl.store(v_base + dst[:, None] * stride_vs, v, mask=move[:, None])


def compact_kv_reference(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    accepted_nodes: torch.Tensor,
) -> None:
    """PyTorch reference, one row at a time; indexing copies the sources before any write."""
    S = k_cache.shape[-2]
    for b, (start, nodes) in enumerate(
        zip(cache_lens.tolist(), accepted_nodes.tolist(), strict=True)
    ):
        moves = [
            (start + i, start + n)
            for i, n in enumerate(nodes)
            if n >= 0 and n != i and start >= 0 and start + n < S and start + i < S
        ]
        if not moves:
            continue
        dst, src = torch.tensor(moves, device=k_cache.device).T  # (2, moves)
        for cache in (k_cache, v_cache):
            cache[..., b, :, dst, :] = cache[..., b, :, src, :]


def _validate(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    accepted_nodes: torch.Tensor,
) -> None:
    if not isinstance(k_cache, torch.Tensor) or k_cache.dim() not in (4, 5):
        raise ValueError(
            f"k_cache must be [B, Hkv, S, D] or [L, B, Hkv, S, D], got "
            f"{getattr(k_cache, 'shape', k_cache)}"
        )
    if not isinstance(v_cache, torch.Tensor) or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache shape {getattr(v_cache, 'shape', v_cache)} differs from k_cache shape "
            f"{tuple(k_cache.shape)}"
        )
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"k_cache and v_cache dtypes differ: {k_cache.dtype} vs {v_cache.dtype}")
    B = k_cache.shape[-4]
    if not isinstance(accepted_nodes, torch.Tensor) or accepted_nodes.dim() != 2:
        raise ValueError(f"accepted_nodes must be a [B, M] tensor, got {accepted_nodes!r}")
    if accepted_nodes.shape[0] != B:
        raise ValueError(f"accepted_nodes has {accepted_nodes.shape[0]} rows, the cache {B}")
    if not isinstance(cache_lens, torch.Tensor) or cache_lens.shape != (B,):
        raise ValueError(f"cache_lens must be a tensor of shape [{B}], got {cache_lens!r}")
    for name, t in (("cache_lens", cache_lens), ("accepted_nodes", accepted_nodes)):
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    devices = {t.device for t in (k_cache, v_cache, cache_lens, accepted_nodes)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def compact_kv_num_warps(block_m: int, head_dim: int) -> int:
    """Enough warps that each thread holds at most 64 key and value elements (no spills)."""
    per_thread_at_4_warps = 2 * block_m * head_dim // (4 * 32)
    return min(16, max(4, 4 * triton.next_power_of_2(-(-per_thread_at_4_warps // 64))))


def compact_kv_triton(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    accepted_nodes: torch.Tensor,
) -> None:
    """One launch over (layer, row, KV head); inputs must already be validated."""
    k5 = k_cache if k_cache.dim() == 5 else k_cache[None]  # (L, B, Hkv, S, D)
    v5 = v_cache if v_cache.dim() == 5 else v_cache[None]  # (L, B, Hkv, S, D)
    L, B, Hkv, S, D = k5.shape
    M = accepted_nodes.shape[1]
    if L * B * Hkv * M == 0:
        return
    accepted_nodes = (
        accepted_nodes if accepted_nodes.stride(-1) == 1 else accepted_nodes.contiguous()
    )
    block_m = max(16, triton.next_power_of_2(M))
    _compact_kv_kernel[(L * B * Hkv,)](
        k5, v5, cache_lens, accepted_nodes, Hkv, B, S, M, accepted_nodes.stride(0),
        k5.stride(0), k5.stride(1), k5.stride(2), k5.stride(3),
        v5.stride(0), v5.stride(1), v5.stride(2), v5.stride(3),
        HEAD_DIM=D, BLOCK_M=block_m, num_warps=compact_kv_num_warps(block_m, D),
    )  # fmt: skip


def compact_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    accepted_nodes: torch.Tensor,
) -> None:
    """Move accepted nodes' K/V to cache_lens[b] + i, in place, for all layers at once.

    Caches are [B, Hkv, S, D] or [L, B, Hkv, S, D]; accepted_nodes [B, M] holds node indices
    relative to cache_lens[b], root first, -1 padded (as `greedy_verify` returns them).
    """
    _validate(k_cache, v_cache, cache_lens, accepted_nodes)
    D = k_cache.shape[-1]
    contiguous_d = k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    triton_ok = contiguous_d and D >= 1 and D & (D - 1) == 0
    if triton_ok and use_triton(_compact_kv_kernel, k_cache.device):
        compact_kv_triton(k_cache, v_cache, cache_lens, accepted_nodes)
    else:
        compact_kv_reference(k_cache, v_cache, cache_lens, accepted_nodes)
