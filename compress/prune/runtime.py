"""The runtime of pruned layers, chosen when a checkpoint loads (`compress.load(..., sparse_runtime=...)`,
`--sparse-runtime` on the CLI).

- `auto` (default): on CUDA `packed` (the GPU dispatcher's kernels read fewer bytes than dense); on the CPU, per
  layer, `packed` for float32 layers of at least PACKED_MIN_WEIGHTS weights when the C kernels are here (the C
  product over the packed values reads ~0.53x the bytes: 1.4-1.7x dense at 1 token for 2:4 at Llama shapes, ~1x
  for the 50% bitmask, 1.5-3.6x at 4-8 tokens, 0.9-1.0x at 512), `dense` for smaller layers (cache-resident: the
  dense GEMV's full-width FMAs beat the product's gathers), for fp16 layers, for bf16 layers unless the CPU has
  AVX512-BF16 and VBMI2 (csrc/sparse_bf16.c, sparse_speed.py on one Zen 5 core: 2:4 1.7-2.2x the dense bf16 layer
  at 1 token, 1.1-1.4x at 8, the 50% bitmask 1.5-2.1x / 1.0-1.4x; elsewhere the float32 product over bf16 values
  lost to the dense bf16 layer from 2 tokens) and without a compiler.
- `dense`: decode every pruned layer once at load and run plain matmuls: dense speed and dense memory, while the
  checkpoint on disk stays packed (saving gathers the packed values back).
- `packed`: hold only the packed tensors: the smallest memory."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import CompressError

SPARSE_RUNTIMES = ("auto", "dense", "packed")
# `auto` on the CPU packs layers from this size up. One thread, AVX2 EPYC, 2:4, 1 token, the layer hot in cache: 0.83x
# dense at 384x1536, 0.96x at 1024x1024, 1.1-1.6x from 2M weights; Llama-3-8B's smallest (k/v, 1024x4096) is 4.2M.
PACKED_MIN_WEIGHTS = 1 << 22


def resolve_runtime(runtime: str, device_type: str, layer: nn.Module | None = None) -> str:
    """The concrete runtime (`dense` or `packed`) that `runtime` means for `layer` on a device of this type."""
    if runtime not in SPARSE_RUNTIMES:
        raise CompressError(f"unknown sparse runtime {runtime!r}; use one of {', '.join(SPARSE_RUNTIMES)}")
    if runtime != "auto":
        return runtime
    if device_type == "cuda":
        return "packed"
    return "packed" if layer is not None and _packed_pays_on_cpu(layer) else "dense"


def _packed_pays_on_cpu(layer) -> bool:
    from ..kernels.sparse_linear_cpu import cpu_sparse_available, cpu_sparse_bf16_available

    if layer.in_features * layer.out_features < PACKED_MIN_WEIGHTS:
        return False
    if layer.values.dtype == torch.bfloat16:  # only where bf16's 32-lane dot products run on the packed values
        return (cpu_sparse_available(torch.bfloat16)
                and cpu_sparse_bf16_available(layer.format, layer.n, layer.m, layer.in_features))
    return layer.values.dtype == torch.float32 and cpu_sparse_available(torch.float32)


def set_sparse_runtime(model: nn.Module, runtime: str = "auto") -> dict[str, str]:
    """Switch every pruned layer of `model` to `runtime` on the device it sits on; returns {module: path}."""
    from .sparse_linear import SparseLinear

    resolve_runtime(runtime, "cpu")  # validate before touching anything
    paths = {}
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            module.set_runtime(resolve_runtime(runtime, module.values.device.type, module))
            paths[name] = module.runtime_path()
    return paths


def runtime_plan(model: nn.Module, runtime: str = "auto", device_type: str = "cpu") -> dict[str, str]:
    """{module: path} that each compressed layer (pruned, quantized, activation-sparse, codebook head) would run on a
    device of this type, without weights (a meta model): what `compress inspect` prints."""
    from .sparse_linear import SparseLinear, cpu_packed_path

    from ..activation_sparsity.mlp import ActivationSparseMLP
    from ..linearize.attention import LinearizedAttention
    from ..kernels.quantized_linear_cpu import max_tokens as qgemv_max_tokens
    from ..kernels.quantized_linear_cpu import ROW_BLOCK as QGEMV_ROW_BLOCK
    from ..kernels.quantized_linear_cpu import (cpu_dequantize_available, cpu_nm24_qgemv_available,
                                                cpu_qgemv_available, nm24_max_tokens)
    from ..quantize.bnb import Bnb4bitLinear, Bnb8bitLinear
    from ..quantize.quantized_linear import QuantizedLinear
    from ..vq_logits.head import VQLogitsHead

    resolve_runtime(runtime, device_type)
    plan = {}
    for name, module in model.named_modules():
        if isinstance(module, ActivationSparseMLP) and not module.dense_projections():
            plan[name] = ("activation-sparse, masked dense (its up/down projections are no plain Linear layers "
                          "after a later pass: no row gathers)")
        elif isinstance(module, ActivationSparseMLP) and device_type != "cuda" and module.small_for_gathers():
            plan[name] = (f"activation-sparse, masked dense (an MLP of {3 * module.up_proj.weight.numel():,} weights: "
                          f"below {module.MIN_GATHER_WEIGHTS:,} the row gathers are slower on a CPU)")
        elif isinstance(module, ActivationSparseMLP):
            gather = "Triton" if device_type == "cuda" else "C or torch"
            predictor = f", {module.predictor_description()}" if module.has_predictor else ""
            plan[name] = (f"activation-sparse: active neurons' rows only ({gather} gather{predictor}) at <= "
                          f"{module.max_sparse_tokens} tokens, masked dense above")
        elif isinstance(module, SparseLinear):
            if resolve_runtime(runtime, device_type, module) == "dense":
                plan[name] = "dense (decoded at load)"
            elif device_type == "cuda":
                from .gpu_dispatch import describe_path

                plan[name] = describe_path(module, None)
            else:
                plan[name] = cpu_packed_path(module)
        elif isinstance(module, QuantizedLinear):
            zeros = (f", {module.n}:{module.m} zeros kept" if module.sparsity == "nm"
                     else ", zeros kept" if module.sparsity else "")
            dequantized = f"int{module.bits} codes, dequantized per call, then a dense product (torch{zeros})"
            blocks = f"dequantized in C up to {QGEMV_ROW_BLOCK} rows at a time, each block by torch's matmul"
            nm24_blocks = "dequantized in C a block of rows at a time, each block by torch's matmul"
            scale_dtype = module.weight_scale.dtype
            dense_codes = module.sparsity in (None, "bitmask")  # pruned codes at the code of zero
            if device_type == "cpu" and module.sparsity == "nm" and (module.n, module.m) == (2, 4) and \
                    cpu_nm24_qgemv_available(scale_dtype):
                most = nm24_max_tokens(scale_dtype, module.in_features, module.group_size)
                plan[name] = (f"kept int{module.bits} codes multiplied in C where their 2:4 positions say at <= "
                              f"{most} tokens; above, {nm24_blocks}")
            elif device_type == "cpu" and dense_codes and \
                    cpu_qgemv_available(module.bits, module.in_features, module.group_size, scale_dtype):
                most = qgemv_max_tokens(scale_dtype, module.in_features, module.group_size)
                plan[name] = (f"int{module.bits} codes multiplied in C at <= {most} tokens; "
                              f"above, {blocks}")
            elif device_type == "cpu" and dense_codes and cpu_dequantize_available(scale_dtype):
                plan[name] = f"int{module.bits} codes {blocks}"  # e.g. an odd row: no C product, the blocks run
            else:
                plan[name] = dequantized
        elif isinstance(module, Bnb4bitLinear):
            plan[name] = f"bitsandbytes {module.quant_type.upper()} kernels"
        elif isinstance(module, Bnb8bitLinear):
            plan[name] = "bitsandbytes LLM.int8 kernels"
        elif isinstance(module, LinearizedAttention):
            plan[name] = module.runtime_path(device_type)
        elif isinstance(module, VQLogitsHead):
            plan[name] = "codebook logits (" + ("Triton)" if device_type == "cuda" else "torch reference)")
    return plan
