"""The GPU dispatcher of packed SparseLinear: which paths apply where, and (on a CUDA GPU) that every path gives the
reference's output and that the measured choice is cached per device. Without CUDA only the CPU-side logic runs;
the semi-structured path needs compute capability >= 8.0 and skips cleanly elsewhere."""
import json

import pytest
import torch
from torch import nn

from compress.prune import gpu_dispatch
from compress.prune.masks import nm_mask, unstructured_mask
from compress.prune.sparse_linear import SparseLinear

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def sparse_layer(out_f, in_f, structure, dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=True)
    if structure == "2:4":
        mask, nm = nm_mask(lin.weight.detach().abs(), 2, 4), (2, 4)
    else:
        mask, nm = unstructured_mask(lin.weight.detach().abs(), 0.5), None
    return SparseLinear.from_linear(lin, mask, nm).to(device=device, dtype=dtype)


def test_candidates_by_tokens_and_layout():
    nm = sparse_layer(64, 128, "2:4")
    bm = sparse_layer(64, 128, "unstructured")
    assert gpu_dispatch.candidates(nm, 1, torch.float16)[0] == "packed_gemv"
    assert "packed_gemv" not in gpu_dispatch.candidates(nm, 64, torch.float16)
    assert "expand_cublas" in gpu_dispatch.candidates(nm, 64, torch.float16)
    assert gpu_dispatch.candidates(bm, 4, torch.float16) == ["packed_gemv", "expand_cublas"]
    assert gpu_dispatch.candidates(bm, 64, torch.float16) == ["expand_cublas"]  # was an fp32 FMA kernel
    if not gpu_dispatch.semi_structured_available():
        assert "semi_structured" not in gpu_dispatch.candidates(nm, 64, torch.float16)
    assert [gpu_dispatch.token_bucket(t) for t in (1, 2, 3, 16, 17, 4096)] == [1, 2, 4, 16, 32, 4096]
    assert "packed GEMV at <= 16 tokens" in gpu_dispatch.describe_path(nm, None)


@cuda
@pytest.mark.parametrize("structure", ["2:4", "unstructured"])
@pytest.mark.parametrize("tokens", [1, 8, 64])
def test_every_path_matches_reference_on_cuda(structure, tokens, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    layer = sparse_layer(256, 512, structure, torch.float16, "cuda")
    x = torch.randn(tokens, 512, device="cuda", dtype=torch.float16)
    ref = x.float() @ layer.dense_weight(torch.float32).t() + layer.bias.float()
    paths = gpu_dispatch.candidates(layer, tokens, torch.float16)
    for path in paths:
        y = gpu_dispatch.RUN[path](layer, x, layer.bias)
        assert y.shape == (tokens, 256) and y.dtype == torch.float16
        assert float((y.float() - ref).abs().max() / ref.abs().max()) < 5e-3, path
    gpu_dispatch._tables.clear()
    y = layer(x)  # measures, records and uses the fastest path (one candidate: used without measuring or a table)
    assert float((y.float() - ref).abs().max() / ref.abs().max()) < 5e-3
    tables = list((tmp_path / "compress").glob("sparse_dispatch_*.json"))
    if len(paths) == 1:
        assert not tables
    else:
        table = json.loads(tables[0].read_text())
        assert len(table) == 1 and list(table.values())[0] in paths


@cuda
def test_semi_structured_path_or_clean_skip():
    if not gpu_dispatch.semi_structured_available():
        pytest.skip("cuSPARSELt needs compute capability >= 8.0 and a torch build with it")
    layer = sparse_layer(256, 512, "2:4", torch.float16, "cuda")
    x = torch.randn(48, 512, device="cuda", dtype=torch.float16)
    ref = x.float() @ layer.dense_weight(torch.float32).t() + layer.bias.float()
    y = gpu_dispatch.RUN["semi_structured"](layer, x, layer.bias)
    assert float((y.float() - ref).abs().max() / ref.abs().max()) < 5e-3


@pytest.mark.parametrize("structure", ["2:4", "unstructured"])
@pytest.mark.parametrize("tokens", [3, 40])
def test_triton_paths_match_reference_under_the_interpreter(structure, tokens, monkeypatch):
    """The dispatcher's Triton paths (packed GEMV, expand into the shared scratch buffer + a dense GEMM) on CPU
    tensors, run by the Triton interpreter: the same outputs as the dense masked layer (float32, tight)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("test_every_path_matches_reference_on_cuda runs them compiled")
    monkeypatch.setenv("COMPRESS_KERNELS", "triton")
    layer = sparse_layer(48, 128, structure)
    x = torch.randn(tokens, 128)
    ref = (x.double() @ layer.dense_weight(torch.float32).double().t() + layer.bias.double()).detach()
    paths = [p for p in gpu_dispatch.candidates(layer, tokens, torch.float32) if p != "semi_structured"]
    assert "expand_cublas" in paths and ("packed_gemv" in paths) == (tokens <= 16)
    for path in paths:
        with torch.no_grad():
            y = gpu_dispatch.RUN[path](layer, x, layer.bias)
        assert y.shape == (tokens, 48) and float((y.double() - ref).abs().max() / ref.abs().max()) < 1e-5, path
