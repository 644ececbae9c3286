"""Decode attention that reads the compressed KV storage directly (codes + scales, low-rank spans, outliers) plus
the fp16 window of recent tokens, never building a dense K or V of the past.

Storage: the paged format of kv_pages.py (any object with `axis, bits, group_size, chunk_len, page_chunks,
per_group, pages` works: the cache's CompressedStore, or kv_pages.PagedKV). Layout of this kernel family:
- kv_attention_reference.py: the torch reference (the CPU path; what the kernel is tested against),
- kv_attention_triton.py: the Triton flash-decoding kernel (CUDA, or the interpreter in tests),
- kv_attention_cpu.py: the CPU kernel (C, csrc/kv_decode.c: the reference in one call per layer),
- this file: the public function choosing between them.

`compressed_decode_attention` runs the Triton kernel on CUDA tensors (or with COMPRESS_KERNELS=triton) for the
shapes it tiles (`triton_supports`), the C kernel on CPU tensors for the shapes it holds (`cpu_kernel_supports`;
not with COMPRESS_KERNELS=torch or COMPRESS_CPU_KERNELS=off), and the torch reference elsewhere."""
from __future__ import annotations

import torch

from .dispatch import use_triton
from .kv_attention_cpu import compressed_attention_cpu, cpu_kernel_supports
from .kv_attention_reference import MASKED, attention_bias, compressed_attention_reference  # noqa: F401
from .kv_attention_triton import compressed_attention_triton, triton_supports  # noqa: F401
from .kv_pages import Page, PagedKV  # noqa: F401
from ..environment import setting


def decode_attention_path(query: torch.Tensor, keys, values, window_keys: torch.Tensor,
                          window_values: torch.Tensor | None = None) -> str:
    """Which implementation `compressed_decode_attention` runs for these inputs: "triton", "c" or "torch"."""
    if use_triton(query, window_keys):
        return "triton" if triton_supports(keys, values, query.shape[-1]) else "torch"
    if (setting("COMPRESS_KERNELS") != "torch"
            and cpu_kernel_supports(query, keys, values, window_keys, window_values)):
        return "c"
    return "torch"


def compressed_decode_attention(query: torch.Tensor, keys, values, window_keys: torch.Tensor,
                                window_values: torch.Tensor, mask: torch.Tensor | None = None,
                                softmax_scale: float | None = None) -> torch.Tensor:
    """softmax(q K^T * scale + mask) V over the compressed past (`keys`, `values`: paged stores, or None / empty)
    followed by the fp16 window [B, H, W, D]. query [B, Hq, L, D] (L = 1 for a decode step; L > 1 for a chunk of
    new tokens, which must then be in the window); mask: see `attention_bias`. Returns [B, Hq, L, D] in query's
    dtype. Triton on CUDA tensors, the C kernel on CPU tensors, the torch reference for what neither holds."""
    path = decode_attention_path(query, keys, values, window_keys, window_values)
    if path == "triton":
        return compressed_attention_triton(query, keys, values, window_keys, window_values, mask, softmax_scale)
    if path == "c":
        return compressed_attention_cpu(query, keys, values, window_keys, window_values, mask, softmax_scale)
    return compressed_attention_reference(query, keys, values, window_keys, window_values, mask, softmax_scale)
