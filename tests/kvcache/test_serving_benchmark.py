"""benchmarks/kv_serving.py on a small shape: the issue's row interface, bytes and errors ordered as the formats
promise, and --max-seconds naming what it cut (the end-to-end rows included); kv_cache.py's scale-error
diagnostic."""
import json

import pytest


@pytest.fixture
def bench(script_module):
    return script_module("benchmarks/kv_serving.py")


def test_rows_keep_the_interface_and_order(bench, capsys):
    bench.main(["--json", "--device", "cpu", "--shapes", "1,352,64", "--no-e2e", "--min-run-time", "0.01"])
    rows = {r["format"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(bench.FORMATS)
    for r in rows.values():
        assert {"device", "format", "batch", "context", "head_dim", "bytes_vs_fp16", "rel_err",
                "speedup_vs_sdpa_fp16"} <= set(r)
        assert (r["device"], r["batch"], r["context"], r["head_dim"]) == ("cpu", 1, 352, 64)
        assert 0 < r["bytes_vs_fp16"] < 1 and 0 < r["rel_err"] < 1 and r["speedup_vs_sdpa_fp16"] > 0
        assert r["compress_ms"] > 0
    assert rows["kivi-4"]["rel_err"] < rows["kivi-2"]["rel_err"]
    assert rows["gear-4"]["rel_err"] < rows["gear-2"]["rel_err"]
    assert rows["kivi-2"]["bytes_vs_fp16"] < rows["gear-2"]["bytes_vs_fp16"] < rows["kivi-4"]["bytes_vs_fp16"]
    for s8, fp16 in (("kivi-2-s8", "kivi-2"), ("gear-4-s8", "gear-4")):  # one-byte scales: fewer bytes
        assert rows[s8]["scale_format"] == "log8" and rows[fp16]["scale_format"] == "fp16"
        assert rows[s8]["bytes_vs_fp16"] < rows[fp16]["bytes_vs_fp16"]


def test_max_seconds_skips_shapes_and_end_to_end_rows_by_name(bench, capsys):
    bench.main(["--json", "--device", "cpu", "--shapes", "1,352,64", "--max-seconds", "0"])
    out = capsys.readouterr()
    assert json.loads(out.out) == []
    assert "[skip] batch 1 context 352 head_dim 64: past --max-seconds" in out.err
    assert all(f"[skip] e2e {name}: past --max-seconds" in out.err for name in ("dynamic", *bench.E2E_FORMATS))


def test_end_to_end_rows_carry_the_interface_keys(bench):
    """The e2e rows lacked rel_err and speedup_vs_sdpa_fp16 (a helper's check of the issue's interface), and their
    max_batch_gain was taken against the CPU's fp32 cache (twice the gain a 16-bit cache leaves)."""
    rows = {r["format"]: r for r in bench.e2e_rows("cpu", prompt=160, batch=1, new_tokens=2, budget_gib=1,
                                                   baselines=False)}
    assert set(rows) == {"dynamic", *bench.E2E_FORMATS}
    for r in rows.values():
        assert {"device", "format", "batch", "context", "head_dim", "bytes_vs_fp16", "rel_err",
                "speedup_vs_sdpa_fp16"} <= set(r)
        assert r["speedup_vs_sdpa_fp16"] is None  # the CPU's baseline is an fp32 cache
    assert rows["dynamic"]["rel_err"] == 0 and rows["dynamic"]["bytes_vs_fp16"] == 2.0
    assert rows["dynamic"]["max_batch_gain"] == pytest.approx(0.5, abs=0.01)
    assert 0 < rows["kivi-4"]["rel_err"] < rows["kivi-2"]["rel_err"] < 1
    assert rows["kivi-2"]["max_batch_gain"] == pytest.approx(1 / rows["kivi-2"]["bytes_vs_fp16"], rel=0.02)


def test_scale_error_diagnostic_on_the_reference_model(script_module):
    """`kv_cache.py --scale-error`: one-byte scales' reconstruction error relative to fp16 min-max on the model's own
    keys and values (the BENCHMARKS figures), below 1 at 2 bits on both sides."""
    rows = script_module("benchmarks/kv_cache.py").scale_error("builtin:small", bits_list=(2,))
    assert [(r["kind"], r["bits"]) for r in rows] == [("key", 2), ("value", 2)]
    for r in rows:
        assert r["log8_vs_fp16"] == pytest.approx(r["log8_error"] / r["fp16_error"]) and r["log8_vs_fp16"] < 0.85
