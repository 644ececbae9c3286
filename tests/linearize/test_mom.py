"""Mixture-of-Memories (variant mom): initialized from the pretrained projections, the router's load-balancing loss
is differentiable and reaches the recover pass, checkpoints reload with compress.load and generate the same.
(Full forward == prefill + cached decode, left padding, cache bytes: test_models.py, variant "mom".)"""
import pytest
import torch

import compress
from compress.errors import CompressError
from compress.linearize import LinearizeSettings, MixtureOfMemoriesAttention, linearize_model
from compress.linearize.mom import load_balance_loss, top_k_routing
from compress.recover.training import take_aux_losses

CALIBRATION = compress.CalibrationSpec(source="builtin:calibration", num_samples=4, seq_len=32)
MOM = LinearizeSettings(variant="mom", num_memories=4, top_k=2, chunk_size=8)


def test_built_from_the_pretrained_projections_with_a_small_router(tiny_model):
    original = tiny_model("qwen3")
    model = tiny_model("qwen3")
    linearize_model(model, MOM)
    attn = model.model.layers[1].self_attn
    assert isinstance(attn, MixtureOfMemoriesAttention)
    assert attn.k_proj is model.model.layers[1].self_attn.k_proj and attn.k_norm is not None
    old, new = original.state_dict(), model.state_dict()
    added = set(new) - set(old)
    assert added == {f"model.layers.{i}.self_attn.{n}" for i in range(3)
                     for n in ("router.weight", "beta_proj.weight", "beta_proj.bias")}
    assert all(torch.equal(new[k], v) for k, v in old.items())  # nothing pretrained changed
    assert 0 < attn.router.weight.std() < 0.05 and attn.router.weight.shape == (4, 64)
    assert torch.equal(attn.beta_proj.weight, torch.zeros(2, 64))  # beta = 0.5 at conversion
    again = tiny_model("qwen3")
    linearize_model(again, MOM)  # deterministic conversion (router seeded per layer)
    assert torch.equal(again.model.layers[1].self_attn.router.weight, attn.router.weight)


def test_load_balance_loss_values():
    logits = torch.zeros(1, 8, 4)  # uniform probabilities: the loss is 1 whatever the choice
    _, chosen = top_k_routing(logits, 2)
    assert chosen.sum(-1).eq(2).all()
    assert load_balance_loss(logits, chosen, None).item() == pytest.approx(1.0)
    skewed = torch.tensor([[[5.0, 4.0, 0.0, 0.0]] * 6])  # every token to memories 0 and 1
    _, chosen = top_k_routing(skewed, 2)
    p = skewed.softmax(-1)[0, 0]
    assert load_balance_loss(skewed, chosen, None).item() == pytest.approx(4 * (0.5 * p[0] + 0.5 * p[1]).item())
    valid = torch.tensor([[False, False, True, True, True, True]])  # padding does not count
    mixed = skewed.clone()
    mixed[0, :2] = torch.tensor([0.0, 0.0, 5.0, 4.0])
    assert load_balance_loss(mixed, top_k_routing(mixed, 2)[1], valid).item() == pytest.approx(
        load_balance_loss(skewed, chosen, None).item())


def test_aux_loss_is_differentiable_and_only_set_in_training(tiny_model):
    model = tiny_model("llama", num_key_value_heads=4)
    linearize_model(model, MOM)
    ids = torch.randint(1, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    assert take_aux_losses(model) is None  # eval / no grad: nothing kept
    model.train()
    model(ids)
    aux = take_aux_losses(model)
    assert aux is not None and aux.item() >= 3.0 - 1e-6  # 3 layers, each >= 1 (its balanced value)
    assert take_aux_losses(model) is None  # taken: cleared
    aux.backward()
    router = model.model.layers[0].self_attn.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


@pytest.mark.parametrize("memories,shared", [(4, True), (1, False)], ids=["4+shared", "1-unshared"])
def test_checkpoint_round_trip_and_generate(tmp_path, reference_tokenizer, memories, shared):
    model = compress.load("builtin:tiny")
    ids = torch.tensor([reference_tokenizer("The Python tutorial explains")["input_ids"]])
    lin = compress.get_pass("linearize")(variant="mom", num_memories=memories, top_k=min(2, memories),
                                         shared_memory=shared, layers="every_2")
    model, report = compress.apply(model, [lin], progress=False)
    cfg = model.config
    per_layer = cfg.hidden_size * memories + cfg.hidden_size * cfg.num_key_value_heads + cfg.num_key_value_heads
    assert report.passes[0].details["new_parameters"] == 3 * per_layer
    with torch.no_grad():  # the saved router must be the trained one, not a fresh draw: perturb it (bf16-exactly)
        model.model.layers[0].self_attn.router.weight.mul_(2.0)
        model.model.layers[2].self_attn.beta_proj.bias.fill_(0.75)
    reloaded = compress.load(compress.save(model, tmp_path / "out", tokenizer=reference_tokenizer))
    kinds = [type(layer.self_attn) is MixtureOfMemoriesAttention for layer in reloaded.model.layers]
    assert kinds == [True, False] * 3
    settings = reloaded.model.layers[0].self_attn.settings
    assert (settings.num_memories, settings.shared_memory) == (memories, shared)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
        a = reloaded.generate(ids, max_new_tokens=8, do_sample=False)
        b = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)


def test_recover_trains_the_router_with_the_aux_loss(reference_model, reference_tokenizer):
    import copy

    model = copy.deepcopy(reference_model)
    passes = [compress.get_pass("linearize")(variant="mom", layers=[0]),
              compress.get_pass("recover")(seq_len=32, batch_size=2, max_tokens=2 * 64, lr=1e-2, aux_weight=0.1,
                                           train_modules=["re:.*self_attn\\.(router|beta_proj)"])]

    def snapshot(m):
        return m.model.layers[0].self_attn.router.weight.detach().clone()

    linearized, _ = compress.apply(copy.deepcopy(model), passes[:1], progress=False)
    router_before = snapshot(linearized)  # the conversion is deterministic: the same router the run starts from
    model, report = compress.apply(model, passes, calibration=CALIBRATION, tokenizer=reference_tokenizer,
                                   progress=False)
    details = report.passes[1].details
    attn = model.model.layers[0].self_attn
    assert details["fully_trained_parameters"] == sum(p.numel() for m in (attn.router, attn.beta_proj)
                                                      for p in m.parameters())
    assert details["first_aux"] >= 1.0 - 1e-6  # logged: the balanced value is 1
    assert not torch.equal(snapshot(model), router_before)  # trained in full (not LoRA)
    assert not any("lora" in n for n, _ in model.named_parameters())  # LoRA on q/k/v merged


@pytest.mark.parametrize("args,match", [
    (dict(variant="mom", num_memories=2, top_k=3), "top_k .3. cannot exceed num_memories .2."),
    (dict(variant="mom", num_memories=0), "greater than or equal to 1"),
    (dict(variant="mom", gate="gsa"), "gate gla or hgrn2, not gsa"),
])
def test_bad_arguments(args, match):
    with pytest.raises(CompressError, match=match):
        compress.get_pass("linearize")(**args)


def test_train_modules_that_overlap_lora_targets_are_refused(reference_model, reference_tokenizer):
    import copy

    passes = [compress.get_pass("linearize")(variant="mom", layers=[0]),
              compress.get_pass("recover")(seq_len=32, batch_size=2, max_tokens=64, train_modules=["re:.*self_attn"])]
    with pytest.raises(CompressError, match="overlap the LoRA targets"):
        compress.apply(copy.deepcopy(reference_model), passes, calibration=CALIBRATION, tokenizer=reference_tokenizer,
                       progress=False)


@pytest.mark.parametrize("uneven", [False, True])
def test_routed_memories_equal_identity_steps_over_every_token(uneven):
    """The routed mixture with each memory over only its gathered tokens (or, with routing so uneven that gathering
    would not pay, over every token) == the recurrence over every token with identity steps where it is not routed,
    mixed by the weights: outputs, final states and every input's gradient."""
    from compress.kernels.delta_rule import delta_rule_recurrent_reference
    from compress.linearize.mom import GATHER_MAX_FRACTION, routed_delta_rule

    gen = torch.Generator().manual_seed(0)
    b, hq, hkv, t, d, m = 2, 4, 2, 23, 8, 4

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, v = rnd(b, hq, t, d).softmax(-1).requires_grad_(), rnd(b, hkv, t, d).requires_grad_()
    k = torch.nn.functional.normalize(rnd(b, hkv, t, d), dim=-1).requires_grad_()
    g = (torch.nn.functional.logsigmoid(rnd(b, hkv, t)) / 4).requires_grad_()
    beta = torch.rand(b, hkv, t, generator=gen, dtype=torch.float64).requires_grad_()
    state = rnd(b, m, hkv, d, d).requires_grad_()
    chosen = torch.zeros(b, t, m, dtype=torch.bool).scatter(-1, torch.rand(b, t, m, generator=gen).topk(2).indices,
                                                            True)
    chosen[0, :, 3] = False  # a memory no token of row 0 is routed to: its state passes through unchanged
    chosen[1, :, 2] = uneven  # one memory takes every token of row 1: the dense layout
    assert (chosen.sum(1).max() > GATHER_MAX_FRACTION * t) == uneven
    raw_weights = torch.rand(b, t, m, generator=gen, dtype=torch.float64).requires_grad_()
    weights = raw_weights * chosen  # 0 where not routed, as top_k_routing's
    out, final = routed_delta_rule(q, k, v, g, beta, chosen, weights, state, chunk_size=8)

    refs = []
    for i in range(m):
        on = chosen[:, :, i].unsqueeze(1).to(torch.float64)  # [B, 1, T]
        refs.append(delta_rule_recurrent_reference(q, k * on.unsqueeze(-1), v, g * on, beta * on, state[:, i]))
    ref_out = sum(o * weights[:, :, i][:, None, :, None] for i, (o, _) in enumerate(refs))
    ref_final = torch.stack([s for _, s in refs], 1)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(final, ref_final, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(final[0, 3], state[0, 3])
    w = rnd(*out.shape)
    inputs = (q, k, v, g, beta, raw_weights, state)
    for a, c in zip(torch.autograd.grad((out * w).sum() + final.sum(), inputs, retain_graph=True),
                    torch.autograd.grad((ref_out * w).sum() + ref_final.sum(), inputs)):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("gate,key_scale", [("gla", 1.0), ("hgrn2", 1.0), ("gla", 40.0), ("hgrn2", 40.0)])
def test_prompt_through_the_c_step_equals_the_chunked_path(monkeypatch, gate, key_scale):
    """Without gradients on the CPU a prompt goes through the C step token by token; it must compute what the
    chunked torch path computes (several chunks, left padding, a cache continued afterwards), and a model whose C
    kernels are off (or that trains) keeps the torch path. key_scale 40: raw keys of magnitude ~100, where the C
    step's own exp (exp_vec) saturates and its sum of log1p(e^-|k|) as one log of a product must still agree."""
    import compress.linearize.mom as mom

    model = compress.load("builtin:tiny")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(key_scale)
    linearize_model(model, LinearizeSettings(variant="mom", gate=gate, chunk_size=8))
    ids = torch.randint(1, 200, (2, 40), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    calls = []
    step = mom.mom_decode_step
    monkeypatch.setattr(mom, "mom_decode_step", lambda *a, **k: calls.append(a[0].shape[2]) or step(*a, **k))
    logits, states = {}, {}
    for switch in ("off", "on"):
        monkeypatch.setenv("COMPRESS_CPU_KERNELS", switch)
        cache = compress.linearize.LinearizedCache(model)
        with torch.no_grad():
            logits[switch] = model(ids, attention_mask=mask, cache=cache).logits
        states[switch] = torch.stack([layer.state for layer in cache.layers])
        assert cache.get_seq_length() == 40
    assert calls == [40] * model.config.num_hidden_layers
    real = mask.bool()
    torch.testing.assert_close(logits["on"][real], logits["off"][real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(states["on"], states["off"], rtol=1e-4, atol=1e-4)
    # both sum in float32, in other orders (the states sit ~1e-4 from float64's at key_scale 40; the two paths
    # differed by 3.3e-5 on an AMX Xeon): the C step must be no further from the float64 torch path than the chunked
    monkeypatch.setenv("COMPRESS_CPU_KERNELS", "off")
    model.double()
    cache = compress.linearize.LinearizedCache(model)
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache)
    exact = torch.stack([layer.state for layer in cache.layers])
    error = {switch: (states[switch].double() - exact).abs().max().item() for switch in states}
    assert error["on"] <= 1.5 * error["off"] + 1e-6, error


def test_a_float64_model_keeps_its_prompt_in_float64():
    """The C step computes in float32: a float64 model (references, tests) keeps the torch path and its state dtype."""
    model = compress.load("builtin:tiny", dtype="float32")
    linearize_model(model, LinearizeSettings(variant="mom"))
    model.double()
    ids = torch.randint(1, 200, (1, 20), generator=torch.Generator().manual_seed(4))
    cache = compress.linearize.LinearizedCache(model)
    with torch.no_grad():
        logits = model(ids, cache=cache).logits
    assert cache.layers[0].state.dtype == torch.float64
    torch.testing.assert_close(logits, model(ids).logits.detach(), rtol=1e-12, atol=1e-12)  # the grad path


@pytest.mark.parametrize("first", ["prune", "quantize"])
def test_mom_beside_pruned_or_quantized_projections(first):
    """A helper's audit: MoM after prune/quantize crashed on `k_proj.weight` (packed or quantized layers have none);
    MoM then quantize/prune took its router and beta map too (targets: Linear), and the saved checkpoint could not
    run. The router is never a compression target now, and MoM takes its dtype from k_proj's float tensors."""
    from compress.linearize.mom import Float32Router
    from compress.prune.sparse_linear import SparseLinear
    from compress.quantize.quantized_linear import QuantizedLinear

    compressing = {"prune": compress.get_pass("prune")(method="magnitude", structure="2:4", storage="packed"),
                   "quantize": compress.get_pass("quantize")(method="rtn", bits=4, group_size=64)}[first]
    mom = compress.get_pass("linearize")(variant="mom", layers="every_2")
    ids = torch.randint(0, 1000, (1, 24))
    for order in ([compressing, mom], [mom, compressing]):
        model, _ = compress.apply(compress.load("builtin:tiny", dtype="float32"), order, progress=False)
        attn = model.model.layers[0].self_attn
        assert isinstance(attn, MixtureOfMemoriesAttention)
        assert type(attn.router) is Float32Router and type(attn.beta_proj) is torch.nn.Linear  # not compressed
        assert isinstance(attn.k_proj, (SparseLinear, QuantizedLinear))
        with torch.no_grad():
            assert torch.isfinite(model(ids).logits).all()
    with pytest.raises(CompressError, match="passes may compress; it names model.layers.0.self_attn.router"):
        compress.apply(model, [compress.get_pass("quantize")(method="rtn", targets=["model.layers.0.self_attn.router"])],
                       progress=False)


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_mom_beside_bitsandbytes_projections_in_bf16(method):
    """A bitsandbytes k_proj shows only float32 statistics: MoM built its router in float32 on a bf16 model and the
    forward failed (mat1 and mat2 must have the same dtype); it takes the model's compute dtype."""
    pytest.importorskip("bitsandbytes")
    model, _ = compress.apply(compress.load("builtin:tiny", dtype="bfloat16"),
                              [compress.get_pass("quantize")(method=method),
                               compress.get_pass("linearize")(variant="mom", layers="every_2")], progress=False)
    attn = model.model.layers[0].self_attn
    assert attn.router.weight.dtype == attn.beta_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 1000, (1, 16))).logits).all()


def test_a_lora_target_on_moms_router_says_to_train_it_in_full():
    """The router does not exist before linearize runs and never takes LoRA: "matches no module" alone sent a user
    looking for a typo (a helper's hostile run)."""
    passes = [compress.get_pass("linearize")(variant="mom"), compress.get_pass("recover")(targets=["re:.*router$"])]
    with pytest.raises(CompressError, match="router is one of Mixture-of-Memories' new modules .* name them in "
                                            "train_modules instead"):
        compress.apply(compress.load("builtin:tiny"), passes, progress=False)
