"""Batch means: runs of consecutive windows as the samples (compress.intervals, benchmarks/interval_blocks.py)."""
import copy

import pytest
import torch

from compress.intervals import ratio_interval


def test_runs_of_windows_by_hand():
    num, den = torch.tensor([1.0, 3.0, 2.0, 6.0, 5.0]), torch.ones(5)
    assert ratio_interval(num, den, block=2) == pytest.approx(ratio_interval(torch.tensor([4.0, 8.0]),
                                                                             torch.tensor([2.0, 2.0])))
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
    for r in rows:
        assert r["ppl_ratio_ci95"][0] < r["ppl_ratio"] < r["ppl_ratio_ci95"][1]
    assert rows[0]["ppl_ratio"] == pytest.approx(rows[1]["ppl_ratio"], rel=1e-9)  # the same windows, summed
