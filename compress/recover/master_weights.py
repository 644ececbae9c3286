"""Parameters trained in full beside LoRA (`train_modules`) kept in float32 while a half-precision model trains.

The Trainer's AdamW ran on the model's float16 / bfloat16 tensors themselves: in float16 its state underflowed and
steps blew up (a VQ head all NaN after 20 steps, RMSNorm weights moved 11 where float32 moved 0.014), in bfloat16 the
steps were below half an ulp and nothing moved (0 of 3,072 norm weights). Each such parameter becomes a float32
original behind a parametrization that hands the module its usual dtype (`module.weight` is `original.to(half)` on
every read): the forward computes as before, the optimizer updates float32 values. LoRA needs nothing of this (PEFT
keeps its adapters in float32)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import CompressError

HALF = (torch.float16, torch.bfloat16)


class _Stored(nn.Module):
    """original (float32) -> the dtype the module computes in."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return original.to(self.dtype)


@contextmanager
def float32_originals(model: nn.Module, params: dict[str, nn.Parameter]) -> Iterator[dict[str, nn.Parameter]]:
    """Yields `params` (name -> parameter, names relative to `model`) with each half-precision one replaced by its
    float32 original for the duration; on exit the modules hold plain parameters again, the trained values rounded
    to their dtype. A parameter the model shares between modules (a tied head) stays as it is: a parametrization
    would untie it. A trained value that is not finite is an error (nothing is written)."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    swapped: list[tuple[nn.Module, str]] = []
    trained = dict(params)
    try:
        for name, p in params.items():
            if p.dtype not in HALF or counts.get(id(p), 0) > 1:
                continue
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            # the float32 copy becomes the parameter, the parametrization hands the module its dtype (unsafe: the
            # two dtypes differ, which torch's check of a parametrization refuses)
            setattr(owner, attr, nn.Parameter(p.detach().float(), requires_grad=p.requires_grad))
            parametrize.register_parametrization(owner, attr, _Stored(p.dtype), unsafe=True)
            swapped.append((owner, attr, p.dtype))
            trained[name] = getattr(owner.parametrizations, attr).original
        yield trained
        bad = [name for name, p in trained.items() if not torch.isfinite(p).all()]
        if bad:
            raise CompressError(f"recover: training left non-finite values in {bad[0]}"
                                f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''} (nothing written); "
                                "lower lr, or train in float32 (--dtype float32)")
    finally:
        for owner, attr, dtype in swapped:  # the module's own dtype again, the trained values rounded to it
            parametrize.remove_parametrizations(owner, attr, leave_parametrized=False)
            original = getattr(owner, attr)
            setattr(owner, attr, nn.Parameter(original.detach().to(dtype), requires_grad=original.requires_grad))
