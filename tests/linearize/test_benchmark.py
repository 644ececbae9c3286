"""benchmarks/linearize.py: the recovered rows' ratio to the unconverted model given the same recovery."""
import json

import pytest

import compress


@pytest.fixture
def bench(script_module):
    return script_module("benchmarks/linearize.py")


def test_dense_recovered_ratio(bench, tmp_path, capsys, reference_tokenizer):
    """With the converted model standing in for the recovered one and the original for the dense control, the row's
    ratio must be exactly ppl_converted / the original's perplexity, both measured independently in the same run."""
    converted, _ = compress.apply(compress.load("builtin:tiny"), [compress.get_pass("linearize")(variant="gla")],
                                  progress=False)
    lin = compress.save(converted, tmp_path / "lin", tokenizer=reference_tokenizer)
    dense = compress.save(compress.load("builtin:tiny"), tmp_path / "dense", tokenizer=reference_tokenizer)
    bench.main(["--json", "--skip-speed", "--model", "builtin:tiny", "--only", "liger-gla", "--windows", "2",
                "--seq-len", "64",
                "--probe-num", "1", "--copy-len", "8", "--passkey-len", "128",
                "--recovered", f"liger-gla={lin}", "--dense-recovered", f"liger-gla={dense}"])
    original, row = json.loads(capsys.readouterr().out)
    assert row["ppl_recovered"] == pytest.approx(row["ppl_converted"], rel=1e-5)
    assert row["ppl_dense_recovered"] == pytest.approx(original["perplexity"], rel=1e-5)
    assert row["recovered_vs_dense_recovered"] == pytest.approx(row["ppl_converted"] / original["perplexity"],
                                                                rel=1e-5)
    assert row["recovered_vs_dense_recovered"] > 1.5  # GLA without recovery is far from the original
    for key in ("ppl_recovered_ratio_ci95", "recovered_vs_dense_recovered_ci95"):  # over the 2 windows
        lo, hi = row[key]
        assert lo < row["ppl_converted"] / original["perplexity"] < hi


@pytest.mark.parametrize("args,match", [
    (["--dense-recovered", "liger-gla=."], "give that variant's --recovered checkpoint too"),
    (["--recovered", "gla=."], "expected NAME=DIR"),
    (["--recovered", "liger-gla=/nonexistent"], "expected NAME=DIR"),
])
def test_bad_checkpoint_arguments(bench, capsys, args, match):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--skip-speed", *args])
    assert exit_info.value.code == 2
    assert match in capsys.readouterr().err


def test_serving_shape_rows(bench, capsys, monkeypatch):
    """--serving-shape (the GPU row) on the CPU with the layer shrunk: every variant's decode speed and cache bytes,
    batch 2, the linearized caches constant in context, the original's growing with it."""
    monkeypatch.setattr(bench, "SERVING_LAYER", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                     head_dim=16, intermediate_size=128, vocab_size=256))
    monkeypatch.setattr(bench, "CONTEXTS", (64, 256))
    monkeypatch.setattr(bench, "PREFILL_CONTEXTS", (96, 160))
    bench.main(["--json", "--serving-shape", "--batch", "2", "--reps", "2", "--steps", "2",
                "--only", "liger-hybrid", "mom", "liger-gsa"])
    rows = {r["variant"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"original", "liger-hybrid", "mom", "liger-gsa"}
    for name, row in rows.items():
        assert row["device"] == "cpu" and row["batch"] == 2 and set(row["decode_speedup"]) == {"64", "256"}
        assert all(v > 0 for v in row["decode_speedup"].values())
        assert set(row["prefill_speedup"]) == {"96", "160"} and all(v > 0 for v in row["prefill_speedup"].values())
        for ctx, (low, high) in row["decode_speedup_range"].items():  # the median of two paired ratios: between
            assert low - 0.01 <= row["decode_speedup"][ctx] <= high + 0.01
            assert name != "original" or low == high == 1.0
        sizes = row["cache_bytes"]
        if name == "original":  # 2 layers x K and V x 2 rows x 2 KV heads x 16 floats per token
            assert sizes["256"] - sizes["64"] == (256 - 64) * 2 * 2 * 2 * 2 * 16 * 4
        else:
            assert sizes["256"] == sizes["64"] > 0


def test_speed_dtype_and_bound_rows(bench, capsys, monkeypatch):
    """--speed-dtype bfloat16 times bf16 models (the original's K/V: 2 bytes a value); --bound adds the row whose
    attention runs only its projections, with a constant cache like the linearized rows'."""
    monkeypatch.setattr(bench, "SERVING_LAYER", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                     head_dim=16, intermediate_size=128, vocab_size=256))
    monkeypatch.setattr(bench, "CONTEXTS", (64, 256))
    bench.main(["--json", "--serving-shape", "--reps", "1", "--steps", "1", "--skip-prefill", "--only", "liger-gla",
                "--speed-dtype", "bfloat16", "--bound"])
    rows = {r["variant"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"original", "liger-gla", bench.BOUND}
    assert all(r["speed_dtype"] == "bfloat16" for r in rows.values())
    sizes = rows["original"]["cache_bytes"]  # 2 layers x K and V x 2 KV heads x 16 values per token, bf16
    assert sizes["256"] - sizes["64"] == (256 - 64) * 2 * 2 * 2 * 16 * 2
    bound = rows[bench.BOUND]
    assert bound["cache_bytes"]["256"] == bound["cache_bytes"]["64"] and bound["decode_speedup"]["256"] > 0


def test_bound_model_runs_only_the_projections(bench, monkeypatch):
    """The bound model's attention output is o_proj of the values repeated over the query heads: the four
    projections, nothing of the recurrence (its speed is what the rest of the model leaves to gain)."""
    import torch

    monkeypatch.setattr(bench, "SERVING_LAYER", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                     head_dim=16, intermediate_size=128, vocab_size=256))
    bound = bench.bound_model(bench.serving_model("cpu", torch.float32))
    attn = bench.attention_modules(bound)[0][1]
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        out, weights = attn(x)
        v = attn.v_proj(x).view(2, 3, 2, 16)
        expected = attn.o_proj(v.repeat_interleave(2, dim=2).reshape(2, 3, -1))
    assert weights is None and torch.allclose(out, expected, atol=1e-5)


def test_serving_options_refused_without_serving_shape(bench):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--batch", "4"])
    assert exit_info.value.code == 2


def test_table_shows_the_measured_columns_and_the_ratio_spread(bench, capsys):
    """Piped output (as here) keeps every measured column readable: the columns a run left empty are dropped, a
    decode ratio carries its lowest-highest over the repetitions."""
    speed = {"decode_speedup": {"1024": 1.25, "8192": 3.12, "32768": 11.54},
             "decode_speedup_range": {"1024": [1.07, 1.44], "8192": [3.01, 3.63], "32768": [10.72, 11.97]},
             "cache_bytes": {"1024": 2**20, "8192": 2**20, "32768": 2**20},
             "prefill_speedup": {"1024": 1.31, "4096": 1.87}, "prefill_speedup_range": {"1024": [1.2, 1.4],
                                                                                      "4096": [1.8, 1.9]}}
    bench.print_table([{"variant": "liger-gla", **speed}], "builtin:small")
    out = capsys.readouterr().out
    assert "3.12 (3.01-3.63)" in out and "11.54 (10.72-11.97)" in out and "cache MiB 32k" in out
    assert "prefill x 4k" in out and "1.87 (1.80-1.90)" in out
    assert "ppl converted" not in out and "passkey" not in out
