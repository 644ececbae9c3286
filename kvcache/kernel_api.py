"""The kernel functions the KV cache calls, in one place.

The shared storage format is implemented by `compress.kernels.kv_quant` (quantize+pack with GEAR outliers,
unpack+dequantize) and `compress.kernels.kv_attention` (decode attention over the compressed storage, imported by
attention.py), each a Triton kernel beside its torch reference behind a public dispatch function."""
from __future__ import annotations

from ..kernels.kv_quant import PackedQuant, outliers_per_side, quantize_pack, unpack_dequantize  # noqa: F401

KEY_AXIS, VALUE_AXIS = "token", "channel"  # keys: groups of G tokens per channel; values: G channels per token
