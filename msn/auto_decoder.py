"""TR-Jacobi with ``tree="auto"``: a tree chosen afresh every step for this model and machine.

One step (``AutoTreeDecoder.step``):
1. ``msn.autotree.grow_tree`` builds the tree with the most expected tokens per second from
   the drafts (``msn.drafts``), the acceptance statistics (``msn.acceptance``) and the latency
   profile (``msn.latency``); a one-node tree is a plain greedy step;
2. one forward pass over the tree (positions prefix + depth, ancestor mask), ``greedy_verify``
   and KV compaction, as for a fixed tree;
3. the statistics learn from every slot whose parent was accepted, and the nodes below the
   chosen one give next step's Jacobi candidates with their probabilities.

Only tokens on a verified path plus the bonus token are emitted, so whatever tree is built,
the output is greedy decoding's.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections import Counter, OrderedDict

import torch

from msn.acceptance import AcceptanceStats
from msn.autotree import DEFAULT_MAX_NODES, DEFAULT_WIDTH, BuiltTree, grow_tree
from msn.drafts import Drafts, candidate_rows, output_memory
from msn.latency import LatencyProfile
from msn.sampling import Sampler
from msn.step_graph import StepRunner, length_bound
from msn_kernels import greedy_verify
from msn_kernels.greedy_verify import _tree_tensors

RETRIEVAL_DEPTH = 8
JACOBI_ROWS = 6  # depths of Jacobi candidates kept for the next step
GRAPH_AFTER = 3  # a tree shape is captured in a CUDA graph the 3rd time a step builds it


class AutoTreeDecoder:
    """Decoding state for one prompt; same interface as ``msn.decoding.TreeDecoder``."""

    default_max_nodes = DEFAULT_MAX_NODES

    def __init__(
        self,
        model,
        output: list[int],
        profile: LatencyProfile,
        stats: AcceptanceStats,
        retrieval: bool = True,
        max_nodes: int = DEFAULT_MAX_NODES,
        width: int = DEFAULT_WIDTH,
        learn: bool = True,
        seed: int = 0,
        sampler: Sampler | None = None,
        runner: StepRunner | None = None,
    ):
        self.model = model
        self.sampler = sampler  # None: greedy; else draws verified on perturbed logits
        self.runner = runner or StepRunner(model, graphs=False)
        self.output = output
        self.device = model.device
        self.profile = profile
        self.stats = stats
        self.learn = learn
        self.max_nodes = max(1, min(max_nodes, profile.max_tokens))
        self.width = min(width, model.config.vocab_size)
        self.cache_len = len(output) - 1
        self.drafts = Drafts(output, RETRIEVAL_DEPTH, retrieval, output_memory(model))
        self.rng = random.Random(seed)
        self._masks: OrderedDict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.capacity: int | None = None
        # What was built, for the report: nodes and depth per step, predicted seconds.
        self.shapes: Counter[tuple[int, int]] = Counter()
        self.predicted_seconds = 0.0

    @property
    def num_nodes(self) -> int:
        """The largest tree a step may build (what the cache must leave room for)."""
        return self.max_nodes

    def fits(self, capacity: int) -> bool:
        """Whether any tree (two nodes or more) still fits the cache after the prefix."""
        self.capacity = capacity
        return self.cache_len + 2 <= capacity

    def extend_retrieval(self, chunk: list[int]) -> None:
        self.drafts.extend(chunk)

    def build(self, profile: LatencyProfile | None = None) -> BuiltTree:
        """This step's tree; with ``profile``, the one another machine's curve would pick from
        the same drafts and statistics (``benchmarks/auto_tree_shadow.py``)."""
        profile = profile or self.profile
        prefix = self.cache_len
        room = min(self.max_nodes, profile.max_tokens) if profile is not self.profile else None
        room = room or self.max_nodes
        if self.capacity is not None:
            room = max(1, min(room, self.capacity - prefix))

        def step_time(size: int) -> float:
            return profile.step_time(size, prefix)

        draft = self.drafts.draft()
        if len(draft.rows) < JACOBI_ROWS:
            # Depths without candidates get one noise slot (a random context token, as in paper
            # mode). It is worth almost nothing itself, so it only fills slots that cost nothing
            # (T = 2..3 on a CPU core); its logits seed next step's Jacobi candidates.
            noise = [[(self._noise_token(), 0.0)] for _ in range(JACOBI_ROWS - len(draft.rows))]
            draft = dataclasses.replace(draft, rows=[*draft.rows, *noise])
        return grow_tree(self.output[-1], draft, self.stats.estimate, step_time, room, self.width)

    def _noise_token(self) -> int:
        return self.output[self.rng.randrange(len(self.output))]

    def plan(self, profile: LatencyProfile | None = None) -> BuiltTree:
        """This step's tree (``build``), counted in the report of the trees built."""
        tree = self.build(profile)
        self.shapes[tree.num_nodes, tree.max_depth] += 1
        self.predicted_seconds += tree.seconds
        return tree

    def step(self) -> list[int]:
        tree = self.plan()
        if tree.num_nodes == 1:
            return self.greedy_step()
        mask, depths = self._mask(tree)
        follow, follow_lengths = _follow_table(tree)
        inputs = (torch.tensor([tree.tokens]), torch.tensor([self.cache_len]), follow)
        fn = functools.partial(self.device_step, mask, depths, tree.parents, tree.max_depth)
        keep = (mask, depths, _tree_tensors(tree.parents, self.device))
        key = ("auto", tree.parents, self.width)
        capacity = self.capacity if self.capacity is not None else self.model.cache.max_seq_len
        bound = length_bound(self.cache_len, capacity - tree.num_nodes)
        output = self.runner(key, fn, inputs, bound, capture_after=GRAPH_AFTER, keep=keep)
        packed = output.tolist()  # the step's one read-back: verdict and Jacobi rows together
        accept_len, next_token = int(packed[0]), int(packed[1])
        path = [int(node) for node in packed[2 : 3 + accept_len]]
        rows = follow_lengths[path[-1]] * self.width
        start = 3 + tree.max_depth
        top_tokens = [int(token) for token in packed[start : start + rows]]
        start += JACOBI_ROWS * self.width
        top_probs = packed[start : start + rows]
        return self.absorb(tree, path, next_token, top_tokens, top_probs)

    def device_step(
        self,
        mask: torch.Tensor,
        depths: torch.Tensor,
        parents: tuple[int, ...],
        max_depth: int,
        tokens: torch.Tensor,
        cache_lens: torch.Tensor,
        follow: torch.Tensor,
        bound: int,
    ) -> torch.Tensor:
        """Forward, verify, compact and the Jacobi rows on the device; nothing read back.

        ``follow`` [T, JACOBI_ROWS]: each node's continuation (``_follow_table``). Returns, in
        float64 (exact for token ids): accept_len, next_token, the accepted nodes (max_depth +
        1), then the top ``width`` tokens and their probabilities at each of the JACOBI_ROWS
        nodes below the chosen one (rows past its continuation hold filler).
        """
        logits = self.model(
            tokens, positions=cache_lens[:, None] + depths[None], cache_lens=cache_lens,
            tree_mask=mask, max_cache_len=bound,
        )  # fmt: skip
        scores = logits
        if self.sampler is not None:  # never captured (use_cuda_graph): cache_len is host state
            scores = self.sampler.perturb(logits, self.cache_len, depths, max_depth)
        verdict = greedy_verify(scores, tokens, parents)
        self.model.compact_cache(cache_lens, verdict.accepted_nodes)
        chosen = verdict.accepted_nodes[0].gather(0, verdict.accept_len)  # (1,)
        below = follow.index_select(0, chosen)[0].clamp(min=0)  # (JACOBI_ROWS,)
        top_tokens, top_probs = candidate_rows(logits[0, below], self.width)  # (rows, width)
        head = torch.cat([verdict.accept_len, verdict.next_token, verdict.accepted_nodes[0]])
        return torch.cat(
            [head.double(), top_tokens.flatten().double(), top_probs.flatten().double()]
        )

    def absorb(
        self,
        tree: BuiltTree,
        path: list[int],
        next_token: int,
        top_tokens: list[int],
        top_probs: list[float],
    ) -> list[int]:
        """Advance past a verified step of ``tree``; returns the emitted tokens.

        ``path``: the accepted nodes, root first; ``top_tokens``/``top_probs``: flat,
        depth-major, ``width`` candidates per node of ``tree.continuation(path[-1])`` (empty
        when it has none). Split from ``step`` so that a batched loop can verify many rows in
        one pass.
        """
        if top_tokens:
            self.drafts.set_rows(top_tokens, top_probs, self.width)
        else:
            self.drafts.clear_rows()
        if self.learn:
            on_path = set(path)
            for node in range(1, tree.num_nodes):
                if tree.parents[node] in on_path:
                    self.stats.record(tree.keys[node], node in on_path)
        self.cache_len += len(path)
        self.drafts.streak = int(len(path) - 1 >= 2)
        return [tree.tokens[node] for node in path[1:]] + [next_token]

    def greedy_step(self) -> list[int]:
        """One plain step (a one-node tree, or the last positions of the context)."""
        cache_lens = torch.tensor([self.cache_len], device=self.device)
        logits = self.model(
            torch.tensor([[self.output[-1]]], device=self.device),
            cache_lens=cache_lens,
            max_cache_len=self.cache_len,
        )
        if self.sampler is not None:  # the fed token sits at the cache length
            return self.absorb_single(self.sampler.draw(logits[0, -1], self.cache_len))
        return self.absorb_single(int(logits[0, -1].argmax()))

    def absorb_single(self, token: int) -> list[int]:
        """Advance past a one-token step: no candidates for the next step."""
        self.cache_len += 1
        self.drafts.clear_rows()
        self.drafts.streak = 0
        return [token]

    def _mask(self, tree: BuiltTree) -> tuple[torch.Tensor, torch.Tensor]:
        """The ancestor mask and depths of a tree shape, cached (shapes repeat a lot)."""
        cached = self._masks.get(tree.parents)
        if cached is not None:
            self._masks.move_to_end(tree.parents)
            return cached
        size = tree.num_nodes
        rows = [[False] * size for _ in range(size)]
        for node in range(size):
            parent = tree.parents[node]
            if parent >= 0:
                rows[node][:node] = rows[parent][:node]
            rows[node][node] = True
        mask = torch.tensor(rows, dtype=torch.bool, device=self.device)
        depths = torch.tensor(tree.depths, dtype=torch.long, device=self.device)
        self._masks[tree.parents] = (mask, depths)
        if len(self._masks) > 256:
            self._masks.popitem(last=False)
        return mask, depths

    def summary(self, steps: int) -> dict:
        """Which trees were built: mean nodes, depths, the commonest shapes, step times."""
        built = sum(self.shapes.values())
        if not built:
            return {"tree": "auto", "mean_nodes": 1.0, "max_depth": 0, "mean_depth": 0.0}
        nodes = sum(n * c for (n, _), c in self.shapes.items()) / built
        depth = sum(d * c for (_, d), c in self.shapes.items()) / built
        common = [
            {"nodes": n, "depth": d, "share": round(c / built, 3)}
            for (n, d), c in self.shapes.most_common(3)
        ]
        return {
            "tree": "auto",
            "mean_nodes": round(nodes, 2),
            "max_depth": max(d for _, d in self.shapes),
            "mean_depth": round(depth, 2),
            "common_shapes": common,
            "predicted_step_ms": round(1e3 * self.predicted_seconds / built, 2),
        }


def _follow_table(tree: BuiltTree) -> tuple[torch.Tensor, list[int]]:
    """``tree.continuation(node)[:JACOBI_ROWS]`` for every node, as a -1 padded CPU tensor
    [T, JACOBI_ROWS], and each row's length: the device step picks the chosen node's row."""
    best: dict[int, int] = {}
    for child in range(1, tree.num_nodes):
        parent = tree.parents[child]
        if parent not in best or tree.values[child] > tree.values[best[parent]]:
            best[parent] = child
    rows, lengths = [], []
    for node in range(tree.num_nodes):
        row = []
        while node in best and len(row) < JACOBI_ROWS:
            node = best[node]
            row.append(node)
        lengths.append(len(row))
        rows.append(row + [-1] * (JACOBI_ROWS - len(row)))
    return torch.tensor(rows, dtype=torch.long), lengths
