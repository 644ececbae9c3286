"""`ActivationSparseMLP`: a gated MLP (down(act(gate(x)) * up(x))) whose neurons with |act(gate(x))| below a
calibrated per-layer threshold are zeroed (CATS, Lee et al. 2024), and skipped when decoding.

- few tokens (decoding, <= `max_sparse_tokens`): compute the gate, keep the active neurons (of any token), then
  multiply only their rows of up_proj and their columns of down_proj (kernels/activation_sparse.py: a fused C
  gather kernel on the CPU, Triton on CUDA). down_proj's weight is held column-major (a transposed view of a
  contiguous [intermediate, hidden] tensor), so each neuron's column is one contiguous row; the dense path multiplies
  that layout at the same speed and the checkpoint stores the usual layout.
- many tokens (prefill, training): the dense MLP with the same mask, so every path computes the same function.

Its children keep the names and tensors of the MLP it replaces (gate_proj, up_proj, down_proj), so the checkpoint's
tensors are those of the dense model; the threshold is recorded in the checkpoint's compression section."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.activation_sparse import gather_axpy, gather_dot


class ActivationSparseMLP(nn.Module):
    def __init__(self, mlp: nn.Module, threshold: float = 0.0, max_sparse_tokens: int = 4):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        device = mlp.gate_proj.weight.device
        # not in the state dict (which is cast to the checkpoint's bf16): the pass records the exact float in the
        # checkpoint's compression section and restore passes it back
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float32,
                                                       device=None if device.type == "meta" else device),
                             persistent=False)
        self.max_sparse_tokens = max_sparse_tokens
        self.record = False  # when True, forward counts active neurons into `counts` (benchmarks, reports)
        self.counts = [0, 0]  # [active, seen] (token, neuron) pairs

    def gate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(act(gate(x)), keep mask |act(gate(x))| >= threshold)."""
        g = self.act_fn(self.gate_proj(x))
        keep = g.abs() >= self.threshold.to(g.dtype)
        if self.record:
            self.counts[0] += int(keep.sum())
            self.counts[1] += keep.numel()
        return g, keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] <= self.max_sparse_tokens and not self.training and self._gatherable():
            y = self._sparse(x2)
        else:
            g, keep = self.gate(x2)
            y = self.down_proj(g * self.up_proj(x2) * keep)
        return y.view(*lead, y.shape[-1])

    def runtime_path(self, tokens: int = 1) -> str:
        if tokens > self.max_sparse_tokens or self.training or not self._gatherable():
            return "masked dense"
        from ..kernels.activation_sparse import _cpu_fast

        w = self.up_proj.weight
        if w.is_cuda:
            return "active rows only (Triton gather)"
        return "active rows only (C gather)" if _cpu_fast(w, w) else "active rows only (torch gather)"

    def _gatherable(self) -> bool:
        return all(type(p) is nn.Linear for p in (self.up_proj, self.down_proj)) and \
            self.up_proj.weight.device.type != "meta"

    @torch.no_grad()
    def column_major_down(self) -> torch.Tensor:
        """down_proj's weight transposed [intermediate, hidden], contiguous: lays it out once, in place."""
        w = self.down_proj.weight
        if w.stride(0) != 1:
            w.data = w.data.t().contiguous().t()
        return w.t()

    def _sparse(self, x: torch.Tensor) -> torch.Tensor:
        g, keep = self.gate(x)
        idx = keep.any(0).nonzero().squeeze(1)
        h = (g[:, idx] * keep[:, idx]) * gather_dot(self.up_proj.weight, idx, x).to(g.dtype)
        if self.up_proj.bias is not None:
            h = h + (g[:, idx] * keep[:, idx]) * self.up_proj.bias[idx]
        y = gather_axpy(self.column_major_down(), idx, h).to(x.dtype)
        if self.down_proj.bias is not None:
            y = y + self.down_proj.bias
        return y

    def extra_repr(self) -> str:
        return f"threshold={float(self.threshold):.4g}, max_sparse_tokens={self.max_sparse_tokens}"
