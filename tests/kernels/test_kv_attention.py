"""Attention over the compressed KV storage: the torch reference against float64 attention over the dense
reconstruction, and the Triton kernel (interpreted on CPU) against the reference."""
import math

import pytest
import torch

from compress.kernels import kv_attention as A
from compress.kernels import kv_quant as Q

TRITON_KERNEL = A._compressed_decode_kernel  # checked by the triton_kernels fixture (tests/kernels/conftest.py)


def random_store(x, axis, bits, group_size, chunk_len, outlier_ratio=0.0, ranks=(), seed=0):
    """x [B, H, N, D] compressed chunk by chunk into the shared format, with low-rank segments of the given
    (chunks, rank) (random factors: only the arithmetic is under test); returns (store, float64 reconstruction)."""
    gen = torch.Generator().manual_seed(seed)
    b, h, n, d = x.shape
    nc = n // chunk_len
    p = Q.quantize_pack_reference(x.reshape(b, h, nc, chunk_len, d), bits, group_size, axis, outlier_ratio)
    flat = lambda t: t.reshape(b, h, -1, t.shape[-1])  # noqa: E731
    store = A.CompressedKV(flat(p.codes), flat(p.scale), flat(p.zero), bits, group_size, chunk_len,
                           p.outlier_values, p.outlier_positions)
    dense = Q.unpack_dequantize_reference(p).reshape(b, h, n, d).double()
    first = 0
    for chunks, rank in ranks:
        a = (torch.randn(b, h, chunks * chunk_len, rank, generator=gen) * 0.3).half()
        bf = (torch.randn(b, h, chunks, d, rank, generator=gen) * 0.3).half()
        store.segments.append(A.LowRank(first, a, bf))
        lr = a.double().view(b, h, chunks, chunk_len, rank) @ bf.double().transpose(-1, -2)
        dense[:, :, first * chunk_len:(first + chunks) * chunk_len] += lr.reshape(b, h, -1, d)
        first += chunks
    return store, dense


def dense_attention_f64(q, k, v, bias):
    """Plain attention in float64; k, v [B, H, KV, D] are repeated over the query heads (GQA)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    s = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias.double()[:, None]
    return s.softmax(-1) @ v


def make_case(bits=4, outlier_ratio=0.05, key_ranks=((1, 2), (2, 4)), value_ranks=((3, 2),), n_chunks=3, chunk=32,
              window=5, batch=2, kv_heads=2, q_heads=4, q_len=1, group=32, d=64, seed=0):
    torch.manual_seed(seed)
    n = n_chunks * chunk
    keys, k_dense = random_store(torch.randn(batch, kv_heads, n, d) * 2, "token", bits, group, chunk, outlier_ratio,
                                 key_ranks, seed)
    values, v_dense = random_store(torch.randn(batch, kv_heads, n, d), "channel", bits, group, chunk, outlier_ratio,
                                   value_ranks, seed + 1)
    wk = torch.randn(batch, kv_heads, window, d).half()
    wv = torch.randn(batch, kv_heads, window, d).half()
    q = torch.randn(batch, q_heads, q_len, d)
    k_all = torch.cat([k_dense, wk.double()], 2)
    v_all = torch.cat([v_dense, wv.double()], 2)
    return q, keys, values, wk, wv, k_all, v_all


def left_padding_mask(batch, kv, pad):
    mask = torch.ones(batch, kv, dtype=torch.bool)
    mask[-1, :pad] = False
    return mask


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("outlier_ratio, key_ranks, value_ranks", [
    (0.0, (), ()),                          # KIVI: codes only
    (0.05, ((1, 2), (2, 4)), ((3, 2),)),   # GEAR: outliers + low-rank, prompt and decode ranks differ
])
def test_reference_matches_float64_dense(bits, outlier_ratio, key_ranks, value_ranks):
    q, keys, values, wk, wv, k_all, v_all = make_case(bits, outlier_ratio, key_ranks, value_ranks)
    mask = left_padding_mask(2, k_all.shape[2], pad=37)  # the second row starts 37 tokens late
    out = A.compressed_attention_reference(q, keys, values, wk, wv, mask)
    want = dense_attention_f64(q, k_all, v_all, A.attention_bias(mask, 2, 1, k_all.shape[2], q.device))
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    # the masked keys had no influence; the compressed tokens did (dropping them changes the answer)
    window_only = A.compressed_attention_reference(q, None, None, wk, wv)
    assert (out - window_only).abs().max() > 1e-2


def test_reference_multi_token_causal_and_4d_masks():
    # a chunk of 3 new tokens (in the window) attends to the compressed past and causally to each other
    q, keys, values, wk, wv, k_all, v_all = make_case(q_len=3, window=7)
    kv = k_all.shape[2]
    want = dense_attention_f64(q, k_all, v_all, A.attention_bias(None, 2, 3, kv, q.device))
    torch.testing.assert_close(A.compressed_attention_reference(q, keys, values, wk, wv).double(), want,
                               rtol=1e-4, atol=1e-5)
    causal = A.attention_bias(None, 2, 3, kv, q.device)
    assert causal[0, 0, -2:].eq(A.MASKED).all() and causal[0, 2].eq(0).all()
    # transformers' 4D masks: bool (True = attend) and additive float, with extra leading columns cut off
    bool4d = torch.cat([torch.zeros(2, 1, 3, 4, dtype=torch.bool), (causal == 0)[:, None]], -1)
    float4d = torch.where(bool4d, 0.0, float("-inf"))
    for mask in (bool4d, float4d):
        torch.testing.assert_close(A.compressed_attention_reference(q, keys, values, wk, wv, mask).double(), want,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_reference_blocks_give_the_same_result(monkeypatch, bits):
    q, keys, values, wk, wv, _, _ = make_case(bits=bits, n_chunks=4)
    whole = A.compressed_attention_reference(q, keys, values, wk, wv)
    monkeypatch.setattr(A, "REFERENCE_BLOCK_TOKENS", 32)  # one chunk per block: 4 blocks
    torch.testing.assert_close(A.compressed_attention_reference(q, keys, values, wk, wv), whole)


def test_cpu_tensors_take_the_reference(monkeypatch):
    monkeypatch.setenv("COMPRESS_KERNELS", "")
    monkeypatch.setattr(A, "compressed_attention_triton", lambda *a, **k: pytest.fail("Triton path on CPU"))
    q, keys, values, wk, wv, _, _ = make_case()
    torch.testing.assert_close(A.compressed_decode_attention(q, keys, values, wk, wv),
                               A.compressed_attention_reference(q, keys, values, wk, wv))


def _to(device, *tensors):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors]


def _store_to(store, device):
    if store is None:
        return None
    return A.CompressedKV(*_to(device, store.codes, store.scale, store.zero), store.bits, store.group_size,
                          store.chunk_len, *_to(device, store.outlier_values, store.outlier_positions),
                          [A.LowRank(s.first_chunk, s.a.to(device), s.b.to(device)) for s in store.segments])


@pytest.mark.parametrize("case", [
    dict(bits=4),                                                    # GEAR, two key ranks, one value run
    dict(bits=2, outlier_ratio=0.0, key_ranks=(), value_ranks=()),  # KIVI-2
    dict(bits=3, window=0, value_ranks=((1, 4),)),                   # 3-bit straddling codes, no window
    dict(bits=8, q_len=2, window=40, group=16, batch=1),             # two new tokens, window over 32 lanes
    dict(bits=4, q_len=9, window=12, batch=1),                       # 2 x 9 = 18 query rows: two row blocks
])
def test_triton_matches_reference(triton_kernels, case):
    q, keys, values, wk, wv, k_all, _ = make_case(**case)
    kv = k_all.shape[2]
    mask = None if case.get("q_len", 1) > 1 else left_padding_mask(case.get("batch", 2), kv, pad=20)
    ref = A.compressed_attention_reference(q, keys, values, wk, wv, mask)
    dev = triton_kernels
    got = A.compressed_decode_attention(*_to(dev, q), _store_to(keys, dev), _store_to(values, dev),
                                        *_to(dev, wk, wv, mask))
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-5)


def test_triton_window_only(triton_kernels):
    q, _, _, wk, wv, _, _ = make_case(window=9)
    ref = A.compressed_attention_reference(q, None, None, wk, wv)
    want = dense_attention_f64(q, wk, wv, None)
    torch.testing.assert_close(ref.double(), want, rtol=1e-5, atol=1e-6)
    dev = triton_kernels
    got = A.compressed_decode_attention(*_to(dev, q), None, None, *_to(dev, wk, wv))
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("splits", (2, 3))
def test_triton_split_sequence_matches_reference(triton_kernels, splits):
    # flash-decoding: the chunks are split over programs (3 splits of 4 chunks leaves the last split only the window)
    q, keys, values, wk, wv, k_all, _ = make_case(n_chunks=4, window=3, q_heads=2)
    mask = left_padding_mask(2, k_all.shape[2], pad=70)
    ref = A.compressed_attention_reference(q, keys, values, wk, wv, mask)
    dev = triton_kernels
    got = A.compressed_attention_triton(*_to(dev, q), _store_to(keys, dev), _store_to(values, dev),
                                        *_to(dev, wk, wv, mask), splits=splits)
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits, group", [(4, 64), (3, 4), (2, 16)])
def test_reference_group_layouts(bits, group):
    # values: one group per token (G = D), groups narrower than a lane's word (3-bit, G = 4), and in between
    q, keys, values, wk, wv, k_all, v_all = make_case(bits=bits, group=group, chunk=64, n_chunks=2,
                                                      key_ranks=((2, 2),), value_ranks=((1, 2),))
    want = dense_attention_f64(q, k_all, v_all, None)
    torch.testing.assert_close(A.compressed_attention_reference(q, keys, values, wk, wv).double(), want,
                               rtol=1e-4, atol=1e-5)


def test_head_dim_128_reference_and_triton(triton_kernels):
    # the head size of Llama / Mistral / Qwen checkpoints; values in two groups of 64 channels
    q, keys, values, wk, wv, k_all, v_all = make_case(d=128, group=64, chunk=64, n_chunks=2, batch=1,
                                                      key_ranks=((2, 2),), value_ranks=((2, 3),))
    ref = A.compressed_attention_reference(q, keys, values, wk, wv)
    torch.testing.assert_close(ref.double(), dense_attention_f64(q, k_all, v_all, None), rtol=1e-4, atol=1e-5)
    dev = triton_kernels
    got = A.compressed_decode_attention(*_to(dev, q), _store_to(keys, dev), _store_to(values, dev), *_to(dev, wk, wv))
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-5)


def test_shapes_the_kernel_cannot_tile_take_the_reference(triton_kernels, monkeypatch):
    # head_dim 96 is not a power of two: even with Triton forced, the public function answers with the reference
    monkeypatch.setattr(A, "compressed_attention_triton", lambda *a, **k: pytest.fail("Triton path for head_dim 96"))
    q, keys, values, wk, wv, k_all, v_all = make_case(d=96, group=32, chunk=32, n_chunks=2, batch=1,
                                                      key_ranks=(), value_ranks=())
    got = A.compressed_decode_attention(q, keys, values, wk, wv)
    torch.testing.assert_close(got.double(), dense_attention_f64(q, k_all, v_all, None), rtol=1e-4, atol=1e-5)



@pytest.mark.parametrize("bits", (4, 8))
def test_cache_store_longer_than_a_reference_block(bits):
    """The cache's own store (codes sliced from a larger tensor), several heads, more tokens than one block."""
    from compress.kvcache.store import CompressedStore

    stores = {ax: CompressedStore(axis=ax, bits=bits, group_size=64, chunk_len=64, outlier_ratio=0.0, power_iters=1)
              for ax in ("token", "channel")}
    x = torch.randn(1, 2, A.REFERENCE_BLOCK_TOKENS + 64, 64)
    for s in stores.values():
        s.append(x, 0)
    q, w = torch.randn(1, 2, 1, 64), torch.randn(1, 2, 3, 64)
    got = A.compressed_attention_reference(q, stores["token"], stores["channel"], w, w)
    k = torch.cat([stores["token"].dequantize(), w], 2)
    v = torch.cat([stores["channel"].dequantize(), w], 2)
    want = torch.softmax(q @ k.transpose(-1, -2) / 8, -1) @ v
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_triton_reads_grown_store_views_in_place(triton_kernels):
    """The cache's store grows by doubling and hands out prefix views: the kernel addresses the buffers by their
    capacity instead of copying them, and still matches the reference."""
    from compress.kvcache.store import CompressedStore

    torch.manual_seed(0)
    stores = {ax: CompressedStore(axis=ax, bits=4, group_size=32, chunk_len=32, outlier_ratio=0.05, power_iters=1)
              for ax in ("token", "channel")}
    x = torch.randn(2, 2, 5 * 32, 64)
    for i in range(5):  # one chunk at a time: the buffers grow and readers see prefix views
        for ax, s in stores.items():
            s.append(x[:, :, i * 32:(i + 1) * 32], 0 if ax == "token" else 1)
    keys, values = stores["token"], stores["channel"]
    assert not keys.codes.is_contiguous()
    n = keys.codes.shape[2]
    assert A._token_capacity(n, [keys.codes, keys.scale, keys.zero]) > n
    q, w = torch.randn(2, 4, 1, 64), torch.randn(2, 2, 3, 64).half()
    dev = triton_kernels
    got = A.compressed_decode_attention(q.to(dev), keys, values, w.to(dev), w.to(dev)).cpu()
    want = A.compressed_attention_reference(q, keys, values, w, w)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)
