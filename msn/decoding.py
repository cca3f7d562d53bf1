"""Greedy, Jacobi and TR-Jacobi decoding, all with exactly greedy decoding's output.

One TR-Jacobi step (`TreeDecoder.step`):
1. tree tokens: the pending token at the root; a Jacobi node of depth d and rank r takes
   candidate r of depth d; retrieval nodes take the n-gram draft; empty slots take random
   context tokens (the "noise" MSN training makes the model robust to);
2. one forward pass over the tree, at positions prefix + depth, with the ancestor mask;
3. `greedy_verify` finds the deepest node whose path matches the model's own argmax, and its
   keys/values are compacted after the prefix (`compact_kv`);
4. Jacobi update: the model's top-k at the nodes past the accepted ones on the chosen path
   become next step's candidates (their context held a wrong guess; MSN trains for that).

Output is lossless by construction: a token is only ever emitted when it is the argmax of
the model given the accepted context.
"""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from msn.acceptance import AcceptanceStats, acceptance_stats
from msn.auto_decoder import AutoTreeDecoder
from msn.interop import decoding_entry
from msn.latency import LatencyProfile, latency_profile
from msn.retrieval import NgramIndex
from msn.sampling import Sampler, make_sampler
from msn.step_graph import StepRunner, length_bound, use_cuda_graph
from msn.tree import JACOBI, TreeSpec, chain_tree, paper_tree, parse_tree
from msn.validation import check_generate_inputs, check_prompt_fits, check_tree
from msn_kernels import greedy_verify
from msn_kernels.greedy_verify import _tree_tensors

METHODS = ("greedy", "jacobi", "tr-jacobi")
AUTO = "auto"
JACOBI_DEPTH = 5
RETRIEVAL_NGRAM = 3


@dataclass
class GenerationResult:
    output_ids: Tensor  # (1, L + new_tokens)
    new_tokens: int
    steps: int  # forward passes after prefill
    accept_lengths: list[int]  # tokens emitted per step
    prefill_seconds: float
    decode_seconds: float
    stop_reason: str  # "eos", "max_new_tokens" or "context"
    method: str = ""
    # The tree used: name, nodes and depth (mean and commonest shapes for "auto"), and its
    # step time (predicted by the latency profile where one was used, and measured).
    tree: dict | None = None
    # With do_sample=True: temperature, top_k, top_p and the seed used (also when drawn).
    sampling: dict | None = None

    @property
    def total_seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens emitted per decoding step; greedy decoding gives exactly 1.

        The first new token comes from the prefill pass, which is not a step, so it is left
        out: new_tokens / steps (DESIGN.md's MTA) is larger by 1 / steps.
        """
        return sum(self.accept_lengths) / self.steps if self.steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_seconds if self.total_seconds > 0 else 0.0


class _Stopper:
    """Cuts emitted chunks at EOS and at max_new_tokens; tracks why decoding ended."""

    def __init__(self, eos_ids: Sequence[int], max_new_tokens: int):
        self.eos_ids = frozenset(eos_ids)
        self.budget = max_new_tokens
        self.reason: str | None = None

    def cut(self, chunk: list[int]) -> list[int]:
        if self.eos_ids:
            for i, token in enumerate(chunk):
                if token in self.eos_ids:
                    chunk, self.reason = chunk[: i + 1], "eos"
                    break
        if len(chunk) >= self.budget:
            chunk = chunk[: self.budget]
            self.reason = self.reason or "max_new_tokens"
        self.budget -= len(chunk)
        return chunk


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
@decoding_entry
def generate(
    model,
    input_ids: Tensor | Sequence[int],
    max_new_tokens: int = 256,
    method: str = "tr-jacobi",
    eos_token_id: int | Sequence[int] | None = None,
    streamer=None,
    tree: TreeSpec | str | None = None,
    retrieval: bool = True,
    seed: int | None = None,
    latency: LatencyProfile | None = None,
    acceptance: AcceptanceStats | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cuda_graph: bool | None = None,
) -> GenerationResult:
    """Decode up to `max_new_tokens` new tokens after `input_ids` ([1, L] or a list of ints).

    `method`: "greedy" (plain autoregressive), "jacobi" (one chain of guesses, no retrieval)
    or "tr-jacobi" (a token tree; `tree` picks it: "auto" by default, else "paper", a short
    name or a `TreeSpec`; `retrieval=False` drops its n-gram retrieval chain). `tree="auto"`
    builds each step's tree from `latency` (default: this model's cached profile, measured on
    first use, see `msn.latency`) and `acceptance` (default: the model's running statistics,
    see `msn.acceptance`), which it updates as it decodes. `eos_token_id`: an int, a list,
    or None for the checkpoint's own; an empty list decodes exactly `max_new_tokens`.
    `streamer` follows the transformers protocol (`put` the prompt, then each accepted chunk;
    `end`). `seed` fixes the random context tokens that fill empty tree slots (a greedy
    output never depends on it; None means 0 there).

    `do_sample=True` samples instead, with transformers' filters (`temperature`, then `top_k`,
    0 = off, then `top_p`, 1 = off), and every method's output has exactly the distribution of
    plain ancestral sampling (see `msn.sampling`). `seed` then also fixes the draws (None: one
    from torch's global generator, so `torch.manual_seed` makes a run reproducible); the same
    seed gives the same tokens with any method, up to floating-point near-ties.

    `model` is an msn model or a transformers `LlamaForCausalLM` (decoded through
    `msn.from_transformers`, sharing its weights). Calls on one model hold its lock
    (`msn.interop.exclusive`) throughout: concurrent calls from several threads run one after
    another, each with the output it would have alone.

    `cuda_graph`: replay each decode step as a captured CUDA graph (`msn.step_graph`). None
    (default) does so where it can: a CUDA model, Triton kernels, greedy decoding; False runs
    every step eagerly (the CPU path); True insists, and raises where it cannot.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    check_generate_inputs(model, input_ids, max_new_tokens, method, eos_token_id, tree)
    prompt = _prompt_tensor(input_ids)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    limit = model.max_seq_len
    check_prompt_fits(prompt.shape[1], limit)
    eos_ids = _eos_ids(model, eos_token_id)
    decoder_tree = _tree_for(method, tree, retrieval)
    check_tree(decoder_tree, model, prompt.shape[1], limit, max_new_tokens)
    auto = decoder_tree == AUTO
    sampler = make_sampler(do_sample, temperature, top_k, top_p, seed, model.device)
    runner = StepRunner(model, use_cuda_graph(cuda_graph, model, sampler is not None))
    if auto:
        latency = latency or latency_profile(model)
        if acceptance is None:
            # Sampled drafts are accepted less often: learn within the call, on a copy.
            acceptance = acceptance_stats(model)
            acceptance = acceptance if sampler is None else acceptance.copy()
    if streamer is not None:
        streamer.put(prompt.cpu())

    device = model.device
    start = time.perf_counter()
    # The cache covers what this call can need: the prompt, the output and one tree.
    if auto:
        tree_size = min(latency.max_tokens, AutoTreeDecoder.default_max_nodes)
    else:
        tree_size = 1 if decoder_tree is None else decoder_tree.num_nodes
    capacity = min(limit, prompt.shape[1] + max_new_tokens + tree_size)
    model.setup_cache(1, capacity)
    logits = model(prompt.to(device), last_only=True)
    first = _pick(logits[0, -1], prompt.shape[1] - 1, sampler)
    _sync(device)
    prefill_seconds = time.perf_counter() - start

    stopper = _Stopper(eos_ids, max_new_tokens)
    output = prompt[0].tolist()
    accept_lengths: list[int] = []
    decoder = None
    start = time.perf_counter()
    if max_new_tokens > 0:
        _emit(stopper.cut([first]), output, streamer)
        if decoder_tree is None:
            _greedy_loop(
                model, output, prompt.shape[1], stopper, accept_lengths, streamer, limit, sampler,
                runner, capacity,
            )  # fmt: skip
        else:
            draft_seed = 0 if seed is None else seed
            if auto:
                decoder = AutoTreeDecoder(
                    model, output, latency, acceptance, retrieval, max_nodes=tree_size,
                    seed=draft_seed, sampler=sampler, runner=runner,
                )  # fmt: skip
            else:
                decoder = TreeDecoder(
                    model, decoder_tree, output, seed=draft_seed, sampler=sampler, runner=runner
                )
            while stopper.reason is None:
                if len(output) > limit:
                    stopper.reason = "context"
                    break
                chunk = decoder.step() if decoder.fits(capacity) else decoder.greedy_step()
                emitted = stopper.cut(chunk)
                accept_lengths.append(len(emitted))
                _emit(emitted, output, streamer)
                decoder.extend_retrieval(emitted)
    else:
        stopper.reason = "max_new_tokens"
    _sync(device)
    decode_seconds = time.perf_counter() - start
    if streamer is not None:
        streamer.end()
    if stopper.reason == "context":
        warnings.warn(
            f"decoding stopped at the end of the model's context ({limit} tokens) before EOS "
            f"or max_new_tokens; load the model with a larger max_seq_len for longer outputs.",
            stacklevel=2,
        )
    new_tokens = len(output) - prompt.shape[1]
    return GenerationResult(
        output_ids=torch.tensor([output], dtype=torch.long),
        new_tokens=new_tokens,
        steps=len(accept_lengths),
        accept_lengths=accept_lengths,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        stop_reason=stopper.reason,
        method=method,
        tree=_tree_report(decoder_tree, decoder, tree, accept_lengths, decode_seconds),
        sampling=None if sampler is None else sampler.settings(),
    )


def _tree_report(decoder_tree, decoder, requested, accept_lengths, decode_seconds) -> dict:
    """Which tree a call used, for `msn generate` and `msn bench`."""
    steps = len(accept_lengths)
    if decoder_tree is None:
        info = {"tree": "none (greedy)", "mean_nodes": 1.0, "max_depth": 0}
    elif isinstance(decoder, AutoTreeDecoder):
        info = decoder.summary(steps)
    elif decoder_tree == AUTO:  # no decoder was needed (max_new_tokens=0)
        info = {"tree": AUTO, "mean_nodes": 1.0, "max_depth": 0}
    else:
        name = requested if isinstance(requested, str) else None
        if name is None:
            name = "paper" if decoder_tree == paper_tree() else "custom"
        info = {
            "tree": name,
            "mean_nodes": float(decoder_tree.num_nodes),
            "max_depth": decoder_tree.max_depth,
        }
    info["measured_step_ms"] = round(1e3 * decode_seconds / steps, 2) if steps else None
    return info


def _emit(chunk: list[int], output: list[int], streamer) -> None:
    output.extend(chunk)
    if streamer is not None and chunk:
        streamer.put(torch.tensor(chunk, dtype=torch.long))


def _prompt_tensor(input_ids: Tensor | Sequence[int]) -> Tensor:
    if isinstance(input_ids, Tensor):
        prompt = input_ids.detach().to("cpu", torch.long)
        if prompt.dim() == 1:
            prompt = prompt[None]
    else:
        prompt = torch.tensor([list(input_ids)], dtype=torch.long)
    if prompt.dim() != 2 or prompt.shape[0] != 1:
        raise ValueError(
            f"input_ids must be one prompt, shape [1, L] or a list of ints; got shape "
            f"{tuple(prompt.shape)} (batched decoding takes one prompt at a time for now)."
        )
    if prompt.shape[1] == 0:
        raise ValueError("input_ids is empty; give at least one prompt token (e.g. BOS).")
    return prompt


def _eos_ids(model, eos_token_id: int | Sequence[int] | Tensor | None) -> tuple[int, ...]:
    if eos_token_id is None:
        return tuple(model.config.eos_token_ids)
    try:
        return tuple(int(t) for t in torch.as_tensor(eos_token_id).flatten().tolist())
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"eos_token_id must be an int, a list of ints or None, got {eos_token_id!r}."
        ) from error


def _tree_for(method: str, tree: TreeSpec | str | None, retrieval: bool) -> TreeSpec | str | None:
    """The tree a method decodes with: a TreeSpec, AUTO, or None for plain greedy decoding."""
    if method == "greedy":
        return None
    if method == "jacobi":
        if tree is not None:
            raise ValueError(
                "method='jacobi' decodes one chain of guesses; for another tree use "
                "method='tr-jacobi' with tree=... (and retrieval=False for no retrieval)."
            )
        return chain_tree(JACOBI_DEPTH)
    if tree is None or tree == AUTO:
        return AUTO
    if isinstance(tree, str):
        tree = parse_tree(tree)
    return tree if retrieval else tree.without_retrieval()


def _pick(logits: Tensor, position: int, sampler: Sampler | None) -> int:
    """The next token after logits ``[V]`` read at ``position``: argmax, or a draw."""
    return int(logits.argmax()) if sampler is None else sampler.draw(logits, position)


def _greedy_loop(
    model,
    output,
    prompt_len,
    stopper,
    accept_lengths,
    streamer,
    limit,
    sampler=None,
    runner=None,
    capacity=None,
) -> None:
    """Plain autoregressive decoding (or ancestral sampling) through the same model and cache.

    Each step feeds the pending token and the cache length from the host, runs
    `_greedy_device_step` (no read-back inside; a CUDA graph where `runner` replays them) and
    reads the next token back: the step's one synchronisation.
    """
    runner = runner or StepRunner(model, graphs=False)
    capacity = capacity or model.cache.max_seq_len  # the cache generate set up
    cache_len = prompt_len  # on the host: no read-back for the bounds
    while stopper.reason is None:
        if cache_len + 1 > limit:
            stopper.reason = "context"
            break

        def step(token: Tensor, cache_lens: Tensor, bound: int, position: int = cache_len):
            return _greedy_device_step(model, sampler, position, token, cache_lens, bound)

        inputs = (torch.tensor([[output[-1]]]), torch.tensor([cache_len]))
        bound = length_bound(cache_len, capacity - 1)
        token = runner(("greedy",), step, inputs, bound)
        cache_len += 1
        emitted = stopper.cut([int(token)])
        accept_lengths.append(len(emitted))
        _emit(emitted, output, streamer)


def _greedy_device_step(
    model, sampler: Sampler | None, position: int, token: Tensor, cache_lens: Tensor, bound: int
) -> Tensor:
    """One plain step on the device: the next token [1, 1] after `token` [1, 1]."""
    logits = model(token, cache_lens=cache_lens, max_cache_len=bound)
    if sampler is not None:  # never captured (use_cuda_graph): `position` is a host value
        logits = sampler.perturb(logits[:, -1:], position)
    return logits[:, -1].argmax(dim=-1, keepdim=True)


class TreeDecoder:
    """State of Jacobi / TR-Jacobi decoding for one prompt: cache length, candidates, index.

    `output` is the shared list of prompt + emitted tokens; its last token is the pending one
    (emitted, but its keys and values are not yet in the cache).
    """

    def __init__(
        self,
        model,
        tree: TreeSpec,
        output: list[int],
        seed: int = 0,
        sampler: Sampler | None = None,
        runner: StepRunner | None = None,
    ):
        self.model = model
        self.sampler = sampler  # None: greedy; else draws verified on perturbed logits
        self.runner = runner or StepRunner(model, graphs=False)
        self.tree = tree
        self.output = output
        self.device = model.device
        self.rng = random.Random(seed)
        self.depth = tree.max_depth
        self.width = max(tree.max_top_k, 1)
        self.vocab_size = model.config.vocab_size
        # Each depth keeps one spare candidate beyond the tree's width (see tree_tokens).
        self.row_size = min(self.width + 1, self.vocab_size)
        tensors = tree.tensors_on(self.device)
        self.mask = tensors.mask
        self.depths = tensors.depths
        self.parents = tree.parents
        self.cache_len = len(output) - 1
        self.capacity: int | None = None  # the cache's length, as `fits` last saw it
        continuation = _continuations(tree)
        self.continuation = continuation.to(self.device)
        self.follow_lengths = (continuation >= 0).sum(dim=1).tolist()
        # candidates[d][r]: rank-r guess for the token d + 1 places after the pending one.
        self.candidates: list[list[int] | None] = [None] * self.depth
        self.index = (
            NgramIndex(RETRIEVAL_NGRAM, tree.retrieval_depth) if tree.has_retrieval else None
        )
        if self.index is not None:
            self.index.extend(output)
        self._jacobi_nodes = [
            (node, tree.depths[node] - 1, tree.ranks[node])
            for node in range(tree.num_nodes)
            if tree.kinds[node] == JACOBI
        ]
        # Depth-1 Jacobi leaves may repeat the retrieval draft's first token: such a slot
        # could never add anything, so it gets the depth's spare candidate instead.
        has_child = set(tree.parents)
        self._depth_one_leaves = [
            n for n, d, _ in self._jacobi_nodes if d == 0 and n not in has_child
        ]

    def fits(self, capacity: int) -> bool:
        """Whether a whole tree still fits in the cache after the prefix."""
        self.capacity = capacity
        return self.cache_len + self.tree.num_nodes <= capacity

    def extend_retrieval(self, chunk: list[int]) -> None:
        if self.index is not None:
            self.index.extend(chunk)

    def tree_tokens(self) -> list[int]:
        """The token of every node for this step."""
        tokens = [self.output[-1]] * self.tree.num_nodes
        rows = [self._candidate_row(d) for d in range(self.depth)]
        for node, depth, rank in self._jacobi_nodes:
            tokens[node] = rows[depth][rank]
        if self.tree.retrieval_nodes:
            draft = self.index.lookup()
            for depth, node in enumerate(self.tree.retrieval_nodes):
                tokens[node] = draft[depth] if depth < len(draft) else self._random_token(())
            first = tokens[self.tree.retrieval_nodes[0]]
            for node in self._depth_one_leaves:
                if tokens[node] == first:
                    spare = rows[0][self.width :]
                    tokens[node] = spare[0] if spare else self._random_token([*rows[0], first])
        return tokens

    def _candidate_row(self, depth: int) -> list[int]:
        """Candidates for one depth: the previous step's top-k, else random context tokens."""
        row = self.candidates[depth]
        if row is None:
            row, seen = [], set()  # a set: a row as wide as the vocabulary stays linear
            while len(row) < self.row_size:
                row.append(self._random_token(seen))
                seen.add(row[-1])
            self.candidates[depth] = row
        return row

    def _random_token(self, avoid: Sequence[int]) -> int:
        """A token drawn from the context, distinct from `avoid` when the context allows."""
        for _ in range(8):
            token = self.output[self.rng.randrange(len(self.output))]
            if token not in avoid:
                return token
        return next(t for t in range(self.vocab_size) if t not in avoid)

    def step(self) -> list[int]:
        """One tree step; returns the emitted tokens (accepted drafts plus the bonus token).

        The host builds the tree tokens, `device_step` runs the pass with no read-back (as a
        CUDA graph where the runner replays them), and the packed verdict comes back in one
        transfer: the step's one synchronisation.
        """
        node_tokens = self.tree_tokens()
        inputs = (torch.tensor([node_tokens]), torch.tensor([self.cache_len]))
        keep = (self.mask, self.depths, self.continuation, _tree_tensors(self.parents, self.device))
        packed = self.runner(
            ("tree", self.tree, self.row_size), self.device_step, inputs,
            length_bound(self.cache_len, self._capacity() - self.tree.num_nodes),
            keep=keep,
        ).tolist()  # fmt: skip
        accept_len, next_token = packed[0], packed[1]
        path = packed[2 : 2 + accept_len + 1]
        top_rows = packed[2 + self.depth + 1 :]
        return self.absorb(node_tokens, path, next_token, top_rows)

    def _capacity(self) -> int:
        return self.capacity if self.capacity is not None else self.model.cache.max_seq_len

    def device_step(self, tokens: Tensor, cache_lens: Tensor, bound: int) -> Tensor:
        """Forward, verify, compact and Jacobi update on the device; nothing read back.

        `tokens` [1, T] and `cache_lens` [1] on the device; `bound` >= the cache length, on the
        host. Returns accept_len, next_token, the accepted nodes (depth + 1, -1 padded) and the
        top `row_size` tokens at each node of the chosen node's continuation, as one tensor.
        """
        logits = self.model(
            tokens,
            positions=cache_lens[:, None] + self.depths[None],
            cache_lens=cache_lens,
            tree_mask=self.mask,
            max_cache_len=bound,
        )
        scores = logits
        if self.sampler is not None:  # never captured (use_cuda_graph): cache_len is host state
            scores = self.sampler.perturb(logits, self.cache_len, self.depths, self.depth)
        verdict = greedy_verify(scores, tokens, self.parents)
        self.model.compact_cache(cache_lens, verdict.accepted_nodes)
        chosen = verdict.accepted_nodes[0].gather(0, verdict.accept_len)  # (1,)
        follow = self.continuation.index_select(0, chosen)[0]  # (depth,)
        top = logits[0, follow.clamp(min=0)].topk(self.row_size, dim=-1).indices  # (depth, K+1)
        return torch.cat(
            [verdict.accept_len, verdict.next_token, verdict.accepted_nodes[0], top.flatten()]
        )

    def absorb(
        self, node_tokens: list[int], path: list[int], next_token: int, top_rows: list[int]
    ) -> list[int]:
        """Advance past a verified tree step and return the emitted tokens.

        `path`: the accepted nodes, root first; `top_rows`: flat, depth-major, the top
        `row_size` tokens at each node of `continuation[path[-1]]` (any values past the valid
        ones). Split from `step` so that a batched loop can verify many rows in one pass.
        """
        follow_valid = self.follow_lengths[path[-1]]
        row = self.row_size
        self.candidates = [
            top_rows[d * row : (d + 1) * row] if d < follow_valid else None
            for d in range(self.depth)
        ]
        self.cache_len += len(path)
        return [node_tokens[node] for node in path[1:]] + [next_token]

    def absorb_single(self, token: int) -> list[int]:
        """Advance past a one-token step (no tree): the candidates start over."""
        self.candidates = [None] * self.depth
        self.cache_len += 1
        return [token]

    def greedy_step(self) -> list[int]:
        """One plain step, for the last positions of the context where the tree cannot fit."""
        cache_lens = torch.tensor([self.cache_len], device=self.device)
        logits = self.model(
            torch.tensor([[self.output[-1]]], device=self.device),
            cache_lens=cache_lens,
            max_cache_len=self.cache_len,
        )
        return self.absorb_single(_pick(logits[0, -1], self.cache_len, self.sampler))


def _continuations(tree: TreeSpec) -> Tensor:
    """For each node, the nodes below it whose logits become next step's candidates.

    Row x lists, depth by depth, the path that continues from x: its lowest-rank Jacobi child,
    or its retrieval child where it has no Jacobi child; -1 padded to `max_depth`.
    """
    children: dict[int, list[int]] = {}
    for node in range(1, tree.num_nodes):
        children.setdefault(tree.parents[node], []).append(node)

    def preference(node: int) -> tuple[int, int]:
        return (tree.kinds[node] != JACOBI, tree.ranks[node])

    table = torch.full((tree.num_nodes, max(tree.max_depth, 1)), -1, dtype=torch.long)
    for node in range(tree.num_nodes):
        current, depth = node, 0
        while current in children:
            current = min(children[current], key=preference)
            table[node, depth] = current
            depth += 1
    return table
