"""The kernel functions the KV cache calls, in one place.

The shared storage format is implemented by `compress.kernels.kv_quant` (quantize+pack with GEAR outliers,
unpack+dequantize) and `compress.kernels.kv_attention` (decode attention over the compressed storage), each a Triton
kernel beside its torch reference with a public dispatch function. The cache code only calls the names below."""
from __future__ import annotations

from ..kernels.kv_quant import (PackedQuant, outlier_fraction, outliers_per_side, position_dtype,  # noqa: F401
                                quantize_pack, unpack_codes, unpack_dequantize)

KEY_AXIS, VALUE_AXIS = "token", "channel"  # keys: groups of G tokens per channel; values: G channels per token
