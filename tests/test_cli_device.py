"""`compress eval` and `compress generate` on a chosen device (--device): the model and its baseline load there;
the mistakes (no GPU, --max-memory with a GPU) are said before anything loads. The CUDA test runs on a GPU machine
(scripts/gpu_check.sh) and compares with the CPU's numbers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import compress
from compress import models
from compress.cli import main
from compress.errors import CompressError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
COMMANDS = (["generate", "builtin:tiny", "--prompt", "The"], ["eval", "builtin:tiny", "--no-speed", "--max-windows", 1])


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load", refuse)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_device_cuda_without_a_gpu_is_one_line_before_any_loading(command, monkeypatch):
    _no_loading(monkeypatch)
    result = run(*command, "--device", "cuda")
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "error: --device cuda, but torch sees no CUDA GPU here; use --device cpu"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_device_cuda_with_max_memory_is_refused_before_any_loading(command, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _no_loading(monkeypatch)
    result = run(*command, "--device", "cuda", "--max-memory", "1GB")
    assert result.exit_code == 2, result.output
    assert "--max-memory runs a model larger than memory on the CPU" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_load_refuses_a_gpu_with_max_memory(monkeypatch):
    # before: the resident embeddings, norms and head stayed on the CPU while the layers on disk ran on the GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(CompressError, match="device='cuda' needs the model whole on the GPU"):
        compress.load("builtin:tiny", device="cuda", max_memory="1GB")


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_the_device_reaches_every_load(command, monkeypatch):
    seen = []
    real_load = models.load

    def recording(source, **kwargs):
        seen.append(kwargs.get("device"))
        return real_load(source, **kwargs)

    monkeypatch.setattr(models, "load", recording)
    extra = ["--baseline", "builtin:tiny"] if command[0] == "eval" else ["--max-new-tokens", 2]
    result = run(*command, *extra, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert seen == (["cpu", "cpu"] if command[0] == "eval" else ["cpu"])  # the model and the baseline


# builtin:tiny stores 17.2 MB in bf16: two copies need 1.039 GiB with the margin, 1.077 GiB at float32
@pytest.mark.parametrize("free_gib, dtype, expected", [(10, "auto", "cuda"), (10, "float32", "cuda"),
                                                      (1.06, "auto", "cuda"), (1.06, "float32", "cpu"),
                                                      (0.5, "auto", "cpu")])
def test_apply_evaluates_on_the_gpu_when_both_models_fit_it(free_gib, dtype, expected, monkeypatch):
    from compress.cli_eval import eval_device

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (int(free_gib * 2**30), 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 0)
    tiny = models.resolve_model_path("builtin:tiny")
    where, note = eval_device("cuda", None, [tiny, tiny], dtype)
    assert where == expected
    assert (note is None) == (expected == "cuda")
    if note:
        assert note.startswith("the evaluation runs on the CPU: the checkpoint and the original need about")
    # what torch's allocator holds cached from the passes is free for the evaluation (the driver counts it used)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 2 * 2**30)
    assert eval_device("cuda", None, [tiny, tiny], dtype) == ("cuda", None)
    # the CPU's passes, and --max-memory (layers read from disk), evaluate on the CPU without a word
    assert eval_device("cpu", None, [tiny], dtype) == ("cpu", None)
    assert eval_device("cuda", "8GB", [tiny], dtype) == ("cpu", None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_apply_on_the_gpu_evaluates_there_as_eval_does(tmp_path):
    out = tmp_path / "kivi"
    result = run("apply", RECIPES / "kivi-2.yaml", "-o", out, "--device", "cuda", "--eval-windows", 2, "--json")
    assert result.exit_code == 0, result.output
    on_gpu = json.loads(result.stdout)["eval"]
    assert on_gpu["device"] == "cuda"
    result = run("eval", out, "--device", "cpu", "--max-windows", 2, "--no-speed", "--json")
    on_cpu = json.loads(result.stdout)
    assert on_gpu["kv_cache"]["ppl"] == pytest.approx(on_cpu["kv_cache"]["ppl"], rel=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_compressed_kv_cache_model_evaluates_and_generates_on_the_gpu(tmp_path):
    out = tmp_path / "kivi"
    assert run("apply", RECIPES / "kivi-2.yaml", "-o", out, "--no-eval").exit_code == 0
    scores = {}
    for device in ("cpu", "cuda"):
        result = run("eval", out, "--device", device, "--max-windows", 2, "--no-speed", "--json")
        assert result.exit_code == 0, result.output
        scores[device] = json.loads(result.stdout)
    assert scores["cuda"]["perplexity"] == pytest.approx(scores["cpu"]["perplexity"], rel=2e-3)
    # read through the compressed cache (KIVI-2 costs ~1% perplexity here): the GPU's kernels quantize and attend
    # as the CPU's do, up to float rounding (a 2-bit code may round the other way now and then)
    cpu, cuda = scores["cpu"]["kv_cache"], scores["cuda"]["kv_cache"]
    assert cuda["tokens_scored"] == cpu["tokens_scored"]
    assert cuda["ppl_reference"] == pytest.approx(cpu["ppl_reference"], rel=2e-3)
    assert cuda["ppl"] == pytest.approx(cpu["ppl"], rel=1e-2)
    assert cuda["kl"] == pytest.approx(cpu["kl"], rel=0.2)
    result = run("generate", out, "--device", "cuda", "--prompt", "The", "--max-new-tokens", 80)
    assert result.exit_code == 0, result.output
    assert len(result.output.strip()) > 3
