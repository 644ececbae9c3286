"""Spherical k-means over the rows of the output matrix, weighted by token frequency. The math only.

Rows are compared by direction (cosine), since a row's norm mostly sets how peaked its logit is, which the
per-token scale restores. Each row carries a weight (its token's calibration count + 1): frequent tokens pull the
centroids, so the code vectors fit the tokens that carry most of the probability mass."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..progress import progress_bar


@dataclass
class KMeansResult:
    centroids: torch.Tensor    # [K, d] unit vectors
    assignments: torch.Tensor  # [n] int64 in [0, K)
    iterations: int
    objective: float           # sum_i w_i * cos(row_i, its centroid)


def _assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid by cosine, chunked over rows (memory: chunk x K)."""
    best = torch.empty(x.shape[0], dtype=torch.long)
    sims = torch.empty(x.shape[0], dtype=x.dtype)
    for i in range(0, x.shape[0], chunk):
        s = x[i:i + chunk] @ centroids.t()
        sims[i:i + chunk], best[i:i + chunk] = s.max(dim=1)
    return best, sims


def spherical_kmeans(rows: torch.Tensor, k: int, weights: torch.Tensor | None = None, *, iterations: int = 25,
                     seed: int = 0, chunk: int = 8192, progress: bool = False) -> KMeansResult:
    """Weighted spherical k-means of `rows` [n, d] into `k` clusters; deterministic given `seed`.

    Init: k distinct rows drawn with probability proportional to weight. Empty clusters are re-seeded with the rows
    that sit farthest from their centroid. Stops early when no assignment changes."""
    n = rows.shape[0]
    if not 2 <= k <= n:
        raise ValueError(f"k must be between 2 and the number of rows {n} (got {k})")
    x = F.normalize(rows.detach().float().cpu(), dim=1)
    w = torch.ones(n) if weights is None else weights.detach().float().cpu().clamp_min(0)
    if not (w > 0).sum() >= k:
        w = w + 1e-6  # fewer positive weights than clusters: let every row be drawn
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.multinomial(w, k, replacement=False, generator=gen)].clone()
    assign, sims = _assign(x, centroids, chunk)
    it = 0
    for it in progress_bar(range(1, iterations + 1), description="vq_logits: k-means iterations", enabled=progress):
        sums = torch.zeros(k, x.shape[1]).index_add_(0, assign, x * w[:, None])
        counts = torch.bincount(assign, minlength=k)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():
            # re-seed with the worst-fitting rows (lowest cosine to their centroid), one per empty cluster
            worst = torch.argsort(sims, stable=True)[: empty.numel()]
            sums[empty] = x[worst]
        centroids = F.normalize(sums, dim=1)
        new_assign, sims = _assign(x, centroids, chunk)
        if torch.equal(new_assign, assign) and not empty.numel():
            break
        assign = new_assign
    return KMeansResult(centroids, assign, it, float((w * sims).sum()))


def cluster_means(rows: torch.Tensor, assignments: torch.Tensor, k: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """[k, d] weighted mean of the raw rows of each cluster: the code vectors of the plain copy (no scale/bias)."""
    rows = rows.detach().float().cpu()
    w = torch.ones(rows.shape[0]) if weights is None else weights.detach().float().cpu()
    sums = torch.zeros(k, rows.shape[1]).index_add_(0, assignments, rows * w[:, None])
    mass = torch.zeros(k).index_add_(0, assignments, w)
    return sums / mass.clamp_min(1e-12)[:, None]
