"""The GPU entry points that `compile_check` compiles: each label calls the Triton path of one kernel wrapper, on
small CPU tensors, with the constexprs it takes at serving shapes (Llama-3-8B: 32 query / 8 KV heads, head_dim
128 (also 64 and 256), MLP 4096 x 14336; fp16 activations as on the GPU). Context length, batch and matrix sizes
are runtime arguments of these kernels, so the tensors stay small."""
from __future__ import annotations

import torch

from .dispatch import forced_kernels

# name: (bits, outlier_ratio, key_rank, value_rank, factor dtype): the serving benchmark's rows, 3 bits, fp8
# factors, and 8 bits with 8 outliers per group of 64 (ratio 0.125), the largest loads per chunk
KV_FORMATS = {
    "kivi-2": (2, 0.0, 0, 0, torch.float16), "kivi-3": (3, 0.0, 0, 0, torch.float16),
    "kivi-4": (4, 0.0, 0, 0, torch.float16), "kivi-8": (8, 0.0, 0, 0, torch.float16),
    "gear-2": (2, 0.02, 2, 2, torch.float16), "gear-4": (4, 0.02, 2, 2, torch.float16),
    "gear-4-fp8": (4, 0.02, 2, 2, torch.float8_e4m3fn), "gear-8-o8": (8, 0.125, 2, 2, torch.float16),
}
GROUP = CHUNK = 64  # the KV cache's defaults (kvcache/cache.py)
HEAD_DIMS = (64, 128, 256)


def torch_kernels():
    """Build inputs with the torch references (under compile_only the Triton quantizer would not run)."""
    return forced_kernels("torch")


def kv_decode(d: int, fmt: str, masked: bool = False, dtype: torch.dtype = torch.float16, aligned: bool = True,
              scale_format: str = "fp16", value_bits: int | None = None):
    """One decode step of 32 query heads over 8 KV heads; `dtype`: the model's, that of the queries (the cache
    keeps its window in fp16 whatever the model's dtype); `scale_format`: the stores' (fp16 or one-byte log8);
    `value_bits`: the values' code width where it differs from the keys'."""
    from ..kvcache.store import CompressedStore
    from .kv_attention_triton import compressed_attention_triton

    bits, ratio, key_rank, value_rank, factor_dtype = KV_FORMATS[fmt]
    batch, heads, q_heads, n, window = (2 if masked else 1), 8, 32, 4 * CHUNK, 16
    g = torch.Generator().manual_seed(0)
    stores = []
    with torch_kernels():
        for axis, rank in (("token", key_rank), ("channel", value_rank)):
            width = value_bits if axis == "channel" and value_bits else bits
            store = CompressedStore(axis=axis, bits=width, group_size=GROUP, chunk_len=CHUNK, outlier_ratio=ratio,
                                    power_iters=1, factor_dtype=factor_dtype, scale_format=scale_format)
            store.append(torch.randn(batch, heads, n, d, generator=g).to(dtype), rank)
            stores.append(store)
    if not aligned:  # every page's codes one byte past an aligned address: the kernel without its ALIGN16 hint
        for store in stores:
            for page in store.pages:
                buf = torch.empty(page.codes.numel() + 1, dtype=torch.uint8)
                buf[1:] = page.codes.flatten()
                page.codes = buf[1:].view(page.codes.shape)
    wk, wv = (torch.randn(batch, heads, window, d, generator=g).half() for _ in range(2))
    q = torch.randn(batch, q_heads, 1, d, generator=g).to(dtype)
    mask = None
    if masked:  # left padding: the additive bias over every position
        mask = torch.ones(batch, n + window, dtype=torch.bool)
        mask[0, :5] = False
    compressed_attention_triton(q, stores[0], stores[1], wk, wv, mask)


def kv_quantize(d: int, bits: int, ratio: float):
    from .kv_quant import quantize_pack_triton, unpack_dequantize_triton

    x = torch.randn(1, 8, 2 * CHUNK, d).half()
    for axis in ("token", "channel"):
        quantize_pack_triton(x, bits, GROUP, axis, ratio)
    with torch_kernels():
        from .kv_quant import quantize_pack

        packed = quantize_pack(x, bits, GROUP, "token", ratio)
    unpack_dequantize_triton(packed)


def sparse_nm(tokens: int):
    from ..prune.masks import nm_mask
    from ..prune.packing import pack_nm
    from .sparse_gemv import nm_expand, nm_gemv

    rows, cols = 256, 512
    w = torch.randn(rows, cols).half()
    values, indices = pack_nm(w, nm_mask(torch.rand(rows, cols), 2, 4), 2, 4)
    x = torch.randn(tokens, cols).half()
    if tokens <= 16:
        nm_gemv(x, values, indices, 2, 4, cols)
    else:  # above 16 tokens: expand + cuBLAS (or cuSPARSELt)
        nm_expand(values, indices, 2, 4, cols, torch.empty(rows, cols).half())


def sparse_bitmask(tokens: int):
    from ..prune.masks import unstructured_mask
    from ..prune.packing import pack_bitmask
    from .sparse_gemv import bitmask_expand, bitmask_gemv

    rows, cols = 256, 512
    w = torch.randn(rows, cols).half()
    values, bitmask, offsets = pack_bitmask(w, unstructured_mask(torch.rand(rows, cols), 0.5))
    x = torch.randn(tokens, cols).half()
    if tokens <= 16:
        bitmask_gemv(x, values, bitmask, offsets, cols)
    else:  # above 16 tokens the dispatcher expands into a scratch buffer for cuBLAS
        bitmask_expand(values, bitmask, offsets, cols, torch.empty(rows, cols).half())


def sparse_linear_kernels():
    """`nm_linear` / `bitmask_linear` on CUDA tensors called directly (SparseLinear dispatches around them): fp32
    operands in tl.dot by design (input_precision ieee, the accuracy of the float64 tests), so no tensor cores."""
    from ..prune.masks import nm_mask, unstructured_mask
    from ..prune.packing import pack_bitmask, pack_nm
    from .sparse_bitmask import bitmask_linear_triton
    from .sparse_nm import nm_linear_triton

    rows, cols = 256, 512
    w = torch.randn(rows, cols).half()
    x = torch.randn(64, cols).half()
    nm_linear_triton(x, *pack_nm(w, nm_mask(torch.rand(rows, cols), 2, 4), 2, 4), 2, 4, cols)
    bitmask_linear_triton(x, *pack_bitmask(w, unstructured_mask(torch.rand(rows, cols), 0.5)), cols)


def activation_sparse(bits: int):
    from .activation_sparse import gather_axpy_triton, gather_dot_triton, quantize_groups, quantized_matvec_triton

    n, d = 1024, 512
    w = torch.randn(n, d).half()
    x = torch.randn(1, d).half()
    with torch_kernels():
        codes, scales = quantize_groups(w.float(), bits)
    quantized_matvec_triton(codes, scales.half(), x, bits)
    idx = torch.arange(0, n, 2)
    gather_dot_triton(w, idx, x)
    gather_axpy_triton(w, idx, torch.randn(1, idx.numel()).half())


def vq_logits():
    from .vq_logits import vq_logits_triton, vq_logsumexp_triton, vq_topk_triton

    n, d, k, v = 4, 256, 512, 4096
    args = (torch.randn(n, d).half(), torch.randn(k, d).half(), torch.randint(0, k, (v,), dtype=torch.int16),
            torch.rand(v).half(), torch.randn(v).half())
    vq_logits_triton(*args, gemm="torch")  # stage 1 is cuBLAS on a GPU ...
    vq_logits_triton(*args, gemm="triton")  # ... or the Triton GEMM when asked for
    vq_logsumexp_triton(*args, gemm="torch")
    vq_topk_triton(*args, k=8, gemm="torch")


def linear_decode(d: int, window: bool, normalize: bool):
    """One decoding step of a linearized layer (GLA gates; the hybrid's window of 64 when `window`, RoPE inside):
    32 query heads over 8 KV heads, float32 state as the cache keeps it."""
    from .linear_decode_triton import linear_decode_step_triton

    b, h, g = 2, 8, 4
    x = lambda *shape: torch.randn(*shape)  # noqa: E731
    state = x(b, h, d, d + int(normalize))
    q, k, v = x(b, h * g, 1, d), x(b, h, 1, d), x(b, h, 1, d)
    win = rope = None
    if window:
        slots = 63
        win = (None, None, v, x(b, h, slots, d), x(b, h, slots, d), torch.ones(b, slots, dtype=torch.bool), 5)
        rope = (x(b, 1, d), x(b, 1, d))
    linear_decode_step_triton(q, k, v, state, "gla", normalize, win, torch.ones(b, dtype=torch.bool), 0.3, 0.7,
                              d ** -0.5, rope=rope)


def mom_decode(d: int):
    """Mixture-of-Memories' step: 4 routed memories (top 2) + the shared one per KV head, 32 query / 8 KV heads."""
    from .linear_decode_triton import mom_decode_step_triton

    b, h, g, m = 2, 8, 4, 4
    mom_decode_step_triton(torch.randn(b, h * g, 1, d), torch.randn(b, h, 1, d), torch.randn(b, h, 1, d),
                           torch.randn(b, 1, h), torch.randn(b, 1, m), torch.randn(b, m + 1, h, d, d), "gla", 2, True,
                           torch.ones(b, dtype=torch.bool), 0.5)


def gsa_decode(d: int, slots: int = 8):
    """Gated slot attention's step (Liger's GSA gate, 8 slots), 32 query / 8 KV heads."""
    from .linear_decode_triton import gsa_decode_step_triton

    b, h, g = 2, 8, 4
    gsa_decode_step_triton(torch.randn(b, h * g, 1, d), torch.randn(b, h, 1, d), torch.randn(b, h, 1, d),
                           torch.randn(b, h, slots, 2 * d), torch.ones(b, dtype=torch.bool))


def entry_points() -> dict:
    """label -> zero-argument callable that launches (compiles) one wrapper's kernels."""
    entries = {}
    for d in HEAD_DIMS:
        for fmt in KV_FORMATS:
            entries[f"kv_decode d{d} {fmt}"] = lambda d=d, fmt=fmt: kv_decode(d, fmt)
    entries["kv_decode d128 gear-4 masked"] = lambda: kv_decode(128, "gear-4", masked=True)
    entries["kv_decode d128 gear-4 bf16"] = lambda: kv_decode(128, "gear-4", dtype=torch.bfloat16)  # Llama's dtype
    entries["kv_decode d128 kivi-2 unaligned"] = lambda: kv_decode(128, "kivi-2", aligned=False)
    entries["kv_decode d128 gear-4 values 2-bit"] = lambda: kv_decode(128, "gear-4", value_bits=2)
    for d, fmt in ((128, "kivi-2"), (256, "gear-4-fp8")):  # one-byte scales
        entries[f"kv_decode d{d} {fmt} log8"] = lambda d=d, fmt=fmt: kv_decode(d, fmt, scale_format="log8")
    for d in HEAD_DIMS:
        for bits, ratio in ((2, 0.0), (4, 0.0), (4, 0.02)):
            entries[f"kv_quantize d{d} {bits}-bit outliers {ratio}"] = lambda d=d, b=bits, r=ratio: kv_quantize(d, b, r)
    for tokens in (1, 16, 512):
        entries[f"sparse 2:4 {tokens} tokens"] = lambda t=tokens: sparse_nm(t)
        entries[f"sparse bitmask {tokens} tokens"] = lambda t=tokens: sparse_bitmask(t)
    entries["sparse linear kernels (fp32 dots)"] = sparse_linear_kernels
    for bits in (4, 8):
        entries[f"activation_sparse int{bits}"] = lambda b=bits: activation_sparse(b)
    entries["vq_logits"] = vq_logits
    for d in (64, 128):
        for window, normalize in ((False, False), (False, True), (True, False), (True, True)):
            label = f"linear_decode d{d}" + (" hybrid" if window else " gla") + (" normalized" if normalize else "")
            entries[label] = lambda d=d, w=window, n=normalize: linear_decode(d, w, n)
        entries[f"linear_decode d{d} mom"] = lambda d=d: mom_decode(d)
        entries[f"linear_decode d{d} gsa"] = lambda d=d: gsa_decode(d)
    return entries
