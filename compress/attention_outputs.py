"""What transformers 5 collects for `output_attentions`: attention modules it did not define (a linearized layer) or
attention functions that return weights only when asked (the gear_kv one) read the request here and hand over their
weights."""
from __future__ import annotations

import torch

try:  # transformers 5's output-capturing context (what it collects for the running forward); resolved once: every
    # attention call, decoding steps included, asks it
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # an older transformers collects what each layer returns
    _active_collector = None


def _collector() -> dict | None:
    return None if _active_collector is None else _active_collector.get()


def attentions_requested(kwargs: dict) -> bool:
    """output_attentions asked for this call: as an argument (older transformers pass it down), or in the config /
    the model's call, which transformers 5 says through the outputs it collects."""
    collected = _collector()
    return bool(kwargs.get("output_attentions")) or (collected is not None and "attentions" in collected)


def record_as_attentions(weights: torch.Tensor) -> None:
    """transformers 5 collects `output_attentions` with forward hooks it installs on the model's own attention class
    only, so a swapped-in module's weights would be dropped and every later layer's entry shifted: hand them to the
    collector it runs for this call instead (what its hook does). No hook of ours: one would sit on every call, and
    a closure would stop the model from pickling. An older transformers collects what each layer returns."""
    collected = _collector()
    if collected is not None and "attentions" in collected:
        collected["attentions"].append(weights)
