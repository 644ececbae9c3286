"""The `prune` pass: glue between recipes and the masking math in masks.py."""
from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..errors import ConfigError
from ..pass_api import Pass, PassConfig, PassContext, PassReport, tensor_bytes, timed
from ..registry import register_pass
from .masks import nm_mask, parse_structure, unstructured_mask


@register_pass("prune")
class Prune(Pass):
    """Zero out weights of Linear layers by importance: magnitude (no data)."""

    class Config(PassConfig):
        method: Literal["magnitude"] = "magnitude"
        sparsity: float = Field(0.5, ge=0.0, lt=1.0)
        structure: str = Field("unstructured", description='"unstructured" or "N:M" (N kept of every M)')

    def validate_config(self) -> None:
        s = self.config.structure
        if s != "unstructured":
            if not re.fullmatch(r"\d+:\d+", s):
                raise ConfigError(f'structure must be "unstructured" or "N:M" like "2:4" (got {s!r})')
            n, m = parse_structure(s)
            if not 0 < n < m:
                raise ConfigError(f"structure {s!r}: N (kept) must be between 1 and M-1")

    def apply(self, model: nn.Module, ctx: PassContext) -> PassReport:
        targets = self.target_modules(model)
        report = PassReport(name=self.name, modules=list(targets))
        report.bytes_before = sum(tensor_bytes(m) for m in targets.values())
        nm = parse_structure(self.config.structure)
        zeros = total = 0
        with timed(report), torch.no_grad():
            for name, module in targets.items():
                w = module.weight
                if nm is not None and w.shape[1] % nm[1]:
                    raise ConfigError(f"{name}: input width {w.shape[1]} is not divisible by M={nm[1]}; "
                                      "ignore this module or choose another N:M")
                scores = w.abs().float()
                mask = nm_mask(scores, *nm) if nm else unstructured_mask(scores, self.config.sparsity)
                w.mul_(mask.to(w.dtype))
                zeros += int((~mask).sum())
                total += mask.numel()
        report.bytes_after = sum(tensor_bytes(m) for m in targets.values())
        report.details = {"sparsity": zeros / max(total, 1), "storage": "dense"}
        return report
