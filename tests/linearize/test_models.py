"""Linearized models of each architecture: a full forward equals chunked prefill + token-by-token cached decoding,
with and without left padding, with GQA and without; the cache stays constant in size."""
import copy
import os

import pytest
import torch

from compress.linearize import LinearizedCache, LinearizedLayer, LinearizeSettings, cache_nbytes, linearize_model

VARIANTS = {
    "gla": LinearizeSettings(variant="gla"),
    "hybrid": LinearizeSettings(variant="hybrid", window=8, alpha=0.6, beta=0.4),
    "hybrid-normalized": LinearizeSettings(variant="hybrid", window=8, normalize=True),
    "hgrn2": LinearizeSettings(variant="gla", gate="hgrn2"),
    "mom": LinearizeSettings(variant="mom", num_memories=3, top_k=2),
    "mom-unshared": LinearizeSettings(variant="mom", num_memories=2, top_k=1, shared_memory=False),
    "mom-hgrn2": LinearizeSettings(variant="mom", gate="hgrn2", num_memories=3, top_k=2),
    "gsa": LinearizeSettings(variant="gla", gate="gsa", num_slots=4),
    "gsa-3": LinearizeSettings(variant="gla", gate="gsa", num_slots=3),  # slots pool unequal groups of dimensions
}
TOL = dict(rtol=1e-5, atol=2e-5)


def converted(tiny_model, arch, variant, kv_heads=2, layers="all", chunk_size=4):
    model = tiny_model(arch, num_key_value_heads=kv_heads)
    linearize_model(model, VARIANTS[variant].model_copy(update={"chunk_size": chunk_size}), layers)
    return model


def incremental_logits(model, ids, attention_mask=None, prefill=13, cache=None):
    """Logits of a chunked prefill of `prefill` tokens then one token at a time through `cache`."""
    cache = cache if cache is not None else LinearizedCache(model)
    mask = attention_mask
    out = [model(ids[:, :prefill], cache=cache, attention_mask=None if mask is None else mask[:, :prefill]).logits]
    for i in range(prefill, ids.shape[1]):
        out.append(model(ids[:, i:i + 1], cache=cache,
                         attention_mask=None if mask is None else mask[:, :i + 1]).logits)
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_full_forward_equals_prefill_plus_cached_decode(tiny_model, arch, variant, kv_heads):
    model = converted(tiny_model, arch, variant, kv_heads)
    ids = torch.randint(1, 128, (2, 27), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        inc, cache = incremental_logits(model, ids)
    torch.testing.assert_close(inc, full, **TOL)
    assert all(isinstance(layer, LinearizedLayer) for layer in cache.layers)
    assert cache.get_seq_length() == 27


@pytest.mark.parametrize("variant", ["gla", "hybrid", "hybrid-normalized", "mom", "gsa"])
def test_left_padding_computes_what_the_unpadded_row_computes(tiny_model, arch, variant):
    model = converted(tiny_model, arch, variant, layers="every_2")  # also mixes softmax layers in
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (2, 26), generator=gen)
    pad = 9
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, pad:]).logits
        inc, _ = incremental_logits(model, ids, mask, prefill=12)
    torch.testing.assert_close(full[1:, pad:], alone, **TOL)
    torch.testing.assert_close(inc[:, pad:], full[:, pad:], **TOL)
    torch.testing.assert_close(inc[0], full[0], **TOL)


def test_generate_with_default_and_explicit_cache_and_padding(tiny_model):
    model = converted(tiny_model, "qwen3", "hybrid", layers=[0, 2])
    ids = torch.randint(1, 128, (2, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    ids[1, :6] = 0
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        default = model.generate(ids, attention_mask=mask, **kw, return_dict_in_generate=True)
        explicit = model.generate(ids, attention_mask=mask, cache=LinearizedCache(model), **kw)
        row1 = model.generate(ids[1:, 6:], **kw)
    assert torch.equal(default.sequences, explicit)
    assert torch.equal(default.sequences[1, 20:], row1[0, 14:])
    kinds = [type(layer).__name__ for layer in default.cache.layers]
    assert kinds == ["LinearizedLayer", "DynamicLayer", "LinearizedLayer"]


@pytest.mark.parametrize("layers", ["all", [0, 2]], ids=["linearized", "mixed"])
def test_static_cache_is_refused(tiny_model, layers):
    """A static cache's masks span max_cache_len: padding was read off unwritten columns and every token treated as
    padding (silently wrong tokens); it is refused with one clear error, by either way of asking for it."""
    from transformers import StaticCache

    from compress.errors import UnsupportedModelError

    model = converted(tiny_model, "llama", "hybrid", layers=layers)
    ids = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    for kw in (dict(cache_implementation="static"), dict(cache=StaticCache(config=model.config, max_cache_len=32))):
        with pytest.raises(UnsupportedModelError, match="do not work with a static cache"), torch.no_grad():
            model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, **kw)


def test_softmax_layers_are_untouched_and_no_parameters_added(tiny_model):
    original = tiny_model("llama")
    model = converted(tiny_model, "llama", "gla", layers="every_3")  # keeps layer 2 softmax
    assert type(model.model.layers[2].self_attn) is type(original.model.layers[2].self_attn)
    assert set(model.state_dict()) == set(original.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.state_dict().items())


@pytest.mark.parametrize("variant", ["gla", "hybrid", "mom", "mom-unshared", "gsa"])
def test_cache_bytes_constant_in_context_length(tiny_model, variant):
    model = converted(tiny_model, "mistral", variant)
    sizes = []
    with torch.no_grad():
        for length in (9, 40, 120):
            cache = LinearizedCache(model)
            model(torch.randint(1, 128, (1, length)), cache=cache)
            model(torch.randint(1, 128, (1, 1)), cache=cache)
            sizes.append(cache_nbytes(cache)["total"])
    assert sizes[0] == sizes[1] == sizes[2] > 0
    # state: layers x KV heads x head_dim^2 floats; the hybrid adds window-1 keys and values and their validity
    # (mom: one state per memory, 3 routed + 1 shared, or 2 routed alone; gsa: 4 slots of a key and a value)
    state = 3 * 2 * {"mom": 4 * 16 * 16, "mom-unshared": 2 * 16 * 16, "gsa": 4 * (16 + 16)}.get(variant, 16 * 16) * 4
    window = 3 * (2 * 2 * 7 * 16 * 4 + 7) if variant == "hybrid" else 0
    assert sizes[0] == state + window


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", ["gla", "hybrid", "mom", "gsa"])
def test_cache_bytes_predicted_is_what_the_cache_holds(tiny_model, variant, dtype):
    """LinearizedAttention.cache_bytes (what a user sizes a batch by) equals the bytes held, batch 3, float64 too
    (its states and window are float64: it said half)."""
    model = converted(tiny_model, "llama", variant).to(dtype)
    cache = LinearizedCache(model)
    with torch.no_grad():
        model(torch.randint(1, 128, (3, 11)), cache=cache)
    predicted = sum(m.cache_bytes(3) for m in model.modules() if hasattr(m, "cache_bytes") and hasattr(m, "settings"))
    assert predicted == cache_nbytes(cache)["total"] > 0


def test_prompt_under_inference_mode_then_decoding_under_no_grad(tiny_model, monkeypatch):
    """The torch decoding step (no C kernels) writes the window's ring buffer in place; filled under
    torch.inference_mode() it refused that outside it (DynamicCache and the C step decode on)."""
    monkeypatch.setenv("COMPRESS_CPU_KERNELS", "off")
    model = converted(tiny_model, "llama", "hybrid")
    ids = torch.randint(1, 128, (2, 12))
    with torch.no_grad():
        expected = model(ids).logits[:, -3:]
    cache = LinearizedCache(model)
    with torch.inference_mode():
        model(ids[:, :9], cache=cache)
    with torch.no_grad():
        got = torch.cat([model(ids[:, i:i + 1], cache=cache).logits for i in range(9, 12)], dim=1)
    torch.testing.assert_close(got, expected, **TOL)


def test_normalized_recurrence_is_a_weighted_mean_of_values(tiny_model):
    """normalize: o_t = sum_s w_ts v_s / sum_s w_ts with w_ts = sum_d phi(q_t)_d phi(k_s)_d prod_{r=s+1..t} gate_r,d,
    computed here in float64 from the module's own projections, without the GLA kernels."""
    model = tiny_model("llama", num_key_value_heads=2)
    linearize_model(model, LinearizeSettings(variant="gla", normalize=True, chunk_size=4))
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 11, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        q, k, v = attn.project(x)
        phi_q, phi_k, log_gate = (t.double() for t in attn.features(q, k))
        group = phi_q.shape[1] // phi_k.shape[1]
        phi_k, log_gate, v = (t.double().repeat_interleave(group, dim=1) for t in (phi_k, log_gate, v))
        cum = log_gate.cumsum(2)                                                  # [B, H, T, D]
        decay = (cum[:, :, :, None, :] - cum[:, :, None, :, :]).exp()             # [B, H, t, s, D]: gates s+1..t
        w = (phi_q[:, :, :, None, :] * phi_k[:, :, None, :, :] * decay).sum(-1).tril()
        expected = (w @ v) / w.sum(-1, keepdim=True)
        expected = attn.o_proj(expected.transpose(1, 2).reshape(1, 11, -1).float())
        got, _ = attn(x, position_embeddings=None)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def assert_fused_step_matches_torch(model, variant, monkeypatch, suffix, switch, dev="cpu"):
    """Incremental decoding with left padding and a window that fills up during decoding (prefill 5 < 7 slots),
    once with the environment variable `switch` = (name, torch value, fused value) at its torch value and once at
    its fused value: the fused step (`linear_decode_step` / `gsa_decode_step` / `mom_decode_step` + `suffix`) runs
    at every decode step of every layer in the second run only, with the same logits; gradients on keep the torch
    path."""
    import compress.linearize.attention as attention
    import compress.linearize.mom as mom

    ids = torch.randint(1, 128, (2, 16), generator=torch.Generator().manual_seed(2)).to(dev)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[1, 8] = mask[0, 10] = 0  # padding at decode steps too: the fused step's no-update, invalid-slot path
    calls = []
    module, name = (mom, "mom_decode_step") if variant.startswith("mom") else \
        (attention, "gsa_decode_step") if variant.startswith("gsa") else (attention, "linear_decode_step")
    fused = getattr(module, name + suffix)
    monkeypatch.setattr(module, name + suffix, lambda *a, **k: calls.append(1) or fused(*a, **k))
    variable, off, on = switch
    logits = {}
    for value in (off, on):
        monkeypatch.setenv(variable, value)
        with torch.no_grad():
            logits[value], cache = incremental_logits(model, ids, mask, prefill=5)
    # every decode step of every layer; MoM's C step also takes the prompt (5 tokens, left padding) on the CPU
    steps = 11 + int(variant.startswith("mom") and suffix == "")
    assert len(calls) == steps * model.config.num_hidden_layers
    torch.testing.assert_close(logits[on], logits[off], rtol=1e-5, atol=1e-5)
    with torch.enable_grad():
        model(ids[:, :1], cache=cache)
    assert len(calls) == steps * model.config.num_hidden_layers


@pytest.mark.parametrize("variant", ["gla", "hgrn2", "hybrid", "hybrid-normalized", "mom", "mom-unshared", "mom-hgrn2",
                                     "gsa", "gsa-3"])
def test_fused_cpu_decode_step_matches_the_torch_step(tiny_model, arch, variant, monkeypatch, cpu_level):
    """The one-call C decode steps (kernels/linear_decode_cpu.py) against forward's torch path."""
    from compress.kernels import linear_decode_cpu

    if linear_decode_cpu._library() is None:
        pytest.skip("no C compiler: the fused CPU step is not built")
    assert_fused_step_matches_torch(converted(tiny_model, arch, variant), variant, monkeypatch, "",
                                    ("COMPRESS_CPU_KERNELS", "off", "on"))


@pytest.mark.parametrize("kind", ["c", "triton"])
def test_fused_steps_store_a_padding_tokens_key_as_zeros(kind):
    """A padding token's slot: key and value zeros and invalid, as the torch path stores it (a NaN key kept there
    would poison a later prompt's blocked window attention, where a masked NaN still gives NaN)."""
    from compress.kernels import linear_decode_cpu, linear_decode_triton
    from compress.kernels.dispatch import triton_available

    if kind == "c" and linear_decode_cpu._library() is None:
        pytest.skip("no C compiler: the fused CPU step is not built")
    if kind == "triton" and not triton_available():
        pytest.skip("no Triton")
    step = linear_decode_cpu.linear_decode_step if kind == "c" else linear_decode_triton.linear_decode_step_triton
    b, h, d, slots = 2, 2, 16, 5
    q, k, v = torch.randn(b, 2 * h, 1, d), torch.randn(b, h, 1, d), torch.randn(b, h, 1, d)
    k[1] = float("nan")  # the padding row's key
    ring_k, ring_v = torch.randn(b, h, slots, d), torch.randn(b, h, slots, d)
    ring_valid = torch.ones(b, slots, dtype=torch.bool)
    rope = tuple(torch.randn(b, 1, d) for _ in range(2))
    with torch.no_grad():
        step(q, k, v, torch.randn(b, h, d, d), "gla", False, (None, None, v, ring_k, ring_v, ring_valid, 3),
             torch.tensor([True, False]), 0.5, 0.5, 0.25, rope=rope)
    assert ring_valid[:, 3].tolist() == [True, False]
    assert (ring_k[1, :, 3] == 0).all() and (ring_v[1, :, 3] == 0).all()
    assert ring_k[0, :, 3].abs().sum() > 0 and torch.equal(ring_v[0, :, 3], v[0, :, 0])


def test_fused_cpu_step_takes_the_models_own_rotation_where_it_is_not_rotate_half(tiny_model, monkeypatch):
    """A model whose RoPE function is not the rotate-half form the steps compute: the window's q and k are rotated
    by the model's function and handed to the C step, which then equals the torch step as well."""
    from compress.kernels import linear_decode_cpu
    from compress.linearize.attention import LinearizedAttention

    if linear_decode_cpu._library() is None:
        pytest.skip("no C compiler: the fused CPU step is not built")
    model = converted(tiny_model, "llama", "hybrid")
    for module in model.modules():
        if isinstance(module, LinearizedAttention):
            module._rope_is_rotate_half = False
    assert_fused_step_matches_torch(model, "hybrid", monkeypatch, "", ("COMPRESS_CPU_KERNELS", "off", "on"))


def test_the_c_step_rotates_only_for_models_whose_rope_it_computes():
    """The hybrid's C step applies RoPE itself only where the model's function is Llama's x cos + rotate_half(x) sin
    (every supported family's is); another function (here interleaved pairs, GPT-J style) keeps the model's own."""
    import importlib

    from compress.linearize.attention import rotate_half_rope

    for family in ("llama", "mistral", "qwen2", "qwen3"):
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        assert rotate_half_rope(module.apply_rotary_pos_emb, 16)

    def interleaved(q, k, cos, sin):
        def rot(x):
            return torch.stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + rot(q) * sin, k * cos + rot(k) * sin

    assert not rotate_half_rope(interleaved, 16)
    assert not rotate_half_rope(lambda q, k: (q, k), 16)  # another signature


@pytest.mark.parametrize("variant", ["gla", "hybrid", "mom", "gsa"])
def test_half_precision_model_keeps_a_float32_state_and_decodes_as_its_forward(tiny_model, variant):
    """A bf16 model's recurrent state and window stay float32 (a bf16 state summed over thousands of tokens drifts;
    the fused CPU step reads float32), its cached decode equals its full forward to bf16 rounding, and both stay
    near the float32 model's logits."""
    model = converted(tiny_model, "llama", variant)
    half = copy.deepcopy(model).to(torch.bfloat16)
    ids = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = half(ids).logits.float()
        decoded, cache = incremental_logits(half, ids, prefill=5)
        reference = model(ids).logits
    for layer in cache.layers:
        assert layer.state.dtype == torch.float32
        assert layer.window_keys is None or layer.window_keys.dtype == torch.float32
    scale = reference.abs().max()
    assert (decoded.float() - full).abs().max() < 0.02 * scale
    assert (full - reference).abs().max() < 0.05 * scale


TRITON_STEP_VARIANTS = {**VARIANTS, "gla-normalized": LinearizeSettings(variant="gla", normalize=True),
                        "hybrid-wide": LinearizeSettings(variant="hybrid", window=21)}  # 20 slots: past one tile


GROUPINGS = [("llama", 1), ("qwen3", 2), ("mistral", 4)]  # 4, 2, 1 query heads per KV head
# each kernel (linear_decode: gla/hybrid/hgrn2, mom, gsa) at every grouping through its richest variant; the other
# variants, whose flags do not touch the head indexing, at one grouping each (the interpreter's cost: ~4 s a case)
TRITON_STEP_CASES = [(*g, v) for v in ("hybrid", "gsa") for g in GROUPINGS] + [
    (*g, v) for g, v in zip(GROUPINGS, ("mom", "mom-hgrn2", "mom"))] + [  # MoM's gates: the interpreter's slowest
    (*GROUPINGS[i % 3], v) for i, v in enumerate(
        ["gla", "hybrid-normalized", "hgrn2", "mom-unshared", "gla-normalized", "hybrid-wide", "gsa-3"])]


@pytest.mark.parametrize("arch,kv_heads,variant", TRITON_STEP_CASES)
def test_triton_decode_step_matches_the_torch_step(tiny_model, arch, kv_heads, variant, monkeypatch):
    """The one-launch Triton decode steps (kernels/linear_decode_triton.py: interpreted here, compiled on a GPU)
    against forward's torch path (the C step kept out of both runs; only the decode step switches, so a prefill
    through fla-core on a GPU is the same in both)."""
    pytest.importorskip("triton")
    import compress.linearize.attention as attention
    import compress.linearize.mom as mom

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setenv("COMPRESS_CPU_KERNELS", "off")
    for module in (attention, mom):
        monkeypatch.setattr(module, "use_triton", lambda *tensors: os.environ["DECODE_STEP"] == "triton")
    model = tiny_model(arch, num_key_value_heads=kv_heads)
    linearize_model(model, TRITON_STEP_VARIANTS[variant].model_copy(update={"chunk_size": 4}))
    assert_fused_step_matches_torch(model.to(dev), variant, monkeypatch, "_triton",
                                    ("DECODE_STEP", "torch", "triton"), dev)


def test_the_c_steps_vectorized_exp_is_within_one_ulp_of_exp(cpu_level):
    """exp_vec (csrc/linear_decode.c: the softmax feature maps and MoM's decay, vectorized where libm's expf is a
    call per element) against float64 exp: within 1.05 ulp over its range (1.02 measured over 354M points with this
    CPU's FMA; 0.99 without), 0 below it, inf above, NaN kept."""
    from compress.kernels import linear_decode_cpu

    if linear_decode_cpu._library() is None:
        pytest.skip("no C compiler: the C steps are not built")
    x = torch.cat([torch.linspace(-87.33, 88.72, 400_003),
                   torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 4,
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 88.376, 88.7, 88.72])])
    got, ref = linear_decode_cpu.exp_vec(x), torch.exp(x.double())
    ulp = (ref.float().nextafter(torch.tensor(float("inf"))) - ref.float()).double()
    assert ((got.double() - ref).abs() / ulp).max() <= 1.05
    edges = linear_decode_cpu.exp_vec(torch.tensor([-87.5, -1000.0, -float("inf"), 88.8, float("inf"), float("nan")]))
    assert edges[:3].eq(0).all() and edges[3:5].isinf().all() and edges[5].isnan()
