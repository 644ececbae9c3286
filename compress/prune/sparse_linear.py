"""`SparseLinear`: a Linear layer that holds its pruned weight packed (N:M or bitmask) and runs it packed.

Its buffers are the packed tensors themselves (values follow the model's floating dtype like any weight; indices
and bitmasks are uint8), so they are what the checkpoint stores and what memory holds after `compress.load`. The
bitmask format also holds per-row offsets into `values` (int64, 8 bytes per output row), recomputed on load. `SparseLinear.empty` builds one with the right buffer shapes for `Prune.restore`."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.sparse_bitmask import bitmask_decode_reference, bitmask_linear
from ..kernels.sparse_nm import index_bits, nm_decode_reference, nm_linear
from .packing import pack_bitmask, pack_nm

FORMATS = ("nm", "bitmask")


class SparseLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, fmt: str, *, nnz: int = 0, n: int = 0, m: int = 0,
                 bias: bool = False, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"unknown sparse format {fmt!r}; one of {FORMATS}")
        self.in_features, self.out_features, self.format = in_features, out_features, fmt
        self.n, self.m = n, m
        if fmt == "nm":
            kept = in_features // m * n
            self.register_buffer("values", torch.zeros(out_features, kept, dtype=dtype, device=device))
            self.register_buffer("indices", torch.zeros(out_features, (kept * index_bits(m) + 7) // 8,
                                                        dtype=torch.uint8, device=device))
        else:
            self.register_buffer("values", torch.zeros(nnz, dtype=dtype, device=device))
            self.register_buffer("bitmask", torch.zeros(out_features, (in_features + 7) // 8, dtype=torch.uint8,
                                                        device=device))
            # derived from the bitmask, so not stored in checkpoints: recomputed after the state dict loads
            self.register_buffer("row_offsets", torch.zeros(out_features, dtype=torch.int64, device=device),
                                 persistent=False)
            self.register_load_state_dict_post_hook(lambda module, incompatible: module.refresh_row_offsets())
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def empty(cls, linear: nn.Linear, spec: dict) -> "SparseLinear":
        """An uninitialized SparseLinear shaped like the checkpoint's `spec` (from `restore_spec`), replacing `linear`."""
        return cls(linear.in_features, linear.out_features, spec["format"], nnz=spec.get("nnz", 0),
                   n=spec.get("n", 0), m=spec.get("m", 0), bias=linear.bias is not None,
                   dtype=linear.weight.dtype, device=linear.weight.device)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor, nm: tuple[int, int] | None) -> "SparseLinear":
        """Pack `linear.weight` where `mask` is True (N:M layout when `nm` is given, else the bitmask layout)."""
        w = linear.weight.detach()
        mask = mask.to(w.device)
        if nm is not None:
            out = cls(linear.in_features, linear.out_features, "nm", n=nm[0], m=nm[1], bias=linear.bias is not None,
                      dtype=w.dtype, device=w.device)
            out.values, out.indices = pack_nm(w, mask, *nm)
        else:
            out = cls(linear.in_features, linear.out_features, "bitmask", nnz=int(mask.sum()),
                      bias=linear.bias is not None, dtype=w.dtype, device=w.device)
            out.values, out.bitmask, out.row_offsets = pack_bitmask(w, mask)
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach())
        return out

    @torch.no_grad()
    def refresh_row_offsets(self) -> None:
        if self.format == "bitmask" and self.bitmask.device.type != "meta":
            from ..kernels.sparse_bitmask import unpack_bitmask

            counts = unpack_bitmask(self.bitmask, self.in_features).sum(1)
            self.row_offsets.copy_(torch.cumsum(counts, 0) - counts)

    def restore_spec(self) -> dict:
        spec = {"format": self.format}
        if self.format == "nm":
            spec.update(n=self.n, m=self.m)
        else:
            spec["nnz"] = int(self.values.numel())
        return spec

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The decoded [out, in] weight with zeros where pruned (for inspection and tests; forward stays packed)."""
        if self.format == "nm":
            return nm_decode_reference(self.values, self.indices, self.n, self.m, self.in_features, dtype)
        return bitmask_decode_reference(self.values, self.bitmask, self.in_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if self.format == "nm":
            return nm_linear(x, self.values, self.indices, self.n, self.m, self.in_features, bias)
        return bitmask_linear(x, self.values, self.bitmask, self.row_offsets, self.in_features, bias)

    def extra_repr(self) -> str:
        layout = f"{self.n}:{self.m}" if self.format == "nm" else f"bitmask, nnz={self.values.numel()}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {layout}, bias={self.bias is not None}"
