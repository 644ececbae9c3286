"""benchmarks/sparse_speed.py's pruned-layer rows (the interface issue 9's checks read), on small shapes."""
import pytest


@pytest.fixture
def bench(script_module):
    return script_module("benchmarks/sparse_speed.py")


def test_runtime_packed_rows_say_path_bytes_and_ratio(bench):
    rows = bench.cpu_runtime_packed([1, 20], 1, shapes=[(64, 128)])
    assert [(r["structure"], r["tokens"]) for r in rows] == [("2:4", 1), ("2:4", 20), ("unstructured", 1),
                                                            ("unstructured", 20)]
    assert all(r["device"] == "cpu" and r["speedup_vs_dense"] > 0 for r in rows)
    # the C product over the packed values is the CPU's packed GEMV (issue 9's row kinds), the blocked GEMM not
    assert all(r["kind"] == ("packed_gemv" if "C product" in r["path"] else "runtime_packed") for r in rows)
    assert rows[0]["path"].startswith("packed: C product") and rows[1]["path"].endswith("GEMM")
    assert all(0.45 < r["bytes_vs_dense"] < 0.7 for r in rows)  # values + positions (+ row offsets) vs fp32 dense


def test_unmerged_adapter_rows_time_the_merged_copy_and_the_training_call(bench):
    rows = bench.cpu_unmerged_adapter([1, 20], 1, shapes=[(64, 128)])
    assert [(r["tokens"], r["path"]) for r in rows] == [(1, "merged copy (no grad)"), (1, "per-call update (training)"),
                                                        (20, "merged copy (no grad)")]
    assert all(r["kind"] == "unmerged_adapter" and r["speedup_vs_dense"] > 0 and r["vs_packed"] > 0 for r in rows)
    assert rows[0]["extra_bytes_vs_packed"] == 1.0  # the merged copy: the packed layer's bytes once more


def test_only_runtimes_takes_no_activation_sparsity_options(bench, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--only-runtimes", "--only-activation-sparse"])
    assert exit_info.value.code == 2 and "--only-runtimes skips activation sparsity" in capsys.readouterr().err


@pytest.mark.parametrize("content,fragment", [
    ("not json", "not a JSON file (Expecting value, line 1)"),
    ("[1, 2]", "not a JSON object"),
    ('{"model": "builtin:small"}', "no sparsity, ppl_delta_pct, kl, calibration_ppl_delta_pct"),
    ('{"model": "m", "sparsity": 0.4, "ppl_delta_pct": 1, "kl": 0, "calibration_ppl_delta_pct": 1, '
     '"exact_gate": false}', "no quantized_gate_alone"),
])
def test_a_quality_file_it_cannot_use_is_one_line(bench, capsys, tmp_path, content, fragment):
    """A --quality file that is not JSON or lacks the keys the rows read was a traceback (after minutes of timing,
    for a missing key)."""
    f = tmp_path / "q.json"
    f.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quality", str(f)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"--quality {f}: {fragment}" in err and "Traceback" not in err, err


def test_the_shipped_quality_file_is_read(bench):
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[2] / "benchmarks" / "sparse_quality_int8_gate.json"
    quality, problem = bench.read_quality(shipped)
    assert problem is None and quality["exact_gate"] is False
