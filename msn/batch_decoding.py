"""Batched decoding: many prompts, one model pass per step, each row exactly its own `generate`.

Rows and slots. The model's KV cache holds one row per slot, and a pass reads slots `[0, B)`,
so the active rows always sit in the first B slots. A row that finishes (EOS, max_new_tokens or
the end of the context) leaves at once: the next queued prompt is prefilled into its slot, or,
with the queue empty, the last active row moves into it (one row's prefix is copied). Finished
rows cost no forward work. `batch_size` caps the rows in flight (default: every prompt at once).

Exactness. Each row keeps the per-prompt state `msn.generate` keeps (`TreeDecoder` or
`AutoTreeDecoder`, the same seeds, the same cache-capacity rule), each prompt is prefilled alone
into its slot by the causal pass `generate` uses (through a one-row view of the batch cache), and
rows sit at their own cache lengths (per-row `cache_lens` and positions): no padding enters any
row's attention. So each row's output equals that prompt's own `generate` output, and with a
fixed tree so do its steps and accepted lengths.

One host sync per step: the tree tokens go to the device, and every row's verdict, with the
Jacobi candidates below its chosen node, comes back in one `.tolist()`.

`tree="auto"` in a batch: every row grows its own tree each step, as `generate` does, but
against its share of the batched step's time. A pass over B rows of t tokens costs about
`step_time(B * t)` of the latency profile (measured for one row of T tokens: the weight matmuls
dominate and see B * t tokens alike), so a row's tree of t nodes is charged `step_time(B * t) /
B` and may have at most `profile.max_tokens // B` nodes (the measured range). The larger the
batch, the smaller the trees, down to plain greedy steps once the batch alone fills the flat
part of the curve. Rows' trees differ in shape: they are padded to the largest (dead slots that
see only themselves and never match) and verified with per-row parents (`verify_row_trees`).

Sampling is not batched: `do_sample=True` is refused with a pointer to `msn.generate`.
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from msn.acceptance import AcceptanceStats, acceptance_stats
from msn.auto_decoder import JACOBI_ROWS, AutoTreeDecoder
from msn.autotree import BuiltTree
from msn.decoding import (
    AUTO,
    METHODS,
    GenerationResult,
    TreeDecoder,
    _eos_ids,
    _prompt_tensor,
    _Stopper,
    _sync,
    _tree_for,
    _tree_report,
)
from msn.drafts import OutputMemory, candidate_rows
from msn.interop import decoding_entry
from msn.latency import LatencyProfile, latency_profile
from msn.model import KVCache
from msn.tree import TreeSpec
from msn.validation import check_generate_inputs, check_prompt_fits, check_tree
from msn_kernels import VerifyResult, greedy_verify


@dataclass
class _Row:
    """One prompt in flight: its output so far, stop rule, decoder state and timings."""

    index: int  # position in the caller's prompt list
    prompt_len: int
    output: list[int]  # prompt + emitted tokens; the last one is pending (not in the cache)
    capacity: int  # the cache length `generate` would set up for this prompt alone
    stopper: _Stopper
    decoder: TreeDecoder | AutoTreeDecoder | None  # None: plain greedy
    prefill_seconds: float
    decode_start: float
    accept_lengths: list[int] = field(default_factory=list)

    @property
    def cache_len(self) -> int:
        return len(self.output) - 1

    @property
    def done(self) -> bool:
        return self.stopper.reason is not None

    def emit(self, chunk: list[int]) -> None:
        emitted = self.stopper.cut(chunk)
        self.accept_lengths.append(len(emitted))
        self.output.extend(emitted)
        if self.decoder is not None:
            self.decoder.extend_retrieval(emitted)


@dataclass
class _Plan:
    """What every row of one call shares."""

    method: str
    requested_tree: TreeSpec | str | None
    tree: TreeSpec | str | None  # TreeSpec, AUTO or None (greedy)
    retrieval: bool
    eos_ids: tuple[int, ...]
    max_new_tokens: int
    limit: int
    tree_size: int  # the most tree nodes one row can feed in a step
    seed: int
    latency: LatencyProfile | None = None
    acceptance: AcceptanceStats | None = None
    memory: OutputMemory | None = None  # auto + retrieval: the model's output memory


@dataclass(frozen=True)
class BatchShare:
    """One row's share of a batched step's time, shaped like a `LatencyProfile` for
    `AutoTreeDecoder.build`: B rows of t tokens cost `step_time(B * t)`, a row a B-th of it."""

    profile: LatencyProfile
    rows: int

    @property
    def max_tokens(self) -> int:
        return max(1, self.profile.max_tokens // self.rows)

    def step_time(self, num_tokens: int, prefix: int | None = None) -> float:
        seconds = self.profile.step_time(self.rows * num_tokens) / self.rows
        if prefix is not None:  # each row pays for attention over its own prefix
            seconds += self.profile.prefix_slope * (prefix - self.profile.prefix_tokens)
        return max(seconds, 1e-9)


class _Recall:
    """Read-only view of an `OutputMemory`: rows of one batch must not interleave their tokens
    in it (its n-grams would span rows); each finished row's output is stored whole instead."""

    def __init__(self, memory: OutputMemory):
        self.memory = memory

    def lookup(self, context: Sequence[int], draft_len: int) -> tuple[list[int], int]:
        return self.memory.lookup(context, draft_len)

    def extend(self, tokens: Sequence[int]) -> None:
        pass


@torch.no_grad()
@decoding_entry
def generate_batch(
    model,
    prompts: Sequence[Sequence[int] | Tensor] | Tensor,
    max_new_tokens: int = 256,
    method: str = "tr-jacobi",
    eos_token_id: int | Sequence[int] | None = None,
    tree: TreeSpec | str | None = None,
    retrieval: bool = True,
    seed: int | None = None,
    latency: LatencyProfile | None = None,
    acceptance: AcceptanceStats | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int | None = None,
) -> list[GenerationResult]:
    """Decode every prompt of `prompts` (token lists or 1-D tensors, any lengths) in batches.

    Takes `msn.generate`'s options and returns one `GenerationResult` per prompt, in order,
    each equal to that prompt's own `generate` output. `batch_size` caps the rows decoded
    together (default: all); a finished row's slot goes to the next prompt. Timings are wall
    times: a row's `decode_seconds` runs from its prefill to its last step, shared with the rows
    beside it. `tree="auto"` sizes each row's tree by its share of the batch's step time (see the
    module docstring). Sampling (`do_sample=True`) is not batched: call `msn.generate` per
    prompt. `model` is an msn model or a transformers `LlamaForCausalLM`; the call holds the
    model's lock, like `generate`.
    """
    del temperature, top_k, top_p  # sampling filters: only meaningful with do_sample
    if do_sample:
        raise ValueError(
            "generate_batch decodes greedily; for sampling call msn.generate(model, prompt, "
            "do_sample=True, ...) for each prompt."
        )
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    tensors = _prompt_list(model, prompts, max_new_tokens, method, eos_token_id, tree)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}.")
    plan = _make_plan(model, tensors, max_new_tokens, method, eos_token_id, tree, retrieval, seed)
    if plan.tree == AUTO:
        plan.latency = latency or latency_profile(model)
        plan.acceptance = acceptance if acceptance is not None else acceptance_stats(model)
        plan.tree_size = min(plan.latency.max_tokens, AutoTreeDecoder.default_max_nodes)
    width = min(batch_size or len(tensors), len(tensors))
    capacities = [_capacity(plan, t.shape[1]) for t in tensors]
    # Slots past a row's own capacity take the dead nodes of a row whose tree no longer fits.
    model.setup_cache(width, max(capacities) + plan.tree_size)

    results: list[GenerationResult | None] = [None] * len(tensors)
    queue = deque(enumerate(tensors))
    rows: list[_Row] = []
    while queue or rows:
        while len(rows) < width and queue:
            rows.append(_admit(model, plan, *queue.popleft(), slot=len(rows)))
        _retire(model, plan, rows, queue, results)
        if rows:
            _step(model, plan, rows)
    _sync(model.device)
    stopped = [i for i, r in enumerate(results) if r.stop_reason == "context"]
    if stopped:
        warnings.warn(
            f"decoding of prompts {stopped} stopped at the end of the model's context "
            f"({plan.limit} tokens) before EOS or max_new_tokens; load the model with a larger "
            "max_seq_len for longer outputs.",
            stacklevel=3,
        )
    return results


def _prompt_list(model, prompts, max_new_tokens, method, eos_token_id, tree) -> list[Tensor]:
    """Each prompt as a [1, L] tensor, checked as `generate` checks it; errors name the index."""
    if isinstance(prompts, Tensor):
        if prompts.dim() != 2:
            raise ValueError(
                f"prompts as a tensor must be [N, L] (N prompts of one length), got shape "
                f"{tuple(prompts.shape)}; pass a list of token lists for prompts of any length."
            )
        prompts = list(prompts)  # N rows of shape (L,)
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence):
        raise ValueError(
            f"prompts must be a list of prompts (token lists or 1-D tensors), got "
            f"{type(prompts).__name__}."
        )
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt (a list of token ids).")
    limit = model.max_seq_len
    tensors = []
    for i, prompt in enumerate(prompts):
        try:
            check_generate_inputs(model, prompt, max_new_tokens, method, eos_token_id, tree)
            tensor = _prompt_tensor(prompt)
        except ValueError as error:
            raise ValueError(f"prompts[{i}]: {error}") from error
        check_prompt_fits(tensor.shape[1], limit, name=f"prompts[{i}]")
        tensors.append(tensor)
    return tensors


def _make_plan(model, tensors, max_new_tokens, method, eos_token_id, tree, retrieval, seed):
    decoder_tree = _tree_for(method, tree, retrieval)
    longest = max(t.shape[1] for t in tensors)
    check_tree(decoder_tree, model, longest, model.max_seq_len, max_new_tokens)
    return _Plan(
        method=method,
        requested_tree=tree,
        tree=decoder_tree,
        retrieval=retrieval,
        eos_ids=_eos_ids(model, eos_token_id),
        max_new_tokens=max_new_tokens,
        limit=model.max_seq_len,
        tree_size=decoder_tree.num_nodes if isinstance(decoder_tree, TreeSpec) else 1,
        seed=0 if seed is None else seed,
    )


def _capacity(plan: _Plan, prompt_len: int) -> int:
    """The cache length `generate` sets up for one prompt: prompt, output and one tree."""
    return min(plan.limit, prompt_len + plan.max_new_tokens + plan.tree_size)


def _prefill_slot(model, prompt: Tensor, slot: int) -> Tensor:
    """Logits [1, 1, V] of `prompt`'s last token, its keys/values written to cache row `slot`.

    The causal pass of `generate`'s own prefill, run on a one-row view of the batch cache.
    """
    full = model.cache
    model.cache = KVCache(k=full.k[:, slot : slot + 1], v=full.v[:, slot : slot + 1])
    try:
        return model(prompt.to(model.device), last_only=True)
    finally:
        model.cache = full


def _admit(model, plan: _Plan, index: int, prompt: Tensor, slot: int) -> _Row:
    """Prefill one prompt into `slot` and emit its first token, as `generate` does."""
    start = time.perf_counter()
    first = int(_prefill_slot(model, prompt, slot)[0, -1].argmax())
    prefill_seconds = time.perf_counter() - start
    stopper = _Stopper(plan.eos_ids, plan.max_new_tokens)
    output = prompt[0].tolist()
    row = _Row(
        index=index,
        prompt_len=len(output),
        output=output,
        capacity=_capacity(plan, len(output)),
        stopper=stopper,
        decoder=None,
        prefill_seconds=prefill_seconds,
        decode_start=time.perf_counter(),
    )
    if plan.max_new_tokens == 0:
        stopper.reason = "max_new_tokens"
        return row
    output.extend(stopper.cut([first]))
    if plan.tree == AUTO:
        row.decoder = AutoTreeDecoder(
            model, output, plan.latency, plan.acceptance, plan.retrieval,
            max_nodes=plan.tree_size, seed=plan.seed,
        )  # fmt: skip
        if row.decoder.drafts.memory is not None:
            plan.memory = row.decoder.drafts.memory
            row.decoder.drafts.memory = _Recall(plan.memory)
    elif plan.tree is not None:
        row.decoder = TreeDecoder(model, plan.tree, output, seed=plan.seed)
    return row


def _retire(model, plan: _Plan, rows: list[_Row], queue: deque, results: list) -> None:
    """Finished rows leave: a queued prompt takes the slot, else the last row moves into it."""
    slot = 0
    while slot < len(rows):
        row = rows[slot]
        if not row.done and len(row.output) > plan.limit:
            row.stopper.reason = "context"
        if not row.done:
            slot += 1
            continue
        results[row.index] = _result(row, plan)
        if queue:
            rows[slot] = _admit(model, plan, *queue.popleft(), slot=slot)
            continue
        last = rows.pop()
        if slot < len(rows):
            _move_row(model.cache, len(rows), slot, last.cache_len)
            rows[slot] = last


def _move_row(cache: KVCache, src: int, dst: int, length: int) -> None:
    """Copy the first `length` cached positions of row `src` to row `dst`, all layers."""
    cache.k[:, dst, :, :length] = cache.k[:, src, :, :length]  # (layers, Hkv, length, D)
    cache.v[:, dst, :, :length] = cache.v[:, src, :, :length]


def _result(row: _Row, plan: _Plan) -> GenerationResult:
    decode_seconds = time.perf_counter() - row.decode_start
    if plan.memory is not None:  # store this row's output whole (see _Recall)
        plan.memory.begin()
        plan.memory.extend(row.output[row.prompt_len :])
    return GenerationResult(
        output_ids=torch.tensor([row.output], dtype=torch.long),
        new_tokens=len(row.output) - row.prompt_len,
        steps=len(row.accept_lengths),
        accept_lengths=row.accept_lengths,
        prefill_seconds=row.prefill_seconds,
        decode_seconds=decode_seconds,
        stop_reason=row.stopper.reason,
        method=plan.method,
        tree=_tree_report(
            plan.tree, row.decoder, plan.requested_tree, row.accept_lengths, decode_seconds
        ),
    )


def _step(model, plan: _Plan, rows: list[_Row]) -> None:
    """One forward pass for every active row; each row emits its accepted chunk."""
    if plan.tree is None:
        chunks = _greedy_step(model, rows)
    elif plan.tree == AUTO:
        chunks = _auto_step(model, plan, rows)
    else:
        chunks = _fixed_tree_step(model, plan.tree, rows)
    for row, chunk in zip(rows, chunks, strict=True):
        row.emit(chunk)


def _greedy_step(model, rows: list[_Row]) -> list[list[int]]:
    device = model.device
    tokens = torch.tensor([[row.output[-1]] for row in rows], device=device)  # (B, 1)
    cache_lens = torch.tensor([row.cache_len for row in rows], device=device)
    bound = max(row.cache_len for row in rows)  # host-side: no read-back in the pass
    logits = model(tokens, cache_lens=cache_lens, max_cache_len=bound)
    return [[token] for token in logits[:, -1].argmax(dim=-1).tolist()]


def _fixed_tree_step(model, tree: TreeSpec, rows: list[_Row]) -> list[list[int]]:
    """A step of one fixed tree shape for all rows; a row whose tree no longer fits its
    capacity feeds the root alone (its draft slots dead), as `generate`'s greedy fallback."""
    device = model.device
    size = tree.num_nodes
    fits = [row.decoder.fits(row.capacity) for row in rows]
    node_tokens = [
        row.decoder.tree_tokens() if fit else [row.output[-1]] * size
        for row, fit in zip(rows, fits, strict=True)
    ]
    checked = [
        tokens if fit else tokens[:1] + [-1] * (size - 1)
        for tokens, fit in zip(node_tokens, fits, strict=True)
    ]
    tokens = torch.tensor(node_tokens, device=device)  # (B, T)
    cache_lens = torch.tensor([row.cache_len for row in rows], device=device)
    shared = rows[0].decoder  # every row holds the same tree tensors
    logits = model(
        tokens,
        positions=cache_lens[:, None] + shared.depths[None],
        cache_lens=cache_lens,
        tree_mask=shared.mask,
        max_cache_len=max(row.cache_len for row in rows),
    )
    verdict = greedy_verify(logits, torch.tensor(checked, device=device), shared.parents)
    model.compact_cache(cache_lens, verdict.accepted_nodes)
    follow = shared.continuation[_chosen(verdict)]  # (B, depth)
    top = _gather_nodes(logits, follow).topk(shared.row_size, dim=-1).indices  # (B, depth, K+1)
    packed = torch.cat(
        [verdict.accept_len, verdict.next_token, verdict.accepted_nodes.flatten(), top.flatten()]
    ).tolist()
    batch, path_len = verdict.accepted_nodes.shape
    tops = _split(packed[2 * batch + batch * path_len :], batch)
    chunks = []
    for b, (row, fit) in enumerate(zip(rows, fits, strict=True)):
        accept_len, next_token = packed[b], packed[batch + b]
        if not fit:
            chunks.append(row.decoder.absorb_single(next_token))
            continue
        start = 2 * batch + b * path_len
        path = packed[start : start + accept_len + 1]
        chunks.append(row.decoder.absorb(node_tokens[b], path, next_token, tops[b]))
    return chunks


def _chosen(verdict: VerifyResult) -> Tensor:
    """The deepest accepted node of each row, [B] (no host sync)."""
    return verdict.accepted_nodes.gather(1, verdict.accept_len[:, None])[:, 0]


def _gather_nodes(logits: Tensor, nodes: Tensor) -> Tensor:
    """logits [B, T, V] at node indices [B, R] (-1 read as node 0) -> [B, R, V]."""
    index = nodes.clamp(min=0)[:, :, None].expand(-1, -1, logits.shape[-1])  # (B, R, V)
    return logits.gather(1, index)


def _split(values: list, parts: int) -> list[list]:
    """`values` cut into `parts` equal consecutive lists."""
    size = len(values) // parts
    return [values[i * size : (i + 1) * size] for i in range(parts)]


def _auto_step(model, plan: _Plan, rows: list[_Row]) -> list[list[int]]:
    """Each row grows its own tree for its share of the step; the trees are padded to the
    largest and verified together. A row with a one-node tree (or no room) steps greedily."""
    device = model.device
    share = BatchShare(plan.latency, len(rows))
    trees = [row.decoder.plan(share) if row.decoder.fits(row.capacity) else None for row in rows]
    trees = [tree if tree is not None and tree.num_nodes > 1 else None for tree in trees]
    roots = [row.output[-1] for row in rows]
    padded = pad_trees(trees, roots)
    tokens = torch.tensor(padded.tokens, device=device)  # (B, T)
    depths = torch.tensor(padded.depths, device=device)  # (B, T)
    ancestors = torch.tensor(padded.ancestors, device=device)  # (B, T, T)
    cache_lens = torch.tensor([row.cache_len for row in rows], device=device)
    logits = model(
        tokens,
        positions=cache_lens[:, None] + depths,
        cache_lens=cache_lens,
        tree_mask=ancestors,
        max_cache_len=max(row.cache_len for row in rows),
    )
    verdict = verify_row_trees(
        logits,
        torch.tensor(padded.checked, device=device),
        torch.tensor(padded.parents, device=device),
        ancestors,
        depths,
        padded.path_len,
    )
    model.compact_cache(cache_lens, verdict.accepted_nodes)
    continuation = torch.tensor(padded.continuation, device=device)  # (B, T, R)
    follow = continuation.gather(
        1, _chosen(verdict)[:, None, None].expand(-1, 1, continuation.shape[-1])
    )[:, 0]  # (B, R)
    width = rows[0].decoder.width
    top_tokens, top_probs = candidate_rows(_gather_nodes(logits, follow), width)  # (B, R, W)
    packed = torch.cat(
        [
            verdict.accept_len.double(),
            verdict.next_token.double(),
            verdict.accepted_nodes.flatten().double(),
            (follow >= 0).sum(dim=1).double(),
            top_tokens.flatten().double(),
            top_probs.flatten().double(),
        ]
    ).tolist()  # token ids are exact in float64
    batch, path_len = verdict.accepted_nodes.shape
    heads = [int(v) for v in packed[: batch * (3 + path_len)]]
    rest = packed[batch * (3 + path_len) :]
    token_rows = _split([int(v) for v in rest[: len(rest) // 2]], batch)
    prob_rows = _split(rest[len(rest) // 2 :], batch)
    chunks = []
    for b, (row, tree) in enumerate(zip(rows, trees, strict=True)):
        accept_len, next_token = heads[b], heads[batch + b]
        if tree is None:
            chunks.append(row.decoder.absorb_single(next_token))
            continue
        start = 2 * batch + b * path_len
        path = heads[start : start + accept_len + 1]
        valid = heads[2 * batch + batch * path_len + b] * width
        chunks.append(
            row.decoder.absorb(tree, path, next_token, token_rows[b][:valid], prob_rows[b][:valid])
        )
    return chunks


@dataclass(frozen=True)
class PaddedTrees:
    """Per-row trees padded to one size T, as nested lists ready for `torch.tensor`."""

    tokens: list[list[int]]  # (B, T) the tokens fed (dead slots repeat the root)
    checked: list[list[int]]  # (B, T) the tokens verified (dead slots -1: never accepted)
    parents: list[list[int]]  # (B, T) -1 at the root and at dead slots
    depths: list[list[int]]  # (B, T)
    ancestors: list[list[list[bool]]]  # (B, T, T) node i sees node j (dead slots: themselves)
    continuation: list[list[list[int]]]  # (B, T, JACOBI_ROWS) Jacobi rows below a node, -1 pad
    path_len: int  # the deepest tree's depth + 1


def pad_trees(trees: Sequence[BuiltTree | None], roots: Sequence[int]) -> PaddedTrees:
    """Pad each row's tree (None: the root alone) to the largest tree's node count."""
    size = max((tree.num_nodes for tree in trees if tree is not None), default=1)
    out: dict[str, list] = {k: [] for k in ("tokens", "checked", "parents", "depths")}
    out["ancestors"], out["continuation"] = [], []
    path_len = 1
    for tree, root in zip(trees, roots, strict=True):
        n = 1 if tree is None else tree.num_nodes
        dead = size - n
        tokens = [root] if tree is None else list(tree.tokens)
        parents = [-1] if tree is None else list(tree.parents)
        depths = [0] if tree is None else list(tree.depths)
        path_len = max(path_len, max(depths) + 1)
        out["tokens"].append(tokens + [root] * dead)
        out["checked"].append(tokens + [-1] * dead)
        out["parents"].append(parents + [-1] * dead)
        out["depths"].append(depths + [0] * dead)
        out["ancestors"].append(_ancestor_rows(parents, size))
        follow = [[] for _ in range(n)] if tree is None else [
            tree.continuation(node)[:JACOBI_ROWS] for node in range(n)
        ]  # fmt: skip
        out["continuation"].append(
            [f + [-1] * (JACOBI_ROWS - len(f)) for f in follow] + [[-1] * JACOBI_ROWS] * dead
        )
    return PaddedTrees(path_len=path_len, **out)


def _ancestor_rows(parents: Sequence[int], size: int) -> list[list[bool]]:
    """The ancestor mask (self included) of a tree, padded to `size` with self-only rows."""
    rows = [[False] * size for _ in range(size)]
    for node, parent in enumerate(parents):
        if parent >= 0:
            rows[node][:node] = rows[parent][:node]
        rows[node][node] = True
    for node in range(len(parents), size):
        rows[node][node] = True
    return rows


def verify_row_trees(
    logits: Tensor,
    tree_tokens: Tensor,
    parents: Tensor,
    ancestors: Tensor,
    depths: Tensor,
    path_len: int,
) -> VerifyResult:
    """`greedy_verify` with a tree per row: the same rule and outputs, per-row parents.

    logits [B, T, V]; tree_tokens [B, T] (negative: dead slot); parents [B, T] (-1 at the
    root); ancestors [B, T, T] bool (self included); depths [B, T]; `path_len` is the largest
    depth + 1 (known on the host, so no sync). A node is accepted when every node on its root
    path matches the argmax at its parent; the deepest accepted node wins, ties to the smaller
    index.
    """
    batch, size, _ = logits.shape
    amax = logits.argmax(dim=-1)  # (B, T)
    match = (tree_tokens == amax.gather(1, parents.clamp(min=0))) & (tree_tokens >= 0)
    match[:, 0] = True
    accepted = ~(ancestors & ~match[:, None, :]).any(dim=-1)  # (B, T)
    score = torch.where(accepted, depths, -1)  # (B, T)
    accept_len = score.max(dim=-1).values  # (B,)
    nodes = torch.arange(size, device=logits.device)
    chosen = torch.where(score == accept_len[:, None], nodes, size).min(dim=-1).values  # (B,)
    on_path = ancestors[torch.arange(batch, device=logits.device), chosen]  # (B, T)
    # Path nodes in index order are in depth order, since parents[i] < i.
    slot = torch.where(on_path, on_path.long().cumsum(dim=-1) - 1, path_len)  # (B, T)
    accepted_nodes = torch.full((batch, path_len + 1), -1, dtype=torch.long, device=logits.device)
    accepted_nodes.scatter_(1, slot, nodes.expand(batch, size).clone())
    next_token = amax.gather(1, chosen[:, None])[:, 0]  # (B,)
    return VerifyResult(accept_len, accepted_nodes[:, :path_len], next_token)
