"""Second-order statistics of a Linear layer's inputs, shared by the OBS-style passes (SparseGPT pruning, GPTQ
quantization): H = 2/n sum_t x_t x_t^T accumulated over calibration tokens, the dampened inverse's Cholesky factor,
and the treatment of input features that never fire."""
from __future__ import annotations

import functools
import math
import threading

import torch

# torch's thread count is shared beyond one Python thread (its intra-op pool, MKL's): a pinned section in one thread
# could change it under another's (two applies at once), and a restore leave the other's pin in place
_PINNED = threading.RLock()


def thread_independent(fn):
    """Run `fn` on one CPU thread: torch's CPU Cholesky and matrix products split their sums by thread count, so the
    OBS updates (SparseGPT's weights and masks at near ties, GPTQ's codes: 4.5% of int4 codes by the sixth layer of
    builtin:tiny) would otherwise change with torch.get_num_threads(). The calibration forwards keep every thread;
    pinned sections of concurrent calls run one at a time."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _PINNED:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return fn(*args, **kwargs)
            finally:
                torch.set_num_threads(threads)
    return wrapper


class HessianAccumulator:
    """H = 2/n sum_t x_t x_t^T over calibration tokens, accumulated in float32 as a running mean."""

    def __init__(self, in_features: int, device) -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        self.hessian *= self.tokens / (self.tokens + n)
        self.tokens += n
        x = x * math.sqrt(2.0 / self.tokens)
        self.hessian += x.t() @ x


def input_hook(acc):
    """A forward hook feeding a module's input to `acc.add` (for `LayerStep.run`)."""
    def hook(module, inputs, output):
        acc.add(inputs[0])
    return hook


def drop_dead_inputs(w: torch.Tensor, h: torch.Tensor) -> str | None:
    """In place: input features that were always zero (H_jj = 0) get H_jj = 1 and zero weights (they never matter),
    so H becomes factorizable. Returns a note when there were any."""
    dead = torch.diagonal(h) == 0
    if not bool(dead.any()):
        return None
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return f"{int(dead.sum())} input features were always zero"


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float, max_retries: int = 4):
    """Upper Cholesky factor of (H + damp I)^-1, multiplying the dampening by 10 while H is not positive definite.

    Returns (factor or None, relative dampening used, retries)."""
    h = hessian.float()
    diag_mean = float(torch.diagonal(h).mean())
    if not math.isfinite(diag_mean) or diag_mean <= 0:
        return None, dampening, 0
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    damp = dampening
    for retry in range(max_retries + 1):
        chol, info = torch.linalg.cholesky_ex(h + damp * diag_mean * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper, damp, retry
        damp *= 10.0
    return None, damp / 10.0, max_retries
