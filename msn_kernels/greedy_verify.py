"""Greedy verification of a token tree: the longest path whose tokens equal the model's argmax.

Node i (i > 0) is accepted when its parent is accepted and tree_tokens[b, i] equals the argmax of
the logits at its parent; the root is always accepted; a negative token ("dead" slot) never
matches. The chosen node is the deepest accepted one, ties going to the smallest node index.

The Triton path takes two launches and no host synchronisation:
1. `_argmax_partial_kernel` reads the logits once: each program keeps the max and first index of
   one vocabulary chunk of BLOCK_R (row, node) pairs (on a GPU one pair and enough chunks to fill
   the machine; under the interpreter many pairs per program, which costs less there);
2. `_verify_walk_kernel`, one program per batch row, merges the chunks into each node's argmax,
   then resolves "all ancestors matched" by pointer jumping (log2 T rounds of gathers through a
   small per-row scratch buffer) and walks the chosen path up to the root. Trees of up to
   MAX_TRITON_NODES = 256 nodes; larger ones are a ValueError on the Triton path.

Ties in the argmax go to the smallest token id, as in `torch.argmax`. The kernels compare in fp32,
so float64 logits use the PyTorch reference; NaN logits are outside the contract.
"""

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from msn_kernels.dispatch import use_triton

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BLOCK_V = 1024
MAX_TRITON_NODES = 256  # the walk kernel's limit, checked for spills by the codegen test
_INT32_MAX = tl.constexpr(2**31 - 1)  # padding index, above any token id


def verify_uses_triton(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `greedy_verify` on logits of this dtype and device runs the Triton kernels
    (and so takes at most MAX_TRITON_NODES nodes), rather than the PyTorch reference."""
    return dtype in _TRITON_DTYPES and use_triton(_argmax_partial_kernel, device)


class VerifyResult(NamedTuple):
    """Outcome of one verification step, all int64 tensors on the logits' device."""

    accept_len: torch.Tensor  # [B] accepted draft nodes on the chosen path, root not counted
    accepted_nodes: torch.Tensor  # [B, max_depth + 1] node indices root first, -1 padded
    next_token: torch.Tensor  # [B] argmax at the last accepted node (the bonus token)


@triton.jit
def _argmax_partial_kernel(
    Logits, PartVal, PartIdx, stride_lb, stride_lt, n_rows, T, V, chunk,
    NUM_CHUNKS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Max and first index of one vocabulary chunk for BLOCK_R (row, node) pairs."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # flat b * T + t
    row_valid = rows < n_rows
    c = tl.program_id(1)
    base = Logits + (rows // T).to(tl.int64) * stride_lb + (rows % T).to(tl.int64) * stride_lt
    start = c * chunk
    end = tl.minimum(start + chunk, V)
    offs = start + tl.arange(0, BLOCK_V)
    mask = row_valid[:, None] & (offs < end)[None, :]
    # Seeding from the first tile makes an all -inf chunk report its first index, like argmax.
    best = tl.load(base[:, None] + offs[None, :], mask=mask, other=float("-inf")).to(tl.float32)
    best_idx = tl.broadcast_to(offs[None, :], [BLOCK_R, BLOCK_V])
    for v0 in range(start + BLOCK_V, end, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = row_valid[:, None] & (offs < end)[None, :]
        x = tl.load(base[:, None] + offs[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        better = x > best  # strict: each lane keeps its first maximum
        best = tl.where(better, x, best)
        best_idx = tl.where(better, offs[None, :], best_idx)
    top = tl.max(best, 1)
    top_idx = tl.min(tl.where(best == top[:, None], best_idx, _INT32_MAX), 1)
    tl.store(PartVal + rows * NUM_CHUNKS + c, top, mask=row_valid)
    tl.store(PartIdx + rows * NUM_CHUNKS + c, top_idx, mask=row_valid)


@triton.jit
def _verify_walk_kernel(
    PartVal, PartIdx, Tokens, Parents, Depths, Scratch, AcceptLen, AcceptedNodes, NextToken,
    stride_tok_b, stride_acc_b, T, path_len,
    NUM_CHUNKS: tl.constexpr, CHUNKS_PAD: tl.constexpr, T_PAD: tl.constexpr,
    LOG_T: tl.constexpr, PATH_PAD: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    nodes = tl.arange(0, T_PAD)
    node_valid = nodes < T

    # Each node's argmax: the best chunk, ties to the smallest token id.
    chunks = tl.arange(0, CHUNKS_PAD)
    part = (b * T + nodes)[:, None] * NUM_CHUNKS + chunks[None, :]
    part_mask = node_valid[:, None] & (chunks < NUM_CHUNKS)[None, :]
    vals = tl.load(PartVal + part, mask=part_mask, other=float("-inf"))
    idxs = tl.load(PartIdx + part, mask=part_mask, other=_INT32_MAX)
    top = tl.max(vals, 1)
    amax = tl.min(tl.where(vals == top[:, None], idxs, _INT32_MAX), 1)  # (T_PAD,)

    parent = tl.load(Parents + nodes, mask=node_valid, other=0)
    depth = tl.load(Depths + nodes, mask=node_valid, other=-1)
    token = tl.load(Tokens + b.to(tl.int64) * stride_tok_b + nodes, mask=node_valid, other=-1)
    # Gathers x[idx] of register vectors go through this row's scratch (3 x T_PAD int32, L1
    # resident): store, barrier, gathered load. (One-hot reductions over a (T_PAD, T_PAD) tile
    # did the same in registers and spilled 4.4 KB at T_PAD = 256.)
    amax_buf = Scratch + b.to(tl.int64) * (3 * T_PAD) + nodes
    ok_buf = amax_buf + T_PAD
    anc_buf = ok_buf + T_PAD
    tl.store(amax_buf, amax)
    tl.debug_barrier()
    amax_at_parent = tl.load(amax_buf - nodes + parent)
    ok = ((token == amax_at_parent) & (token >= 0)) | (nodes == 0)
    ok = (ok & node_valid).to(tl.int32)
    # Pointer jumping: after round r, ok[i] covers the 2^r nearest ancestors of i.
    anc = tl.where(nodes == 0, 0, parent)
    for _ in tl.static_range(LOG_T):
        tl.store(ok_buf, ok)
        tl.store(anc_buf, anc)
        tl.debug_barrier()
        ok = ok * tl.load(ok_buf - nodes + anc)
        anc_next = tl.load(anc_buf - nodes + anc)
        tl.debug_barrier()  # every gather is done before the next round overwrites
        anc = anc_next

    score = tl.where(ok != 0, depth, -1)
    accept_len = tl.max(score, 0)
    chosen = tl.min(tl.where(score == accept_len, nodes, T_PAD), 0)
    next_token = tl.sum(tl.where(nodes == chosen, amax, 0), 0)

    # Walk up from the chosen node, writing depth d's node into slot d.
    slots = tl.arange(0, PATH_PAD)
    path = tl.full([PATH_PAD], -1, tl.int32)
    cur = chosen
    for step in range(0, accept_len + 1):
        path = tl.where(slots == accept_len - step, cur, path)
        cur = tl.load(Parents + cur)
    acc_ptrs = AcceptedNodes + b.to(tl.int64) * stride_acc_b + slots
    tl.store(acc_ptrs, path.to(tl.int64), mask=slots < path_len)
    tl.store(AcceptLen + b, accept_len.to(tl.int64))
    tl.store(NextToken + b, next_token.to(tl.int64))


@functools.lru_cache(maxsize=64)
def _tree_depths(parents: tuple[int, ...]) -> tuple[int, ...]:
    """Depth of every node; validates parents[0] == -1 and 0 <= parents[i] < i."""
    if not parents or parents[0] != -1:
        raise ValueError(f"parents[0] must be -1 (the root), got {parents[:1]}")
    depths = [0]
    for i, p in enumerate(parents[1:], start=1):
        if not 0 <= p < i:
            raise ValueError(f"parents[{i}] = {p}: every parent must satisfy 0 <= parents[i] < i")
        depths.append(depths[p] + 1)
    return tuple(depths)


@functools.lru_cache(maxsize=64)
def _tree_tensors(parents: tuple[int, ...], device: torch.device) -> dict[str, torch.Tensor]:
    """Per-tree constants on `device`, built once per tree."""
    depths = _tree_depths(parents)
    T = len(parents)
    ancestors = torch.eye(T, dtype=torch.bool)  # ancestors[i, j]: j on the root-to-i path
    for i in range(1, T):
        ancestors[i] |= ancestors[parents[i]]
    return {
        "parents": torch.tensor(parents, dtype=torch.int32, device=device),
        "depths": torch.tensor(depths, dtype=torch.int32, device=device),
        "ancestors": ancestors.to(device),
    }


def _as_tuple(parents: torch.Tensor | Sequence[int]) -> tuple[int, ...]:
    if type(parents) is tuple:
        return parents  # the decoders' per-step path: no conversion
    if isinstance(parents, torch.Tensor):
        if parents.dim() != 1 or parents.dtype.is_floating_point or parents.dtype == torch.bool:
            raise ValueError(f"parents must be a 1-d integer tensor, got {parents.dtype} "
                             f"of shape {tuple(parents.shape)}")  # fmt: skip
        return tuple(parents.tolist())  # a GPU tensor syncs here: pass parents on the CPU
    return tuple(int(p) for p in parents)


def _validate(logits: torch.Tensor, tree_tokens: torch.Tensor, parents: tuple[int, ...]) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(
            f"logits must be a [B, T, V] tensor, got {getattr(logits, 'shape', logits)}"
        )
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    B, T, V = logits.shape
    if T < 1 or V < 1:
        raise ValueError(
            f"logits must have at least one node and one token, got {tuple(logits.shape)}"
        )
    if not isinstance(tree_tokens, torch.Tensor) or tree_tokens.shape != (B, T):
        got = tuple(tree_tokens.shape) if isinstance(tree_tokens, torch.Tensor) else tree_tokens
        raise ValueError(f"tree_tokens must have shape [{B}, {T}] like logits, got {got}")
    if tree_tokens.dtype.is_floating_point or tree_tokens.dtype == torch.bool:
        raise ValueError(f"tree_tokens must be an integer tensor, got {tree_tokens.dtype}")
    if tree_tokens.device != logits.device:
        raise ValueError(f"tree_tokens is on {tree_tokens.device}, logits on {logits.device}")
    if len(parents) != T:
        raise ValueError(f"parents has {len(parents)} entries for {T} tree nodes")
    _tree_depths(parents)


def greedy_verify_reference(
    logits: torch.Tensor, tree_tokens: torch.Tensor, parents: torch.Tensor | Sequence[int]
) -> VerifyResult:
    """PyTorch reference: argmax, comparisons, then the ancestor matrix decides acceptance."""
    tree = _tree_tensors(_as_tuple(parents), logits.device)
    B, T, _ = logits.shape
    amax = logits.argmax(dim=-1)  # (B, T)
    parent = tree["parents"].long().clamp(min=0)
    match = (tree_tokens == amax[:, parent]) & (tree_tokens >= 0)  # (B, T)
    match[:, 0] = True
    # A node is accepted when no node on its root path mismatches.
    mismatches = (~match).to(torch.float32) @ tree["ancestors"].T.to(torch.float32)  # (B, T)
    accepted = mismatches == 0
    score = torch.where(accepted, tree["depths"].long(), -1)  # (B, T)
    accept_len = score.max(dim=-1).values  # (B,)
    nodes = torch.arange(T, device=logits.device)
    chosen = torch.where(score == accept_len[:, None], nodes, T).min(dim=-1).values  # (B,)
    # Path nodes in index order are in depth order, since parents[i] < i.
    on_path = tree["ancestors"][chosen]  # (B, T)
    path_len = int(max(_tree_depths(_as_tuple(parents)))) + 1
    slot = torch.where(on_path, on_path.long().cumsum(dim=-1) - 1, path_len)  # (B, T)
    accepted_nodes = torch.full((B, path_len + 1), -1, dtype=torch.long, device=logits.device)
    accepted_nodes.scatter_(1, slot, nodes.expand(B, T).clone())
    next_token = amax.gather(1, chosen[:, None]).squeeze(1)  # (B,)
    return VerifyResult(accept_len, accepted_nodes[:, :path_len], next_token)


def greedy_verify_triton(
    logits: torch.Tensor, tree_tokens: torch.Tensor, parents: tuple[int, ...]
) -> VerifyResult:
    """Launch the two Triton kernels; inputs must already be validated."""
    B, T, V = logits.shape
    tree = _tree_tensors(parents, logits.device)
    path_len = max(_tree_depths(parents)) + 1
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    tree_tokens = tree_tokens if tree_tokens.stride(-1) == 1 else tree_tokens.contiguous()
    device = logits.device
    accept_len = torch.empty(B, dtype=torch.long, device=device)
    accepted_nodes = torch.empty(B, path_len, dtype=torch.long, device=device)
    next_token = torch.empty(B, dtype=torch.long, device=device)
    if B == 0:
        return VerifyResult(accept_len, accepted_nodes, next_token)

    n_rows = B * T
    if logits.is_cuda:
        # One (row, node) per program, enough vocabulary chunks to fill the GPU.
        programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count  # cached
        block_r, wanted = 1, triton.cdiv(programs, n_rows)
    else:
        # The interpreter pays per program: many rows each, two chunks to exercise the merge.
        block_r, wanted = min(64, triton.next_power_of_2(n_rows)), 2
    chunk = triton.cdiv(triton.cdiv(V, wanted), _BLOCK_V) * _BLOCK_V
    num_chunks = triton.cdiv(V, chunk)
    part_val = torch.empty(n_rows, num_chunks, dtype=torch.float32, device=device)
    part_idx = torch.empty(n_rows, num_chunks, dtype=torch.int32, device=device)
    t_pad = max(16, triton.next_power_of_2(T))
    scratch = torch.empty(B, 3, t_pad, dtype=torch.int32, device=device)
    _argmax_partial_kernel[(triton.cdiv(n_rows, block_r), num_chunks)](
        logits, part_val, part_idx, logits.stride(0), logits.stride(1), n_rows, T, V, chunk,
        NUM_CHUNKS=num_chunks, BLOCK_R=block_r, BLOCK_V=_BLOCK_V, num_warps=4,
    )  # fmt: skip
    _verify_walk_kernel[(B,)](
        part_val, part_idx, tree_tokens, tree["parents"], tree["depths"], scratch,
        accept_len, accepted_nodes, next_token,
        tree_tokens.stride(0), accepted_nodes.stride(0), T, path_len,
        NUM_CHUNKS=num_chunks, CHUNKS_PAD=max(2, triton.next_power_of_2(num_chunks)),
        T_PAD=t_pad, LOG_T=max(1, (T - 1).bit_length()),
        PATH_PAD=max(16, triton.next_power_of_2(path_len)), num_warps=4 if t_pad <= 64 else 8,
    )  # fmt: skip
    return VerifyResult(accept_len, accepted_nodes, next_token)


def greedy_verify(
    logits: torch.Tensor, tree_tokens: torch.Tensor, parents: torch.Tensor | Sequence[int]
) -> VerifyResult:
    """Accept the longest tree path that greedy decoding would have produced.

    logits [B, T, V]; tree_tokens [B, T] (negative = dead slot); parents [T] (tensor or list,
    parents[0] == -1, parents[i] < i). Pass parents on the CPU or as a list: a GPU tensor is
    read back to the host. Returns a `VerifyResult` of int64 tensors on the logits' device.
    """
    parents_tuple = _as_tuple(parents)
    _validate(logits, tree_tokens, parents_tuple)
    if verify_uses_triton(logits.dtype, logits.device):
        if logits.shape[1] > MAX_TRITON_NODES:
            raise ValueError(
                f"greedy_verify's Triton kernel takes trees of at most {MAX_TRITON_NODES} nodes, "
                f"got T={logits.shape[1]}: use a smaller tree (or MSN_KERNELS=torch, the "
                "PyTorch reference, which has no limit)"
            )
        return greedy_verify_triton(logits, tree_tokens, parents_tuple)
    return greedy_verify_reference(logits, tree_tokens, parents_tuple)
