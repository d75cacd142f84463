"""Neuron partitions for granular upcycling: which FFN neurons share an expert.

Every partition is a list of G equal-size, disjoint index arrays covering range(I), computed
with numpy and deterministic for a given seed. Which neurons share an expert decides most of
the quality of a granular MoE before training (REFERENCE: contiguous G=64 at 50% active, oracle
routing, perplexity 47.9; co-activation 33.3; dense 11.7), so the clustering ones matter.

- contiguous: neurons [0, m), [m, 2m), ... (NVIDIA granular upcycling, Megatron's shards)
- random: a seeded permutation cut into G parts
- kmeans: balanced k-means on the normalized concatenation [gate_i, up_i] of each neuron's rows
  (LLaMA-MoE, https://arxiv.org/abs/2406.16554; MoEfication, https://arxiv.org/abs/2110.01786)
- coactivation: balanced k-means on each neuron's activation pattern over calibration tokens
  (which tokens it is important for), so neurons that fire together share an expert
"""

from __future__ import annotations

import numpy as np

PARTITIONS = ("contiguous", "random", "kmeans", "coactivation")


def balanced_assign(sim: np.ndarray, size: int) -> np.ndarray:
    """Assign each of N rows to one of G clusters, exactly `size` per cluster (N = G * size).

    Rounds of proposals: every unassigned row proposes to its most similar cluster that still
    has room; each cluster keeps its most similar proposers up to its remaining capacity. Each
    round fills at least one cluster or assigns everyone, so there are at most G rounds.
    sim: (N, G) similarities. Returns (N,) cluster ids.
    """
    n, g = sim.shape
    if n != g * size:
        raise ValueError(f"{n} rows do not split into {g} clusters of {size}")
    assign = np.full(n, -1, dtype=np.int64)
    capacity = np.full(g, size, dtype=np.int64)
    todo = np.arange(n)
    while todo.size:
        s = sim[todo].astype(np.float64, copy=True)
        s[:, capacity == 0] = -np.inf
        choice = s.argmax(axis=1)
        score = s[np.arange(todo.size), choice]
        order = np.lexsort((-score, choice))  # by cluster, best first
        chosen = choice[order]
        first = np.searchsorted(chosen, chosen, side="left")
        rank = np.arange(order.size) - first
        accept = rank < capacity[chosen]
        assign[todo[order[accept]]] = chosen[accept]
        capacity -= np.bincount(chosen[accept], minlength=g)
        todo = np.sort(todo[order[~accept]])
    return assign


def balanced_kmeans(x: np.ndarray, groups: int, seed: int, iters: int = 15) -> list[np.ndarray]:
    """Cosine balanced k-means of the rows of x (N, D) into `groups` equal clusters."""
    x = x.astype(np.float32, copy=False)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = x.shape[0]
    size = n // groups
    rng = np.random.default_rng([seed, 11])
    centers = x[rng.choice(n, groups, replace=False)]
    assign = balanced_assign(x @ centers.T, size)
    for _ in range(iters):
        sums = np.zeros_like(centers)
        np.add.at(sums, assign, x)
        centers = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
        new = balanced_assign(x @ centers.T, size)
        if np.array_equal(new, assign):
            break
        assign = new
    return _groups(assign, groups)


def _groups(assign: np.ndarray, groups: int) -> list[np.ndarray]:
    """Cluster ids -> sorted index arrays, clusters ordered by their smallest neuron."""
    parts = [np.flatnonzero(assign == c) for c in range(groups)]
    return sorted(parts, key=lambda p: int(p[0]))


def contiguous(n: int, groups: int) -> list[np.ndarray]:
    size = n // groups
    return [np.arange(c * size, (c + 1) * size) for c in range(groups)]


def random_partition(n: int, groups: int, seed: int, layer: int) -> list[np.ndarray]:
    perm = np.random.default_rng([seed, layer, 7]).permutation(n)
    size = n // groups
    return [np.sort(perm[c * size : (c + 1) * size]) for c in range(groups)]


def kmeans_partition(
    gate: np.ndarray, up: np.ndarray, groups: int, seed: int, layer: int
) -> list[np.ndarray]:
    """gate, up: (I, H) float32."""
    return balanced_kmeans(np.concatenate([gate, up], axis=1), groups, seed=seed * 1_000 + layer)


def coactivation_partition(
    active: np.ndarray, groups: int, seed: int, layer: int
) -> list[np.ndarray]:
    """active: (T, I) boolean, True where a neuron is among a token's most important ones."""
    features = active.T.astype(np.float32)  # (I, T): the tokens each neuron matters for
    features -= features.mean(axis=1, keepdims=True)  # compare patterns, not frequencies
    return balanced_kmeans(features, groups, seed=seed * 1_000 + layer)


def split_shared(
    parts: list[np.ndarray], shared: int, importance: np.ndarray | None
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Take `shared` parts' worth of neurons out as the always-on shared expert.

    With an importance score per neuron, the shared expert gets the most important neurons and
    the routed parts keep their remaining members re-cut to equal sizes in their own order;
    without one, the first `shared` parts become the shared expert.
    """
    if shared == 0:
        return np.zeros(0, dtype=np.int64), parts
    if importance is None:
        return np.sort(np.concatenate(parts[:shared])), parts[shared:]
    size = parts[0].size
    n = size * len(parts)
    top = np.sort(np.argsort(-importance, kind="stable")[: shared * size])
    is_shared = np.zeros(n, dtype=bool)
    is_shared[top] = True
    rest = np.concatenate([p[~is_shared[p]] for p in parts])  # keeps cluster order
    routed = [np.sort(rest[c * size : (c + 1) * size]) for c in range(len(parts) - shared)]
    return top, routed


def check_partition(parts: list[np.ndarray], n: int) -> None:
    """Equal sizes, disjoint, covering range(n)."""
    sizes = {p.size for p in parts}
    if len(sizes) != 1:
        raise AssertionError(f"unequal part sizes {sorted(sizes)}")
    if not np.array_equal(np.sort(np.concatenate(parts)), np.arange(n)):
        raise AssertionError("parts overlap or miss neurons")
