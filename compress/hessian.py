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

    def finite(self) -> bool:
        return bool(torch.isfinite(self.hessian).all())


def check_calibration_inputs(accs: dict, label: str, without_data: str) -> None:
    """Each module's input statistics (HessianAccumulator, wanda's InputNormAccumulator) came from some tokens and are
    finite. NaN or inf inputs (float16 activations past 65504) made masks of NaN scores, and a Hessian GPTQ fell
    back from with a note blaming its factorization."""
    from .errors import CalibrationError, ConfigError

    for name, acc in accs.items():
        if acc.tokens == 0:
            raise ConfigError(f"{label}: {name} saw no calibration inputs (it is not called in the forward pass); "
                              f"add it to `ignore` or use {without_data}")
        if not acc.finite():
            raise CalibrationError(f"{label}: {name}'s calibration inputs hold NaN or inf (activations overflowing "
                                   "the model's dtype, float16 most often): load the model as float32 or bfloat16 "
                                   "(--dtype)")


# the Linears a Llama, Mistral or Qwen layer feeds one tensor (and vLLM fuses into one layer: qkv_proj, gate_up_proj)
SAME_INPUT_LINEARS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def input_statistics(step, modules: dict, make) -> dict:
    """{name: accumulator} of `modules`' inputs over the calibration batches of `step` (`make(module)` builds one), in
    `modules`' order: Linears fed the same tensor share one accumulator, which reads it once. The q/k/v projections
    (gate/up) of a Llama, Mistral or Qwen layer read one tensor: SparseGPT and GPTQ summed three identical d x d
    Hessians (two), held all at once. The passes read a shared Hessian only through a copy (gptq_quantize and
    sparsegpt_prune clone it). Where the calls do not pair the same way throughout (a module skipped in a batch,
    called twice, or first called late), the batches are read again with one accumulator per module; a module never
    called gets an empty one (the passes' check names it)."""
    shared = _SharedInputs(modules, make)
    try:
        step.run(shared.hooks())
    finally:
        shared.last = None  # (the last input: one batch's hidden states)
    if shared.consistent():
        return {n: shared.accs[n] if n in shared.accs else make(m) for n, m in modules.items()}
    shared = None  # (its accumulators go before the per-module ones are made: not both sets at once)
    accs = {n: make(m) for n, m in modules.items()}
    step.run({m: _adding_to(accs[n]) for n, m in modules.items()})
    return accs


def _adding_to(acc):
    def hook(module, inputs, output):
        acc.add(inputs[0])
    return hook


class _SharedInputs:
    """A module follows another when, on its first call, it reads the very tensor object the previous hooked call
    read (HF modeling passes `hidden_states` to q, k and v). `consistent`: every follower read each of its leader's
    inputs exactly once, in the call right after it (or after another follower of it), and nothing else."""

    def __init__(self, modules: dict, make):
        self.modules, self.make = modules, make
        self.accs: dict = {}
        self.leader: dict[str, str] = {}  # follower -> the module whose accumulator it shares
        self.adds: dict[str, int] = {}  # leader -> inputs it added
        self.read: dict[str, int] = {}  # follower -> the leader's add it read last (1-based)
        self.reads: dict[str, int] = {}  # follower -> calls
        self.last: tuple | None = None  # (input tensor, its reader's leader) of the latest hooked call
        self.paired = True

    def hooks(self) -> dict:
        return {m: self._hook(n) for n, m in self.modules.items()}

    def consistent(self) -> bool:
        return self.paired and all(self.read[f] == self.reads[f] == self.adds[lead] for f, lead in self.leader.items())

    def _hook(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0]
            same = self.last is not None and x is self.last[0]
            if name not in self.accs:
                if same:
                    self.leader[name] = self.last[1]
                    self.accs[name] = self.accs[self.last[1]]
                else:
                    self.accs[name] = self.make(module)
            lead = self.leader.get(name, name)
            if lead == name:
                self.accs[name].add(x)
                self.adds[name] = self.adds.get(name, 0) + 1
            else:
                self.reads[name] = self.reads.get(name, 0) + 1
                if same and self.last[1] == lead and self.read.get(name, 0) < self.adds[lead]:
                    self.read[name] = self.adds[lead]  # the leader's latest input, read once
                else:
                    self.paired = False  # (read again, one accumulator each)
            self.last = (x, lead)
        return hook


def mark_dead_inputs(h: torch.Tensor) -> str | None:
    """In place: input features that were always zero in calibration (H_jj = 0) get H_jj = the mean of the live
    diagonal, so H becomes factorizable; returns a note when there were any.

    Their weights are kept. The reference GPTQ/SparseGPT code zeroes them (they never mattered on the calibration
    text), but a ReLU-style input dead on the calibration text fires on other text: a layer with 64 of 512 inputs
    dead, GPTQ-8 output MSE on other text 1.3e-2 with them zeroed, 3.5e-6 kept (rounding to nearest: 4.3e-6),
    and SparseGPT's extra zeros went unreported. With no off-diagonal terms such a column is rounded (or pruned by
    magnitude, weighted like an average input) and passes no error on."""
    diag = torch.diagonal(h)
    dead = diag == 0
    if not bool(dead.any()):
        return None
    live = diag[~dead]
    h[dead, dead] = float(live.mean()) if live.numel() and bool(torch.isfinite(live).all()) else 1.0
    return f"{int(dead.sum())} input features were always zero in calibration (their weights kept)"


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
