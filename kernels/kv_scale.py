"""Storage of the KV quantizer's per-group scale: "fp16" (KIVI's and GEAR's own), or "log8": one byte u per group,
scale = 2^(u/8 - 17) (steps of 9%, from 7.6e-6 to 3.0e4: group ranges up to 9e4 at 2 bits, far beyond what keys
and values reach), chosen per group by a small search. It halves the scale's cost (0.125 bit per element at groups
of 64; the zero stays fp16, because keys carry per-channel offsets many times their group's range, which an 8-bit
zero would blur).

The search: among the three 8-bit steps nearest the min-max step (the largest at or below it, the next one up, and
one further below: the two smaller ones clip the group's extremes a little), with the zero centred on the group's
range (a constant group keeps its value as the zero, exactly), the step whose reconstruction has the least squared
error over the group's quantized entries (outliers, stored exactly, excluded). On builtin:small's keys and values
this lowers the reconstruction error below fp16 min-max's (by 23-26% at 2 bits, 17-18% at 3, 6% at 4; 11-12% above
it at 8 bits: `benchmarks/kv_cache.py --scale-error`), and the cache's KL on the reference model is lower at 2-3
bits and the same within noise at 4 (BENCHMARKS.md, "One-byte scales"). Compressing costs 1.4-1.9x the fp16
quantizer's CPU time (three candidate passes; `benchmarks/kv_serving.py`'s compress_ms)."""
from __future__ import annotations

import functools

import torch

SCALE_FORMATS = ("fp16", "log8")
_STEPS_PER_OCTAVE, _BIAS = 8, 17  # scale = 2^(u / 8 - 17), u in 0..255


@functools.lru_cache(maxsize=None)
def log8_table(device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """float32 [256]: the scale each byte stands for (computed in float64, rounded once)."""
    u = torch.arange(256, dtype=torch.float64)
    return torch.exp2(u / _STEPS_PER_OCTAVE - _BIAS).float().to(device)


def scale_values(scale: torch.Tensor) -> torch.Tensor:
    """Stored scales (fp16, or log8 bytes) -> float32, same shape."""
    if scale.dtype == torch.uint8:
        return log8_table(scale.device)[scale.long()]
    return scale.float()


def search_log8(xg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, levels: int,
                keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups xg [..., G] (float32) with their min lo and max hi [...] over the entries to quantize (`keep`, a bool
    mask like xg, marks them; None: all): (u uint8 [...], zero fp16 [...], codes float32 [..., G]) of the searched
    step. The codes and the reconstruction codes * table[u] + zero are what the stored tensors reproduce."""
    table = log8_table(xg.device)
    span = (hi - lo).clamp_min(0) / levels
    u0 = torch.floor(_STEPS_PER_OCTAVE * torch.log2(span.clamp_min(2.0 ** -_BIAS))) + _STEPS_PER_OCTAVE * _BIAS
    u0 = torch.nan_to_num(u0, nan=255.0)  # a NaN in the group: garbage in, as with fp16 scales, but no bad index
    mid = (lo + hi) / 2
    constant = span == 0  # such a group is exact with zero = its value (fp16 min-max's zero)
    best_err = best_u = best_zero = None
    for du in (0, 1, -1):  # the largest at or below the min-max step, the next one up, one further below
        u = (u0 + du).clamp(0, 255).long()
        s = table[u]
        zero16 = torch.where(constant, lo, mid - levels * s / 2).half()
        x_hat = group_codes(xg, s, zero16, levels).mul_(s.unsqueeze(-1)).add_(zero16.float().unsqueeze(-1))
        err = x_hat.sub_(xg).square_()
        if keep is not None:
            err.masked_fill_(~keep, 0.0)
        err = err.sum(-1)
        if best_err is None:
            best_err, best_u, best_zero = err, u, zero16
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_u, best_zero = torch.where(better, u, best_u), torch.where(better, zero16, best_zero)
    return best_u.to(torch.uint8), best_zero, group_codes(xg, table[best_u], best_zero, levels)


def group_codes(xg: torch.Tensor, s: torch.Tensor, zero16: torch.Tensor, levels: int) -> torch.Tensor:
    """floor((x - zero) / s + 0.5) clamped to the codes, for groups xg [..., G] with s, zero16 [...] (every scale
    format's rounding rule)."""
    return (xg - zero16.float().unsqueeze(-1)).div_(s.unsqueeze(-1)).add_(0.5).floor_().clamp_(0, levels)
