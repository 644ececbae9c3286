"""95% intervals over windows for the perplexity change and the KL (compress.evaluate.paired_change)."""
import math

import pytest
import torch

from compress.evaluate import MetricAccumulator, evaluate, paired_change
from compress.intervals import format_interval, ratio_interval, t_quantile_975


@pytest.mark.parametrize("df, want", [(1, 12.706), (4, 2.776), (30, 2.042), (31, 2.0395), (60, 2.0003),
                                      (120, 1.9799)])
def test_t_quantile_matches_tables(df, want):
    assert t_quantile_975(df) == pytest.approx(want, abs=2e-4)


def test_ratio_interval_is_the_t_interval_for_equal_windows():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    est, lo, hi = ratio_interval(x, torch.ones(4))
    half = 3.182 * (torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).std() / 2).item()  # by hand
    assert (est, lo, hi) == pytest.approx((2.5, 2.5 - half, 2.5 + half), rel=1e-4)
    # one window: no spread to measure, so no bounds (not a zero-width interval that looks certain)
    assert ratio_interval(torch.tensor([3.0]), torch.tensor([2.0])) == (1.5, None, None)
    assert format_interval(None, ".2f") == "n/a (1 window)"
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_ratio_interval_for_windows_of_unequal_length_by_hand():
    """sum(num)/sum(den) with the ratio estimator's standard error: residuals num - R den over mean(den)."""
    num, den = torch.tensor([2.0, 9.0, 4.0]), torch.tensor([1.0, 3.0, 2.0])
    r = 15.0 / 6.0
    resid = [(2 - r * 1) / 2, (9 - r * 3) / 2, (4 - r * 2) / 2]  # mean(den) = 2
    mean = sum(resid) / 3
    se = (sum((x - mean) ** 2 for x in resid) / 2 / 3) ** 0.5
    est, lo, hi = ratio_interval(num, den)
    assert (est, lo, hi) == pytest.approx((r, r - 4.303 * se, r + 4.303 * se), rel=1e-9)


def test_interval_covers_the_true_change_95_percent_of_the_time():
    """Windows of 32 positions with per-window shifts drawn around a known mean: the interval holds it in ~95% of
    2,000 seeded trials (a wrong quantile or standard error lands far outside [0.93, 0.97])."""
    gen = torch.Generator().manual_seed(0)
    hits = 0
    for _ in range(2000):
        per_window = 0.3 + torch.randn(8, generator=gen, dtype=torch.float64)  # true mean 0.3 per position
        _, lo, hi = ratio_interval(per_window * 32, torch.full((8,), 32.0))
        hits += lo <= 0.3 <= hi
    assert 0.93 <= hits / 2000 <= 0.97


def _accumulators(shift_per_window: torch.Tensor, positions: int = 16, vocab: int = 11):
    gen = torch.Generator().manual_seed(1)
    w = shift_per_window.numel()
    base = torch.randn(w, positions, vocab, generator=gen)
    targets = torch.randint(0, vocab, (w, positions), generator=gen)
    noise = torch.randn(w, positions, vocab, generator=gen) * shift_per_window.view(w, 1, 1)
    model, ref = MetricAccumulator(), MetricAccumulator()
    for i in range(0, w, 3):  # batches of three windows
        model.add(base[i:i + 3] + noise[i:i + 3], targets[i:i + 3], base[i:i + 3])
        ref.add(base[i:i + 3], targets[i:i + 3])
    return model, ref


def test_paired_change_agrees_with_the_totals():
    model, ref = _accumulators(torch.linspace(0.1, 1.0, 10))
    change = paired_change(model, ref)
    ppl, ppl_ref = model.result(True)["perplexity"], ref.result(False)["perplexity"]
    assert change["ppl_delta_pct"] == pytest.approx(100 * (ppl / ppl_ref - 1), rel=1e-9)
    lo, hi = change["ppl_delta_pct_ci95"]
    assert lo < change["ppl_delta_pct"] < hi and change["windows"] == 10
    klo, khi = change["kl_ci95"]
    assert 0 <= klo < model.result(True)["kl"] < khi


def test_identical_models_have_a_zero_width_interval():
    model, ref = _accumulators(torch.zeros(6))
    change = paired_change(model, ref)
    assert change["ppl_delta_pct_ci95"] == pytest.approx([0.0, 0.0], abs=1e-9)
    assert change["kl_ci95"] == pytest.approx([0.0, 0.0], abs=1e-9)


def test_paired_change_refuses_different_windows():
    a, _ = _accumulators(torch.zeros(6))
    b, _ = _accumulators(torch.zeros(3))
    with pytest.raises(ValueError, match="same windows"):
        paired_change(a, b)


def test_evaluate_reports_intervals_over_its_windows(reference_model):
    """Against itself: zero width. Against a perturbed copy: the interval holds the change and the pairing is by
    window (each window's NLL against the baseline's on the same text, checked by recomputing one by hand)."""
    import copy

    windows = torch.randint(0, reference_model.config.vocab_size, (5, 24), generator=torch.Generator().manual_seed(2))
    out = evaluate(reference_model, windows, baseline=reference_model, batch_size=2, progress=False)
    assert out["windows"] == 5 and out["ppl_delta_pct_ci95"] == pytest.approx([0.0, 0.0], abs=1e-9)
    assert math.isclose(out["perplexity"], out["baseline_perplexity"])
    other = copy.deepcopy(reference_model)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.3)
    out = evaluate(other, windows, baseline=reference_model, batch_size=2, progress=False)
    lo, hi = out["ppl_delta_pct_ci95"]
    assert lo < out["ppl_delta_pct"] < hi and out["ppl_ratio_ci95"][0] < out["ppl_ratio"] < out["ppl_ratio_ci95"][1]
    nll = lambda m: torch.stack([torch.nn.functional.cross_entropy(  # noqa: E731
        m(w[None]).logits[0, :-1].double(), w[1:], reduction="sum") for w in windows]).detach()
    with torch.no_grad():
        est, want_lo, want_hi = ratio_interval(nll(other) - nll(reference_model), torch.full((5,), 23.0))
    assert [lo, hi] == pytest.approx([100 * math.expm1(want_lo), 100 * math.expm1(want_hi)], rel=1e-6)


def test_paired_proportion_difference_by_hand_and_edge_cases():
    """Newcombe's square-and-add interval for paired outcomes: his worked example (36 both right, 12 only ours, 2
    only the baseline's, 0 neither; Statist. Med. 1998, method 10: 0.0569 to 0.3404), an interval around 0 that is
    not zero-width when every pair agrees, and one narrower than the unpaired difference when the pairs agree."""
    from compress.intervals import paired_proportion_difference, wilson_interval

    ours = [True] * 36 + [True] * 12 + [False] * 2
    base = [True] * 36 + [False] * 12 + [True] * 2
    lo, hi = paired_proportion_difference(ours, base)
    assert lo == pytest.approx(0.0569, abs=1e-4) and hi == pytest.approx(0.3404, abs=1e-4)
    same = [True] * 5 + [False] * 5
    lo, hi = paired_proportion_difference(same, same)
    assert lo < 0 < hi and hi - lo > 0.1
    # 90 items both sides get right or wrong alike, 10 where ours fails: the pairing knows the 90 cancel
    base = [True] * 60 + [False] * 30 + [True] * 10
    ours = [True] * 60 + [False] * 30 + [False] * 10
    lo, hi = paired_proportion_difference(ours, base)
    (l1, u1), (l2, u2) = wilson_interval(0.6, 100), wilson_interval(0.7, 100)
    unpaired = ((0.6 - l1) ** 2 + (u2 - 0.7) ** 2) ** 0.5 + ((u1 - 0.6) ** 2 + (0.7 - l2) ** 2) ** 0.5
    assert hi < 0 and hi - lo < 0.6 * unpaired  # all ten changes one way: worse beyond the noise
    with pytest.raises(ValueError, match="paired"):
        paired_proportion_difference([True], [True, False])


def test_paired_proportion_difference_covers_95_percent():
    """Seeded simulation: correlated pairs (each item is easy or hard for both models), coverage of the true
    difference over 2,000 trials of 60 items."""
    from compress.intervals import paired_proportion_difference

    g = torch.Generator().manual_seed(0)
    p_both, p_ours, p_base = 0.55, 0.10, 0.05  # true difference: 0.05
    covered = 0
    for _ in range(2000):
        u = torch.rand(60, generator=g)
        ours = (u < p_both + p_ours).tolist()
        base = ((u < p_both) | (u >= p_both + p_ours) & (u < p_both + p_ours + p_base)).tolist()
        lo, hi = paired_proportion_difference(ours, base)
        covered += lo <= 0.05 <= hi
    assert 0.93 <= covered / 2000 <= 0.975


def test_wilson_bounds_are_exact_at_zero_and_one():
    from compress.intervals import wilson_interval

    assert wilson_interval(0.0, 3)[0] == 0.0 and wilson_interval(1.0, 3)[1] == 1.0  # not 5.6e-17 / 1 - 1e-16


def test_metrics_are_computed_in_float64_a_slice_at_a_time(monkeypatch):
    # over a whole batch the float64 copies were ~45 bytes per position and vocabulary entry: 12 GB for 8 windows of
    # 255 tokens at a 128k vocabulary. Each log-softmax now sees at most 4M entries, and the sums are unchanged
    import torch.nn.functional as F

    from compress import evaluate as ev

    seen, log_softmax = [], F.log_softmax
    monkeypatch.setattr(ev.F, "log_softmax", lambda x, dim: seen.append(x.numel()) or log_softmax(x, dim=dim))
    g = torch.Generator().manual_seed(0)
    logits, base = torch.randn(3, 40, 200_000, generator=g), torch.randn(3, 40, 200_000, generator=g)
    targets = torch.randint(0, 200_000, (3, 40), generator=g)
    acc = ev.MetricAccumulator()
    acc.add(logits, targets, base)
    assert max(seen) <= 1 << 22
    logp, base_logp = log_softmax(logits.double(), dim=-1), log_softmax(base.double(), dim=-1)
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(1)
    kl = (base_logp.exp() * (base_logp - logp)).sum((1, 2))
    assert torch.allclose(torch.cat(acc.window_nll), nll, rtol=1e-12)
    assert torch.allclose(torch.cat(acc.window_kl), kl, rtol=1e-10) and acc.positions == 120
