"""On a CUDA device (skipped elsewhere): the cache with the Triton kernels (quantize+pack, decode attention over the
compressed storage) inside generate, against the uncompressed cache and the dense reconstruction."""
import pytest
import torch
from transformers import DynamicCache

from compress.kvcache import GEARCache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_lm():
    import compress

    # float32: the comparisons below are float32-tight (the default, bf16, rounds one step's logits by ~0.06 at
    # this size, twice the tolerance); the kernel still takes fp16 dots there (its DOT16 path)
    return compress.load("builtin:tiny", device="cuda", dtype="float32")


def test_triton_path_8bit_greedy_matches_uncompressed(cuda_lm, heldout_ids, greedy):
    cuda_lm.set_attn_implementation("gear_kv")
    ids = heldout_ids[:, :150].cuda()
    cache = GEARCache(cuda_lm.config, bits=8, outlier_ratio=0.0, key_rank=0, value_rank=0)
    out = greedy(cuda_lm, ids, cache, 60)
    assert cache.layers[0].key_store.pages[0].codes.is_cuda
    assert torch.equal(out, greedy(cuda_lm, ids, DynamicCache(config=cuda_lm.config), 60))


@pytest.mark.parametrize("settings", [dict(bits=2, outlier_ratio=0.02, key_rank=4, value_rank=2),
                                      dict(method="kivi", bits=4)])
def test_triton_attention_matches_dense_reconstruction(cuda_lm, heldout_ids, settings):
    ids = torch.cat([heldout_ids[:, :180], heldout_ids[:, 300:480]]).cuda()
    mask = torch.ones_like(ids)
    mask[1, :25] = 0
    logits = {}
    for impl in ("sdpa", "gear_kv"):
        cuda_lm.set_attn_implementation(impl)
        cache, m, out = GEARCache(cuda_lm.config, **settings), mask, []
        with torch.no_grad():
            o = cuda_lm(ids, attention_mask=m, cache=cache, use_cache=True)
            nxt = o.logits[:, -1:].argmax(-1)
            for _ in range(16):
                m = torch.cat([m, torch.ones_like(nxt)], 1)
                o = cuda_lm(nxt, attention_mask=m, cache=cache, use_cache=True)
                out.append(o.logits[:, -1])
                nxt = o.logits[:, -1:].argmax(-1)
        logits[impl] = torch.stack(out, 1)
    ref = logits["sdpa"]
    assert torch.allclose(logits["gear_kv"], ref, atol=2e-3 * ref.abs().max().item(), rtol=0)
