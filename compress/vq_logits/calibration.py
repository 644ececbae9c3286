"""The hidden states entering the output head on the calibration batches, as the fit needs them: a fixed random
subset of positions, gathered batch by batch, and without computing the head itself (the dense logits of a batch are
[batch, seq, vocab]: gigabytes at a 128k vocabulary, and nothing here reads them)."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import CompressError
from ..progress import progress_bar


class _HeadReached(Exception):
    """Ends a calibration forward at the head's input (the rest of the forward is the head and the loss)."""


def head_inputs(model: nn.Module, head: nn.Module, batches: torch.Tensor, *, keep: int, seed: int,
                batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """[min(N, keep), d] float32 rows of the head's input over the N = batches.numel() positions: all of them in
    order, or above `keep` the rows randperm(N, seed)[:keep] in that order (what sampling the concatenation of every
    position gives, without holding that concatenation)."""
    total = batches.numel()
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:keep] if total > keep else None
    out: torch.Tensor | None = None
    device, start = head.weight.device, 0

    def stop(module, args):
        raise _HeadReached(args[0])

    hook = head.register_forward_pre_hook(stop)
    try:
        for i in progress_bar(range(0, batches.shape[0], batch_size), description="vq_logits: hidden states",
                              enabled=progress):
            try:
                model(input_ids=batches[i:i + batch_size].to(device), use_cache=False)
            except _HeadReached as reached:
                hidden = reached.args[0].detach()
            else:
                raise CompressError("vq_logits: the model's forward never called its output head")
            hidden = hidden.reshape(-1, hidden.shape[-1])
            if hidden.shape[0] != batches[i:i + batch_size].numel():  # (the sampled positions index the tokens)
                raise CompressError(f"vq_logits: the output head received {hidden.shape[0]} positions for "
                                    f"{batches[i:i + batch_size].numel()} tokens; it needs one per token")
            if out is None:
                out = torch.empty(min(total, keep), hidden.shape[-1], dtype=torch.float32, device=hidden.device)
            rows = hidden.shape[0]
            if order is None:
                out[start:start + rows] = hidden
            else:
                slots = ((order >= start) & (order < start + rows)).nonzero().flatten()
                out[slots.to(out.device)] = hidden[(order[slots] - start).to(hidden.device)].float()
            start += rows
    finally:
        hook.remove()
    return out
