"""Distillation of the VQ head against the dense head: minimize KL(dense || vq) of next-token distributions on
calibration hidden states, training codebook, scales and biases (the backbone is not involved: the head's input
is a fixed set of hidden states). Plain torch Adam, a step and a wall-clock budget, a progress bar."""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from ..progress import progress_bar
from .fit import positions_per_block
from .head import VQLogitsHead


def kl_dense_to_head(hidden: torch.Tensor, dense_weight: torch.Tensor, head: VQLogitsHead,
                     chunk: int | None = None) -> float:
    """Mean over positions of KL(softmax(h W^T) || softmax(head(h))), without gradients; blocks of positions sized
    by the vocabulary (fit.positions_per_block), the float32 head made once (it was made again for every block)."""
    total = 0.0
    chunk = chunk or positions_per_block(dense_weight.shape[0])
    with torch.no_grad():
        w = dense_weight.float()
        for i in range(0, hidden.shape[0], chunk):
            h = hidden[i:i + chunk].float()
            t = F.log_softmax(h @ w.t(), dim=-1)
            s = F.log_softmax(head.reference_logits(h).float(), dim=-1)
            total += float(F.kl_div(s, t, log_target=True, reduction="sum"))
    return total / hidden.shape[0]


def distill_head(head: VQLogitsHead, hidden: torch.Tensor, dense_weight: torch.Tensor, *, steps: int = 300,
                 max_seconds: float = 120.0, lr: float = 1e-3, batch_size: int = 512, seed: int = 0,
                 progress: bool = True) -> dict:
    """Fine-tune `head` in place on random minibatches of `hidden` [N, d]; stops at `steps` or `max_seconds`.

    Adam with a cosine-decayed learning rate; shortlist tokens stay exact (their scale/bias are reset each step).
    A half-precision head trains a float32 copy, copied back at the end: Adam's eps (1e-8) is 0 in float16, which
    made the first step 0/0 (the whole head NaN), and in bfloat16 most steps were below half an ulp of the scales
    (63% of them never moved)."""
    trained = head if head.codebook.dtype == torch.float32 else copy.deepcopy(head).float()
    stats = _adam_steps(trained, hidden, dense_weight, steps, max_seconds, lr, batch_size, seed, progress)
    if trained is not head:
        with torch.no_grad():
            for name in ("codebook", "scales", "biases"):
                getattr(head, name).copy_(getattr(trained, name))
    return stats


def _adam_steps(head: VQLogitsHead, hidden, dense_weight, steps, max_seconds, lr, batch_size, seed,
                progress) -> dict:
    params = [head.codebook, head.scales, head.biases]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + torch.cos(torch.tensor(s / max(steps, 1) * torch.pi)).item()))
    gen = torch.Generator().manual_seed(seed)
    w = dense_weight.detach().float()
    t0 = time.perf_counter()
    done, last_loss = 0, float("nan")
    with torch.enable_grad():
        for _ in progress_bar(range(steps), description="vq_logits: distilling", enabled=progress):
            if time.perf_counter() - t0 > max_seconds:
                break
            idx = torch.randint(0, hidden.shape[0], (min(batch_size, hidden.shape[0]),), generator=gen)
            h = hidden[idx].float()
            with torch.no_grad():
                target = F.log_softmax(h @ w.t(), dim=-1)
            logp = F.log_softmax(head.reference_logits(h).float(), dim=-1)
            loss = F.kl_div(logp, target, log_target=True, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            head.reset_shortlist()
            done += 1
            last_loss = float(loss.detach())
    return {"steps": done, "seconds": round(time.perf_counter() - t0, 2), "last_batch_kl": last_loss, "lr": lr}
