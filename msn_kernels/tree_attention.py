"""Tree-masked attention of T draft nodes over a KV cache, for one decoding step.

Layout (see DESIGN.md): for row b the prefix sits at cache positions [0, cache_lens[b]) and the
tree's own keys/values at [cache_lens[b], cache_lens[b] + T). Every node sees the whole prefix;
inside the tree, node i sees node j when tree_mask[i, j].

The Triton kernel is built for the memory-bound decode regime (flash-decoding):
- one program owns one KV head of one row, and packs the T nodes of all GROUP = Hq / Hkv query
  heads of that KV head into the rows of its query tile, so each K/V tile is read once per KV head
  (row r of the tile is query head r // T, node r % T);
- the prefix is split into NUM_SPLITS chunks handled by different programs; each writes a partial
  output and its log-sum-exp, and a second small kernel merges them;
- the tree mask is only applied on the tree x tree block, which the last split handles after its
  share of the prefix; the prefix loop carries no mask beyond the sequence bound.

Triton covers head dims 16, 32, 64 and 128 in fp16, bf16 and fp32 (fp32 accumulation, bf16 is
widened to fp32 under the interpreter, which cannot do bf16 arithmetic). Otherwise CPU tensors
take `tree_attention_sdpa` (one fused PyTorch call); float64, other devices and
MSN_KERNELS=torch take the reference.
"""

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from msn_kernels.dispatch import forced_reference, use_triton

_LOG2E = 1.4426950408889634
TRITON_HEAD_DIMS = (16, 32, 64, 128)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLOAT_DTYPES = (*_TRITON_DTYPES, torch.float64)
_MIN_KEYS_PER_SPLIT = 256


@triton.jit
def _online_softmax_step(acc, m_i, l_i, q, k, v, visible, qk_scale, FP32_DOT: tl.constexpr):
    """Fold one K/V tile into the running (acc, max, sum) of base-2 online softmax.

    "ieee" only matters for fp32 operands (no TF32 rounding); fp16/bf16 dots ignore it.
    """
    if FP32_DOT:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision="ieee")
    s = tl.where(visible, s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    return acc, m_new, l_i


@triton.jit
def _store_rows(row_ptrs, o, row_valid, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Store o [BLOCK_M, HEAD_DIM] at row_ptrs [BLOCK_M, 1] (+ column), one half of D at a time.

    Storing the whole tile at once costs 50-60 registers more a thread (the layout conversion of
    the accumulator for the store), which spills on sm_90 at 128 x 128 tiles; the codegen test
    checks the register margin.
    """
    halves = tl.permute(tl.reshape(o, [BLOCK_M, 2, HEAD_DIM // 2]), [0, 2, 1])
    low, high = tl.split(halves)  # columns [0, D/2) and [D/2, D)
    offs = tl.arange(0, HEAD_DIM // 2)[None, :]
    tl.store(row_ptrs + offs, low, mask=row_valid[:, None])
    tl.store(row_ptrs + HEAD_DIM // 2 + offs, high, mask=row_valid[:, None])


@triton.jit
def _tree_attention_kernel(
    Q, K, V, CacheLens, Mask, Out, PartO, PartLse,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_mb, stride_mt,
    stride_ob, stride_oh, stride_ot,
    qk_scale, T, S, Hkv,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, FP32_DOT: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    m_tile = tl.program_id(1)
    split = tl.program_id(2)
    b = (pid_bh // Hkv).to(tl.int64)
    kvh = pid_bh % Hkv

    rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < GROUP * T
    head = kvh * GROUP + rows // T
    node = rows % T
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)

    q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + node[:, None] * stride_qt
    q = tl.load(q_ptrs + offs_d[None, :], mask=row_valid[:, None], other=0.0)
    if FP32_DOT:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + kvh.to(tl.int64) * stride_kh + offs_d[None, :]
    v_base = V + b * stride_vb + kvh.to(tl.int64) * stride_vh + offs_d[None, :]
    # Clamped so that unchecked bad lengths (check_lens=False) cannot read outside the cache.
    cache_len = tl.minimum(tl.maximum(tl.load(CacheLens + b).to(tl.int32), 0), S - T)

    # A finite start keeps exp2(m_old - m_new) at 1, not NaN, on tiles a row cannot see at all.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # This program's share of the prefix: whole BLOCK_N tiles, the last split takes the rest.
    chunk = tl.cdiv(tl.cdiv(cache_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, cache_len)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        col_valid = cols < end
        k = tl.load(k_base + cols[:, None] * stride_ks, mask=col_valid[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs, mask=col_valid[:, None], other=0.0)
        acc, m_i, l_i = _online_softmax_step(
            acc, m_i, l_i, q, k, v, col_valid[None, :], qk_scale, FP32_DOT
        )

    if split == NUM_SPLITS - 1:
        mask_base = Mask + b * stride_mb + node[:, None] * stride_mt
        for j0 in range(0, T, BLOCK_N):
            j = j0 + offs_n
            j_valid = j < T
            cols = cache_len + j
            k = tl.load(k_base + cols[:, None] * stride_ks, mask=j_valid[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vs, mask=j_valid[:, None], other=0.0)
            allowed = tl.load(
                mask_base + j[None, :], mask=row_valid[:, None] & j_valid[None, :], other=0
            )
            acc, m_i, l_i = _online_softmax_step(
                acc, m_i, l_i, q, k, v, allowed != 0, qk_scale, FP32_DOT
            )

    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        out_ptrs = Out + b * stride_ob + head[:, None] * stride_oh + node[:, None] * stride_ot
        _store_rows(out_ptrs, o.to(Out.dtype.element_ty), row_valid, BLOCK_M, HEAD_DIM)
    else:
        # Partials are contiguous (B, Hq, T, NUM_SPLITS[, D]).
        part_row = ((b * Hkv * GROUP + head) * T + node) * NUM_SPLITS + split
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(PartLse + part_row, lse, mask=row_valid)
        _store_rows(PartO + part_row[:, None] * HEAD_DIM, o, row_valid, BLOCK_M, HEAD_DIM)


@triton.jit
def _merge_splits_kernel(
    PartO, PartLse, Out, n_rows,
    NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Combine per-split outputs by their base-2 log-sum-exp; Out is contiguous (B*Hq*T, D)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_valid = rows < n_rows
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.full([BLOCK_R], -1.0e30, dtype=tl.float32)
    w_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    for s in range(NUM_SPLITS):
        part_row = rows.to(tl.int64) * NUM_SPLITS + s
        lse = tl.load(PartLse + part_row, mask=row_valid, other=float("-inf"))
        o = tl.load(PartO + part_row[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=row_valid[:, None], other=0.0)  # fmt: skip
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        acc = acc * alpha[:, None] + w[:, None] * o
        w_sum = w_sum * alpha + w
        m = m_new
    out = acc / tl.where(w_sum > 0.0, w_sum, 1.0)[:, None]
    out_ptrs = Out + rows.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=row_valid[:, None])


def _visible_keys(tree_mask: torch.Tensor, cache_len: int) -> torch.Tensor:
    """Which of the cache_len + T keys each node sees: the whole prefix, then its tree mask.

    tree_mask [..., T, T] -> [..., T, cache_len + T].
    """
    prefix = tree_mask.new_ones(*tree_mask.shape[:-1], cache_len)
    return torch.cat([prefix, tree_mask], dim=-1)


def tree_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    tree_mask: torch.Tensor,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """PyTorch reference in fp32 (fp64 for fp64), one row at a time.

    Only positions [0, cache_lens[b] + T) are read, so stale or uninitialised cache slots past the
    tree cannot leak in (not even as 0 * NaN). A node with no visible key gets zeros.
    """
    B, Hq, T, D = q.shape
    Hkv = k_cache.shape[1]
    group = Hq // Hkv
    scale = D**-0.5 if sm_scale is None else sm_scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    masks = tree_mask.expand(B, T, T)  # (B, T, T)
    rows = []
    for b, cache_len in enumerate(cache_lens.tolist()):
        n = cache_len + T
        keys = k_cache[b, :, :n].to(compute)  # (Hkv, n, D)
        values = v_cache[b, :, :n].to(compute)  # (Hkv, n, D)
        queries = q[b].to(compute).reshape(Hkv, group * T, D)  # (Hkv, G*T, D)
        scores = (queries @ keys.transpose(-1, -2) * scale).view(Hkv, group, T, n)
        visible = _visible_keys(masks[b].to(q.device), cache_len)  # (T, n)
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        # A node that sees no key at all gets a zero output, as in the Triton kernel (not NaN).
        probs = probs.masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)
        out = probs @ values[:, None]  # (Hkv, G, T, D)
        rows.append(out.reshape(Hq, T, D))
    return torch.stack(rows).to(q.dtype) if rows else q.new_empty(q.shape)


def tree_attention_sdpa(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    tree_mask: torch.Tensor,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """The CPU path: one `scaled_dot_product_attention` call per distinct prefix length.

    The reference spends a dozen small ops per row; in a decode step on CPU those, 30 layers
    deep, cost as much as a GEMM. Here the GQA group's query heads share their KV head through a
    reshape (no K/V copy). Rows of equal length go in one call; ragged rows go one at a time, so
    that, as in the reference, no row reads a cache slot past its own prefix plus tree. Inputs
    must already be validated.
    """
    B, Hq, T, D = q.shape
    lens = cache_lens.tolist()
    masks = tree_mask.expand(B, T, T)  # (B, T, T)
    if B == 0:
        return q.new_empty(q.shape)
    if len(set(lens)) == 1:
        return _sdpa_rows(q, k_cache, v_cache, lens[0], masks, sm_scale)
    rows = []
    for b, cache_len in enumerate(lens):
        one = slice(b, b + 1)
        rows.append(_sdpa_rows(q[one], k_cache[one], v_cache[one], cache_len, masks[one], sm_scale))
    return torch.cat(rows)


def _sdpa_rows(q, k_cache, v_cache, cache_len: int, masks, sm_scale) -> torch.Tensor:
    """Rows that share the prefix length `cache_len`; masks [B, T, T]."""
    B, Hq, T, D = q.shape
    Hkv = k_cache.shape[1]
    group = Hq // Hkv
    n = cache_len + T
    # Row r of a KV head's query block is query head r // T, node r % T (as in the kernel).
    queries = q.reshape(B, Hkv, group * T, D)  # (B, Hkv, G*T, D)
    keys, values = k_cache[:, :, :n], v_cache[:, :, :n]  # (B, Hkv, n, D)
    if bool(masks.all()):  # every node sees every key: no mask (a plain decode step)
        out = F.scaled_dot_product_attention(queries, keys, values, scale=sm_scale)
        return out.view(B, Hq, T, D)
    visible = _visible_keys(masks, cache_len)  # (B, T, n)
    grouped = visible[:, None, None].expand(B, 1, group, T, n).reshape(B, 1, group * T, n)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=grouped, scale=sm_scale)
    if cache_len == 0:  # a node that sees no key at all gets zeros, not NaN
        out = out.masked_fill(~grouped.any(-1, keepdim=True), 0.0)
    return out.view(B, Hq, T, D)


def _validate(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    tree_mask: torch.Tensor,
    check_lens: bool,
) -> int | None:
    """Raise ValueError on bad inputs; return cache_lens.max() when it was read back."""
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor, got shape {getattr(t, 'shape', t)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be fp16, bf16, fp32 or fp64, got {t.dtype}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(
            f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, "
            f"{v_cache.dtype}"
        )
    B, Hq, T, D = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache shapes differ: {tuple(k_cache.shape)} vs {tuple(v_cache.shape)}"
        )
    Bk, Hkv, S, Dk = k_cache.shape
    if Bk != B or Dk != D:
        raise ValueError(
            f"k_cache shape {tuple(k_cache.shape)} does not match q shape {tuple(q.shape)}: "
            "expected [B, Hkv, S, D] with q's B and D"
        )
    if T < 1:
        raise ValueError("q must hold at least one tree node (T >= 1)")
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(
            f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv}) for GQA"
        )
    if not isinstance(cache_lens, torch.Tensor) or cache_lens.shape != (B,):
        raise ValueError(f"cache_lens must be a tensor of shape [{B}], got {cache_lens!r}")
    if cache_lens.dtype.is_floating_point or cache_lens.dtype == torch.bool:
        raise ValueError(f"cache_lens must be an integer tensor, got {cache_lens.dtype}")
    if not isinstance(tree_mask, torch.Tensor) or tree_mask.dtype != torch.bool:
        got = getattr(tree_mask, "dtype", type(tree_mask).__name__)
        raise ValueError(f"tree_mask must be a bool tensor, got {got}")
    if tree_mask.shape not in ((T, T), (B, T, T)):
        raise ValueError(
            f"tree_mask must have shape [{T}, {T}] or [{B}, {T}, {T}], got {tuple(tree_mask.shape)}"
        )
    devices = {t.device for t in (q, k_cache, v_cache, cache_lens, tree_mask)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if T > S:  # a shape check, so it holds even when the lengths are not read back
        raise ValueError(f"cache too short: {T} tree nodes do not fit a cache of length {S}")
    if check_lens and B > 0:
        lo, hi = int(cache_lens.min()), int(cache_lens.max())
        if lo < 0:
            raise ValueError(f"cache_lens must be non-negative, got min {lo}")
        if hi + T > S:
            raise ValueError(
                f"cache too short: cache_lens.max() + T = {hi} + {T} = {hi + T} > cache length {S}"
            )
        return hi
    return None


@functools.cache
def _device_facts(device_index: int | None) -> tuple[int, int]:
    """(SM count, compute capability as 80/90/...) of a CUDA device, read once."""
    props = torch.cuda.get_device_properties(device_index)
    return props.multi_processor_count, 10 * props.major + props.minor


class TileConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    ctas_per_sm: int = 1  # resident programs per SM that registers and shared memory allow


# fp16/bf16 tiles per architecture and head dim, by the packed rows (GROUP x T) they serve:
# the first entry whose bound is >= rows wins (None: any). Each entry is compiled by
# tests/test_kernel_codegen.py for both split modes and both dtypes, which checks: no spills,
# <= 240 registers, shared memory within the card, `ctas_per_sm` programs fit one SM, and the
# tensor-core and exp2 instruction counts equal the tile's minimum (no duplicated QK^T).
# Findings behind the choices (Triton 3.x, cuobjdump of the cubins):
# - sm_90: 64 rows on 8 warps makes both warpgroups compute the whole 64 x N score tile with
#   HGMMA (2x the QK^T work, 2x the exp2); 64 rows take one warpgroup (4 warps), 128 rows two.
#   64 keys per tile at D=128 spill at 4 warps / 64 rows; 32 keys do not.
# - sm_80: 128 x 64 tiles at D=128 spill hundreds of bytes; 64 rows at D=64 on 8 warps duplicate
#   the QK^T HMMAs, and 64 keys per tile sit at 255 registers.
# Tiles under 64 rows run HMMA on both architectures (wgmma needs 64 rows per warpgroup).
_SMALL = ((16, TileConfig(16, 64, 4, 2, 2)), (32, TileConfig(32, 32, 4, 2, 2)))
# D <= 32: 4 warps on 16 or 32 rows would split D = 16 or 32 output columns too thin and
# duplicate the PV/QK^T MMAs (found by the codegen test's full run); 1 or 2 warps do not.
_SMALL_NARROW = ((16, TileConfig(16, 64, 1, 2, 2)), (32, TileConfig(32, 32, 2, 2, 2)))
TILE_TABLE: dict[tuple[int, int], tuple[tuple[int | None, TileConfig], ...]] = {
    (90, 128): (*_SMALL, (64, TileConfig(64, 32, 4, 3, 2)), (None, TileConfig(128, 32, 8, 3, 1))),
    (90, 64): (*_SMALL, (64, TileConfig(64, 64, 4, 3, 2)), (None, TileConfig(128, 64, 8, 3, 1))),
    (80, 128): (*_SMALL, (None, TileConfig(64, 64, 8, 2, 1))),
    (80, 64): (*_SMALL, (64, TileConfig(64, 32, 4, 2, 2)), (None, TileConfig(128, 32, 8, 2, 1))),
}
for _arch in (90, 80):
    TILE_TABLE[(_arch, 32)] = (*_SMALL_NARROW, *TILE_TABLE[(_arch, 64)][2:])

# fp32 runs exact "ieee" dots on FMA units, which spill at larger tiles.
FP32_TILE = TileConfig(block_m=16, block_n=32, num_warps=8, num_stages=2, ctas_per_sm=2)


def table_arch(capability: int) -> int:
    """Hopper (9.x) uses the sm_90 table; every other CUDA card the sm_80 (mma.sync) one."""
    return 90 if capability // 10 == 9 else 80


def tile_config(rows: int, head_dim: int, dtype: torch.dtype, arch: int | None = 90) -> TileConfig:
    """The tile for `rows` packed query rows (GROUP x T) on compute capability `arch`.

    `arch=None` is the interpreter (CPU), which has no registers to spill and runs fastest on
    few, large tiles. Head dims 16 and 32 use the D=32 entries, 64 the D=64 ones.
    """
    if arch is None:
        return TileConfig(min(128, max(16, triton.next_power_of_2(rows))), 64, 4, 1)
    if dtype == torch.float32:
        return FP32_TILE
    table_d = 128 if head_dim > 64 else 64 if head_dim > 32 else 32
    for bound, tiles in TILE_TABLE[(table_arch(arch), table_d)]:
        if bound is None or rows <= bound:
            return tiles
    raise AssertionError("every TILE_TABLE row ends with a catch-all entry")


def num_splits_heuristic(
    programs: int,
    max_len: int,
    rows: int,
    sm_count: int,
    ctas_per_sm: int = 1,
    block_n: int = 64,
    max_splits: int = 64,
) -> int:
    """How many programs share each row's prefix: FlashDecoding's rule on the real lengths.

    `programs` are the (row, KV head, m-tile) programs one split launches; `max_len` bounds the
    prefix lengths (the real ones, not the cache capacity); a wave is `sm_count x ctas_per_sm`
    programs. As in FlashAttention-2's `num_splits_heuristic`: no split when the programs
    already fill 80% of a wave; otherwise the fewest splits whose wave efficiency
    (waves / ceil(waves)) is within 85% of the best, skipping counts that leave the number of
    key tiles per split unchanged. Two caps keep splitting worth it: >= 256 keys per split, and
    the fp32 partials (written and read back, 8 bytes per row, split and dim) no larger than
    the K/V bytes the split reads (4 bytes per key and dim in fp16): splits <= len / (2 rows).
    """
    if min(programs, sm_count, ctas_per_sm) < 1:
        raise ValueError(
            f"programs, sm_count and ctas_per_sm must be >= 1, got {programs}, {sm_count}, "
            f"{ctas_per_sm}"
        )
    slots = sm_count * ctas_per_sm
    if programs >= 0.8 * slots or max_len <= 0:
        return 1
    n_blocks = triton.cdiv(max_len, block_n)
    cap = min(max_splits, slots, n_blocks, max_len // _MIN_KEYS_PER_SPLIT, max_len // (2 * rows))
    if cap <= 1:
        return 1
    efficiency = {}
    for s in range(1, cap + 1):
        if s > 1 and triton.cdiv(n_blocks, s) == triton.cdiv(n_blocks, s - 1):
            continue  # no fewer key tiles per split than with s - 1
        waves = programs * s / slots
        efficiency[s] = waves / math.ceil(waves)
    best = max(efficiency.values())
    return min(s for s, e in efficiency.items() if e >= 0.85 * best)


def tree_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    tree_mask: torch.Tensor,
    sm_scale: float | None = None,
    num_splits: int | None = None,
    max_cache_len: int | None = None,
) -> torch.Tensor:
    """Launch the Triton kernels; inputs must already be validated.

    `max_cache_len` bounds cache_lens on the host (it only sizes the split count); None uses
    the cache capacity S - T.
    """
    B, Hq, T, D = q.shape
    _, Hkv, S, _ = k_cache.shape
    group = Hq // Hkv
    scale = D**-0.5 if sm_scale is None else sm_scale
    q, k_cache, v_cache = (
        t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache)
    )
    mask = tree_mask if tree_mask.stride(-1) == 1 else tree_mask.contiguous()
    mask = mask.view(torch.uint8)  # bool -> bytes, no copy
    stride_mb = mask.stride(0) if mask.dim() == 3 else 0
    out = torch.empty(B, Hq, T, D, dtype=q.dtype, device=q.device)
    if B == 0:
        return out

    rows = group * T
    max_len = S - T if max_cache_len is None else min(max_cache_len, S - T)
    if q.is_cuda:
        sm_count, capability = _device_facts(q.device.index)
        tiles = tile_config(rows, D, q.dtype, capability)
    else:
        tiles = tile_config(rows, D, q.dtype, arch=None)
    m_tiles = triton.cdiv(rows, tiles.block_m)
    if num_splits is None and q.is_cuda:
        num_splits = num_splits_heuristic(
            B * Hkv * m_tiles, max_len, rows, sm_count, tiles.ctas_per_sm, tiles.block_n
        )
    elif num_splits is None:  # the interpreter: a few splits on long prefixes test the merge
        num_splits = max(1, min(4, max_len // (4 * _MIN_KEYS_PER_SPLIT)))
    if num_splits > 1:
        part_o = torch.empty(B, Hq, T, num_splits, D, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(B, Hq, T, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused by the kernel when NUM_SPLITS == 1
    fp32_dot = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and not q.is_cuda)

    _tree_attention_kernel[(B * Hkv, m_tiles, num_splits)](
        q, k_cache, v_cache, cache_lens, mask, out, part_o, part_lse,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        stride_mb, mask.stride(-2),
        out.stride(0), out.stride(1), out.stride(2),
        scale * _LOG2E, T, S, Hkv,
        GROUP=group, HEAD_DIM=D, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        NUM_SPLITS=num_splits, FP32_DOT=fp32_dot,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    if num_splits > 1:
        n_rows = B * Hq * T
        block_r = 32
        _merge_splits_kernel[(triton.cdiv(n_rows, block_r),)](
            part_o, part_lse, out, n_rows,
            NUM_SPLITS=num_splits, HEAD_DIM=D, BLOCK_R=block_r, num_warps=4,
        )  # fmt: skip
    return out


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    tree_mask: torch.Tensor,
    sm_scale: float | None = None,
    *,
    check_lens: bool = True,
    num_splits: int | None = None,
    max_cache_len: int | None = None,
) -> torch.Tensor:
    """Attention of T tree nodes over each row's prefix plus their visible tree nodes.

    q [B, Hq, T, D]; k_cache, v_cache [B, Hkv, S, D]; cache_lens [B]; tree_mask bool [T, T] or
    [B, T, T]. Returns [B, Hq, T, D] in q's dtype. A node that sees no key at all (an empty
    prefix and an all-False mask row) gets a zero output from both the Triton kernel and the
    reference, never NaN. `check_lens=False` skips the bounds check of
    cache_lens, which reads the lengths back to the host (a GPU synchronisation). `num_splits`
    overrides how many programs share each row's prefix; otherwise it follows the real prefix
    lengths: `max_cache_len`, a host-side bound on cache_lens that the caller already knows
    (no synchronisation), or cache_lens.max() when `check_lens` read it anyway, or else the
    cache capacity. The bound only sizes the split count; results do not depend on it.
    """
    read_max = _validate(q, k_cache, v_cache, cache_lens, tree_mask, check_lens)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if max_cache_len is not None and max_cache_len < 0:
        raise ValueError(f"max_cache_len must be >= 0, got {max_cache_len}")
    if max_cache_len is None:
        max_cache_len = read_max
    triton_ok = q.dtype in _TRITON_DTYPES and q.shape[-1] in TRITON_HEAD_DIMS
    if triton_ok and use_triton(_tree_attention_kernel, q.device):
        return tree_attention_triton(
            q, k_cache, v_cache, cache_lens, tree_mask, sm_scale, num_splits, max_cache_len
        )
    if q.device.type == "cpu" and q.dtype != torch.float64 and not forced_reference():
        return tree_attention_sdpa(q, k_cache, v_cache, cache_lens, tree_mask, sm_scale)
    return tree_attention_reference(q, k_cache, v_cache, cache_lens, tree_mask, sm_scale)
