"""Neuron partitions for granular upcycling: which FFN neurons share an expert.

Every partition is a list of G equal-size, disjoint index arrays covering range(I) (for
coactivation: the shared neurons and G - S such routed parts), computed with numpy and
deterministic for a given seed. Which neurons share an expert decides most of
the quality of a granular MoE before training (REFERENCE: contiguous G=64 at 50% active, oracle
routing, perplexity 47.9; co-activation 33.3; dense 11.7), so the clustering ones matter.

- contiguous: neurons [0, m), [m, 2m), ... (NVIDIA granular upcycling, Megatron's shards)
- random: a seeded permutation cut into G parts
- kmeans: balanced k-means on the normalized concatenation [gate_i, up_i] of each neuron's rows
  (LLaMA-MoE, https://arxiv.org/abs/2406.16554; MoEfication, https://arxiv.org/abs/2110.01786)
- coactivation: from each neuron's share of every calibration token's FFN output. The shared
  expert takes the neurons with the largest mean share; the rest are clustered by their share
  patterns (balanced k-means), then refined for top-k routing: alternately take each token's
  top-k parts by captured share, and reassign neurons (balanced) to the parts that are chosen on
  the tokens they matter for, as long as the captured share grows; then the same with the
  parts a linear router (fitted like the activation router) picks instead of the oracle's
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


def token_shares(contributions: np.ndarray) -> np.ndarray:
    """(T, I) contributions -> each neuron's share of its token's total (rows sum to 1)."""
    c = contributions.astype(np.float32, copy=False)
    return c / np.maximum(c.sum(axis=1, keepdims=True), np.float32(1e-12))


def cluster_mass(weights: np.ndarray, assign: np.ndarray, groups: int) -> np.ndarray:
    """(T, groups): each token's summed weight per cluster, for weights (T, N), ids (N,)."""
    onehot = np.zeros((assign.size, groups), np.float32)
    onehot[np.arange(assign.size), assign] = 1
    return weights @ onehot


def top_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """(T, groups) 0/1 mask of each row's k largest scores."""
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    chosen = np.zeros_like(scores)
    np.put_along_axis(chosen, top, 1.0, axis=1)
    return chosen


def topk_captured(weights: np.ndarray, assign: np.ndarray, groups: int, k: int):
    """For weights (T, N) >= 0 and cluster ids (N,): each token's k clusters with the largest
    summed weight, as a (T, groups) 0/1 mask, and the total weight they capture."""
    mass = cluster_mass(weights, assign, groups)
    chosen = top_mask(mass, k)
    return chosen, float((mass * chosen).sum(dtype=np.float64))


def _refine(weights, assign, groups, rounds, choose) -> np.ndarray:
    """Rounds of: each token keeps the clusters `choose(mass)` marks (a (T, groups) mask from
    the (T, groups) cluster masses); every neuron moves (balanced) to the clusters kept on the
    tokens it contributes to, weights.T @ chosen. Stops when the captured weight no longer
    grows; returns the best (N,) ids."""
    size = assign.size // groups
    weights = weights.astype(np.float32, copy=False)
    best, best_score = assign, -np.inf
    for _ in range(rounds + 1):
        mass = cluster_mass(weights, assign, groups)
        chosen = choose(mass)
        score = float((mass * chosen).sum(dtype=np.float64))
        if score <= best_score:
            break
        best, best_score = assign, score
        assign = balanced_assign(weights.T @ chosen, size)
    return best


def refine_for_topk(
    weights: np.ndarray, assign: np.ndarray, groups: int, k: int, rounds: int = 10
) -> np.ndarray:
    """Improve equal-size clusters of N neurons for routing that keeps k clusters per token.

    weights: (T, N) >= 0, what each neuron contributes to each token. The objective is the
    weight captured when every token keeps its k heaviest clusters (what an oracle router
    keeps). Each round fixes the tokens' choices and moves every neuron, with balanced_assign,
    to the cluster whose choosing tokens it contributes most to: weights.T @ chosen. That
    cannot lower the objective for the fixed choices; the choices are then recomputed, and
    the rounds stop when the captured weight no longer grows. Returns the best (N,) ids.
    """
    if k >= groups:
        return assign
    return _refine(weights, assign, groups, rounds, lambda mass: top_mask(mass, k))


def refine_for_router(
    weights: np.ndarray,
    x: np.ndarray,
    assign: np.ndarray,
    groups: int,
    k: int,
    rounds: int = 10,
    ridge: float = 0.1,
) -> np.ndarray:
    """Like refine_for_topk, but each token keeps the k clusters a linear router would pick.

    The router is what `--router-init activation` and `upcycle calibrate` fit: a ridge
    regression from the router input x (T, H) to each cluster's log weight (here the summed
    weights, a proxy for the log output norm), ridge relative to the mean eigenvalue of x.T x.
    Each round refits it to the current clusters (one (H, T) solve up front, then two matrix
    products), takes each token's top-k by its prediction, and moves the neurons to the
    clusters that are picked on the tokens they matter for: the clusters become ones a linear
    router can find. Stops when the weight captured by the router's picks no longer grows;
    returns the best (N,) ids.
    """
    if k >= groups:
        return assign
    x64 = x.astype(np.float64)
    gram = x64.T @ x64
    lam = ridge * np.trace(gram) / gram.shape[0]
    solve = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), x64.T).astype(np.float32)
    x = x.astype(np.float32, copy=False)

    def routed(mass):
        return top_mask(x @ (solve @ np.log(mass + np.float32(1e-9))), k)

    return _refine(weights, assign, groups, rounds, routed)


def coactivation_partition(
    contributions: np.ndarray,
    groups: int,
    seed: int,
    layer: int,
    shared: int = 0,
    top_k: int | None = None,
    router_inputs: np.ndarray | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(shared neurons, routed parts) from contributions (T, I): |h_i| * ||down[:, i]|| per token.

    Contributions are taken as shares of each token's total, so every token counts alike. The
    shared expert gets the `shared` parts' worth of neurons with the largest mean share (those
    every token needs); the other neurons are clustered into `groups - shared` parts by their
    centered share patterns over tokens (balanced cosine k-means). With `top_k` (routed parts
    a token gets) the parts are then refined for the oracle's top-k (refine_for_topk) and,
    given the router inputs x (T, H) of the same tokens, for a linear router's top-k
    (refine_for_router). Choosing the shared neurons first lets the clusters form among the
    routed neurons only. The clusters alone help little (neurons' share patterns are nearly
    uncorrelated); the refinements do most: default model, G=64, S=16, top-16, 8192 tokens,
    see docs/benchmarks.md ("Granular upcycling quality").
    """
    share = token_shares(contributions)
    n = share.shape[1]
    size = n // groups
    top = np.sort(np.argsort(-share.mean(axis=0), kind="stable")[: shared * size])
    rest = np.setdiff1d(np.arange(n), top)
    routed = groups - shared
    features = share[:, rest].T.copy()  # (R, T): the tokens each neuron matters for
    features -= features.mean(axis=1, keepdims=True)  # compare patterns, not sizes
    assign = np.empty(rest.size, dtype=np.int64)
    for c, part in enumerate(balanced_kmeans(features, routed, seed=seed * 1_000 + layer)):
        assign[part] = c
    if top_k:
        assign = refine_for_topk(share[:, rest], assign, routed, top_k)
        if router_inputs is not None:
            assign = refine_for_router(share[:, rest], router_inputs, assign, routed, top_k)
    return top, _groups_of(rest, assign, routed)


def _groups_of(index: np.ndarray, assign: np.ndarray, groups: int) -> list[np.ndarray]:
    """Cluster ids over `index` -> sorted index arrays, ordered by their smallest neuron."""
    return sorted((np.sort(index[assign == c]) for c in range(groups)), key=lambda p: int(p[0]))


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
