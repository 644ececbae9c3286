"""Parameters trained in full beside LoRA (`train_modules`) in a half-precision model: the optimizer updates float32
originals (compress/recover/master_weights.py), as it does in a float32 model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import compress
from compress.errors import CompressError
from compress.recover.master_weights import float32_originals

CALIBRATION = {"source": "builtin:calibration", "num_samples": 4, "seq_len": 32}


def _norms(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if n.endswith("layernorm.weight")}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_norms_trained_in_full_move_in_half_precision_as_in_float32(dtype, reference_tokenizer):
    """Before: AdamW ran on the half-precision tensors themselves; in float16 norm weights moved by 11 where float32
    moved 0.014 (and a VQ head went NaN), in bfloat16 not one of 3,072 moved."""
    steps, lr, moved = 8, 1e-3, {}
    for each in ("float32", dtype):
        model = compress.load("builtin:tiny", dtype=each)
        before = _norms(model)
        recover = compress.get_pass("recover")(max_tokens=8 * 2 * 32, batch_size=2, seq_len=32, lr=lr,
                                               train_modules=["re:.*layernorm$"])
        compress.apply(model, [recover], calibration=CALIBRATION, tokenizer=reference_tokenizer, progress=False)
        after = _norms(model)
        assert all(p.dtype == getattr(torch, each) and type(p) is nn.Parameter
                   for n, p in model.named_parameters() if n.endswith("layernorm.weight"))
        assert not any("parametrizations" in n for n, _ in model.named_parameters())
        moved[each] = torch.cat([(after[n] - before[n]).flatten() for n in before])
    half, full = moved[dtype], moved["float32"]
    assert torch.isfinite(half).all()
    assert half.abs().max() <= 1.5 * steps * lr  # Adam moves an entry about lr a step at most
    assert (half != 0).float().mean() > 0.3  # (bfloat16 before: none moved; steps below an ulp round away)
    assert torch.corrcoef(torch.stack([half, full]))[0, 1] > 0.8  # the same training, rounded to the dtype


def test_a_non_finite_trained_value_is_an_error_and_the_module_gets_its_dtype_back():
    layer = nn.Linear(4, 4).half()
    model = nn.Sequential(layer)
    with pytest.raises(CompressError, match="training left non-finite values in 0.weight"):
        with float32_originals(model, {"0.weight": layer.weight, "0.bias": layer.bias}) as trained:
            assert trained["0.weight"].dtype == torch.float32 and model[0].weight.dtype == torch.float16
            with torch.no_grad():
                trained["0.weight"][0, 0] = float("nan")
    assert type(model[0].weight) is nn.Parameter and model[0].weight.dtype == torch.float16
    assert not hasattr(model[0], "parametrizations")
