"""Which experts and neurons a prune keeps, from routing statistics (numpy only).

Per MoE layer the statistics are `counts` (E,): how often each expert was among a token's
top-k on the calibration data, and for uncurl and merge `logits` (T, E): the router logits of
every calibration token.

- frequency: the N experts with the largest counts (ties: the lower index).
- uncurl: the experts' router-logit profiles (column e of the logits, each token's logits
  centred over the experts first, since a softmax ignores a per-token shift) are clustered
  into N groups by k-means (k-means++ starts, RESTARTS seeded restarts, the lowest
  within-cluster sum of squares wins); each group keeps its most-routed member.
- random: N experts drawn uniformly (seeded per layer), whatever the statistics say: the floor
  a criterion has to beat.
- merge: the same clusters; each becomes one expert, the average of its members weighted by
  their counts (uniform when no token chose any of them).

The result of a layer is an `ExpertPlan`: output expert j = sum_m weights[j][m] * expert
members[j][m] (one member of weight 1 for frequency and uncurl).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESTARTS = 10
MAX_ITERATIONS = 100


@dataclass(frozen=True)
class ExpertPlan:
    members: list[list[int]]  # per output expert, the source experts it is made of
    weights: list[list[float]]  # their weights (sum 1)
    clusters: list[list[int]] | None = None  # uncurl: the clusters the kept experts stand for

    @property
    def num_experts(self) -> int:
        return len(self.members)

    @property
    def is_selection(self) -> bool:
        """Every output expert is one source expert, unchanged."""
        return all(len(m) == 1 for m in self.members)

    def kept(self) -> list[int]:
        return [m[0] for m in self.members]


def by_frequency(counts: np.ndarray, n: int) -> ExpertPlan:
    """The n most-routed experts, in their original order."""
    order = sorted(range(len(counts)), key=lambda e: (-counts[e], e))
    return ExpertPlan([[e] for e in sorted(order[:n])], [[1.0]] * n)


def profiles(logits: np.ndarray) -> np.ndarray:
    """(E, T): each expert's router logits over the tokens, centred per token."""
    x = logits.astype(np.float64)
    return (x - x.mean(axis=1, keepdims=True)).T


def kmeans(points: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Cluster labels (P,) of `points` (P, D) into exactly n non-empty clusters."""
    best, best_labels = np.inf, None
    for _ in range(RESTARTS):
        centers = points[_plus_plus(points, n, rng)]
        for _ in range(MAX_ITERATIONS):
            dist = _sq_distances(points, centers)
            labels = _fill_empty(dist.argmin(axis=1), dist, n)
            new = np.stack([points[labels == c].mean(axis=0) for c in range(n)])
            if np.array_equal(new, centers):
                break
            centers = new
        inertia = float(((points - centers[labels]) ** 2).sum())
        if best_labels is None or inertia < best - 1e-12 * abs(best):
            best, best_labels = inertia, labels
    return best_labels


def _sq_distances(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
    return ((points[:, None, :] - centers[None, :, :]) ** 2).sum(axis=2)


def _plus_plus(points: np.ndarray, n: int, rng: np.random.Generator) -> list[int]:
    """k-means++ starting points (indices); uniform among the rest when all coincide."""
    chosen = [int(rng.integers(len(points)))]
    while len(chosen) < n:
        d2 = _sq_distances(points, points[chosen]).min(axis=1)
        d2[chosen] = 0.0
        if d2.sum() > 0:
            chosen.append(int(rng.choice(len(points), p=d2 / d2.sum())))
        else:
            rest = [i for i in range(len(points)) if i not in chosen]
            chosen.append(int(rng.choice(rest)))
    return chosen


def _fill_empty(labels: np.ndarray, dist: np.ndarray, n: int) -> np.ndarray:
    """Give every empty cluster the point farthest from its own center among clusters of
    more than one point."""
    labels = labels.copy()
    for c in range(n):
        if (labels == c).any():
            continue
        sizes = np.bincount(labels, minlength=n)
        movable = np.flatnonzero(sizes[labels] > 1)
        far = movable[np.argmax(dist[movable, labels[movable]])]
        labels[far] = c
    return labels


def clusters_of(labels: np.ndarray) -> list[list[int]]:
    """Members per cluster, clusters ordered by their smallest member."""
    groups: dict[int, list[int]] = {}
    for e, c in enumerate(labels.tolist()):
        groups.setdefault(c, []).append(e)
    return sorted(groups.values())


def cluster_experts(logits: np.ndarray, n: int, seed: int, layer: int) -> list[list[int]]:
    """The E experts in n clusters by their router-logit profiles (seeded per layer)."""
    rng = np.random.default_rng([seed, layer])
    return clusters_of(kmeans(profiles(logits), n, rng))


def by_uncurl(clusters: list[list[int]], counts: np.ndarray) -> ExpertPlan:
    """Each cluster's most-routed member (ties: the lower index), in original order."""
    kept = [min(c, key=lambda e: (-counts[e], e)) for c in clusters]
    order = np.argsort(kept, kind="stable")
    return ExpertPlan([[kept[j]] for j in order], [[1.0]] * len(kept), [clusters[j] for j in order])


def by_merge(clusters: list[list[int]], counts: np.ndarray) -> ExpertPlan:
    """Each cluster as one expert: its members weighted by their routing counts."""
    weights = []
    for c in clusters:
        total = float(sum(counts[e] for e in c))
        weights.append(
            [float(counts[e]) / total for e in c] if total > 0 else [1.0 / len(c)] * len(c)
        )
    return ExpertPlan([list(c) for c in clusters], weights)


def by_random(num_experts: int, n: int, seed: int, layer: int) -> ExpertPlan:
    """n of the experts drawn uniformly without replacement (seeded per layer), in order."""
    rng = np.random.default_rng([seed, layer])
    kept = sorted(int(e) for e in rng.choice(num_experts, size=n, replace=False))
    return ExpertPlan([[e] for e in kept], [[1.0]] * n)


def plan_layer(by: str, n: int, counts: np.ndarray, logits, seed: int, layer: int) -> ExpertPlan:
    """The ExpertPlan of one layer under criterion `by`."""
    if by == "frequency":
        return by_frequency(counts, n)
    if by == "random":
        return by_random(len(counts), n, seed, layer)
    clusters = cluster_experts(logits, n, seed, layer)
    return by_uncurl(clusters, counts) if by == "uncurl" else by_merge(clusters, counts)


def keep_neurons(importance: np.ndarray, width: int) -> np.ndarray:
    """(N, width) indices: each expert's `width` most important neurons (ties: the lower
    index), in their original order."""
    index = np.arange(importance.shape[1])
    rows = [np.sort(np.lexsort((index, -row))[:width]) for row in importance]
    return np.stack(rows).astype(np.int64)


def ranges(indices) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (sorted indices)."""
    parts, start, prev = [], None, None
    for i in (int(x) for x in indices):
        if start is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            parts.append(f"{start}-{prev}" if prev > start else str(start))
        start = prev = i
    if start is not None:
        parts.append(f"{start}-{prev}" if prev > start else str(start))
    return ",".join(parts)
