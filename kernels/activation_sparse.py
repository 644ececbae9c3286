"""The two products of an activation-sparse MLP when decoding: only the active neurons' weights are read.

- `gather_dot(w, idx, x)`  -> [t, k]: out[:, r] = x @ w[idx[r]]   (up_proj rows of the active neurons)
- `gather_axpy(wt, idx, h)` -> [t, d]: out = h @ wt[idx]           (down_proj as its transpose [inter, hidden], so
  each active neuron's column of down_proj is one contiguous row)
- `quantized_matvec(codes, scales, x, bits)` -> [t, n]: ~ x @ W.T from W's int8/int4 copy (`quantize_groups`) and
  x rounded to int8, for the gate predictor: it reads a quarter / an eighth of the fp32 gate's bytes (prefill-sized
  x: `quantized_matmul`, one GEMM over the weight expanded into a shared scratch buffer)

Each has a torch reference (index_select / embedding_bag: runs everywhere), a Triton kernel (CUDA, or the
interpreter in tests), and on the CPU a small C kernel (cpu_gather.py) that fuses the gather into the product so the
active rows are read once (the torch reference copies them first, which costs more than the product).
`COMPRESS_KERNELS=torch|triton` forces one (dispatch.py)."""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from .dispatch import use_triton
from ..environment import setting


def gather_dot_reference(w: torch.Tensor, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x @ w.index_select(0, idx).t().to(x.dtype)  # in x's dtype (bf16 weights against float32 x: widened)


def gather_axpy_reference(wt: torch.Tensor, idx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    # embedding_bag reads each selected row once and sums them weighted: one bag per token
    t, k = h.shape
    if t == 0 or k == 0:
        return h.new_zeros(t, wt.shape[1])
    if wt.dtype != h.dtype:  # bf16 weights against float32 h: in h's dtype, like gather_dot_reference
        return h @ wt.index_select(0, idx).to(h.dtype)
    return F.embedding_bag(idx.repeat(t), wt, torch.arange(0, t * k, k, device=idx.device),
                           mode="sum", per_sample_weights=h.reshape(-1).to(wt.dtype)).to(h.dtype)


try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch reference runs without triton
    triton = None

if triton is not None:

    @triton.jit
    def _gather_dot_kernel(w_ptr, idx_ptr, x_ptr, out_ptr, K, D, T, stride_w, stride_x, stride_o,
                           BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
        # one program: BLOCK_R active rows x all tokens; the rows are streamed once, x stays in cache
        pid = tl.program_id(0)
        r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        rows = tl.load(idx_ptr + r, mask=r < K, other=0).to(tl.int64)
        tok = tl.arange(0, BLOCK_T)
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :],
                        mask=(r < K)[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)
            x = tl.load(x_ptr + tok[:, None] * stride_x + cols[None, :],
                        mask=(tok < T)[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
        tl.store(out_ptr + tok[:, None] * stride_o + r[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(tok < T)[:, None] & (r < K)[None, :])

    @triton.jit
    def _gather_axpy_kernel(wt_ptr, idx_ptr, h_ptr, out_ptr, K, D, T, stride_w, stride_h, stride_o,
                            BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
        # one program: BLOCK_D output columns, looping over all active rows (no atomics: deterministic)
        pid = tl.program_id(0)
        cols = pid * BLOCK_D + tl.arange(0, BLOCK_D)
        tok = tl.arange(0, BLOCK_T)
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for r0 in range(0, K, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            rows = tl.load(idx_ptr + r, mask=r < K, other=0).to(tl.int64)
            w = tl.load(wt_ptr + rows[:, None] * stride_w + cols[None, :],
                        mask=(r < K)[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)
            h = tl.load(h_ptr + tok[:, None] * stride_h + r[None, :],
                        mask=(tok < T)[:, None] & (r < K)[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(h[:, :, None] * w[None, :, :], axis=1)
        tl.store(out_ptr + tok[:, None] * stride_o + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(tok < T)[:, None] & (cols < D)[None, :])

    @triton.jit
    def _qmatvec_kernel(codes_ptr, sw_ptr, xq_ptr, sx_ptr, out_ptr, N, T, GROUPS, stride_c, stride_sw, stride_x,
                        stride_sx, stride_o, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_T: tl.constexpr):
        # one program: BLOCK_N rows x all tokens; x comes rounded (integers as floats), products summed in fp32 by
        # broadcast-multiply (exact for these integers; tl.dot would round through TF32 on GPUs)
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        tok = tl.arange(0, BLOCK_T)
        rmask, tmask = rows < N, tok < T
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for g in range(0, GROUPS):
            if BITS == 8:
                cols = g * GROUP + tl.arange(0, GROUP)
                w = tl.load(codes_ptr + rows[:, None] * stride_c + cols[None, :], mask=rmask[:, None],
                            other=0).to(tl.float32)
                x = tl.load(xq_ptr + tok[:, None] * stride_x + cols[None, :], mask=tmask[:, None], other=0.0)
                dot = tl.sum(x[:, None, :] * w[None, :, :], axis=2)
            else:
                half = tl.arange(0, GROUP // 2)
                b = tl.load(codes_ptr + rows[:, None] * stride_c + g * (GROUP // 2) + half[None, :],
                            mask=rmask[:, None], other=136).to(tl.int32)  # 136: both nibbles 8, value 0
                lo = (b & 15).to(tl.float32) - 8.0
                hi = (b >> 4).to(tl.float32) - 8.0
                xl = tl.load(xq_ptr + tok[:, None] * stride_x + g * GROUP + half[None, :], mask=tmask[:, None],
                             other=0.0)
                xh = tl.load(xq_ptr + tok[:, None] * stride_x + g * GROUP + GROUP // 2 + half[None, :],
                             mask=tmask[:, None], other=0.0)
                dot = tl.sum(xl[:, None, :] * lo[None, :, :], axis=2) + tl.sum(xh[:, None, :] * hi[None, :, :], axis=2)
            sw = tl.load(sw_ptr + rows * stride_sw + g, mask=rmask, other=0.0).to(tl.float32)
            sx = tl.load(sx_ptr + tok * stride_sx + g, mask=tmask, other=0.0)
            acc += dot * sx[:, None] * sw[None, :]
        tl.store(out_ptr + tok[:, None] * stride_o + rows[None, :], acc, mask=tmask[:, None] & rmask[None, :])


def quantized_matvec_triton(codes, scales, x, bits, block_n=16):
    t, d = x.shape
    n, groups = scales.shape
    xq, sx = round_activations(x, d // groups)
    xq, sx = xq.reshape(t, d).contiguous(), sx.contiguous()
    out = torch.empty(t, n, dtype=torch.float32, device=x.device)
    _qmatvec_kernel[(triton.cdiv(n, block_n),)](codes, scales, xq, sx, out, n, t, groups, codes.stride(0),
                                                scales.stride(0), xq.stride(0), sx.stride(0), out.stride(0), BITS=bits,
                                                GROUP=d // groups, BLOCK_N=block_n, BLOCK_T=_block_t(t))
    return out


def _block_t(t: int) -> int:
    return max(1, triton.next_power_of_2(t))


def gather_dot_triton(w, idx, x, block_r=16, block_d=64):
    t, d = x.shape
    k = idx.numel()
    out = torch.empty(t, k, dtype=x.dtype, device=x.device)
    if k:
        x = x.contiguous()
        _gather_dot_kernel[(triton.cdiv(k, block_r),)](w, idx, x, out, k, d, t, w.stride(0), x.stride(0),
                                                       out.stride(0), BLOCK_R=block_r, BLOCK_D=block_d,
                                                       BLOCK_T=_block_t(t))
    return out


def gather_axpy_triton(wt, idx, h, block_r=16, block_d=64):
    t, k = h.shape
    d = wt.shape[1]
    out = torch.empty(t, d, dtype=h.dtype, device=h.device)
    h = h.contiguous()
    _gather_axpy_kernel[(triton.cdiv(d, block_d),)](wt, idx, h, out, k, d, t, wt.stride(0), h.stride(0),
                                                    out.stride(0), BLOCK_R=block_r, BLOCK_D=block_d,
                                                    BLOCK_T=_block_t(t))
    return out


def gather_dot(w: torch.Tensor, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x [t, d] @ w[idx].T -> [t, k]; w [n, d] row-major, idx int64 [k]."""
    if use_triton(w, idx, x):
        return gather_dot_triton(w, idx, x)
    if _cpu_fast(w, x):
        from .cpu_gather import cpu_gather_dot

        return cpu_gather_dot(w, idx, x)
    return gather_dot_reference(w, idx, x)


def gather_axpy(wt: torch.Tensor, idx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """h [t, k] @ wt[idx] -> [t, d]; wt [n, d] row-major (a down_proj transposed), idx int64 [k]."""
    if use_triton(wt, idx, h):
        return gather_axpy_triton(wt, idx, h)
    if _cpu_fast(wt, h):
        from .cpu_gather import cpu_gather_axpy

        return cpu_gather_axpy(wt, idx, h)
    return gather_axpy_reference(wt, idx, h)


def quantization_group(d: int) -> int:
    """Columns per scale: 128 where they divide the row (4-bit codes pair columns, so an even group), else the row."""
    return 128 if d % 128 == 0 else d


@torch.no_grad()
def quantize_groups(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest codes of w [n, d], one float32 scale per `quantization_group(d)` columns:
    (int8 [n, d], scales) for 8 bits; (uint8 [n, d / 2], scales) for 4 bits, in each group byte b holding column b
    (low nibble) and column b + group / 2 (high nibble) as value + 8."""
    n, d = w.shape
    if bits == 4 and d % 2:
        raise ValueError(f"4-bit codes pair columns: the row length {d} must be even")
    group = quantization_group(d)
    wg = w.detach().float().reshape(n, d // group, group)
    top = (1 << (bits - 1)) - 1
    scales = (wg.abs().amax(-1) / top).clamp_min(1e-12)
    codes = torch.round(wg / scales[..., None]).clamp(-top - 1, top)
    if bits == 8:
        return codes.to(torch.int8).reshape(n, d), scales
    v = (codes + 8).to(torch.uint8)
    return (v[..., : group // 2] | (v[..., group // 2:] << 4)).reshape(n, d // 2), scales


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """The float32 weight [n, d] that `quantize_groups`' codes and scales stand for (a fresh `dequantize_into`)."""
    n, groups = scales.shape
    d = codes.shape[1] * (2 if bits == 4 else 1)
    return dequantize_into(torch.empty(n, d, dtype=torch.float32, device=codes.device), codes, scales, bits)


def round_activations(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [t, d] rounded to int8 per token and `group` columns, symmetric (scale = max |x| / 127, half to even):
    (the integers as float32 [t, d / group, group], scales [t, d / group])."""
    t, d = x.shape
    xg = x.float().reshape(t, d // group, group)
    m = xg.abs().amax(-1)
    scales = torch.where(m > 0, m / 127, torch.ones_like(m))
    return torch.round(xg / scales[..., None]).clamp(-127, 127), scales


def quantized_matvec_reference(codes: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, bits: int) -> torch.Tensor:
    n, groups = scales.shape
    xq, sx = round_activations(x, x.shape[1] // groups)
    w = dequantize_groups(codes, torch.ones_like(scales, dtype=torch.float32), bits).reshape(n, groups, -1)
    out = x.new_zeros(x.shape[0], n, dtype=torch.float32)
    for g in range(groups):  # integer products, exact in float32; one [t, n] product per group
        out += (xq[:, g] @ w[:, g].t()) * sx[:, g, None] * scales[:, g].float()[None]
    return out


FEW_ROWS = 4  # up to this many rows quantized_matvec never expands the weight (GEMV kernels, or the group products)
_SCRATCH = threading.local()  # per thread: two threads running layers of one shape must not share a buffer


def dequantize_into(out: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """`quantize_groups`' weight written into `out` [n, d] (contiguous, any float dtype: each value rounded to it
    once), in place: copy, shift, scale. Into a reused buffer ~50 ms (int8) / ~100 ms (int4) at 14336 x 4096 in
    float32 on one CPU thread; a fresh 235 MB buffer page-faults on top (`dequantize_groups`: ~110 / ~150 ms)."""
    n, groups = scales.shape
    view = out.view(n, groups, -1)
    packed = codes.reshape(n, groups, -1)
    if bits == 8:
        view.copy_(packed)
    else:  # the offset taken off in int8 (a quarter of the bytes of a float pass)
        half = packed.shape[-1]
        view[..., :half].copy_((packed & 15).view(torch.int8).sub_(8))
        view[..., half:].copy_((packed >> 4).view(torch.int8).sub_(8))
    # bf16 out: scales multiplied as bf16 (torch's mixed bf16 x float32 multiply runs ~9x slower on the CPU); a bf16
    # checkpoint's scales are bf16 already, so that rounds nothing more
    view.mul_((scales if out.dtype == torch.bfloat16 else scales.float()).to(out.dtype)[..., None])
    return out


def _scratch(n: int, d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One buffer that every layer of a shape reuses (they run one after another): no float copy per layer; one per
    thread."""
    key = (n, d, dtype, device)
    held = getattr(_SCRATCH, "buffers", None)
    if held is None or key not in held:  # one buffer: the shape a model's layers share
        held = _SCRATCH.buffers = {key: torch.empty(n, d, dtype=dtype, device=device)}
    return held[key]


def quantized_matmul(codes: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, bits: int,
                     expanded: torch.Tensor | None = None) -> torch.Tensor:
    """quantized_matvec for prefill-sized x as one GEMM: (xq * sx) @ W~.T, W~ the dequantized weight (`expanded` when
    the caller holds it, in its dtype; else written into a shared buffer in x's dtype for bf16 / fp16 x, float32
    otherwise): the GEMM the model runs natively, W~ and x rounded to its dtype once (bf16: the gate then differs
    from the integer products by bf16 rounding, as a bf16 model's exact gate does). The same products as the
    reference, summed in floating point instead of exactly per group; 3-5x faster than the reference's depth-128
    GEMMs at 256 tokens (14336 x 4096, one CPU thread: 1142 -> 234 ms int8, 837 -> 268 ms int4). Returns float32."""
    n, groups = scales.shape
    t, d = x.shape
    xq, sx = round_activations(x, d // groups)
    xr = (xq * sx[..., None]).reshape(t, d)
    training = torch.is_grad_enabled() and x.requires_grad
    if training:  # straight through: x's rounding passes the gradient on unchanged (round's own is zero)
        xr = x.float() + (xr - x.float()).detach()
    if expanded is None:
        dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
        out = torch.empty(n, d, dtype=dtype, device=x.device) if training else _scratch(n, d, dtype, x.device)
        expanded = dequantize_into(out, codes, scales, bits)  # (autograd would keep the shared buffer: not then)
    return (xr.to(expanded.dtype) @ expanded.detach().t()).float()  # the copy is not trained: its codes are the gate


def quantized_matvec(codes: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, bits: int,
                     expanded: torch.Tensor | None = None) -> torch.Tensor:
    """sum_g sw[:, g] sx[:, g] (xq_g @ code_g.T) -> [t, n] float32: the product of a weight's quantized copy
    (`quantize_groups`: codes, scales sw) with x rounded to int8 per token and group (`round_activations`: xq, sx).
    Integer products, so the C kernel (VNNI where the CPU has it) and the reference agree to float rounding of the
    scaled sums; the C kernel reads the codes once (the reference expands them per call). Prefill-sized x:
    `quantized_matmul` (over `expanded`, the dequantized weight, where the caller holds it)."""
    training = torch.is_grad_enabled() and x.requires_grad  # quantized_matmul's straight-through gradient
    if x.shape[0] <= 16 and codes.is_contiguous() and not training:  # GEMV kernels (prefill-sized x: GEMMs)
        group = x.shape[1] // scales.shape[1]
        if group & (group - 1) == 0 and use_triton(codes, scales, x):  # tl.arange needs a power-of-two group
            return quantized_matvec_triton(codes, scales, x, bits)
        if cpu_reads(scales):  # a bf16 model's x widened (exactly): it fell to the reference's Python loop
            from .cpu_gather import cpu_quantized_matvec, qmatvec_library

            if qmatvec_library() is not None:
                return cpu_quantized_matvec(codes, scales, x.float(), bits)
        if x.shape[0] <= FEW_ROWS and expanded is None:  # the group products cost less than expanding W
            return quantized_matvec_reference(codes, scales, x, bits)
    return quantized_matmul(codes, scales, x, bits, expanded)


def cpu_reads(w: torch.Tensor) -> bool:
    """The C kernels handle this weight (or predictor scales): on the CPU, float32 or bfloat16, unit column stride,
    a compiler here, and not forced to torch."""
    if setting("COMPRESS_KERNELS") == "torch" or w.device.type != "cpu":
        return False
    from .cpu_gather import WEIGHT_DTYPES, cpu_library

    return w.dtype in WEIGHT_DTYPES and w.stride(-1) == 1 and cpu_library() is not None


def _cpu_fast(w: torch.Tensor, x: torch.Tensor) -> bool:
    """The C kernels run w (float32 or bfloat16) against x: float32 (a bf16 model's MLP widens x, its weights are
    read as they are)."""
    return x.dtype == torch.float32 and cpu_reads(w)
