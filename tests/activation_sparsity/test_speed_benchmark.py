"""benchmarks/sparse_speed.py --gather-crossover: the rows MIN_GATHER_WEIGHTS is set from."""
import json

import pytest


@pytest.fixture
def bench(script_module):
    return script_module("benchmarks/sparse_speed.py")


def test_gather_crossover_rows(bench, capsys, monkeypatch):
    """Shrunk shapes, one weight copy: one row per shape, each timing the gathers (not the masked dense path that
    the small ones decode through in a model), flagged by whether the shape is below MIN_GATHER_WEIGHTS."""
    from compress.activation_sparsity import ActivationSparseMLP

    monkeypatch.setattr(bench, "GATHER_CROSSOVER_SHAPES", ((64, 128), (2048, 1536)))
    monkeypatch.setattr(ActivationSparseMLP, "MIN_GATHER_WEIGHTS", 1_000_000)  # the suite's default is 0
    bench.main(["--json", "--gather-crossover", "--quick", "--weight-copies", "1"])
    rows = json.loads(capsys.readouterr().out)
    assert [r["shape"] for r in rows] == ["64x128", "2048x1536"]
    for r in rows:
        assert r["kind"] == "gather_crossover" and r["device"] == "cpu" and r["speedup_vs_dense"] > 0
        assert r["path"].startswith("active rows only") and r["weight_copies"] == 1
        assert r["below_min_gather_weights"] == (r["weights"] < ActivationSparseMLP.MIN_GATHER_WEIGHTS)
    assert [r["below_min_gather_weights"] for r in rows] == [True, False]
    assert ActivationSparseMLP.MIN_GATHER_WEIGHTS == 1_000_000  # the instances' override did not leak
