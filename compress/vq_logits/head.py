"""`VQLogitsHead`: the output head as a K x d codebook, a token -> code map, per-token scale and bias, and an
optional shortlist of tokens kept as exact dense rows. A drop-in for the `nn.Linear` lm_head (hidden -> [.., V])."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import vq_logits as kernels


def smallest_int_dtype(max_value: int) -> torch.dtype:
    """The narrowest torch integer type (that safetensors stores) holding 0..max_value."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if max_value <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


class VQLogitsHead(nn.Module):
    """logit_v(h) = scales[v] * (h . table[codes[v]]) + biases[v], table = [codebook (K rows); shortlist rows (S)].

    Shortlist token shortlist_ids[j] has code K + j, scale 1 and bias 0: its logit is the exact dense h . w.
    Parameters: codebook, scales, biases, shortlist_weight (frozen). Buffers: codes, shortlist_ids (integers, in
    the smallest type that holds them)."""

    def __init__(self, vocab_size: int, hidden_size: int, num_codes: int, shortlist_size: int = 0, *,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.in_features, self.out_features = hidden_size, vocab_size
        self.num_codes, self.shortlist_size = num_codes, shortlist_size
        f = {"dtype": dtype or torch.get_default_dtype(), "device": device}
        self.codebook = nn.Parameter(torch.zeros(num_codes, hidden_size, **f))
        self.scales = nn.Parameter(torch.ones(vocab_size, **f))
        self.biases = nn.Parameter(torch.zeros(vocab_size, **f))
        self.shortlist_weight = nn.Parameter(torch.zeros(shortlist_size, hidden_size, **f), requires_grad=False)
        self.register_buffer("codes", torch.zeros(vocab_size, dtype=smallest_int_dtype(num_codes + shortlist_size - 1),
                                                  device=device))
        self.register_buffer("shortlist_ids", torch.zeros(shortlist_size, dtype=smallest_int_dtype(vocab_size - 1),
                                                          device=device))

    @classmethod
    def from_parts(cls, codebook: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor | None = None,
                   biases: torch.Tensor | None = None, shortlist_ids: torch.Tensor | None = None,
                   shortlist_weight: torch.Tensor | None = None) -> "VQLogitsHead":
        """Build from fitted pieces. `codes` [V] index the codebook (< K); shortlist tokens are remapped here."""
        k, d = codebook.shape
        v = codes.shape[0]
        s = 0 if shortlist_ids is None else shortlist_ids.numel()
        head = cls(v, d, k, s, dtype=codebook.dtype, device=codebook.device)
        with torch.no_grad():
            head.codebook.copy_(codebook)
            full_codes = codes.long().clone()
            if scales is not None:
                head.scales.copy_(scales)
            if biases is not None:
                head.biases.copy_(biases)
            if s:
                ids = shortlist_ids.long()
                full_codes[ids] = k + torch.arange(s, device=ids.device)
                head.shortlist_ids.copy_(ids)
                head.shortlist_weight.copy_(shortlist_weight)
            head.codes.copy_(full_codes)
            head.reset_shortlist()
        return head

    # what training the head in full (recover's train_modules) must leave alone, and restore after each step
    frozen_parameters = ("shortlist_weight",)

    def after_training_step(self) -> None:
        self.reset_shortlist()

    @torch.no_grad()
    def reset_shortlist(self) -> None:
        """Shortlist tokens use their exact row unchanged: scale 1, bias 0 (after fitting or a distillation step)."""
        if self.shortlist_size:
            from ..recover.master_weights import stored  # (recover may train a float32 original of each)

            ids = self.shortlist_ids.long()
            stored(self, "scales")[ids] = 1.0
            stored(self, "biases")[ids] = 0.0

    def parts(self) -> tuple:
        return self.codebook, self.codes, self.scales, self.biases, self.shortlist_weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [..., V] logits (Triton on CUDA, torch reference elsewhere). When autograd needs the graph
        (training through the head), the differentiable torch reference runs: the Triton kernels have no backward."""
        trainable = hidden.requires_grad or any(p.requires_grad for p in (self.codebook, self.scales, self.biases))
        if torch.is_grad_enabled() and trainable:
            return self.reference_logits(hidden)
        return kernels.vq_logits(hidden.to(self.codebook.dtype), *self.parts())

    def reference_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The torch computation, differentiable in codebook, scales and biases (used by distillation)."""
        return kernels.vq_logits_reference(hidden.to(self.codebook.dtype), *self.parts())

    def logsumexp(self, hidden: torch.Tensor) -> torch.Tensor:
        """log-sum-exp over the vocabulary without materializing the V logits (on CUDA)."""
        return kernels.vq_logsumexp(hidden.to(self.codebook.dtype), *self.parts())

    def topk(self, hidden: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, token ids) of the k largest logits without materializing the V logits (on CUDA)."""
        c, codes, s, b, sw = self.parts()
        return kernels.vq_topk(hidden.to(c.dtype), c, codes, s, b, k, sw)

    def num_float_parameters(self) -> int:
        """Learned/stored floating-point numbers: codebook + shortlist rows + scales + biases."""
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return (f"vocab_size={self.out_features}, hidden_size={self.in_features}, num_codes={self.num_codes}, "
                f"shortlist_size={self.shortlist_size}, codes_dtype={self.codes.dtype}")
