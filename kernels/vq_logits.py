"""VQ-Logits head kernels: codebook logits -> gather by token code -> per-token scale and bias.

    logits[n, v] = scales[v] * (hidden[n] . table[codes[v]]) + biases[v],    table = [codebook; shortlist rows]

Shortlist tokens point at their own exact row (codes >= K) with scale 1 and bias 0, so one gather serves both.

Two stages: (1) the code logits U = hidden @ table^T, a small [N, K+S] GEMM (cuBLAS on CUDA by default, or the
Triton GEMM here: see `code_logits_gemm`); (2) one fused Triton pass over the vocabulary that gathers U by code
and applies scale/bias, and either writes the V logits, or reduces them on the fly to a log-sum-exp or to
per-block top-k candidates without writing [N, V]. The stages are not merged
into one kernel on purpose: every vocabulary block needs code logits for arbitrary codes, so recomputing them per
block would cost V x d like the dense head; U is tiny ([N, K+S]) and stays in L2 between the two launches.

Each public function (`vq_logits`, `vq_logsumexp`, `vq_topk`) runs Triton on CUDA tensors and the torch reference
elsewhere (COMPRESS_KERNELS=torch|triton forces one). The torch references are differentiable (distillation)."""
from __future__ import annotations

import torch

from .dispatch import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the torch reference runs without triton
    triton = None

# Vocabulary chunk of the torch references for the reductions: bounds memory at N x chunk floats.
REFERENCE_CHUNK = 16384


def _table(codebook: torch.Tensor, shortlist_weight: torch.Tensor | None) -> list[torch.Tensor]:
    return [codebook] if shortlist_weight is None or shortlist_weight.shape[0] == 0 else [codebook, shortlist_weight]


# ----------------------------------------------------------------------------------------------- torch reference
def code_logits_reference(hidden: torch.Tensor, codebook: torch.Tensor,
                          shortlist_weight: torch.Tensor | None = None) -> torch.Tensor:
    """[..., K+S]: hidden . each codebook row, then hidden . each shortlist row (two matmuls, no table copy)."""
    parts = [hidden @ t.t() for t in _table(codebook, shortlist_weight)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def vq_logits_reference(hidden, codebook, codes, scales, biases, shortlist_weight=None) -> torch.Tensor:
    """[..., V] logits, computed with torch ops (differentiable in codebook, scales, biases)."""
    u = code_logits_reference(hidden, codebook, shortlist_weight)
    return torch.addcmul(biases, u.index_select(-1, codes.long()), scales)


def _chunks(codes, scales, biases, chunk):
    for start in range(0, codes.shape[0], chunk):
        yield start, codes[start:start + chunk].long(), scales[start:start + chunk], biases[start:start + chunk]


def vq_logsumexp_reference(hidden, codebook, codes, scales, biases, shortlist_weight=None,
                           chunk: int = REFERENCE_CHUNK) -> torch.Tensor:
    """[...] log-sum-exp over the vocabulary, chunk by chunk (never holds [..., V])."""
    u = code_logits_reference(hidden, codebook, shortlist_weight).float()
    running = None
    for _, c, s, b in _chunks(codes, scales, biases, chunk):
        part = torch.logsumexp(torch.addcmul(b.float(), u[..., c], s.float()), dim=-1)
        running = part if running is None else torch.logaddexp(running, part)
    return running


def vq_topk_reference(hidden, codebook, codes, scales, biases, k: int, shortlist_weight=None,
                      chunk: int = REFERENCE_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, token ids) of the k largest logits, [..., k] each, chunk by chunk (never holds [..., V])."""
    u = code_logits_reference(hidden, codebook, shortlist_weight).float()
    best_v = best_i = None
    for start, c, s, b in _chunks(codes, scales, biases, chunk):
        x = torch.addcmul(b.float(), u[..., c], s.float())
        v, i = torch.topk(x, min(k, x.shape[-1]), dim=-1)
        i = i + start
        if best_v is not None:
            v, j = torch.topk(torch.cat([best_v, v], -1), k, dim=-1)
            i = torch.cat([best_i, i], -1).gather(-1, j)
        best_v, best_i = v, i
    return best_v, best_i


# ------------------------------------------------------------------------------------------------------ Triton
if triton is not None:

    @triton.jit
    def _code_logits_kernel(h_ptr, t_ptr, u_ptr, N, K, D, stride_hn, stride_tk, stride_un,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        # U[n, k] = sum_d H[n, d] * T[k, d], accumulated in fp32 (fp32 operands: exact under the interpreter)
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            h = tl.load(h_ptr + offs_n[:, None] * stride_hn + offs_d[None, :],
                        mask=(offs_n[:, None] < N) & (offs_d[None, :] < D), other=0.0).to(tl.float32)
            t = tl.load(t_ptr + offs_k[:, None] * stride_tk + offs_d[None, :],
                        mask=(offs_k[:, None] < K) & (offs_d[None, :] < D), other=0.0).to(tl.float32)
            acc += tl.dot(h, tl.trans(t), input_precision="ieee")  # no TF32: matches the reference on GPUs
        tl.store(u_ptr + offs_n[:, None] * stride_un + offs_k[None, :], acc,
                 mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))

    @triton.jit
    def _gathered_block(u_ptr, codes_ptr, scales_ptr, biases_ptr, N, V, stride_un, pid_n, pid_v,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
        # one [BLOCK_N, BLOCK_V] tile of logits: gather code logits by token code, then scale and bias
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        vmask = offs_v < V
        mask = (offs_n[:, None] < N) & vmask[None, :]
        code = tl.load(codes_ptr + offs_v, mask=vmask, other=0).to(tl.int64)
        s = tl.load(scales_ptr + offs_v, mask=vmask, other=0.0).to(tl.float32)
        b = tl.load(biases_ptr + offs_v, mask=vmask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs_n[:, None].to(tl.int64) * stride_un + code[None, :], mask=mask, other=0.0)
        return u * s[None, :] + b[None, :], offs_n, offs_v, mask

    @triton.jit
    def _logits_kernel(u_ptr, codes_ptr, scales_ptr, biases_ptr, out_ptr, N, V, stride_un, stride_on,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
        x, offs_n, offs_v, mask = _gathered_block(u_ptr, codes_ptr, scales_ptr, biases_ptr, N, V, stride_un,
                                                  tl.program_id(0), tl.program_id(1), BLOCK_N, BLOCK_V)
        # int64: tokens x vocabulary passes 2^31 from 16,744 tokens at Llama-3's 128,256 (a long prompt's logits)
        tl.store(out_ptr + offs_n[:, None].to(tl.int64) * stride_on + offs_v[None, :], x, mask=mask)

    @triton.jit
    def _lse_partial_kernel(u_ptr, codes_ptr, scales_ptr, biases_ptr, max_ptr, sum_ptr, N, V, NUM_VB, stride_un,
                            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
        # per (row, vocabulary block): max and sum of exp(x - max); combined across blocks on the host side
        pid_v = tl.program_id(1)
        x, offs_n, offs_v, mask = _gathered_block(u_ptr, codes_ptr, scales_ptr, biases_ptr, N, V, stride_un,
                                                  tl.program_id(0), pid_v, BLOCK_N, BLOCK_V)
        x = tl.where(mask, x, float("-inf"))
        m = tl.max(x, axis=1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        ssum = tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        nmask = offs_n < N
        tl.store(max_ptr + offs_n * NUM_VB + pid_v, m, mask=nmask)
        tl.store(sum_ptr + offs_n * NUM_VB + pid_v, ssum, mask=nmask)

    @triton.jit
    def _topk_partial_kernel(u_ptr, codes_ptr, scales_ptr, biases_ptr, val_ptr, idx_ptr, N, V, NUM_VB, stride_un,
                             TOPK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
        # per (row, vocabulary block): the TOPK largest logits, by repeated max (TOPK is small: 1 for greedy)
        pid_v = tl.program_id(1)
        x, offs_n, offs_v, mask = _gathered_block(u_ptr, codes_ptr, scales_ptr, biases_ptr, N, V, stride_un,
                                                  tl.program_id(0), pid_v, BLOCK_N, BLOCK_V)
        x = tl.where(mask, x, float("-inf"))
        nmask = offs_n < N
        for j in tl.static_range(TOPK):
            m = tl.max(x, axis=1)
            # lowest token id among the maxima; a fully masked row yields id V (dropped by the host)
            idx = tl.min(tl.where((x == m[:, None]) & mask, offs_v[None, :], V), axis=1)
            base = (offs_n * NUM_VB + pid_v) * TOPK + j
            tl.store(val_ptr + base, m, mask=nmask)
            tl.store(idx_ptr + base, idx, mask=nmask)
            x = tl.where(offs_v[None, :] == idx[:, None], float("-inf"), x)


def _flat(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.reshape(-1, hidden.shape[-1]).contiguous()


def code_logits_triton(hidden2d: torch.Tensor, codebook, shortlist_weight=None) -> torch.Tensor:
    """[N, K+S] fp32 code logits by the Triton GEMM kernel (one launch per table part, into one buffer)."""
    tables = _table(codebook, shortlist_weight)
    n, d = hidden2d.shape
    total = sum(t.shape[0] for t in tables)
    u = torch.empty(n, total, device=hidden2d.device, dtype=torch.float32)
    block_n, block_k, block_d = 16, 32, 32
    col = 0
    for t in tables:
        t = t.contiguous()
        view = u[:, col:]
        grid = (triton.cdiv(n, block_n), triton.cdiv(t.shape[0], block_k))
        _code_logits_kernel[grid](hidden2d, t, view, n, t.shape[0], d, hidden2d.stride(0), t.stride(0), u.stride(0),
                                  BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d)
        col += t.shape[0]
    return u


def code_logits_gemm(hidden2d: torch.Tensor, codebook, shortlist_weight=None, gemm: str = "auto") -> torch.Tensor:
    """Stage 1, [N, K+S] fp32. `gemm="torch"` hands this plain GEMM to the BLAS library (cuBLAS on a GPU), which
    is the default on CUDA: the H200 run measured the whole Triton path at only 2x over the dense fp16 head at
    Llama-3-8B's shape, most likely because the Triton GEMM above (64 programs x 128 serial d-steps for one
    token) is latency-bound there. `gemm="triton"` runs the Triton GEMM (the default off CUDA, i.e. under the
    interpreter). The fused stage 2 is Triton either way."""
    if gemm == "auto":
        gemm = "torch" if hidden2d.is_cuda else "triton"
    if gemm == "triton":
        return code_logits_triton(hidden2d, codebook, shortlist_weight)
    if gemm != "torch":
        raise ValueError(f"gemm must be 'auto', 'torch' or 'triton' (got {gemm!r})")
    if hidden2d.is_cuda and hidden2d.dtype in (torch.float16, torch.bfloat16):
        # half-precision GEMM on tensor cores (fp32 accumulation), as the dense head it replaces would run; no fp32
        # copy of the codebook per call
        parts = [hidden2d @ t.to(hidden2d.dtype).t() for t in _table(codebook, shortlist_weight)]
        return torch.cat(parts, dim=1).float() if len(parts) > 1 else parts[0].float()
    return code_logits_reference(hidden2d.float(), codebook.float(),
                                 None if shortlist_weight is None else shortlist_weight.float()).contiguous()


def _launch_args(hidden, codebook, codes, scales, biases, shortlist_weight, gemm):
    h = _flat(hidden)
    u = code_logits_gemm(h, codebook, shortlist_weight, gemm)
    return h, u, codes.contiguous(), scales.contiguous(), biases.contiguous()


BLOCK_N_ROWS, BLOCK_V_COLS = 16, 256


def vq_logits_triton(hidden, codebook, codes, scales, biases, shortlist_weight=None, gemm="auto") -> torch.Tensor:
    h, u, codes, scales, biases = _launch_args(hidden, codebook, codes, scales, biases, shortlist_weight, gemm)
    n, v = h.shape[0], codes.shape[0]
    out = torch.empty(n, v, device=h.device, dtype=hidden.dtype)  # the store casts: no extra pass over [N, V]
    grid = (triton.cdiv(n, BLOCK_N_ROWS), triton.cdiv(v, BLOCK_V_COLS))
    _logits_kernel[grid](u, codes, scales, biases, out, n, v, u.stride(0), out.stride(0),
                         BLOCK_N=BLOCK_N_ROWS, BLOCK_V=BLOCK_V_COLS)
    return out.view(*hidden.shape[:-1], v)


def vq_logsumexp_triton(hidden, codebook, codes, scales, biases, shortlist_weight=None, gemm="auto") -> torch.Tensor:
    h, u, codes, scales, biases = _launch_args(hidden, codebook, codes, scales, biases, shortlist_weight, gemm)
    n, v = h.shape[0], codes.shape[0]
    nvb = triton.cdiv(v, BLOCK_V_COLS)
    pmax = torch.empty(n, nvb, device=h.device, dtype=torch.float32)
    psum = torch.empty_like(pmax)
    _lse_partial_kernel[(triton.cdiv(n, BLOCK_N_ROWS), nvb)](u, codes, scales, biases, pmax, psum, n, v, nvb,
                                                             u.stride(0), BLOCK_N=BLOCK_N_ROWS, BLOCK_V=BLOCK_V_COLS)
    m = pmax.max(dim=1, keepdim=True).values
    lse = m.squeeze(1) + torch.log((psum * torch.exp(pmax - m)).sum(dim=1))
    return lse.view(hidden.shape[:-1])


def vq_topk_triton(hidden, codebook, codes, scales, biases, k: int, shortlist_weight=None, gemm="auto"):
    h, u, codes, scales, biases = _launch_args(hidden, codebook, codes, scales, biases, shortlist_weight, gemm)
    n, v = h.shape[0], codes.shape[0]
    nvb = triton.cdiv(v, BLOCK_V_COLS)
    kk = min(k, BLOCK_V_COLS)
    vals = torch.empty(n, nvb * kk, device=h.device, dtype=torch.float32)
    idx = torch.empty(n, nvb * kk, device=h.device, dtype=torch.int32)
    _topk_partial_kernel[(triton.cdiv(n, BLOCK_N_ROWS), nvb)](u, codes, scales, biases, vals, idx, n, v, nvb,
                                                              u.stride(0), TOPK=kk, BLOCK_N=BLOCK_N_ROWS,
                                                              BLOCK_V=BLOCK_V_COLS)
    best, j = torch.topk(vals, k, dim=1)
    return best.view(*hidden.shape[:-1], k), idx.gather(1, j).long().view(*hidden.shape[:-1], k)


# ------------------------------------------------------------------------------------------------------ public
def _check(codebook, codes, scales, biases, shortlist_weight):
    table_rows = codebook.shape[0] + (0 if shortlist_weight is None else shortlist_weight.shape[0])
    if not (codes.shape == scales.shape == biases.shape and codes.dim() == 1):
        raise ValueError(f"codes, scales, biases must be [V] each (got {tuple(codes.shape)}, {tuple(scales.shape)}, "
                         f"{tuple(biases.shape)})")
    if codes.is_floating_point():
        raise ValueError("codes must be an integer tensor")
    return table_rows


def vq_logits(hidden, codebook, codes, scales, biases, shortlist_weight=None) -> torch.Tensor:
    """All V logits [..., V] (like nn.Linear's output). Triton on CUDA, torch reference elsewhere."""
    _check(codebook, codes, scales, biases, shortlist_weight)
    if use_triton(hidden, codebook):
        return vq_logits_triton(hidden, codebook, codes, scales, biases, shortlist_weight)
    return vq_logits_reference(hidden, codebook, codes, scales, biases, shortlist_weight)


def vq_logsumexp(hidden, codebook, codes, scales, biases, shortlist_weight=None) -> torch.Tensor:
    """log-sum-exp of the logits over the vocabulary, [...], without writing the V logits."""
    _check(codebook, codes, scales, biases, shortlist_weight)
    if use_triton(hidden, codebook):
        return vq_logsumexp_triton(hidden, codebook, codes, scales, biases, shortlist_weight)
    return vq_logsumexp_reference(hidden, codebook, codes, scales, biases, shortlist_weight)


def vq_topk(hidden, codebook, codes, scales, biases, k: int, shortlist_weight=None):
    """(values, token ids) of the k largest logits, [..., k] each, without writing the V logits."""
    _check(codebook, codes, scales, biases, shortlist_weight)
    if not 1 <= k <= min(codes.shape[0], BLOCK_V_COLS):
        raise ValueError(f"k must be between 1 and min(vocabulary size, {BLOCK_V_COLS}) (got {k})")
    if use_triton(hidden, codebook):
        return vq_topk_triton(hidden, codebook, codes, scales, biases, k, shortlist_weight)
    return vq_topk_reference(hidden, codebook, codes, scales, biases, k, shortlist_weight)
