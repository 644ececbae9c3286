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
def float32_originals(model: nn.Module, params: dict[str, nn.Parameter],
                      notes: list[str] | None = None) -> Iterator[dict[str, nn.Parameter]]:
    """Yields `params` (name -> parameter, names relative to `model`) with each half-precision one replaced by its
    float32 original for the duration; on exit each module holds its own Parameter object again, the trained values
    rounded to its dtype. A parameter the model shares between modules (a tied head) stays as it is, said in
    `notes`: a parametrization would untie it. A trained value that is not finite in the module's dtype is an error
    (nothing is written)."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    trained = dict(params)
    try:
        for name, p in params.items():
            if p.dtype not in HALF:
                continue
            if counts.get(id(p), 0) > 1:
                if notes is not None:
                    notes.append(f"{name} is shared with another module (tied): trained in "
                                 f"{str(p.dtype).removeprefix('torch.')} itself, where AdamW's small steps round "
                                 "away; train in float32 (--dtype float32) for the full updates")
                continue
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            # the float32 copy becomes the parameter, the parametrization hands the module its dtype (unsafe: the
            # two dtypes differ, which torch's check of a parametrization refuses); the half copy is let go meanwhile
            master = nn.Parameter(p.detach().float(), requires_grad=p.requires_grad)
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            setattr(owner, attr, master)
            parametrize.register_parametrization(owner, attr, _Stored(p.dtype), unsafe=True)
            swapped.append((owner, attr, p))
            trained[name] = getattr(owner.parametrizations, attr).original
        yield trained
        bad = [name for name, t in trained.items() if not torch.isfinite(t.detach().to(params[name].dtype)).all()]
        if bad:  # (in the module's dtype: a float32 value past float16's 65504 is inf there)
            raise CompressError(f"recover: training left non-finite values in {bad[0]}"
                                f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''} (nothing written); "
                                "lower lr, or train in float32 (--dtype float32)")
    finally:
        for owner, attr, p in swapped:  # the module's own Parameter again, holding the trained values rounded
            parametrize.remove_parametrizations(owner, attr, leave_parametrized=False)
            p.data = getattr(owner, attr).detach().to(p.dtype)
            setattr(owner, attr, p)


def stored(module: nn.Module, name: str) -> torch.Tensor:
    """The tensor that holds `module`'s parameter `name`: its float32 original while `float32_originals` trains
    it (reading `module.name` then gives a rounded copy, and writing into that copy is lost), else the parameter."""
    if parametrize.is_parametrized(module, name):
        return getattr(module.parametrizations, name).original
    return getattr(module, name)
