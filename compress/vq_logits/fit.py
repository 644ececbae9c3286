"""Closed-form per-token scale and bias: logit_i(h) = s_i * (h . c_{m(i)}) + b_i, least squares against the dense
logits h . w_i over calibration hidden states. The math only.

For each token i this is a 1-D linear regression of z_i = H w_i on g_i = H c_{m(i)} with intercept, so it needs
five sums over positions (sum g, sum g^2, sum z, sum g z, count), accumulated in chunks of positions in float64."""
from __future__ import annotations

import torch


@torch.no_grad()
def fit_scale_bias(hidden: torch.Tensor, dense_weight: torch.Tensor, table: torch.Tensor, codes: torch.Tensor, *,
                   chunk: int = 1024, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares (scales [V], biases [V]) for hidden [N, d], dense rows [V, d], code table [K', d], codes [V].

    `ridge` (relative to sum g^2) keeps the 2x2 solve stable for a token whose code logit barely varies."""
    codes = codes.long()
    v = dense_weight.shape[0]
    sg = torch.zeros(v, dtype=torch.float64)
    sgg, sz, sgz = torch.zeros_like(sg), torch.zeros_like(sg), torch.zeros_like(sg)
    w, t = dense_weight.float(), table.float()
    n = 0
    for i in range(0, hidden.shape[0], chunk):
        h = hidden[i:i + chunk].float()
        z = h @ w.t()                             # [n, V] dense logits
        g = (h @ t.t()).index_select(1, codes)    # [n, V] code logit of each token
        sg += g.sum(0, dtype=torch.float64)
        sgg += (g * g).sum(0, dtype=torch.float64)
        sz += z.sum(0, dtype=torch.float64)
        sgz += (g * z).sum(0, dtype=torch.float64)
        n += h.shape[0]
    var_g = sgg - sg * sg / n                      # n * variance of g
    cov = sgz - sg * sz / n                        # n * covariance of g and z
    scales = cov / (var_g + ridge * sgg.clamp_min(1e-30))
    biases = (sz - scales * sg) / n
    return scales.float(), biases.float()


@torch.no_grad()
def logit_mse(hidden: torch.Tensor, dense_weight: torch.Tensor, head_logits) -> float:
    """Mean squared logit error of `head_logits(h)` against h . W^T (a fit diagnostic)."""
    z = hidden.float() @ dense_weight.float().t()
    return float(((head_logits(hidden) - z) ** 2).mean())
