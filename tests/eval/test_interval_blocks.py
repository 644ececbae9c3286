"""Batch means: runs of consecutive windows as the samples (compress.intervals, benchmarks/interval_blocks.py)."""
import copy

import pytest
import torch

from compress.intervals import ratio_interval


def test_runs_of_windows_by_hand():
    num, den = torch.tensor([1.0, 3.0, 2.0, 6.0, 5.0]), torch.ones(5)
    # runs [1, 3], [2, 6], [5]: the last, shorter run stays, weighed by its positions (the estimate does not move)
    assert ratio_interval(num, den, block=2) == pytest.approx(ratio_interval(torch.tensor([4.0, 8.0, 5.0]),
                                                                             torch.tensor([2.0, 2.0, 1.0])))
    assert ratio_interval(num, den, block=2)[0] == ratio_interval(num, den)[0] == pytest.approx(17 / 5)
    assert ratio_interval(num, den, block=5)[1:] == (None, None)  # one run: no spread
    with pytest.raises(ValueError):
        ratio_interval(num, den, block=0)
    # windows that move together in pairs: the pairs' interval is the wider one
    correlated = torch.tensor([1.0, 1.1, 3.0, 3.1, 0.5, 0.6, 2.0, 2.1])
    _, lo1, hi1 = ratio_interval(correlated, torch.ones(8))
    _, lo2, hi2 = ratio_interval(correlated, torch.ones(8), block=2)
    assert hi2 - lo2 > hi1 - lo1


def test_benchmark_rows(script_module, reference_model):
    bench = script_module("benchmarks/interval_blocks.py")
    other = copy.deepcopy(reference_model)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.2)
    windows = torch.randint(0, 512, (8, 16), generator=torch.Generator().manual_seed(0))
    rows = bench.block_intervals(other, reference_model, windows, batch_size=4)
    assert [r["block"] for r in rows] == [1, 4] and rows[0]["widening"] == 1.0  # 8 windows: runs of 8 leave 1
    assert [r["samples"] for r in rows] == [8, 2] and rows[1]["se_widening"] > 0
    assert rows[0]["ppl_ratio"] == pytest.approx(rows[1]["ppl_ratio"], rel=1e-9)  # the same windows, summed
    # the runs' interval by hand: per-window NLL differences summed in runs of 4
    import torch.nn.functional as F

    from compress.intervals import t_quantile_975

    with torch.no_grad():
        nll = lambda m: torch.stack([F.cross_entropy(m(w[None]).logits[0, :-1].double(), w[1:],  # noqa: E731
                                                     reduction="sum") for w in windows])
        d = (nll(other) - nll(reference_model)).view(2, 4).sum(1) / 60  # per position, 4 x 15 positions a run
    half = t_quantile_975(1) * d.std() / 2 ** 0.5
    assert rows[1]["ppl_ratio_ci95"] == pytest.approx([(d.mean() - half).exp().item(), (d.mean() + half).exp().item()],
                                                      rel=1e-6)
