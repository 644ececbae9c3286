"""`SparseLinear`: a Linear layer that holds its pruned weight packed (N:M or bitmask) and runs it packed.

Its buffers are the packed tensors themselves (values follow the model's floating dtype like any weight; indices
and bitmasks are uint8), so they are what the checkpoint stores and what memory holds after `compress.load`. The
bitmask format also holds per-row offsets into `values` (int64, 8 bytes per output row), recomputed on load. `SparseLinear.empty` builds one with the right buffer shapes for `Prune.restore`.

Runtime (chosen at load, `set_runtime`; see runtime.py for the model-wide choice):
- `packed`: only the packed tensors are held. On the CPU a C product reads them directly for a few tokens, and
  blocks of rows are decoded for torch's GEMM above (kernels/sparse_linear_cpu.py; without a C compiler each call
  decodes the whole weight, then multiplies: slow); on CUDA the GPU dispatcher (gpu_dispatch.py) runs the packed
  GEMV for few tokens and, above, the fastest of cuSPARSELt and expand-into-scratch + cuBLAS for that shape.
- `dense`: the weight is decoded once into `weight_dense` (not persistent) and the packed values are dropped; a
  state-dict hook gathers them back from `weight_dense`, so `save` still writes the packed format."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.sparse_bitmask import bitmask_decode_reference, bitmask_linear
from ..kernels.sparse_bitmask import bitmask_row_counts, unpack_bitmask
from ..kernels.sparse_nm import index_bits, nm_decode_reference, nm_linear, nm_positions
from .packing import pack_bitmask, pack_nm

FORMATS = ("nm", "bitmask")
RUNTIMES = ("packed", "dense")


class SparseLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, fmt: str, *, nnz: int = 0, n: int = 0, m: int = 0,
                 bias: bool = False, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"unknown sparse format {fmt!r}; one of {FORMATS}")
        self.in_features, self.out_features, self.format = in_features, out_features, fmt
        self.n, self.m = n, m
        self.runtime = "packed"
        self.gpu_state = None  # per-module cache of the GPU dispatcher (converted weights), built on first call
        self.register_state_dict_post_hook(_packed_values_in_state)
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
            self.register_load_state_dict_post_hook(_refresh_row_offsets_after_load)
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
        return cls.from_weight(linear.weight, mask, nm, linear.bias)

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: torch.Tensor, mask: torch.Tensor, nm: tuple[int, int] | None,
                    bias: torch.Tensor | None = None) -> "SparseLinear":
        """Pack the [out, in] `weight` where `mask` is True (N:M layout when `nm` is given, else the bitmask one)."""
        w = weight.detach()
        mask = mask.to(w.device)
        out_features, in_features = w.shape
        if nm is not None:
            out = cls(in_features, out_features, "nm", n=nm[0], m=nm[1], bias=bias is not None, dtype=w.dtype,
                      device=w.device)
            out.values, out.indices = pack_nm(w, mask, *nm)
        else:
            out = cls(in_features, out_features, "bitmask", nnz=int(mask.sum()), bias=bias is not None,
                      dtype=w.dtype, device=w.device)
            out.values, out.bitmask, out.row_offsets = pack_bitmask(w, mask)
        if bias is not None:
            out.bias.copy_(bias.detach())
        return out

    @torch.no_grad()
    def refresh_row_offsets(self) -> None:
        if self.format == "bitmask" and self.bitmask.device.type != "meta" and self.runtime == "packed":
            counts = bitmask_row_counts(self.bitmask, self.in_features)
            offsets = torch.cumsum(counts, 0) - counts
            if self.row_offsets.device == offsets.device and self.row_offsets.shape == offsets.shape:
                self.row_offsets.copy_(offsets)  # in place: a holder of this buffer (a captured graph) sees it
            else:  # after load_state_dict(assign=True) the unsaved offsets are still on meta, where copy_ does
                self.row_offsets = offsets  # nothing (and the C kernel then read a meta pointer)

    def restore_spec(self) -> dict:
        spec = {"format": self.format}
        if self.format == "nm":
            spec.update(n=self.n, m=self.m)
        else:
            spec["nnz"] = self.nnz()
        return spec

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The decoded [out, in] weight with zeros where pruned (for inspection and tests)."""
        if self.runtime == "dense":
            return self.weight_dense.to(dtype or self.weight_dense.dtype)
        if self.format == "nm":
            return nm_decode_reference(self.values, self.indices, self.n, self.m, self.in_features, dtype)
        return bitmask_decode_reference(self.values, self.bitmask, self.in_features, dtype)

    def nnz(self) -> int:
        if self.runtime == "packed":
            return int(self.values.numel())
        if self.format == "nm":
            return self.out_features * (self.in_features // self.m * self.n)
        return self.dense_nnz  # counted when the values were dropped: the bitmask may be on meta or uninitialized

    @torch.no_grad()
    def packed_values(self) -> torch.Tensor:
        """The packed `values` (gathered back from the dense weight under runtime `dense`)."""
        if self.runtime == "packed":
            return self.values
        w = self.weight_dense
        kept = self.in_features // self.m * self.n if self.format == "nm" else 0
        if w.device.type == "meta":  # shapes only (a state dict of a model moved to meta)
            return w.new_empty((self.nnz(),) if self.format == "bitmask" else (self.out_features, kept))
        if self.format == "bitmask":
            return w[unpack_bitmask(self.bitmask, self.in_features)]
        pos = nm_positions(self.indices, kept, self.m).long().view(self.out_features, -1, self.n)
        return w.view(self.out_features, -1, self.m).gather(-1, pos).reshape(self.out_features, kept)

    @torch.no_grad()
    def set_runtime(self, runtime: str) -> None:
        """`dense`: decode once and hold the dense weight (dense speed); `packed`: hold only the packed tensors."""
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown sparse runtime {runtime!r}; one of {RUNTIMES}")
        if runtime == "dense" and self.runtime == "packed":
            self.dense_nnz = int(self.values.numel())
        if runtime == self.runtime or self.values.device.type == "meta":
            self.runtime = runtime
            return
        if runtime == "dense":
            self.register_buffer("weight_dense", self.dense_weight(), persistent=False)
            self.values = self.values.new_empty(0)
            if self.format == "bitmask":
                self.row_offsets = self.row_offsets.new_empty(0)
        else:
            if getattr(self, "weight_dense", None) is not None:  # (made dense on meta: the packed buffers stayed)
                values = self.packed_values()
                self.weight_dense = None
                self.values = values
            if self.format == "bitmask":
                self.row_offsets = torch.zeros(self.out_features, dtype=torch.int64, device=self.values.device)
        self.runtime = runtime
        self.gpu_state = None
        self.refresh_row_offsets()

    def after_storage_rounding(self) -> None:
        """`round_to_storage` may have rounded the stored values: the GPU forms are built from them again."""
        self.gpu_state = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        dense = self.runtime == "dense"
        held = getattr(self, "weight_dense", None) if dense else None
        kept = self.in_features // self.m * self.n if self.format == "nm" else 0
        values_shape = tuple(self.values.shape) if held is None else (
            (self.dense_nnz,) if self.format == "bitmask" else (self.out_features, kept))
        # a state of another sparsity is refused whole, before anything is copied: torch copied the same-shaped
        # bitmask beside the refused values, and the layer then decoded (or the C kernel read past) the wrong count
        expected = {"values": values_shape, "bitmask" if self.format == "bitmask" else "indices":
                    tuple((self.bitmask if self.format == "bitmask" else self.indices).shape)}
        mismatched = [(name, tuple(state_dict[prefix + name].shape), shape) for name, shape in expected.items()
                      if prefix + name in state_dict and tuple(state_dict[prefix + name].shape) != shape]
        if mismatched:
            error_msgs.extend(f"size mismatch for {prefix}{name}: copying a param with shape {torch.Size(got)} from "
                              f"checkpoint, the shape in current model is {torch.Size(want)}."
                              for name, got, want in mismatched)
            return
        if held is not None:
            # load into packed buffers shaped by this layer's own count (its bitmask and weight may be uninitialized
            # memory, after to_empty); then decode again. A state dict without the values keeps this layer's own.
            self.values = self.values.new_empty(values_shape) if prefix + "values" in state_dict \
                else self.packed_values()
            self.weight_dense = None
        self.runtime = "packed"  # (a layer made dense on meta still holds its packed buffers: nothing to move)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.gpu_state = None
        if dense:
            self.refresh_row_offsets()
            self.set_runtime("dense")

    def runtime_path(self, tokens: int | None = None) -> str:
        """Which code path a call runs (what `compress inspect` prints)."""
        if self.runtime == "dense":
            return "dense (decoded at load)"
        device = self.values.device.type
        if device == "cuda":
            from .gpu_dispatch import describe_path

            return describe_path(self, tokens)
        return cpu_packed_path(self, tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if self.runtime == "dense":
            return F.linear(x, self.weight_dense.to(x.dtype), bias)
        if x.is_cuda and self.values.is_cuda:
            from .gpu_dispatch import sparse_linear_cuda

            return sparse_linear_cuda(self, x, bias)
        if self.format == "nm":
            return nm_linear(x, self.values, self.indices, self.n, self.m, self.in_features, bias)
        return bitmask_linear(x, self.values, self.bitmask, self.row_offsets, self.in_features, bias)

    def extra_repr(self) -> str:
        layout = f"{self.n}:{self.m}" if self.format == "nm" else f"bitmask, nnz={self.nnz()}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {layout}, "
                f"bias={self.bias is not None}, runtime={self.runtime}")


def cpu_packed_path(layer: SparseLinear, tokens: int | None = None) -> str:
    """What the packed runtime runs on the CPU for `tokens` (None: every size), as `compress inspect` says it (bf16
    values that csrc/sparse_bf16.c takes: its longer token limit)."""
    from ..kernels.sparse_linear_cpu import (BF16_MAX_TOKENS, MAX_TOKENS, VALUE_DTYPES, cpu_sparse_available,
                                             cpu_sparse_bf16_available)

    values_dtype = layer.values.dtype
    if not cpu_sparse_available(values_dtype):
        return "packed (decode per call, torch)"
    bf16 = values_dtype == torch.bfloat16 and cpu_sparse_bf16_available(layer.format, layer.n, layer.m,
                                                                         layer.in_features)
    most = BF16_MAX_TOKENS if bf16 else MAX_TOKENS
    product = f"packed: C product over the packed values at <= {most} tokens"
    blocked = "blocks of rows decoded for torch's GEMM"
    if values_dtype not in VALUE_DTYPES:
        return f"packed: {blocked} at every size"
    if tokens is None:
        return f"{product}, {blocked} above"
    return product if tokens <= most else f"packed: {blocked}"


def _packed_values_in_state(module: SparseLinear, state_dict, prefix, local_metadata) -> None:
    """Under runtime `dense` the checkpoint still stores the packed values (gathered from the dense weight)."""
    if module.runtime == "dense":
        state_dict[prefix + "values"] = module.packed_values()


def _refresh_row_offsets_after_load(module: SparseLinear, incompatible) -> None:
    """A module-level hook (a lambda made the layer unpicklable: `torch.save(model)` failed)."""
    module.refresh_row_offsets()
