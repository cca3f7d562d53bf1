"""Tree selection for ``tree="auto"``: the tree that maximises expected tokens per second.

Each step, before the pass, the decoder knows its drafts (``Draft``): the Jacobi candidates of
every depth with the probability the model gave them on the previous step, and the retrieval
draft with the length of the n-gram match behind it. ``AcceptanceStats`` turns a slot's kind
into P(accepted | parent accepted), so a node's *value*, P(its whole path is accepted), is the
product of those along its path, and

    expected tokens per step = 1 + sum of node values      (the 1 is the bonus token)
    expected tokens per second = expected tokens / step_time(T)

``grow_tree`` adds nodes greedily, best value first (a child is never worth more than its
parent, so every prefix of that order is a tree), evaluates the objective at every size T,
starting from T = 1 (plain greedy), and keeps the best prefix: nodes worth less than the time
they cost are dropped, and a machine whose step time grows fast gets a small tree or none.
Sibling slots that hold the same token are merged (the second one's children hang under the
first), so no slot is spent twice on one token.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections.abc import Callable, Sequence

from msn.acceptance import SlotKey, jacobi_key, retrieval_key

ROOT_KIND, JACOBI_KIND, RETRIEVAL_KIND = "root", "J", "R"
DEFAULT_WIDTH = 8
DEFAULT_MAX_NODES = 64


@dataclasses.dataclass(frozen=True)
class Draft:
    """What a step can guess from: Jacobi candidates per depth and a retrieval chain."""

    rows: Sequence[Sequence[tuple[int, float]]] = ()  # rows[d]: (token, prob) for depth d + 1
    # Retrieval chains: (draft tokens depth 1 first, length of the suffix match behind it,
    # source: "R" the context, "H" the output memory).
    chains: Sequence[tuple[Sequence[int], int, str]] = ()
    streak: int = 0  # 1 when the previous step accepted two tokens or more


@dataclasses.dataclass(frozen=True)
class BuiltTree:
    """One step's tree: node 0 is the root (the pending token); ``parents[i] < i``."""

    tokens: tuple[int, ...]
    parents: tuple[int, ...]
    depths: tuple[int, ...]
    keys: tuple[SlotKey | None, ...]  # slot kind of every node (None for the root)
    values: tuple[float, ...]  # P(path to the node accepted); 1 for the root
    seconds: float  # predicted step time

    @property
    def num_nodes(self) -> int:
        return len(self.tokens)

    @property
    def max_depth(self) -> int:
        return max(self.depths)

    @property
    def expected_tokens(self) -> float:
        """Expected tokens emitted by the step: accepted drafts plus the bonus token."""
        return sum(self.values)

    @property
    def expected_rate(self) -> float:
        return self.expected_tokens / self.seconds

    def continuation(self, node: int) -> list[int]:
        """The most valuable path below ``node``: where next step's Jacobi candidates come from.

        Its nodes held guesses for the tokens after the bonus token; their logits, computed
        from a context with a wrong guess in it, are the Jacobi update.
        """
        best: dict[int, int] = {}
        for child in range(1, self.num_nodes):
            parent = self.parents[child]
            if parent not in best or self.values[child] > self.values[best[parent]]:
                best[parent] = child
        path = []
        while node in best:
            node = best[node]
            path.append(node)
        return path


def grow_tree(
    root_token: int,
    draft: Draft,
    estimate: Callable[[SlotKey], float],
    step_time: Callable[[int], float],
    max_nodes: int = DEFAULT_MAX_NODES,
    width: int = DEFAULT_WIDTH,
) -> BuiltTree:
    """The tree, up to ``max_nodes`` nodes, with the most expected tokens per second.

    ``estimate(key)`` is P(accepted | parent accepted) for a slot kind; ``step_time(T)`` the
    seconds of a step over T tree tokens. T = 1 (no draft at all) is always a candidate.
    """
    max_nodes = max(1, max_nodes)
    rows, chains = draft.rows, draft.chains
    times = [0.0] + [step_time(t) for t in range(1, max_nodes + 1)]
    # floor[t]: the cheapest step of t or more tokens (bounds what growing further can give).
    floor = times[:]
    for t in range(max_nodes - 1, 0, -1):
        floor[t] = min(floor[t], floor[t + 1])

    tokens, parents, depths = [root_token], [-1], [0]
    keys: list[SlotKey | None] = [None]
    values = [1.0]
    children: list[dict[int, int]] = [{}]
    heap: list[tuple[float, int, int, str, int, int, SlotKey]] = []  # (-value, ..., key)
    order = itertools.count()

    def offer(parent: int, kind: str, depth: int, value: float) -> None:
        """Queue the children a node of lineage ``kind`` (root, J, or R + chain) can have."""
        if kind in (ROOT_KIND, JACOBI_KIND) and depth < len(rows):
            for rank, (token, prob) in enumerate(rows[depth][:width]):
                key = jacobi_key(depth + 1, rank, prob)
                child_value = value * estimate(key)
                item = (-child_value, next(order), parent, JACOBI_KIND, depth + 1, token, key)
                heapq.heappush(heap, item)
        for index, (chain, match_len, source) in enumerate(chains):
            lineage = f"{RETRIEVAL_KIND}{index}"
            if kind in (ROOT_KIND, lineage) and depth < len(chain):
                key = retrieval_key(depth + 1, match_len, source, draft.streak)
                child_value = value * estimate(key)
                item = (-child_value, next(order), parent, lineage, depth + 1, chain[depth], key)
                heapq.heappush(heap, item)

    offer(0, ROOT_KIND, 0, 1.0)
    total = 1.0
    best_rate, best_size = total / times[1], 1
    while heap and len(tokens) < max_nodes:
        negative, _, parent, kind, depth, token, key = heapq.heappop(heap)
        value = -negative
        size = len(tokens)
        if (total + value * (max_nodes - size)) / floor[size + 1] <= best_rate:
            break  # even max_nodes nodes this good could not beat the best tree so far
        twin = children[parent].get(token)
        if twin is not None:  # the same token is already a sibling: grow under it instead
            offer(twin, kind, depth, value)
            continue
        node = size
        tokens.append(token)
        parents.append(parent)
        depths.append(depth)
        keys.append(key)
        values.append(value)
        children[parent][token] = node
        children.append({})
        total += value
        rate = total / times[node + 1]
        if rate > best_rate:
            best_rate, best_size = rate, node + 1
        offer(node, kind, depth, value)

    n = best_size
    return BuiltTree(
        tokens=tuple(tokens[:n]),
        parents=tuple(parents[:n]),
        depths=tuple(depths[:n]),
        keys=tuple(keys[:n]),
        values=tuple(values[:n]),
        seconds=times[n],
    )
