"""benchmarks/sparse_speed.py --gather-crossover: the rows MIN_GATHER_WEIGHTS is set from."""
import json

import pytest


@pytest.fixture
def bench(script_module):
    return script_module("benchmarks/sparse_speed.py")


def rows_module():
    """benchmarks/activation_sparse_rows.py as sparse_speed.py imported it (its shapes are patched there)."""
    import sys
    return sys.modules["activation_sparse_rows"]


def test_gather_crossover_rows(bench, capsys, monkeypatch):
    """Shrunk shapes, one weight copy: one row per shape, each timing the gathers (not the masked dense path that
    the small ones decode through in a model), flagged by whether the shape is below MIN_GATHER_WEIGHTS."""
    from compress.activation_sparsity import ActivationSparseMLP

    monkeypatch.setattr(rows_module(), "GATHER_CROSSOVER_SHAPES", ((64, 128), (2048, 1536)))
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


@pytest.mark.parametrize("exact_gate", [True, False])
def test_activation_sparse_rows_from_a_quality_file(bench, capsys, monkeypatch, tmp_path, exact_gate):
    """--quality reuses a calibration's figures: decode rows at 1 and 4 tokens through the gathers and a prefill row
    through the masked dense path, per gate variant (with the int8 copy as the gate: alone, every neuron kept, then
    sparse), each carrying its perplexity cost and the measured inactive share."""
    monkeypatch.setattr(rows_module(), "MLP_SHAPE", (128, 256))
    quality = dict(model="builtin:small", ppl_delta_pct=0.9, ppl_delta_pct_ci95=[0.7, 1.1], sparsity=0.5, kl=0.01,
                   calibration_ppl_delta_pct=0.9, neuron_scaling=True, predictor_bits=8, exact_gate=exact_gate,
                   candidate_share=0.55, predictor_rank=0)
    if exact_gate:
        quality["without_predictor"] = dict(ppl_delta_pct=0.8, ppl_delta_pct_ci95=[0.6, 1.0], sparsity=0.5, kl=0.01)
    else:
        quality["quantized_gate_alone"] = dict(ppl_delta_pct=0.01, ppl_delta_pct_ci95=[0.0, 0.02], kl=1e-5)
    path = tmp_path / "q.json"
    path.write_text(json.dumps(quality))
    bench.main(["--json", "--only-activation-sparse", "--quick", "--weight-copies", "1", "--quality", str(path),
                "--prefill-tokens", "32"])
    rows = [r for r in json.loads(capsys.readouterr().out) if r["dtype"] == "float32"]
    gates = ["dense gate", "predictor int8"] if exact_gate else ["int8 gate, every neuron", "int8 gate"]
    assert [(r["gate"], r["tokens"]) for r in rows] == [(g, t) for g in gates for t in (1, 4, 32)]
    for r in rows:
        assert r["kind"] == "activation_sparse_mlp" and r["speedup_vs_dense"] > 0
        assert r["path"].startswith("active rows only" if r["tokens"] <= 4 else "masked dense")
    sparse = [r for r in rows if r["gate"] == gates[1]]
    assert all(0.3 < r["sparsity"] < 0.7 and r["ppl_delta_pct"] == 0.9 for r in sparse)
    if not exact_gate:
        alone = [r for r in rows if r["gate"] == gates[0]]
        assert all(r["sparsity"] == 0 and r["ppl_delta_pct"] == 0.01 for r in alone)
        assert all("the gate from its int8 copy" in r["path"] for r in alone if r["tokens"] <= 4)


def test_json_rows_keep_the_interface_other_tools_read(bench, capsys, monkeypatch):
    """--json: only the interface's kinds, each row with device, kind, shape, tokens and speedup_vs_dense (34 of 58
    CPU rows were runtime_packed or unmerged_adapter); --all-kinds adds the rest. Shrunk shapes, the end-to-end rows
    left out (their models take minutes)."""
    small = ((64, 128),)
    packed, adapter = bench.cpu_runtime_packed, bench.cpu_unmerged_adapter
    monkeypatch.setattr(bench, "SHAPES", small)
    monkeypatch.setattr(bench, "cpu_runtime_packed", lambda tokens, repeats, dtype=None: packed([1, 64], 1, small))
    monkeypatch.setattr(bench, "cpu_unmerged_adapter", lambda tokens, repeats, shapes=None: adapter([1], 1, small))
    monkeypatch.setattr(bench, "cpu_e2e", lambda repeats, model=None: [])
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    bench.main(["--json", "--quick", "--only-runtimes"])
    rows = json.loads(capsys.readouterr().out)
    assert rows and {r["kind"] for r in rows} <= set(bench.CONTRACT_KINDS)
    for r in rows:
        assert {"device", "kind", "shape", "tokens", "speedup_vs_dense"} <= set(r) and r["speedup_vs_dense"] > 0
    bench.main(["--json", "--quick", "--only-runtimes", "--all-kinds"])
    every = json.loads(capsys.readouterr().out)
    assert {"runtime_packed", "unmerged_adapter"} <= {r["kind"] for r in every}
    for r in every:
        if "structure" in r and "path" in r:  # the packed runtime: the C product is the CPU's packed GEMV
            assert r["kind"] == ("packed_gemv" if "C product" in r["path"] else "runtime_packed")
    assert len([r for r in every if r["kind"] in bench.CONTRACT_KINDS]) == len(rows)
