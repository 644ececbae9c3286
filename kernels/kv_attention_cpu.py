"""The CPU decode-attention kernel over the paged compressed KV storage: csrc/kv_decode.c (built on first use by
cpu_build.py), one call per layer doing what kv_attention_reference.py does in ~25 torch ops per page side. Same
inputs and result as `compressed_attention_reference`; `cpu_kernel_supports` says which stores it reads (the
reference runs for the rest, and wherever no C compiler is available)."""
from __future__ import annotations

import ctypes
import functools
import math

import torch

from .cpu_build import load_c_library
from .kv_attention_reference import attention_bias
from .kv_pages import PAGE_FIELDS, num_tokens, page_pointers
from .kv_scale import log8_table

MAX_ROWS, MAX_RANK, MAX_HEAD_DIM = 64, 16, 512  # the kernel's fixed per-head buffers (csrc/kv_decode.c)


_I64, _PTR, _I32, _ARR = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)
_SIGNATURES = (("kv_decode_attention",
                (_PTR, _I64, _I64, _I64, _I64, _I64, ctypes.c_float, _I64, _ARR, _ARR, _ARR, _ARR, _ARR, _ARR, _ARR,
                 _I32, _I32, _I32, _I32, _I32, _I32, _I32, _PTR, _PTR, _I64, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR,
                 _I32),
                ctypes.c_int),)


def _library():
    return load_c_library("kv_decode", _SIGNATURES)


@functools.lru_cache(maxsize=1)
def _fp8_table() -> torch.Tensor:
    """float32 value of each fp8 e4m3 byte (the token factors' optional storage type)."""
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


def _lanes(bits: int) -> int:
    return 8 if bits == 3 else 8 // bits


_FP16_FIELDS = ("zero", "outlier_values", "basis")


def _page_layout_ok(page, b: int, h: int, d: int, bits: int) -> bool:
    """CPU tensors of the kernel's dtypes (uint8 codes/offsets; fp16 or log8 (uint8) scales; fp16 zeros, outliers,
    basis; fp16 or fp8 e4m3 token factors) shaped for this batch, head count and head_dim. Cached on the page (its
    tensors never change), so a long context's many pages cost one dict lookup each per decode step."""
    key = ("_cpu_layout_ok", b, h, d, bits)
    if key not in page.__dict__:
        page.__dict__[key] = _check_layout(page, b, h, d, bits)
    return page.__dict__[key]


def _check_layout(page, b: int, h: int, d: int, bits: int) -> bool:
    tensors = page.tensors()
    return (all(t.device.type == "cpu" for t in tensors) and page.codes.dtype == torch.uint8
            and tuple(page.codes.shape[:2]) == (b, h) and page.codes.shape[-1] * 8 == d * bits
            and all(getattr(page, f) is None or getattr(page, f).dtype == torch.float16 for f in _FP16_FIELDS)
            and page.scale.dtype in (torch.float16, torch.uint8)
            and (page.outlier_offsets is None or page.outlier_offsets.dtype == torch.uint8)
            and (page.a is None or page.a.dtype in (torch.float16, torch.float8_e4m3fn)))


def cpu_kernel_supports(query: torch.Tensor, keys, values, window_keys: torch.Tensor,
                        window_values: torch.Tensor | None = None) -> bool:
    """CPU tensors, the compiled library, and the shapes its fixed buffers hold (query rows per KV head <= 64, rank
    <= 16, head_dim <= 512 in whole code lanes, <= 64 value groups per token); window and pages shaped for the query
    (no broadcasting), of the format's dtypes; keys and values paged alike, every page with outliers exactly when its
    store keeps them."""
    window_values = window_keys if window_values is None else window_values
    if query.device.type != "cpu" or _library() is None:
        return False
    b, hq, l, d = query.shape
    h, w = window_keys.shape[1], window_keys.shape[2]
    if (hq % h or (hq // h) * l > MAX_ROWS or d > MAX_HEAD_DIM or window_keys.shape != (b, h, w, d)
            or window_values.shape != (b, h, w, d) or window_keys.device.type != "cpu"
            or window_values.device.type != "cpu"):
        return False  # (the reference broadcasts or raises)
    if num_tokens(keys) == 0:
        return True
    if keys.bits not in (2, 3, 4, 8) or values.bits not in (2, 3, 4, 8):
        return False
    kp, vp = keys.pages, values.pages
    if not all(_page_layout_ok(p, b, h, d, bits) for pages, bits in ((kp, keys.bits), (vp, values.bits))
               for p in pages):
        return False
    rows, gv = (hq // h) * l, values.group_size
    return (d % _lanes(keys.bits) == 0 and d % _lanes(values.bits) == 0 and gv % _lanes(values.bits) == 0
            and d % gv == 0 and d // gv <= 64 and rows * (d // gv) <= 1024
            and keys.chunk_len == values.chunk_len and keys.chunk_len % keys.group_size == 0
            and len(kp) == len(vp) and all(k.codes.shape[2] == v.codes.shape[2] for k, v in zip(kp, vp))
            and len({p.scale.dtype for p in kp}) == 1 and len({p.scale.dtype for p in vp}) == 1
            and all((p.outlier_values is not None) == bool(keys.per_group) for p in kp)
            and all((p.outlier_values is not None) == bool(values.per_group) for p in vp)
            and max([p.rank for p in kp + vp] + [0]) <= MAX_RANK)


def _store_arrays(store, n_pages: int):
    """(pointers [n_pages, fields], ranks, fp8 flags) as ctypes int64 arrays (a page's pointers are cached on it)."""
    ptrs = (ctypes.c_int64 * (n_pages * len(PAGE_FIELDS)))()
    ranks, fp8 = (ctypes.c_int64 * n_pages)(), (ctypes.c_int64 * n_pages)()
    for i, page in enumerate(store.pages):
        ptrs[i * len(PAGE_FIELDS):(i + 1) * len(PAGE_FIELDS)] = page_pointers(page)
        ranks[i] = page.rank
        fp8[i] = int(page.a is not None and page.a.element_size() == 1)
    return ptrs, ranks, fp8


def compressed_attention_cpu(query: torch.Tensor, keys, values, window_keys: torch.Tensor,
                             window_values: torch.Tensor, mask: torch.Tensor | None = None,
                             softmax_scale: float | None = None) -> torch.Tensor:
    """Attention of query [B, Hq, L, D] over (compressed past ++ window [B, H, W, D]), as
    `compressed_attention_reference`, in one C call (check `cpu_kernel_supports` first)."""
    b, hq, l, d = query.shape
    h, w = window_keys.shape[1], window_keys.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    q = query.float().contiguous()  # [B, Hq, L, D] is [B, H, groups*L, D]: row i*L + l = head h*groups + i, step l
    wk = window_keys.float().contiguous()
    wv = window_values.float().contiguous()
    n = num_tokens(keys)
    n_pages = len(keys.pages) if n else 0
    bias = attention_bias(mask, b, l, n + w, q.device)
    if bias is not None and bias.stride(-1) != 1:
        bias = bias.contiguous()
    out = torch.empty_like(q)
    if n_pages:
        (kptr, krank, kfp8), (vptr, vrank, vfp8) = _store_arrays(keys, n_pages), _store_arrays(values, n_pages)
        tokens = (ctypes.c_int64 * n_pages)(*[p.codes.shape[2] for p in keys.pages])
        kq = (keys.bits, keys.group_size, keys.per_group, values.bits, values.group_size, values.per_group,
              keys.chunk_len)
        k_slut, v_slut = (log8_table().data_ptr() if s.pages[0].scale.dtype == torch.uint8 else None
                          for s in (keys, values))
    else:
        kptr = krank = kfp8 = vptr = vrank = vfp8 = tokens = k_slut = v_slut = None
        kq = (8, 1, 0, 8, 1, 0, 1)
    lut = _fp8_table()
    status = _library().kv_decode_attention(
        q.data_ptr(), b, h, (hq // h) * l, l, d, scale, n_pages, kptr, vptr, tokens, krank, vrank, kfp8, vfp8, *kq,
        wk.data_ptr(), wv.data_ptr(), w,
        bias.data_ptr() if bias is not None else None, bias.stride(0) if bias is not None else 0,
        bias.stride(1) if bias is not None else 0, lut.data_ptr(), k_slut, v_slut, out.data_ptr(),
        torch.get_num_threads())
    if status != 0:
        raise MemoryError("kv_decode_attention: could not allocate its per-head buffers")
    return out.to(query.dtype)
