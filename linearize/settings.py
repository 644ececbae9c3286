"""What a linearized attention layer computes (shared by the pass, the module and its cache), and which layers."""
from __future__ import annotations

import re
from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from ..errors import ConfigError
from ..strict_config import StrictConfig

LayerSpec = Union[Literal["all"], list[int], str]


class LinearizeSettings(StrictConfig):

    # gla: gated linear attention only; hybrid: Liger Attention = alpha * recurrent + beta * sliding-window softmax;
    # mom: Mixture-of-Memories, gated delta-rule memories with top-k routing plus a shared memory (mom.py)
    variant: Literal["gla", "hybrid", "mom"] = "gla"
    # gla: phi(k) = softmax(k), log-gate = logsigmoid(k) / 16; hgrn2: phi(k) = 1 - sigmoid(k), log-gate = logsigmoid(k);
    # gsa: gated slot attention, the gla log-gate averaged into `num_slots` slot gates (kernels/gsa.py)
    gate: Literal["gla", "hgrn2", "gsa"] = "gla"
    window: int = Field(64, ge=2, description="tokens the hybrid's softmax branch sees, itself included")
    alpha: float = Field(0.5, ge=0, allow_inf_nan=False, description="weight of the recurrent branch (hybrid)")
    beta: float = Field(0.5, ge=0, allow_inf_nan=False, description="weight of the sliding-window branch (hybrid)")
    normalize: bool = Field(False, description="divide the recurrent output by phi(q_t) . z_t (z: the decayed sum of "
                            "phi(k)), making it a weighted mean of values as softmax attention is (gates gla and "
                            "hgrn2); the state keeps one more value column for z")
    chunk_size: Optional[int] = Field(None, ge=1, le=256, description="tokens per chunk of the chunked torch path "
                                      "(default: each recurrence's fastest measured on a CPU: gla 64, gsa 32, mom 32)")
    num_memories: int = Field(4, ge=1, le=64, description="routed memories per layer (mom; plus the shared memory "
                                "unless shared_memory is false)")
    top_k: int = Field(2, ge=1, description="memories each token is routed to (mom)")
    shared_memory: bool = Field(True, description="mom: one more memory that every token writes and reads; without "
                                "it, num_memories 1 is a single gated delta-rule memory, GLA's state size")
    num_slots: int = Field(8, ge=1, le=256, description="memory slots per KV head (gate gsa)")

    @model_validator(mode="after")
    def _check_routing(self):
        if self.top_k > self.num_memories:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed num_memories ({self.num_memories})")
        if self.normalize and (self.variant == "mom" or self.gate == "gsa"):
            raise ValueError("normalize applies to the gla and hgrn2 recurrences of variants gla and hybrid")
        if self.variant == "mom" and self.gate == "gsa":
            raise ValueError("variant mom uses gated delta-rule memories: gate gla or hgrn2, not gsa")
        if self.variant == "hybrid" and self.alpha == 0 and self.beta == 0:
            raise ValueError("alpha and beta are both 0: the hybrid's attention output would be zero")
        return self

    def window_or_none(self) -> int | None:
        return self.window if self.variant == "hybrid" else None

    def foreign_options(self) -> str | None:
        """What is wrong with an option of another variant (or gate) set to something else than its default: it
        does nothing here, and is said, not ignored (None: nothing)."""
        owners = {("window", "alpha", "beta"): ("variant", "hybrid", self.variant == "hybrid"),
                  ("num_memories", "top_k", "shared_memory"): ("variant", "mom", self.variant == "mom"),
                  ("num_slots",): ("gate", "gsa", self.gate == "gsa")}
        for names, (key, value, applies) in owners.items():
            unused = [n for n in names if not applies and getattr(self, n) != LinearizeSettings.model_fields[n].default]
            if unused:
                return (f"{', '.join(unused)} appl{'ies' if len(unused) == 1 else 'y'} to {key} {value} "
                        f"only (this is {key} {getattr(self, key)}): drop {'it' if len(unused) == 1 else 'them'} or "
                        f"set {key}: {value}")
        return None


EVERY = re.compile(r"every_(\d+)$")


def check_layer_spec(spec: LayerSpec) -> LayerSpec:
    if isinstance(spec, list) and not spec:
        raise ValueError("layers is an empty list, so nothing would be linearized: give 'all', layer indices, or "
                         "'every_K'")
    if isinstance(spec, str) and spec != "all" and not EVERY.match(spec):
        raise ValueError(f"layers must be 'all', a list of layer indices, or 'every_K' (keep softmax attention in "
                         f"every K-th layer), got {spec!r}")
    if isinstance(spec, str) and EVERY.match(spec) and int(EVERY.match(spec).group(1)) < 2:
        raise ValueError(f"every_K needs K >= 2 (got {spec!r}; every_1 would keep every layer softmax)")
    if isinstance(spec, list) and any(isinstance(i, bool) or not isinstance(i, int) for i in spec):
        raise ValueError(f"layers lists layer indices (integers), got {spec!r}")
    return spec


def resolve_layers(spec: LayerSpec, num_layers: int, strict: bool = True) -> list[int]:
    """Indices of the layers to linearize. `every_K` keeps softmax in layers K-1, 2K-1, ... (the last of each group
    of K), linearizing the others. `strict` (a new run, not a checkpoint being loaded, whose record an older version
    accepted) refuses a repeated index and an every_K that would keep no softmax layer."""
    if spec == "all":
        return list(range(num_layers))
    if isinstance(spec, str):
        k = int(EVERY.match(spec).group(1))
        if k > num_layers and strict:
            raise ConfigError(f"linearize: layers {spec!r} keeps softmax attention in one layer of every {k}, but "
                              f"the model has {num_layers} layers, so none would keep it: use 'all' for that")
        return [i for i in range(num_layers) if (i + 1) % k]
    bad = [i for i in spec if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"linearize: layers {bad} do not exist (the model has {num_layers} layers, "
                          f"0..{num_layers - 1})")
    repeated = sorted({i for i in spec if spec.count(i) > 1})
    if repeated and strict:  # most likely a typo for another layer: said, not silently dropped
        raise ConfigError(f"linearize: layers lists {repeated} more than once")
    return sorted(set(spec))


class LayerSpecField(StrictConfig):
    """Mixin for configs that choose layers."""

    layers: LayerSpec = "all"

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, v):
        return check_layer_spec(v)
