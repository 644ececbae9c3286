"""VQ-Logits: the output head as a codebook with a token -> code map, per-token scale/bias, optional shortlist
and distillation. Math in kmeans.py, fit.py, distill.py; the module in head.py; the pass in pass_.py."""
from .head import VQLogitsHead
from .pass_ import VQLogits

__all__ = ["VQLogits", "VQLogitsHead"]
