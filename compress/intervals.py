"""95% intervals over held-out windows: how far a quality figure could move with other windows of the same text.

The windows are the samples. A figure that is a ratio of sums over them (perplexity's mean NLL per token, KL per
token) gets the ratio estimator's standard error (the linearized variance of a ratio of sums; for windows of equal
length it is the standard error of the per-window means), and Student's t with W - 1 degrees of freedom. Two
models scored on the same windows are paired: the interval is that of their per-window difference, far narrower
than two separate intervals. Assumed: windows are independent samples. Consecutive windows of one document are
not: `block=k` takes runs of k consecutive windows as the samples instead (batch means; on the reference model's
held-out text runs of 16 widened four pairs' standard errors 1.4-2.5x, benchmarks/interval_blocks.py). Nothing
here speaks for other kinds of text. With fewer than two samples there is no spread to measure: the bounds are None.
Accuracies over n examples (the eval suite) get Wilson score intervals."""
from __future__ import annotations

import math

import torch

# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: a Cornish-Fisher expansion)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)

Interval = tuple[float, float | None, float | None]  # (estimate, low, high); bounds None below two windows


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` >= 1 degrees of freedom (accurate to ~1e-4 above 30)."""
    if df < 1:
        raise ValueError(f"Student's t needs at least 1 degree of freedom, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def ratio_interval(num: torch.Tensor, den: torch.Tensor, block: int = 1) -> Interval:
    """sum(num) / sum(den) over W windows, with its 95% interval. `block` > 1 sums runs of that many consecutive
    windows first and treats the runs as the samples (batch means: wider where neighbouring windows correlate)."""
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    num, den = num.double().reshape(-1), den.double().reshape(-1)
    if block > 1:  # a last, shorter run stays (the ratio estimator weighs samples by their positions)
        num = torch.stack([c.sum() for c in torch.split(num, block)])
        den = torch.stack([c.sum() for c in torch.split(den, block)])
    w = num.numel()
    est = (num.sum() / den.sum()).item()
    if w < 2:
        return est, None, None
    resid = (num - est * den) / den.mean()
    half = t_quantile_975(w - 1) * (resid.var(unbiased=True) / w).sqrt().item()
    return est, est - half, est + half


def paired_log_ratio(nll: torch.Tensor, base_nll: torch.Tensor, positions: torch.Tensor, block: int = 1) -> Interval:
    """log(perplexity / base perplexity), from two models' summed NLL per window over the same windows."""
    return ratio_interval(nll - base_nll, positions, block)


def mapped(interval: Interval, fn) -> tuple[float, list[float] | None]:
    """(fn(estimate), [fn(low), fn(high)] or None) for an increasing `fn`."""
    est, lo, hi = interval
    return fn(est), None if lo is None else [fn(lo), fn(hi)]


def perplexity_change(interval: Interval) -> dict:
    """A paired log ratio as ppl_delta_pct / ppl_ratio, each with its 95% interval."""
    from .evaluate import exp_or_inf

    pct, pct_ci = mapped(interval, lambda x: 100.0 * (exp_or_inf(x) - 1) if x > 1 else 100.0 * math.expm1(x))
    ratio, ratio_ci = mapped(interval, exp_or_inf)
    return {"ppl_delta_pct": pct, "ppl_delta_pct_ci95": pct_ci, "ppl_ratio": ratio, "ppl_ratio_ci95": ratio_ci}


def paired_figures(nll: torch.Tensor, base_nll: torch.Tensor, positions: torch.Tensor,
                   kl: torch.Tensor | None = None, kl_per: torch.Tensor | None = None) -> dict:
    """Two models over the same windows (per-window summed NLL, and the first's summed KL): perplexity_change of
    the first against the second, and with `kl` sum(kl) / sum(kl_per) (per position by default; another KL for a
    ratio of two) as kl / kl_ci95, clipped at 0."""
    out = perplexity_change(paired_log_ratio(nll, base_nll, positions))
    if kl is not None:
        out["kl"], out["kl_ci95"] = mapped(ratio_interval(kl, positions if kl_per is None else kl_per),
                                           lambda x: max(x, 0.0))
    return out


def wilson_interval(p: float, n: int) -> list[float]:
    """The 95% Wilson score interval of a proportion p observed over n trials (inside [0, 1], and not zero-width
    at p = 0 or 1 as p +- 1.96 x its standard error would be)."""
    z = 1.959964
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at p = 0 (1) the bound is exactly 0 (1); rounding left it at 5.6e-17 in the JSON
    return [0.0 if p <= 0 else max(centre - half, 0.0), 1.0 if p >= 1 else min(centre + half, 1.0)]


def paired_proportion_difference(ours: list[bool], base: list[bool]) -> list[float]:
    """The 95% interval of p(ours) - p(base) over paired binary outcomes (the same items scored twice): Newcombe's
    (1998) square-and-add of the two Wilson intervals, with the pairs' correlation (continuity-corrected phi, as in
    Altman et al., "Statistics with confidence", 2000); not zero-width when every pair agrees, and narrower than
    the unpaired difference when the two sides agree on most items."""
    n = len(ours)
    if n != len(base) or n == 0:
        raise ValueError(f"paired outcomes: {n} and {len(base)} items")
    both = sum(1 for a, b in zip(ours, base) if a and b)
    only_ours = sum(1 for a, b in zip(ours, base) if a and not b)
    only_base = sum(1 for a, b in zip(ours, base) if b and not a)
    neither = n - both - only_ours - only_base
    p1, p2 = (both + only_ours) / n, (both + only_base) / n
    (l1, u1), (l2, u2) = wilson_interval(p1, n), wilson_interval(p2, n)
    margins = (both + only_ours) * (only_base + neither) * (both + only_base) * (only_ours + neither)
    cross = both * neither - only_ours * only_base
    corrected = cross - n / 2 if cross > n / 2 else cross if cross < 0 else 0.0
    phi = corrected / math.sqrt(margins) if margins else 0.0
    d = p1 - p2
    low = d - math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    high = d + math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    return [max(low, -1.0), min(high, 1.0)]


def format_interval(ci: list[float] | None, spec: str) -> str:
    """`[low, high]` in `spec`, or what stands in for it with a single window."""
    return "n/a (1 window)" if ci is None else f"[{format(ci[0], spec)}, {format(ci[1], spec)}]"
