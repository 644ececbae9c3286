"""The VQ head's fit and distillation in the dtypes and corners users reach: a half-precision head distils as a
float32 one does; tokens with no probability anywhere get a finite fit; a stage that fits the calibration text
worse than the one before it is not kept; a non-finite head is never written; training the head in full (recover's
train_modules) leaves its exact shortlist rows exact."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compress.errors import CompressError
from compress.vq_logits import pass_ as vq_pass
from compress.vq_logits.distill import distill_head, kl_dense_to_head
from compress.vq_logits.fit import fit_scale_bias
from compress.vq_logits.head import VQLogitsHead
from compress.vq_logits.pass_ import VQLogits, build_vq_head, kept_stage


def _problem(v=512, d=32, n=1024, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, d, generator=g)
    hidden = torch.randn(n, d, generator=g) * 2
    codebook = F.normalize(torch.randn(k, d, generator=g), dim=1) * w.norm(dim=1).mean()
    codes = (F.normalize(w, dim=1) @ codebook.t()).argmax(1)
    return w, hidden, codebook, codes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_head_distils_as_a_float32_one(dtype):
    w, hidden, codebook, codes = _problem()
    heads = {}
    for dt in (torch.float32, dtype):
        head = VQLogitsHead.from_parts(codebook, codes).to(dt)
        # before: Adam on float16 parameters divided 0 by 0 (its eps is 0 there): the whole head NaN; on bfloat16
        # most steps rounded away
        distill_head(head, hidden, w, steps=60, lr=3e-3, batch_size=256, progress=False)
        assert head.codebook.dtype == dt and all(torch.isfinite(p).all() for p in head.parameters())
        heads[dt] = head
    before = kl_dense_to_head(hidden, w, VQLogitsHead.from_parts(codebook, codes))
    ours, reference = (kl_dense_to_head(hidden, w, heads[dt].float()) for dt in (dtype, torch.float32))
    assert ours < 0.9 * before
    assert ours == pytest.approx(reference, rel=0.02)  # float32 training, rounded to `dtype` at the end
    moved = (heads[dtype].scales != 1).float().mean()
    assert moved > 0.9


@pytest.mark.parametrize("share", [0.2, 1.0])
def test_tokens_with_no_probability_anywhere_get_a_finite_fit(share):
    w, hidden, codebook, codes = _problem(seed=1)
    hidden = hidden.abs()
    w[-10:] = -40.0  # logits ~ -2,000 everywhere: softmax gives them exactly 0 at every position
    assert (torch.softmax(hidden @ w.t(), -1)[:, -10:] == 0).all()
    scales, biases = fit_scale_bias(hidden, w, codebook, codes, weighting="probability", share=share)
    # before: share / 0 overflowed float32 to inf, and 0 * inf made these scales and biases NaN
    assert torch.isfinite(scales).all() and torch.isfinite(biases).all()
    # such a token is fitted uniformly over the positions: as the uniform weighting fits it
    uniform = fit_scale_bias(hidden, w, codebook, codes, weighting="uniform")
    assert torch.allclose(scales[-10:], uniform[0][-10:], rtol=1e-4, atol=1e-5)
    assert torch.allclose(biases[-10:], uniform[1][-10:], rtol=1e-4, atol=1e-3)


def test_a_stage_fitting_the_calibration_text_worse_is_not_kept():
    heads = [(name, object()) for name in ("copy", "scale_bias", "distill")]
    details = {"calibration_kl_copy": 6.5, "calibration_kl_scale_bias": 7.9, "calibration_kl_distill": 7.0}
    assert kept_stage(heads, details)[0] == "copy"
    details["calibration_kl_distill"] = 6.5  # equal: the later one
    assert kept_stage(heads, details)[0] == "distill"
    assert kept_stage(heads[:1], {})[0] == "copy"  # no calibration KL (a plain copy without calibration)


def test_a_non_finite_stage_is_an_error_not_a_head(monkeypatch):
    w, hidden, _, _ = _problem(seed=2)

    def broken(*args, **kwargs):
        scales = torch.ones(w.shape[0])
        scales[3] = float("nan")
        return scales, torch.zeros(w.shape[0])

    monkeypatch.setattr(vq_pass, "fit_scale_bias", broken)
    config = VQLogits.Config(num_codes=32, distill=False)
    with pytest.raises(CompressError, match="the scale_bias stage left non-finite values in scales"):
        build_vq_head(w, hidden, torch.zeros(w.shape[0]), config, progress=False)


def test_training_the_head_in_full_keeps_its_shortlist_exact(reference_model, reference_tokenizer):
    import copy

    from compress import api
    from compress.recipe import Recipe

    recipe = Recipe.from_text("""
model: builtin:tiny
calibration: {source: builtin:calibration, num_samples: 8, seq_len: 64}
passes:
  - vq_logits: {num_codes: 256, shortlist: 16, distill: false}
  - recover: {max_tokens: 1024, batch_size: 2, seq_len: 64, lr: 0.01, train_modules: ['lm_head']}
""")
    model, report = api.apply(copy.deepcopy(reference_model), recipe, tokenizer=reference_tokenizer, progress=False)
    head = model.lm_head
    ids = head.shortlist_ids.long()
    dense = reference_model.lm_head.weight
    # before: recover trained the frozen shortlist rows too, and their scales and biases drifted from 1 and 0
    assert torch.equal(head.shortlist_weight, dense[ids])
    assert torch.equal(head.scales[ids], torch.ones(16)) and torch.equal(head.biases[ids], torch.zeros(16))
    recovered = report.passes[-1]
    assert recovered.details["fully_trained_parameters"] == head.codebook.numel() + 2 * dense.shape[0]
    # and what it does train moved
    assert not torch.equal(head.scales, torch.ones_like(head.scales))


def test_a_second_codebook_over_the_first_is_refused_by_name(reference_model):
    import copy

    from compress import api
    from compress.errors import UnsupportedModelError

    def plain():
        return VQLogits(VQLogits.Config(num_codes=64, scale_bias=False, distill=False, weighting="uniform"))

    model, _ = api.apply(copy.deepcopy(reference_model), [plain()], progress=False)
    with pytest.raises(UnsupportedModelError, match="lm_head is a codebook head already"):
        api.apply(model, [plain()], progress=False)


def test_the_pass_keeps_the_stage_that_fits_the_calibration_text_best(reference_model, reference_tokenizer):
    """A sharply peaked head (builtin:tiny's x12, logits spanning ~300) fitted on 256 positions: the scale/bias fit
    raised the calibration KL (6.5 -> 8.0) and was kept all the same."""
    import copy

    from compress import api
    from compress.cli_format import _found

    model = copy.deepcopy(reference_model).float()
    with torch.no_grad():
        model.lm_head.weight.mul_(12)
    calibration = {"source": "builtin:calibration", "num_samples": 4, "seq_len": 64}
    _, report = api.apply(model, [VQLogits(VQLogits.Config(num_codes=512, distill=False))], calibration=calibration,
                          tokenizer=reference_tokenizer, progress=False)
    details = report.passes[0].details
    assert details["calibration_kl_scale_bias"] > details["calibration_kl_copy"]
    assert details["kept_stage"] == "copy"
    head = model.lm_head  # the copy's: every scale 1, every bias 0
    assert torch.equal(head.scales, torch.ones_like(head.scales)) and not head.biases.any()
    assert _found(report.passes[0].to_dict()).endswith("; kept the copy head, which fits the calibration text best")

