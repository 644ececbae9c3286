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


def test_a_vq_heads_shortlist_stays_exact_when_its_float32_original_trains(reference_tokenizer):
    """Its after-step reset wrote into the rounded copy a parametrized `scales` reads as, and was lost: the shortlist
    scales of a bfloat16 head drifted to 0.97-1.02 (exactly 1 in float32)."""
    from compress.vq_logits import VQLogits

    model = compress.load("builtin:tiny", dtype="bfloat16")
    dense = model.lm_head.weight.detach().clone()
    recover = compress.get_pass("recover")(max_tokens=4 * 2 * 32, batch_size=2, seq_len=32, lr=1e-2,
                                           train_modules=["lm_head"])
    compress.apply(model, [VQLogits(VQLogits.Config(num_codes=64, shortlist=16, distill=False)), recover],
                   calibration=CALIBRATION, tokenizer=reference_tokenizer, progress=False)
    head = model.lm_head
    ids = head.shortlist_ids.long()
    assert head.scales.dtype == torch.bfloat16
    assert torch.equal(head.scales[ids], torch.ones(16, dtype=torch.bfloat16)) and not head.biases[ids].any()
    assert torch.equal(head.shortlist_weight, dense[ids])
    assert (head.scales != 1).float().mean() > 0.5  # the rest trained


def test_a_tied_parameter_trained_in_full_is_said_to_stay_in_half_precision():
    embed = nn.Embedding(8, 4).half()
    head = nn.Linear(4, 8, bias=False).half()
    head.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "head": head})
    notes: list[str] = []
    with float32_originals(model, {"head.weight": head.weight}, notes) as trained:
        assert trained["head.weight"] is embed.weight and head.weight is embed.weight  # still tied
    assert notes and notes[0].startswith("head.weight is shared with another module (tied): trained in float16")


def test_the_module_keeps_its_parameter_object_and_a_value_past_float16_is_an_error():
    layer = nn.Linear(4, 4).half()
    weight = layer.weight
    with float32_originals(nn.Sequential(layer), {"0.weight": weight}) as trained:
        with torch.no_grad():
            trained["0.weight"].add_(0.5)
    assert layer.weight is weight and weight.dtype == torch.float16  # the same object (others may hold it)
    with pytest.raises(CompressError, match="non-finite values in 0.weight"):
        with float32_originals(nn.Sequential(layer), {"0.weight": weight}) as trained:
            with torch.no_grad():
                trained["0.weight"][0, 0] = 1e6  # finite in float32, inf in the module's float16
