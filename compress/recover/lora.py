"""LoRA that keeps a pruned layer's sparsity: a PEFT LoRA layer that sits beside a packed `SparseLinear` or a
dense-stored pruned `nn.Linear`, and whose update is masked to the layer's kept weights.

Why the mask is applied in training and not only at the merge: with y = W x + (M * B A) x the unmerged forward is
exactly what the merged layer computes (W + M * B A keeps W's zeros), so merging changes no output, the pruned
weights stay zero, and a packed layer is re-packed with the same structure. A layer with no exact zeros gets plain
PEFT LoRA (the low-rank path, no dense delta per step).

PEFT's injection cannot wrap a module without a `weight` or any parameter (a packed layer keeps its values as
buffers), so `wrap_for_lora` builds these layers through PEFT's own `lora.Linear` constructor; `get_peft_model` then
finds them already wrapped and (re)initializes their adapter the PEFT way."""
from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from ..kernels.sparse_bitmask import unpack_bitmask
from ..kernels.sparse_nm import nm_keep_mask
from ..pass_api import replace_module
from ..prune.packing import pack_bitmask, pack_nm
from ..prune.sparse_linear import SparseLinear

ADAPTER = "default"  # PEFT's default adapter name: one adapter per recover pass


# the share of exact zeros from which an unmarked dense layer counts as pruned (one pruned by another tool): a
# trained bf16 layer can hold a few exact zeros by chance, and masking its update for them would make the adapter
# one plain PEFT cannot load (a masked update is not PEFT's) for nothing
PRUNED_ZERO_FRACTION = 0.01


def keep_mask(layer: nn.Module) -> torch.Tensor | None:
    """Bool [out, in] of the weights a pruned layer keeps; None for a layer that is not pruned. Packed layers are;
    a dense-stored layer is when the prune pass marked it (`compress_pruned`, also on reload) or, unmarked, when at
    least PRUNED_ZERO_FRACTION of its weights are exact zeros."""
    if isinstance(layer, SparseLinear):
        if layer.format == "bitmask":
            return unpack_bitmask(layer.bitmask, layer.in_features)
        return nm_keep_mask(layer.indices, layer.n, layer.m, layer.in_features)
    zeros = layer.weight == 0
    return ~zeros if _dense_pruned(layer, zeros) else None


def is_pruned(layer: nn.Module) -> bool:
    """Whether `keep_mask` gives a mask, without unpacking one."""
    return isinstance(layer, SparseLinear) or _dense_pruned(layer)


def _dense_pruned(layer: nn.Module, zeros: torch.Tensor | None = None) -> bool:
    if getattr(layer, "compress_pruned", False):
        return True
    zeros = layer.weight == 0 if zeros is None else zeros
    return int(zeros.sum()) >= PRUNED_ZERO_FRACTION * zeros.numel()


class MaskedLowRankLinear(torch.autograd.Function):
    """x (s * M * B A)^T, whose backward rebuilds the [out, in] update and the mask M (from `mask_of`, a function)
    instead of keeping them. Autograd kept the update and M as a float for every adapted layer until backward: two
    [out, in] float32 matrices a layer (peak added by recover on an 8-layer 0.12B float32 model: 2298 -> 1216 MB);
    here they live one layer at a time, and only x, A and B are saved. Gradients: dL/dx = g (s M BA); with
    G = s M * (g^T x), dL/dB = G A^T, dL/dA = B^T G."""

    @staticmethod
    def forward(ctx, x, a, b, mask_of, scaling: float):
        ctx.save_for_backward(x, a, b)
        ctx.mask_of, ctx.scaling = mask_of, scaling
        return F.linear(x, _masked_update(a, b, mask_of(), scaling))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, a, b = ctx.saved_tensors
        mask = ctx.mask_of()
        grad_x = grad_a = grad_b = None
        grad = grad.to(a.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = grad @ _masked_update(a, b, mask, ctx.scaling)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            g = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
            g = torch.where(mask, g, 0) * ctx.scaling
            grad_a = b.t() @ g if ctx.needs_input_grad[1] else None
            grad_b = g @ a.t() if ctx.needs_input_grad[2] else None
        return grad_x, grad_a, grad_b, None, None


def _masked_update(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, scaling: float) -> torch.Tensor:
    return torch.where(mask, b @ a, 0) * scaling


class SparsityKeepingLoraLinear(PeftLoraLinear):
    """PEFT's `lora.Linear`, also over a `SparseLinear`, with the update masked to the base layer's kept weights."""

    # saved as the base layer's tensors under their usual names + a PEFT adapter folder: plain transformers + PEFT
    # read it when the update is PEFT's own, i.e. over an unpruned layer (set per layer below; a packed base layer
    # is marked by its own tensors; export/native_marker.py)
    transformers_reads = True

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, **kwargs)
        # a masked update (M * BA) x is not what plain PEFT computes: such a checkpoint must not load there silently
        self.transformers_reads = not is_pruned(base_layer)

    @property
    def keep_mask(self) -> torch.Tensor | None:
        """The base layer's kept weights (the module's `keep_mask` function), derived on each use from its bitmask,
        N:M positions or zeros (a frozen base: the same every time): held as a bool tensor for every adapted layer,
        the masks took a byte per weight, half a bf16 model, for the whole run."""
        return keep_mask(self.get_base_layer())

    # PEFT reads in/out features, device and dtype from `weight`; a packed layer has `values` instead
    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):
        if isinstance(base_layer, SparseLinear):
            return base_layer.values.device, base_layer.values.dtype
        return super()._get_base_layer_device_and_dtype(base_layer)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        delta = super().get_delta_weight(adapter)
        mask = self.keep_mask
        return delta if mask is None else delta * mask.to(delta.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.transformers_reads or self.disable_adapters or self.merged or kwargs.get("adapter_names"):
            return super().forward(x, *args, **kwargs)
        names = [name for name in self.active_adapters if name in self.lora_A]
        if not any(self._trains(name, x) for name in names):
            return self._merged_for_inference(names)(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in names:
            a = self.lora_A[name].weight
            update = MaskedLowRankLinear.apply(self.lora_dropout[name](x.to(a.dtype)), a, self.lora_B[name].weight,
                                               functools.partial(keep_mask, self.get_base_layer()), self.scaling[name])
            result = result + update.to(result.dtype)
        return result

    def _trains(self, name: str, x: torch.Tensor) -> bool:
        """Whether this call needs the update's autograd graph or dropout (else the merged copy computes it)."""
        grads = torch.is_grad_enabled() and (x.requires_grad or self.lora_A[name].weight.requires_grad
                                             or self.lora_B[name].weight.requires_grad)
        return grads or (self.training and not isinstance(self.lora_dropout[name], nn.Identity))

    @torch.no_grad()
    def _merged_for_inference(self, names: list[str]) -> nn.Module:
        """What `merge()` would make of the base layer, for calls that train nothing: rebuilding the dense (out x in)
        update on every call made an unmerged adapter beside a packed layer 20-240x slower than the layer. A packed
        base gets a packed copy (its layout, dtype and runtime), a dense-stored one a dense copy; rebuilt when the
        adapters or the base weights change, never saved (not a submodule)."""
        base = self.get_base_layer()
        packed = isinstance(base, SparseLinear)
        stored = (base.weight_dense if base.runtime == "dense" else base.values) if packed else base.weight
        bias = base.bias if base.bias is not None else stored  # (a stand-in: no bias to change)
        key = (tuple((name, self.scaling[name], *((w.data_ptr(), w._version) for w in
                      (self.lora_A[name].weight, self.lora_B[name].weight))) for name in names),
               stored.data_ptr(), stored._version, bias.data_ptr(), bias._version, stored.device, stored.dtype)
        cached = self.__dict__.get("_merged_cache")
        if cached is None or cached[0] != key:
            cached = None
            self.forget_merged_copy()  # the old copy goes before the new one is built
            # a copy: .float() and dense_weight() return the layer's own tensor when it is float32 already
            weight = (base.dense_weight(torch.float32) if packed else base.weight.float()).clone()
            for name in names:
                weight += self.get_delta_weight(name).float()
            if packed:
                layer = SparseLinear.from_weight(weight.to(stored.dtype), self.keep_mask,
                                                 (base.n, base.m) if base.format == "nm" else None, base.bias)
                layer.set_runtime(base.runtime)
            else:
                layer = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                                  device=stored.device, dtype=stored.dtype)
                layer.weight.copy_(weight)
                if base.bias is not None:
                    layer.bias.copy_(base.bias)
            cached = (key, layer.requires_grad_(False))
            self.__dict__["_merged_cache"] = cached
        return cached[1]

    def forget_merged_copy(self) -> None:
        """Drop the merged copy calls without gradients run: it is rebuilt on the next one. Changes to the adapter or
        the layer made in place or by replacing a tensor are seen (their version counters); edits through `.data`
        are not: call this after them."""
        self.__dict__.pop("_merged_cache", None)

    # ------------------------------------------------------------------------------------- merge / unmerge
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        self.forget_merged_copy()  # PEFT's dense merge edits the base weight through .data
        if not isinstance(self.get_base_layer(), SparseLinear):
            return super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        for name in adapter_names or self.active_adapters:
            if name in self.lora_A and name not in self.merged_adapters:
                self._add_to_packed(self.get_delta_weight(name), safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        self.forget_merged_copy()
        if not isinstance(self.get_base_layer(), SparseLinear):
            return super().unmerge()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lora_A:
                self._add_to_packed(-self.get_delta_weight(name), False)

    @torch.no_grad()
    def _add_to_packed(self, delta: torch.Tensor, check_finite: bool) -> None:
        """Decode the packed weight, add the (masked) delta, re-pack with the same kept positions."""
        base: SparseLinear = self.get_base_layer()
        dense = base.dense_weight(torch.float32) + delta.float()
        if check_finite and not torch.isfinite(dense).all():
            raise ValueError("NaNs or infinities in the merged weights: the adapter is broken")
        if getattr(base, "runtime", "packed") == "dense":  # decoded at load: its state-dict hook re-packs on save
            base.weight_dense.copy_(dense.to(base.weight_dense.dtype))
        elif base.format == "nm":
            values, indices = pack_nm(dense, self.keep_mask, base.n, base.m)
            if not torch.equal(indices, base.indices):  # same mask, so the same positions: a bug if not
                raise RuntimeError("re-packing the merged N:M layer changed its kept positions")
            base.values.copy_(values.to(base.values.dtype))
        else:
            base.values.copy_(pack_bitmask(dense, self.keep_mask)[0].to(base.values.dtype))
        if hasattr(base, "gpu_state"):
            base.gpu_state = None  # converted copies of the old weights

    def __repr__(self) -> str:
        return "sparsity_keeping_" + super().__repr__()


@contextmanager
def quiet_rewrap():
    """PEFT warns when it finds layers already wrapped, which is how `wrap_for_lora` hands them over; and PEFT 0.21
    calls an API transformers 5 deprecates (`is_gradient_checkpointing`), a warning for PEFT, not for our users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*modify a model with PEFT for a second time.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated.*", category=FutureWarning)
        yield


def wrap_for_lora(model: nn.Module, names: list[str], lora_config) -> None:
    """Freeze `model` and put a `SparsityKeepingLoraLinear` at each of `names` (built through PEFT's constructor)."""
    # frozen first: PEFT keeps the trainability of parameters that exist when it finds adapters already present
    model.requires_grad_(False)
    for name in names:
        layer = SparsityKeepingLoraLinear(model.get_submodule(name), ADAPTER, config=lora_config,
                                          r=lora_config.r, lora_alpha=lora_config.lora_alpha)
        replace_module(model, name, layer)


def wrapped_layers(model: nn.Module) -> dict[str, SparsityKeepingLoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparsityKeepingLoraLinear)}


def unmerged_adapter_layers(model: nn.Module) -> list[str]:
    """Layers that carry a LoRA adapter kept unmerged: the wrapped ones, or, on a model loaded on the meta device
    (`--dry-run`, where the adapter is not read), those its checkpoint's recover entry names."""
    wrapped = list(wrapped_layers(model))
    if wrapped:
        return wrapped
    for entry in (getattr(model.config, "compression", None) or {}).get("passes", []):
        restore = entry.get("restore") if isinstance(entry, dict) and entry.get("pass") == "recover" else None
        if isinstance(restore, dict) and isinstance(restore.get("modules"), list):
            return [str(m) for m in restore["modules"]]
    return []
