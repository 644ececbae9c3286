"""The runtime of pruned layers, chosen when a checkpoint loads (`compress.load(..., sparse_runtime=...)`,
`--sparse-runtime` on the CLI).

- `auto` (default): `dense` on the CPU (the packed CPU path decodes the weight on every call, 3-47x slower than
  dense), `packed` on CUDA (the GPU dispatcher runs packed kernels that read fewer bytes than dense).
- `dense`: decode every pruned layer once at load and run plain matmuls: dense speed and dense memory, while the
  checkpoint on disk stays packed (saving gathers the packed values back).
- `packed`: hold only the packed tensors: the smallest memory."""
from __future__ import annotations

from torch import nn

from ..errors import CompressError

SPARSE_RUNTIMES = ("auto", "dense", "packed")


def resolve_runtime(runtime: str, device_type: str) -> str:
    """The concrete runtime (`dense` or `packed`) that `runtime` means on a device of this type."""
    if runtime not in SPARSE_RUNTIMES:
        raise CompressError(f"unknown sparse runtime {runtime!r}; use one of {', '.join(SPARSE_RUNTIMES)}")
    if runtime == "auto":
        return "packed" if device_type == "cuda" else "dense"
    return runtime


def set_sparse_runtime(model: nn.Module, runtime: str = "auto") -> dict[str, str]:
    """Switch every pruned layer of `model` to `runtime` on the device it sits on; returns {module: path}."""
    from .sparse_linear import SparseLinear

    resolve_runtime(runtime, "cpu")  # validate before touching anything
    paths = {}
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            module.set_runtime(resolve_runtime(runtime, module.values.device.type))
            paths[name] = module.runtime_path()
    return paths


def runtime_plan(model: nn.Module, runtime: str = "auto", device_type: str = "cpu") -> dict[str, str]:
    """{module: path} that each pruned layer would run on a device of this type, without weights (a meta model)."""
    from .sparse_linear import SparseLinear

    from ..activation_sparsity.mlp import ActivationSparseMLP

    concrete = resolve_runtime(runtime, device_type)
    plan = {}
    for name, module in model.named_modules():
        if isinstance(module, ActivationSparseMLP):
            gather = "Triton" if device_type == "cuda" else "C or torch"
            predictor = f", {module.predictor_description()}" if module.has_predictor else ""
            plan[name] = (f"activation-sparse: active neurons' rows only ({gather} gather{predictor}) at <= "
                          f"{module.max_sparse_tokens} tokens, masked dense above")
        elif isinstance(module, SparseLinear):
            if concrete == "dense":
                plan[name] = "dense (decoded at load)"
            elif device_type == "cuda":
                from .gpu_dispatch import describe_path

                plan[name] = describe_path(module, None)
            else:
                plan[name] = "packed (decode per call)"
    return plan
