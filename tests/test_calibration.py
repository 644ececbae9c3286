"""Calibration sources, deterministic sampling, bounded size, and clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from compress import CalibrationError, CalibrationSpec
from compress.calibration import batches_hash, build_batches


def test_builtin_source_is_deterministic_by_seed(reference_tokenizer):
    spec = CalibrationSpec(source="builtin:calibration", num_samples=6, seq_len=32, seed=3)
    a, b = build_batches(spec, reference_tokenizer), build_batches(spec, reference_tokenizer)
    assert a.shape == (6, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and batches_hash(a) == batches_hash(b)
    c = build_batches(spec.model_copy(update={"seed": 4}), reference_tokenizer)
    assert not torch.equal(a, c) and batches_hash(a) != batches_hash(c)


def test_text_and_jsonl_sources(tmp_path, reference_tokenizer):
    text = "def f(x):\n    return x + 1\n" * 200
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"content": text[i::3]}) for i in range(3)))
    t = build_batches(CalibrationSpec(source=str(tmp_path / "a.txt"), num_samples=2, seq_len=16), reference_tokenizer)
    j = build_batches(CalibrationSpec(source=str(tmp_path / "a.jsonl"), text_field="content", num_samples=2, seq_len=16),
                      reference_tokenizer)
    assert t.shape == j.shape == (2, 16)
    # a .json file that is one document (a list of records, pretty-printed over many lines) or JSON lines
    (tmp_path / "a.json").write_text(json.dumps([{"content": text[i::3]} for i in range(3)], indent=2))
    (tmp_path / "b.json").write_text((tmp_path / "a.jsonl").read_text())
    for name in ("a.json", "b.json"):
        assert torch.equal(build_batches(CalibrationSpec(source=str(tmp_path / name), text_field="content",
                                                         num_samples=2, seq_len=16), reference_tokenizer), j)
    (tmp_path / "stray.txt").write_bytes(text.encode() + b"\xff")  # one stray byte is replaced, not refused
    assert build_batches(CalibrationSpec(source=str(tmp_path / "stray.txt"), num_samples=2, seq_len=16),
                         reference_tokenizer).shape == (2, 16)
    decoded = reference_tokenizer.decode(t[0])
    assert decoded in text


@pytest.mark.parametrize("setup,message", [
    (lambda p: str(p / "missing.txt"), "does not exist"),
    (lambda p: (p / "x.jsonl").write_text('{"body": "a"}\n') and str(p / "x.jsonl"), "no 'text' field"),
    (lambda p: (p / "y.jsonl").write_text("not json\n") and str(p / "y.jsonl"), "y.jsonl:1: not valid JSON"),
    (lambda p: (p / "z.json").write_text('[\n  {"body": "a"}\n]') and str(p / "z.json"), "record 0 has no 'text'"),
    (lambda p: (p / "short.txt").write_text("tiny") and str(p / "short.txt"), "fewer than seq_len"),
    (lambda p: "builtin:wiki", "unknown built-in corpus"),
    (lambda p: (p / "empty.txt").write_text("") == 0 and str(p / "empty.txt"), "holds no text"),
    # a weights file named as the source: it used to calibrate on replacement characters
    (lambda p: (p / "model.safetensors").write_bytes(b"\x08\x00" + bytes(range(256)) * 40) and
     str(p / "model.safetensors"), "is not a text file \\(a NUL byte\\)"),
    (lambda p: (p / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 500) and str(p / "latin1.txt"),
     "is not a text file \\(500 of its"),
    # a value that is not text was calibrated on as its Python spelling ("None<|endoftext|>None...")
    (lambda p: (p / "n.jsonl").write_text('{"text": null}\n' * 50) and str(p / "n.jsonl"), "n.jsonl:1: 'text' is null"),
    (lambda p: (p / "l.json").write_text('[{"text": [1, 2]}]') and str(p / "l.json"), "record 0: 'text' is list"),
    # a pipe blocked forever, /dev/zero filled the memory
    (lambda p: "/dev/zero", "is not a regular file"),
])
def test_bad_sources(tmp_path, reference_tokenizer, setup, message):
    spec = CalibrationSpec(source=setup(tmp_path), num_samples=2, seq_len=64)
    with pytest.raises(CalibrationError, match=message):
        build_batches(spec, reference_tokenizer)


def test_recover_cuts_its_windows_on_demand(reference_tokenizer):
    """recover's training set is the calibration draw `build_batches` makes, held as window starts in the token
    stream and cut when asked for: a budget of millions of windows costs 8 bytes a window up front (stacking them
    took 4.4 GB and half a minute for 300M tokens before a run that max_minutes then stopped after one step)."""
    from compress.calibration import window_offsets
    from compress.recover.training import WindowDataset

    spec = CalibrationSpec(num_samples=6, seq_len=32, seed=2)
    data = WindowDataset(*window_offsets(spec, reference_tokenizer), 32)
    windows = torch.stack([data[i]["input_ids"] for i in range(len(data))])
    assert torch.equal(windows, build_batches(spec, reference_tokenizer))
    assert torch.equal(data[0]["labels"], data[0]["input_ids"])
    ids, offsets = window_offsets(spec.model_copy(update={"num_samples": 2_000_000}), reference_tokenizer)
    assert offsets.numel() == 2_000_000 and ids.numel() < 2_000_000 * 32 // 4  # the text, not 64M tokens of windows


def test_context_of_a_rope_scaled_model_is_what_its_scaling_reaches():
    """Calibration and evaluation text longer than max_position_embeddings was refused for yarn / dynamic-NTK models
    (Qwen2.5 keeps 32768 and adds yarn factor 4)."""
    from transformers import LlamaConfig

    from compress.models import context_length

    def config(rope):
        return LlamaConfig(max_position_embeddings=64, rope_parameters={"rope_theta": 10000.0, **rope})

    assert context_length(config({"rope_type": "default"})) == 64
    assert context_length(config({"rope_type": "dynamic", "factor": 2.0})) == 128
    assert context_length(config({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})) == 128
    # llama3's max_position_embeddings is already the extended context (8192 x 32 would overstate Llama 3.2's 131072)
    assert context_length(config({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8})) == 64
    # linear scaling's checkpoints store the extended length already; odd values fall back to the field
    assert context_length(config({"rope_type": "linear", "factor": 8.0})) == 64
    assert context_length(config({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 48.0})) == 96
    assert context_length(config({"rope_type": "dynamic", "factor": float("inf")})) == 64


def test_calibration_sketch_measures_how_much_of_a_text_the_calibration_drew_from(reference_tokenizer):
    """The checkpoint's sketch of its calibration text: an evaluation on that text is told so (it flatters the
    numbers), on other text it says nothing; the share matches the windows' real coverage."""
    from compress.calibration import (SKETCH_MAX, CalibrationSpec, build_batches, sketch_overlap, text_sketch)
    from compress.evaluate import heldout_windows

    scored = heldout_windows(reference_tokenizer, text=None, seq_len=256, max_windows=None)
    on_heldout = build_batches(CalibrationSpec(source="builtin:heldout"), reference_tokenizer)
    elsewhere = build_batches(CalibrationSpec(source="builtin:calibration"), reference_tokenizer)
    sketch = text_sketch(on_heldout)
    assert len(sketch["hashes"]) <= 8 * SKETCH_MAX and sketch == text_sketch(on_heldout)  # deterministic
    # the share of the scored windows' tokens the calibration windows cover, counted exactly
    covered = torch.zeros(scored.numel(), dtype=torch.bool)
    flat = scored.flatten().tolist()
    starts = {tuple(flat[i:i + 16]): i for i in range(len(flat) - 15)}
    for row in on_heldout.tolist():
        for j in range(len(row) - 15):
            at = starts.get(tuple(row[j:j + 16]))
            if at is not None:
                covered[at:at + 16] = True
    share, picked = sketch_overlap(sketch, scored)
    assert picked > 300 and abs(share - covered.float().mean().item()) < 0.06, (share, covered.float().mean())
    assert sketch_overlap(text_sketch(elsewhere), scored)[0] < 0.02
    # merged over applies and thinned past SKETCH_MAX: a power-of-2 modulus, the earlier text still found
    big = torch.randint(0, 8000, (400_000,), generator=torch.Generator().manual_seed(0))  # 400k distinct n-grams
    merged = text_sketch(big, previous=sketch)
    assert len(merged["hashes"]) <= 8 * SKETCH_MAX and merged["modulus"] > sketch["modulus"]
    assert merged["modulus"] & (merged["modulus"] - 1) == 0
    assert abs(sketch_overlap(merged, scored)[0] - share) < 0.1


def test_json_sources_read_as_their_editors_write_them(tmp_path, reference_tokenizer):
    """An upper-case suffix was read as plain text (calibrated on the JSON syntax); a byte-order mark was invalid
    JSON; lines that are JSON strings asked for a text_field."""
    from compress.calibration import read_texts

    (tmp_path / "UP.JSONL").write_text('{"text": "alpha"}\n{"text": "beta"}\n')
    assert read_texts(CalibrationSpec(source=str(tmp_path / "UP.JSONL"))) == ["alpha", "beta"]
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"text": "gamma"}\n"delta"\n')
    assert read_texts(CalibrationSpec(source=str(tmp_path / "bom.jsonl"))) == ["gamma", "delta"]


def test_drawing_far_more_tokens_than_the_text_holds_is_said(reference_tokenizer):
    said = []
    spec = CalibrationSpec(source="builtin:calibration", num_samples=1000, seq_len=256)
    assert build_batches(spec, reference_tokenizer, say=said.append).shape == (1000, 256)
    assert len(said) == 1 and "each token about 5 times" in said[0]
    said.clear()
    build_batches(CalibrationSpec(source="builtin:calibration", num_samples=64, seq_len=256), reference_tokenizer,
                  say=said.append)
    assert not said


def test_a_large_source_is_sampled_across_its_documents(tmp_path, reference_tokenizer):
    """Documents were read in file order until enough tokens: a large source gave only its first documents."""
    import json

    rows = [json.dumps({"text": f"document number {i} says hello world and goes on a little. " * 3}) for i in range(400)]
    (tmp_path / "many.jsonl").write_text("\n".join(rows) + "\n")
    spec = CalibrationSpec(source=str(tmp_path / "many.jsonl"), num_samples=4, seq_len=32)
    text = reference_tokenizer.decode(build_batches(spec, reference_tokenizer).flatten())
    numbers = [int(w) for w in text.split() if w.isdigit()]
    assert numbers and max(numbers) > 200  # (file order read about the first 40 documents)
    assert torch.equal(build_batches(spec, reference_tokenizer), build_batches(spec, reference_tokenizer))


def test_a_training_sketch_holds_only_the_spans_its_windows_cover():
    """recover sketched all the text it read (up to 4x what its windows use): an evaluation on the unused rest was
    told it had been trained on."""
    from compress.calibration import sketch_overlap, text_sketch

    ids = torch.randint(0, 8000, (40_000,), generator=torch.Generator().manual_seed(0))
    covered = torch.zeros(40_000, dtype=torch.bool)
    covered[:10_000] = True
    sketch = text_sketch(ids, covered=covered)
    used, unused = sketch_overlap(sketch, ids[:10_000]), sketch_overlap(sketch, ids[20_000:])
    assert used[0] == 1.0 and (unused is None or unused[0] == 0.0)
