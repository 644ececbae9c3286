"""`QuantizedLinear`: a Linear layer holding integer weight codes (4 or 8 bits, packed in uint8) with group scales,
optionally on top of a pruned weight (N:M or unstructured). Decoding on a CPU multiplies the packed codes in C
(kernels/quantized_linear_cpu.py); everything else dequantizes, then runs a dense matmul in torch."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.quantized_linear_cpu import (cpu_blocked_applies, cpu_blocked_linear, cpu_dequantize,
                                            cpu_nm24_blocked_applies, cpu_nm24_blocked_linear, cpu_nm24_qgemv,
                                            cpu_nm24_qgemv_applies, cpu_qgemv, cpu_qgemv_applies)
from ..kernels.sparse_bitmask import unpack_bitmask
from ..kernels.sparse_nm import index_bits, nm_decode_reference
from ..prune.packing import pack_bit_fields, pack_nm
from .int_quant import expand_groups, num_groups, pack_codes, packed_width, unpack_codes

SPARSITY_FORMATS = (None, "nm", "bitmask")


def zero_where_pruned(codes: torch.Tensor, mask: torch.Tensor, zero_points: torch.Tensor | None,
                      group_size: int) -> torch.Tensor:
    """`codes` with the code of zero (0 when symmetric, the group's zero point otherwise) where `mask` is False."""
    zero = 0 if zero_points is None else expand_groups(zero_points.to(codes.dtype), group_size, codes.shape[1])
    return torch.where(mask.to(codes.device), codes, zero)


def nm_kept_mask(indices: torch.Tensor, n: int, m: int, in_features: int) -> torch.Tensor:
    """bool [out, in]: True at the positions an N:M `indices` tensor (SparseLinear's packing) keeps."""
    ones = torch.ones(indices.shape[0], in_features // m * n, device=indices.device)
    return nm_decode_reference(ones, indices, n, m, in_features, torch.float32) != 0


class QuantizedLinear(nn.Module):
    """A Linear layer with weight-only integer quantization (GPTQ or round-to-nearest), group-wise scales.

    Public interface (exporters, e.g. compressed-tensors, rely on it; all tensors on the module's device):
    - `bits` (4 or 8), `group_size` (columns per scale group, already clamped to in_features; the last group of a
      row is shorter when in_features % group_size != 0), `symmetric` (bool), `in_features`, `out_features`, `bias`.
    - `int_weight()` -> int8 [out, in]: the integer codes. Symmetric: signed, in [-2^(b-1), 2^(b-1)-1], weight =
      code * scale. Asymmetric: unsigned, in [0, 2^b - 1], weight = (code - zero_point) * scale. (Only bits=8
      asymmetric returns int16, since 255 does not fit int8.) Pruned positions hold the code of zero (0, or the
      group's zero point).
    - `scales()` -> float [out, ceil(in / group_size)] (values exactly representable in the checkpoint dtype).
    - `zero_points()` -> int8 [out, ceil(in / group_size)] (int16 for bits=8) when asymmetric, else None.
    - `dequantized_weight(dtype=None)` -> float [out, in] = the weight the codes stand for (forward multiplies by
      it; when decoding on a CPU it multiplies the codes directly, in float32, which rounds less in bf16).
    - `sparsity_mask()` -> bool [out, in] (True = kept) when the layer was pruned before quantization, else None;
      `sparsity_structure` is (n, m) for N:M (e.g. (2, 4)), None for unstructured or dense.

    Storage (the state dict): `weight_packed` uint8 (4 bits: two codes per byte, even column in the low nibble; 8 bits:
    one per byte; symmetric codes offset by 2^(b-1)); `weight_scale`; `weight_zero_point` uint8 when asymmetric; for an N:M
    pruned layer `weight_packed` holds only the kept codes [out, in*n/m] and `indices` their positions (the packing of
    `SparseLinear`); for an unstructured pruned layer `weight_packed` is dense and `bitmask` (1 bit per weight) marks the
    kept weights."""

    def __init__(self, in_features: int, out_features: int, *, bits: int = 4, group_size: int = 128,
                 symmetric: bool = True, sparsity: str | None = None, n: int = 0, m: int = 0, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits!r}")
        if sparsity not in SPARSITY_FORMATS:
            raise ValueError(f"unknown sparsity format {sparsity!r}; one of {SPARSITY_FORMATS}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.symmetric = bits, symmetric
        self.group_size = min(group_size, in_features) if group_size > 0 else in_features
        self.sparsity, self.n, self.m = sparsity, n, m
        stored = in_features // m * n if sparsity == "nm" else in_features
        groups = num_groups(in_features, self.group_size)
        u8 = dict(dtype=torch.uint8, device=device)
        self.register_buffer("weight_packed", torch.zeros(out_features, packed_width(stored, bits), **u8))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("weight_zero_point", None if symmetric else torch.zeros(out_features, groups, **u8))
        if sparsity == "nm":
            self.register_buffer("indices", torch.zeros(out_features, (stored * index_bits(m) + 7) // 8, **u8))
        elif sparsity == "bitmask":
            self.register_buffer("bitmask", torch.zeros(out_features, (in_features + 7) // 8, **u8))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    @torch.no_grad()
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, *, bits: int,
                   group_size: int, bias: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                   nm: tuple[int, int] | None = None, dtype: torch.dtype = torch.float32) -> "QuantizedLinear":
        """Pack integer `codes` [out, in] (signed when symmetric); `mask` (True = kept) when the weight was pruned,
        with `nm` = (n, m) when it is N:M (stored packed) else unstructured (stored as a bitmask)."""
        out_features, in_features = codes.shape
        symmetric = zero_points is None
        sparsity = None if mask is None else ("nm" if nm else "bitmask")
        n, m = nm or (0, 0)
        layer = cls(in_features, out_features, bits=bits, group_size=group_size, symmetric=symmetric,
                    sparsity=sparsity, n=n, m=m, bias=bias is not None, dtype=dtype, device=codes.device)
        stored = codes
        if sparsity == "nm":
            kept, layer.indices = pack_nm(codes.float(), mask, n, m)
            stored = kept
        elif sparsity == "bitmask":
            layer.bitmask = pack_bit_fields(mask.to(torch.long), 1)
            # pruned positions hold the code of zero, so the C paths of unpruned layers multiply these codes as is
            stored = zero_where_pruned(codes, mask, zero_points, layer.group_size)
        layer.weight_packed = pack_codes(stored.round().to(torch.int16), bits, symmetric)
        layer.weight_scale = scales.to(dtype).clone()
        if not symmetric:
            layer.weight_zero_point = zero_points.to(torch.uint8)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    def empty(cls, linear: nn.Module, spec: dict) -> "QuantizedLinear":
        """An uninitialized QuantizedLinear shaped as `spec` (from `restore_spec`), replacing `linear`."""
        ref = next(linear.parameters(), None)
        ref = ref if ref is not None and ref.is_floating_point() else next(t for t in linear.buffers() if t.is_floating_point())
        return cls(linear.in_features, linear.out_features, bits=spec["bits"], group_size=spec["group_size"],
                   symmetric=spec["symmetric"], sparsity=spec.get("sparsity"), n=spec.get("n", 0),
                   m=spec.get("m", 0), bias=getattr(linear, "bias", None) is not None, dtype=ref.dtype,
                   device=ref.device)

    def restore_spec(self) -> dict:
        spec = {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "sparsity": self.sparsity}
        if self.sparsity == "nm":
            spec.update(n=self.n, m=self.m)
        return spec

    # ------------------------------------------------------------------------------------------ interface
    @property
    def sparsity_structure(self) -> tuple[int, int] | None:
        return (self.n, self.m) if self.sparsity == "nm" else None

    def _code_dtype(self) -> torch.dtype:
        return torch.int16 if (self.bits == 8 and not self.symmetric) else torch.int8

    def sparsity_mask(self) -> torch.Tensor | None:
        if self.sparsity == "bitmask":
            return unpack_bitmask(self.bitmask, self.in_features)
        if self.sparsity == "nm":
            return nm_kept_mask(self.indices, self.n, self.m, self.in_features)
        return None

    def scales(self) -> torch.Tensor:
        return self.weight_scale

    def zero_points(self) -> torch.Tensor | None:
        z = self.weight_zero_point
        return None if z is None else z.to(self._code_dtype())

    def _stored_codes(self) -> torch.Tensor:
        count = self.in_features // self.m * self.n if self.sparsity == "nm" else self.in_features
        return unpack_codes(self.weight_packed, count, self.bits, self.symmetric)

    def int_weight(self) -> torch.Tensor:
        codes = self._stored_codes()
        zero = 0 if self.symmetric else expand_groups(self.weight_zero_point.to(torch.int16), self.group_size,
                                                      self.in_features)
        if self.sparsity == "nm":
            dense = nm_decode_reference(codes.float(), self.indices, self.n, self.m, self.in_features, torch.float32)
            codes = torch.where(self.sparsity_mask(), dense.to(torch.int16), zero)
        elif self.sparsity == "bitmask":
            codes = torch.where(self.sparsity_mask(), codes, zero)
        return codes.to(self._code_dtype())

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.sparsity is None and not self._scale_trains():  # on a CPU, one C pass (bit for bit the same)
            fast = cpu_dequantize(self.weight_packed, self.weight_scale, self.weight_zero_point, self.bits,
                                  self.group_size, self.in_features, dtype or self.weight_scale.dtype)
            if fast is not None:
                return fast
        q = self.int_weight().float()
        scale = expand_groups(self.weight_scale.float(), self.group_size, self.in_features)
        if not self.symmetric:
            q = q - expand_groups(self.weight_zero_point.float(), self.group_size, self.in_features)
        return (q * scale).to(dtype or self.weight_scale.dtype)

    def _dense_codes(self) -> bool:
        """`weight_packed` holds every column's code, pruned ones at the code of zero, so the C paths of unpruned
        layers give this layer's product: unpruned, or unstructured (a bitmask beside dense codes). Checked once per
        layer: a checkpoint's pruned positions that held anything else would take the reference path."""
        if self.sparsity is None:
            return True
        if self.sparsity != "bitmask":
            return False
        # the answer holds for these tensors as they are: a load_state_dict or an in-place edit checks again
        # (inference tensors keep no version counter: an in-place edit of one under inference_mode is not seen)
        key = tuple((t.data_ptr(), -1 if t.is_inference() else t._version)
                    for t in (self.weight_packed, self.bitmask, self.weight_zero_point) if t is not None)
        cached = getattr(self, "_zero_where_pruned", None)
        if cached is None or cached[0] != key:
            codes = self._stored_codes().to(torch.int16)
            zero = 0 if self.symmetric else expand_groups(self.weight_zero_point.to(torch.int16), self.group_size,
                                                          self.in_features)
            cached = self._zero_where_pruned = (key, bool(((codes == zero) | self.sparsity_mask()).all()))
        return cached[1]

    def _scale_trains(self) -> bool:
        """A user training the scales (`weight_scale.requires_grad_()`): only the torch path carries their gradient,
        the C paths read the buffer as plain memory."""
        return self.weight_scale.requires_grad and torch.is_grad_enabled()

    def _path(self, x: torch.Tensor) -> str:
        """Which of forward's paths takes `x`: one decision for forward and for what `runtime_path` reports."""
        if self._scale_trains():
            return "reference"
        if self.sparsity == "nm":
            packed = (self.weight_packed, self.indices, self.weight_scale, self.n, self.m, self.in_features, x)
            if cpu_nm24_qgemv_applies(*packed, group=self.group_size):
                return "nm24_product"
            if cpu_nm24_blocked_applies(*packed):
                return "nm24_blocked"
        elif x.device.type == "cpu" and self._dense_codes():
            if cpu_qgemv_applies(self.weight_packed, self.weight_scale, self.bits, self.in_features, self.group_size,
                                 x):
                return "product"
            if cpu_blocked_applies(self.weight_packed, self.weight_scale, self.in_features, x):
                return "blocked"
        return "reference"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        path = self._path(x)
        if path in ("product", "nm24_product"):
            # decoding on a CPU: the codes multiplied as they are, no float weight built (kernels/csrc/qgemv.c; a
            # 2:4-pruned layer's kept codes where their positions say, kernels/csrc/qsparse.c)
            codes = (self.weight_packed,) if path == "product" else (self.weight_packed, self.indices)
            product = cpu_qgemv if path == "product" else cpu_nm24_qgemv
            y = product(*codes, self.weight_scale, self.weight_zero_point, self.bits, self.group_size, x)
            return (y if self.bias is None else y + self.bias.float()).to(x.dtype)  # one rounding, at the end
        if path == "blocked":
            # prefill on a CPU: rows dequantized a block at a time into one reused buffer, then torch's GEMM
            return cpu_blocked_linear(self.weight_packed, self.weight_scale, self.weight_zero_point, self.bits,
                                      self.group_size, x, bias)
        if path == "nm24_blocked":
            return cpu_nm24_blocked_linear(self.weight_packed, self.indices, self.weight_scale, self.weight_zero_point,
                                           self.bits, self.group_size, x, bias)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def runtime_path(self, tokens: int = 1) -> str:
        """What forward runs for `tokens` tokens on this layer's device (`compress inspect`)."""
        probe = torch.empty(tokens, self.in_features, dtype=self.weight_scale.dtype, device=self.weight_packed.device)
        return {"nm24_product": f"kept int{self.bits} codes multiplied in C where their 2:4 positions say",
                "product": f"int{self.bits} codes multiplied in C",
                "nm24_blocked": "dequantized in C a block of rows at a time, then torch's matmul",
                "blocked": "dequantized in C a block of rows at a time, then torch's matmul",
                "reference": "dequantized, then a dense matmul"}[self._path(probe)]

    def extra_repr(self) -> str:
        sparse = f", {self.n}:{self.m} sparse" if self.sparsity == "nm" else (", sparse" if self.sparsity else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}{sparse}, bias={self.bias is not None}")
