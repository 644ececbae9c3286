"""Attention over the paged compressed KV storage: the torch reference against float64 attention over the dense
reconstruction; the C kernel (the CPU path) and the Triton flash-decoding kernel (interpreted on CPU, compiled on a
GPU) against the reference, at head_dim 64/128/256 (its shared memory and registers on an H100/H200:
test_compile_check.py)."""
import contextlib
import math

import pytest
import torch

from compress.kernels import kv_attention as A
from compress.kernels import kv_attention_cpu as AC
from compress.kernels import kv_attention_triton as AT
from compress.kernels.dispatch import forced_kernels
from compress.kvcache.store import CompressedStore

TRITON_KERNEL = AT._paged_decode_kernel  # checked by the triton_kernels fixture (tests/kernels/conftest.py)
ON_GPU = torch.cuda.is_available()
# the GPU kernel multiplies in fp16 (fp32 accumulation); the interpreter in fp32
TOL = dict(rtol=2e-2, atol=2e-2) if ON_GPU else dict(rtol=1e-4, atol=1e-5)


def build_store(x, axis, bits, group, chunk, outlier_ratio, ranks, page_chunks, device="cpu",
                factor_dtype=torch.float16, scale_format="fp16"):
    """x [B, H, N, D] appended in pieces of (chunks, rank), so the store has several pages, an open page that later
    chunks were projected into, and pages of different ranks; returns (store, float64 reconstruction)."""
    store = CompressedStore(axis=axis, bits=bits, group_size=group, chunk_len=chunk, outlier_ratio=outlier_ratio,
                            power_iters=2, page_chunks=page_chunks, factor_dtype=factor_dtype,
                            scale_format=scale_format)
    start = 0
    with torch_quantizer_on_cpu():
        for chunks, rank in ranks:
            store.append(x[:, :, start:start + chunks * chunk].to(device), rank)
            start += chunks * chunk
        return store, store.dequantize().double().cpu()


def torch_quantizer_on_cpu():
    """Build stores with the torch quantizer on the CPU (the interpreted Triton quantizer is tested elsewhere and
    slow); on a GPU the store is built by the compiled kernels."""
    return contextlib.nullcontext() if ON_GPU else forced_kernels("torch")


def dense_attention_f64(q, k, v, bias):
    """Plain attention in float64; k, v [B, H, KV, D] are repeated over the query heads (GQA)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    s = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias.double()[:, None]
    return s.softmax(-1) @ v


def make_case(bits=4, outlier_ratio=0.05, key_ranks=((3, 2), (2, 0)), value_ranks=((3, 3), (2, 0)), chunk=32,
              window=5, batch=2, kv_heads=2, q_heads=4, q_len=1, group=32, d=64, page_chunks=2, seed=0,
              device="cpu", factor_dtype=torch.float16, scale_format="fp16", value_bits=None):
    torch.manual_seed(seed)
    n = sum(c for c, _ in key_ranks) * chunk
    keys, k_dense = build_store(torch.randn(batch, kv_heads, n, d) * 2, "token", bits, group, chunk, outlier_ratio,
                                key_ranks, page_chunks, device, factor_dtype, scale_format)
    values, v_dense = build_store(torch.randn(batch, kv_heads, n, d), "channel", value_bits or bits, group, chunk,
                                  outlier_ratio, value_ranks, page_chunks, device, factor_dtype, scale_format)
    wk = torch.randn(batch, kv_heads, window, d).half()
    wv = torch.randn(batch, kv_heads, window, d).half()
    q = torch.randn(batch, q_heads, q_len, d)
    return q, keys, values, wk, wv, torch.cat([k_dense, wk.double()], 2), torch.cat([v_dense, wv.double()], 2)


def left_padding_mask(batch, kv, pad):
    mask = torch.ones(batch, kv, dtype=torch.bool)
    mask[-1, :pad] = False
    return mask


GEAR = dict(outlier_ratio=0.05, key_ranks=((3, 2), (2, 0)), value_ranks=((3, 3), (2, 0)))
KIVI = dict(outlier_ratio=0.0, key_ranks=((3, 0), (2, 0)), value_ranks=((3, 0), (2, 0)))


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("fmt", [KIVI, GEAR], ids=["kivi", "gear"])
@pytest.mark.parametrize("scale_format", ("fp16", "log8"))
def test_reference_matches_float64_dense(bits, fmt, scale_format):
    q, keys, values, wk, wv, k_all, v_all = make_case(bits, scale_format=scale_format, **fmt)
    assert keys.pages[0].scale.dtype == (torch.uint8 if scale_format == "log8" else torch.float16)
    assert [p.codes.shape[2] for p in keys.pages] == [64, 64, 32]  # pages of 2 chunks, the last one open
    mask = left_padding_mask(2, k_all.shape[2], pad=37)  # the second row starts 37 tokens late
    out = A.compressed_attention_reference(q, keys, values, wk, wv, mask)
    want = dense_attention_f64(q, k_all, v_all, A.attention_bias(mask, 2, 1, k_all.shape[2], q.device))
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    window_only = A.compressed_attention_reference(q, None, None, wk, wv)
    assert (out - window_only).abs().max() > 1e-2  # the compressed tokens mattered


def _cpu_kernel(*args, **kwargs):
    if AC._library() is None:
        pytest.skip("no C compiler: the CPU kernel is not built")
    return AC.compressed_attention_cpu(*args, **kwargs)


@pytest.mark.parametrize("attend", [A.compressed_attention_reference, _cpu_kernel], ids=["reference", "c"])
def test_multi_token_causal_and_4d_masks(attend):
    q, keys, values, wk, wv, k_all, v_all = make_case(q_len=3, window=7)
    kv = k_all.shape[2]
    want = dense_attention_f64(q, k_all, v_all, A.attention_bias(None, 2, 3, kv, q.device))
    torch.testing.assert_close(attend(q, keys, values, wk, wv).double(), want, rtol=1e-4, atol=1e-5)
    causal = A.attention_bias(None, 2, 3, kv, q.device)
    assert causal[0, 0, -2:].eq(A.MASKED).all() and causal[0, 2].eq(0).all()
    bool4d = torch.cat([torch.zeros(2, 1, 3, 4, dtype=torch.bool), (causal == 0)[:, None]], -1)
    float4d = torch.where(bool4d, 0.0, float("-inf"))
    for mask in (bool4d, float4d):
        torch.testing.assert_close(attend(q, keys, values, wk, wv, mask).double(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(attend(q, None, None, wk, wv),  # window only
                               A.compressed_attention_reference(q, None, None, wk, wv), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits, value_bits", [(4, 2), (8, 3), (2, 4)])
def test_keys_and_values_at_different_widths(bits, value_bits):
    """KIVI's k_bits / v_bits: the reference, the C kernel and the Triton kernel (interpreted) read each store at
    its own width."""
    q, keys, values, wk, wv, k_all, v_all = make_case(bits, value_bits=value_bits, **GEAR)
    assert (keys.bits, values.bits) == (bits, value_bits)
    want = dense_attention_f64(q, k_all, v_all, None)
    torch.testing.assert_close(A.compressed_attention_reference(q, keys, values, wk, wv).double(), want,
                               rtol=1e-4, atol=1e-5)
    if AC._library() is not None:
        assert AC.cpu_kernel_supports(q, keys, values, wk)
        torch.testing.assert_close(AC.compressed_attention_cpu(q, keys, values, wk, wv).double(), want,
                                   rtol=1e-4, atol=1e-5)
    if AT.triton is not None and not ON_GPU:
        assert AT.triton_supports(keys, values, q.shape[-1])
        torch.testing.assert_close(AT.compressed_attention_triton(q, keys, values, wk, wv).double(), want,
                                   rtol=1e-4, atol=1e-5)


def test_triton_refuses_pages_it_would_misread():
    """The Triton kernel finds a chunk's page by arithmetic (every page but the last holds page_chunks chunks) and
    offsets in 32 bits: stores whose pages say otherwise, or hold a tensor of 2^31 elements, go to the C kernel /
    reference, which read each page's own length in 64-bit offsets."""
    import copy

    q, keys, values, *_ = make_case(**GEAR)
    chunks = [p.codes.shape[2] // keys.chunk_len for p in keys.pages]
    assert len(chunks) > 2 and chunks[:-1] == [keys.page_chunks] * (len(chunks) - 1)
    assert AT.triton_supports(keys, values, q.shape[-1])
    claimed_k, claimed_v = copy.copy(keys), copy.copy(values)
    claimed_k.page_chunks = claimed_v.page_chunks = keys.page_chunks + 1
    assert not AT.triton_supports(claimed_k, claimed_v, q.shape[-1])
    # a page tensor of 2^31 elements or more: the kernel's 32-bit offsets would wrap (shape only: an expanded view)
    huge_k, huge_v = copy.copy(keys), copy.copy(values)
    huge_k.pages = list(keys.pages)
    page = copy.copy(keys.pages[0])
    tokens = page.codes.shape[2]  # (kept: the page stays full)
    page.codes = page.codes[:1, :1, :1, :1].expand(2 ** 16, 2 ** 31 // (2 ** 16 * tokens), tokens, 1)  # one byte held
    assert page.codes.numel() == 2 ** 31
    huge_k.pages[0] = page
    assert not AT.triton_supports(huge_k, huge_v, q.shape[-1])


@pytest.mark.parametrize("bits, group", [(4, 64), (3, 4), (2, 16)])
def test_reference_group_layouts(bits, group):
    q, keys, values, wk, wv, k_all, v_all = make_case(bits=bits, group=group, chunk=64, key_ranks=((2, 2),),
                                                      value_ranks=((2, 1),))
    torch.testing.assert_close(A.compressed_attention_reference(q, keys, values, wk, wv).double(),
                               dense_attention_f64(q, k_all, v_all, None), rtol=1e-4, atol=1e-5)


needs_c = pytest.mark.skipif(AC._library() is None, reason="no C compiler: the CPU kernel is not built")


@needs_c
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("fmt", [KIVI, GEAR], ids=["kivi", "gear"])
@pytest.mark.parametrize("factor_dtype, scale_format", [(torch.float16, "fp16"), (torch.float8_e4m3fn, "fp16"),
                                                       (torch.float8_e4m3fn, "log8")], ids=["fp16", "fp8", "fp8-log8"])
def test_cpu_kernel_matches_reference(bits, fmt, factor_dtype, scale_format, cpu_level):
    q, keys, values, wk, wv, k_all, v_all = make_case(bits, factor_dtype=factor_dtype, scale_format=scale_format,
                                                      **fmt)
    mask = left_padding_mask(2, k_all.shape[2], pad=37)
    assert AC.cpu_kernel_supports(q, keys, values, wk)
    out = AC.compressed_attention_cpu(q, keys, values, wk, wv, mask)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, A.compressed_attention_reference(q, keys, values, wk, wv, mask),
                               rtol=1e-4, atol=1e-5)
    want = dense_attention_f64(q, k_all, v_all, A.attention_bias(mask, 2, 1, k_all.shape[2], q.device))
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)


@needs_c
@pytest.mark.parametrize("d, bits, group, scale_format", [(128, 2, 64, "fp16"), (128, 3, 32, "log8"),
                                                         (256, 4, 64, "fp16"), (96, 2, 32, "log8"), (40, 4, 8, "fp16")])
def test_cpu_kernel_head_sizes(d, bits, group, scale_format, cpu_level):
    """64/128 run specialized code, the rest the generic loops (96: whole AVX2 blocks; 40: the scalar unpacking)."""
    q, keys, values, wk, wv, k_all, v_all = make_case(bits, d=d, group=group, chunk=64, q_heads=8,
                                                      scale_format=scale_format, **GEAR)
    assert AC.cpu_kernel_supports(q, keys, values, wk)
    torch.testing.assert_close(AC.compressed_attention_cpu(q, keys, values, wk, wv).double(),
                               dense_attention_f64(q, k_all, v_all, None), rtol=1e-4, atol=1e-5)


@needs_c
def test_cpu_tensors_take_the_c_kernel_where_it_fits(monkeypatch):
    monkeypatch.setenv("COMPRESS_KERNELS", "")
    monkeypatch.setattr(A, "compressed_attention_triton", lambda *a, **k: pytest.fail("Triton path on CPU"))
    reference = A.compressed_attention_reference
    calls = []
    monkeypatch.setattr(A, "compressed_attention_reference", lambda *a, **k: calls.append(1) or reference(*a, **k))
    q, keys, values, wk, wv, _, _ = make_case()
    torch.testing.assert_close(A.compressed_decode_attention(q, keys, values, wk, wv),
                               reference(q, keys, values, wk, wv), rtol=1e-4, atol=1e-5)
    assert not calls  # the C kernel ran
    q, keys, values, wk, wv, _, _ = make_case(bits=3, group=4, chunk=64, key_ranks=((2, 2),), value_ranks=((2, 1),))
    assert not AC.cpu_kernel_supports(q, keys, values, wk)  # value groups of 4 split the 8 lanes of 3-bit codes
    A.compressed_decode_attention(q, keys, values, wk, wv)
    assert calls == [1]
    for env in ({"COMPRESS_KERNELS": "torch"}, {"COMPRESS_CPU_KERNELS": "off"}):  # either switch turns it off
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            q, keys, values, wk, wv, _, _ = make_case()
            A.compressed_decode_attention(q, keys, values, wk, wv)
    assert calls == [1, 1, 1]


@needs_c
def test_cpu_kernel_reads_a_deep_copy_not_the_original():
    """Pages cache their data pointers; a deep copy (how a prompt cache is reused) must not read the original's."""
    import copy

    q, keys, values, wk, wv, _, _ = make_case()
    AC.compressed_attention_cpu(q, keys, values, wk, wv)  # fills the pointer caches
    keys2, values2 = copy.deepcopy(keys), copy.deepcopy(values)
    want = A.compressed_attention_reference(q, keys2, values2, wk, wv)
    for page in keys.pages + values.pages:
        page.codes.zero_()
    torch.testing.assert_close(AC.compressed_attention_cpu(q, keys2, values2, wk, wv), want, rtol=1e-4, atol=1e-5)


@needs_c
def test_cpu_kernel_refuses_broadcast_windows_and_foreign_dtypes():
    q, keys, values, wk, wv, _, _ = make_case()
    assert not AC.cpu_kernel_supports(q, keys, values, wk[:1], wv[:1])  # batch-1 window, batch-2 query
    assert A.decode_attention_path(q, keys, values, wk[:1], wv[:1]) == "torch"
    q, keys, values, wk, wv, _, _ = make_case(factor_dtype=torch.bfloat16)
    assert not AC.cpu_kernel_supports(q, keys, values, wk, wv)  # factors the kernel cannot decode
    assert not AC.cpu_kernel_supports(q.new_zeros(q.shape, device="meta"), keys, values, wk, wv)


@needs_c
def test_cpu_kernel_refuses_what_its_buffers_cannot_hold():
    q, keys, values, wk, wv, _, _ = make_case(key_ranks=((2, 17),), value_ranks=((2, 0),))
    assert not AC.cpu_kernel_supports(q, keys, values, wk)  # rank 17 > 16
    q, keys, values, wk, wv, _, _ = make_case(q_len=33, window=40)
    assert not AC.cpu_kernel_supports(q, keys, values, wk)  # 2 query heads per KV head x 33 steps > 64 rows
    q, keys, values, wk, wv, _, _ = make_case(q_len=32, window=40)
    assert AC.cpu_kernel_supports(q, keys, values, wk)


def _to(device, *tensors):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors]


@pytest.mark.parametrize("case", [
    dict(bits=4, kv_heads=1, q_heads=2),                              # GEAR: outliers, ranks 2/3 and 0 pages
    dict(bits=2, **KIVI),                                             # KIVI-2
    dict(bits=4, batch=1, factor_dtype=torch.float8_e4m3fn),          # fp8 e4m3 low-rank token factors
    dict(bits=2, batch=1, scale_format="log8"),                       # one-byte scales, GEAR-2
    dict(bits=4, value_bits=2, batch=1, **KIVI),                      # keys 4-bit, values 2-bit
    dict(bits=3, window=0, batch=1),                                  # 3-bit straddling codes, no window
    dict(bits=8, q_len=2, window=40, group=16, batch=1),              # two new tokens, group < chunk
    dict(bits=4, q_len=9, window=12, batch=1),                        # 2 x 9 = 18 query rows: two row blocks
    dict(bits=4, d=128, group=64, chunk=64, batch=1, q_heads=8),      # Llama / Mistral / Qwen head size, GQA 4
    dict(bits=2, d=256, group=64, chunk=64, batch=1, q_heads=2, key_ranks=((2, 1), (1, 0)),
         value_ranks=((2, 2), (1, 0))),                                # Gemma head size
])
def test_triton_matches_reference(triton_kernels, case):
    dev = triton_kernels
    q, keys, values, wk, wv, k_all, v_all = make_case(**case, device=dev)
    mask = None if case.get("q_len", 1) > 1 else left_padding_mask(case.get("batch", 2), k_all.shape[2], pad=20)
    ref = A.compressed_attention_reference(*_to(dev, q), keys, values, *_to(dev, wk, wv, mask)).cpu()
    assert A.decode_attention_path(*_to(dev, q), keys, values, *_to(dev, wk, wv)) == "triton"  # no silent fallback
    got = A.compressed_decode_attention(*_to(dev, q), keys, values, *_to(dev, wk, wv, mask)).cpu()
    torch.testing.assert_close(got, ref, **TOL)
    bias = A.attention_bias(mask, q.shape[0], q.shape[2], k_all.shape[2], "cpu")
    want = dense_attention_f64(q, k_all, v_all, bias)
    torch.testing.assert_close(got.double(), want, **(TOL if ON_GPU else dict(rtol=1e-4, atol=1e-5)))


def test_triton_window_only(triton_kernels):
    q, _, _, wk, wv, _, _ = make_case(window=9, key_ranks=((1, 0),), value_ranks=((1, 0),))
    want = dense_attention_f64(q, wk, wv, None)
    dev = triton_kernels
    got = A.compressed_decode_attention(*_to(dev, q), None, None, *_to(dev, wk, wv))
    torch.testing.assert_close(got.cpu().double(), want, **TOL)


@pytest.mark.parametrize("splits", (2, 3, 5))
def test_triton_split_sequence_matches_reference(triton_kernels, splits):
    # flash-decoding: chunks split over programs (5 splits of 5 chunks: one each; pages straddle splits)
    dev = triton_kernels
    q, keys, values, wk, wv, k_all, _ = make_case(window=3, q_heads=2, batch=1, kv_heads=1, device=dev)
    mask = None
    ref = A.compressed_attention_reference(q, keys, values, wk, wv, mask) if dev == "cpu" else None
    got = AT.compressed_attention_triton(*_to(dev, q), keys, values, *_to(dev, wk, wv, mask), splits=splits).cpu()
    if ref is None:
        ref = AT.compressed_attention_triton(*_to(dev, q), keys, values, *_to(dev, wk, wv, mask), splits=1).cpu()
    torch.testing.assert_close(got, ref, **TOL)


def test_shapes_the_kernel_cannot_tile_take_the_reference(triton_kernels, monkeypatch):
    monkeypatch.setattr(A, "compressed_attention_triton", lambda *a, **k: pytest.fail("Triton path for head_dim 96"))
    q, keys, values, wk, wv, k_all, v_all = make_case(d=96, group=32, chunk=32, batch=1, **KIVI)
    got = A.compressed_decode_attention(q, keys, values, wk, wv)
    torch.testing.assert_close(got.double(), dense_attention_f64(q, k_all, v_all, None), rtol=1e-4, atol=1e-5)


def test_store_on_another_device_is_refused(triton_kernels):
    dev = triton_kernels
    q, keys, values, wk, wv, _, _ = make_case()
    if dev == "cpu":
        pytest.skip("one device only")
    with pytest.raises(ValueError, match="move it"):  # a CPU pointer handed to a GPU kernel would fault
        A.compressed_decode_attention(*_to(dev, q), keys, values, *_to(dev, wk, wv))


def test_triton_reads_a_store_grown_chunk_by_chunk(triton_kernels):
    """The cache's own store, appended one chunk at a time on the kernel's device (pages sealed and an open page
    re-allocated on every append), read in place through the page table."""
    dev = triton_kernels
    torch.manual_seed(0)
    stores = {ax: CompressedStore(axis=ax, bits=4, group_size=32, chunk_len=32, outlier_ratio=0.05, power_iters=1,
                                  page_chunks=2) for ax in ("token", "channel")}
    x = torch.randn(1, 2, 5 * 32, 64, device=dev)
    with torch_quantizer_on_cpu():
        for i in range(5):
            for ax, s in stores.items():
                s.append(x[:, :, i * 32:(i + 1) * 32], 2 if ax == "token" else 1)
    keys, values = stores["token"], stores["channel"]
    assert [p.codes.shape[2] for p in keys.pages] == [64, 64, 32] and keys.pages[0].codes.device.type == dev
    q, w = torch.randn(1, 4, 1, 64, device=dev), torch.randn(1, 2, 3, 64, device=dev).half()
    got = A.compressed_decode_attention(q, keys, values, w, w).cpu()
    k = torch.cat([keys.dequantize().cpu(), w.cpu().float()], 2).repeat_interleave(2, 1)
    v = torch.cat([values.dequantize().cpu(), w.cpu().float()], 2).repeat_interleave(2, 1)
    want = torch.softmax(q.cpu() @ k.transpose(-1, -2) / 8, -1) @ v
    torch.testing.assert_close(got, want, **(TOL if ON_GPU else dict(rtol=2e-4, atol=2e-4)))


def test_fp8_factor_decode_matches_torch_for_every_byte(triton_kernels):
    """The kernel decodes fp8 e4m3 token factors by bit arithmetic (sm_80 has no fp8 conversion): every byte but
    the two NaNs gives torch's value, subnormals and signed zeros included."""
    import triton
    import triton.language as tl

    @triton.jit
    def decode(b_ptr, out_ptr):
        i = tl.arange(0, 256)
        tl.store(out_ptr + i, AT._e4m3_to_f32(tl.load(b_ptr + i)))

    dev = triton_kernels
    b = torch.arange(256, dtype=torch.uint8)
    out = torch.empty(256, device=dev)
    decode[(1,)](b.to(dev), out)
    expected = b.view(torch.float8_e4m3fn).float()
    finite = ~expected.isnan()
    assert int(finite.sum()) == 254
    assert torch.equal(out.cpu()[finite], expected[finite])
    assert torch.equal(out.cpu()[finite].signbit(), expected[finite].signbit())


@pytest.mark.parametrize("case", [dict(bits=4, **GEAR), dict(bits=2, **KIVI), dict(bits=4, d=128, **GEAR),
                                  dict(bits=3, factor_dtype=torch.float8_e4m3fn, **GEAR),
                                  dict(bits=2, scale_format="log8", d=128, **KIVI)],
                         ids=["gear-4", "kivi-2", "gear-4-d128", "gear-3-fp8", "kivi-2-log8-d128"])
def test_fp16_dots_of_the_gpu_path_stay_within_its_tolerance(triton_kernels, monkeypatch, case):
    """The compiled kernel multiplies in fp16 (DOT16, fp32 accumulation); the interpreter runs fp32 dots unless
    told otherwise. Run the GPU's fp16 variant here: its casts (q, K_hat, p, V_hat, the low-rank products) keep the
    output within the GPU tests' tolerance of the reference, with a padding mask."""
    if triton_kernels != "cpu":
        pytest.skip("on a GPU the other tests run this variant")
    q, keys, values, wk, wv, k_all, _ = make_case(**case)
    mask = left_padding_mask(2, k_all.shape[2], pad=20)
    ref = A.compressed_attention_reference(q, keys, values, wk, wv, mask)
    fp32 = AT.compressed_attention_triton(q, keys, values, wk, wv, mask)
    monkeypatch.setattr(AT, "interpreted", lambda: False)
    fp16 = AT.compressed_attention_triton(q, keys, values, wk, wv, mask)
    torch.testing.assert_close(fp16, ref, rtol=2e-2, atol=2e-2)
    assert (fp32 - ref).abs().max() < 1e-5 < (fp16 - ref).abs().max()  # the fp16 variant really ran


def test_codes_alignment_claim_and_an_unaligned_page(triton_kernels):
    """ALIGN16 (a 16-byte alignment hint the compiler vectorizes with) is claimed only when every row of codes
    starts aligned; a page whose codes sit one byte off runs the kernel without it, with the same result."""
    dev = triton_kernels
    q, keys, values, wk, wv, _, _ = make_case(d=64, group=32, chunk=32, bits=2, **KIVI, device=dev)
    assert AT.codes_aligned(keys.pages + values.pages, 64, 2)           # rows of 16 bytes, fresh allocations
    assert not AT.codes_aligned(keys.pages, 64, 3)                      # rows of 24 bytes
    want = A.compressed_attention_reference(*_to(dev, q), keys, values, *_to(dev, wk, wv))
    for page in keys.pages:
        buf = torch.empty(page.codes.numel() + 1, dtype=torch.uint8, device=page.codes.device)
        buf[1:] = page.codes.flatten()
        page.codes = buf[1:].view(page.codes.shape)
    assert not AT.codes_aligned(keys.pages + values.pages, 64, 2)
    got = A.compressed_decode_attention(*_to(dev, q), keys, values, *_to(dev, wk, wv))
    torch.testing.assert_close(got.cpu(), want.cpu(), **TOL)
