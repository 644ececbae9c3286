"""The linearize pass: arguments validated, no weights changed, checkpoints reload (compress.load) and generate
what the converted model generated."""
from pathlib import Path

import pytest
import torch

import compress
from compress.errors import CompressError
from compress.linearize import LinearizedAttention

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_checkpoint_round_trip_and_generate(tmp_path, reference_tokenizer):
    model = compress.load("builtin:tiny")
    ids = torch.tensor([reference_tokenizer("The Python tutorial explains")["input_ids"]])
    lin = compress.get_pass("linearize")(variant="hybrid", window=16, layers="every_3")
    model, report = compress.apply(model, [lin], progress=False)
    assert report.bytes_before == report.bytes_after
    assert report.passes[0].modules == [f"model.layers.{i}.self_attn" for i in (0, 1, 3, 4)]
    reloaded = compress.load(compress.save(model, tmp_path / "out", tokenizer=reference_tokenizer))
    kinds = [type(layer.self_attn) is LinearizedAttention for layer in reloaded.model.layers]
    assert kinds == [True, True, False, True, True, False]
    assert reloaded.model.layers[0].self_attn.settings.window == 16
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
        a = reloaded.generate(ids, max_new_tokens=8, do_sample=False)
        b = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)
    # its tensors are the original's, under the original's names: plain transformers must refuse it rather than
    # load softmax attention in its place, silently
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="compress-native .*compress.load"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_a_static_cache_the_source_names_is_removed(tmp_path, reference_tokenizer):
    """Some source models' generation_config names cache_implementation "static", which linearized layers cannot use:
    every generate failed, `compress generate` included (it has no option to choose another cache). apply removes it
    with a note; a checkpoint that still names it loads without it; a caller who asks for it is still refused."""
    import json

    model = compress.load("builtin:tiny")
    model.generation_config.cache_implementation = "static"
    ids = torch.tensor([reference_tokenizer("The Python tutorial explains")["input_ids"]])
    model, report = compress.apply(model, [compress.get_pass("linearize")(variant="gla", layers="every_2")],
                                   progress=False)
    assert "cache_implementation='static'" in " ".join(report.passes[0].notes)
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    out = compress.save(model, tmp_path / "out", tokenizer=reference_tokenizer)
    path = out / "generation_config.json"
    assert "cache_implementation" not in json.loads(path.read_text())
    path.write_text(json.dumps({**json.loads(path.read_text()), "cache_implementation": "static"}))
    reloaded = compress.load(out)
    assert torch.equal(reloaded.generate(ids, max_new_tokens=6, do_sample=False), expected)
    with pytest.raises(CompressError, match="do not work with a static cache"):
        reloaded.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    plain = compress.load("builtin:tiny")  # no linearized layer nor compressed cache: left as it is
    plain.generation_config.cache_implementation = "static"
    from compress.cache_choice import drop_unusable_cache_implementation

    assert drop_unusable_cache_implementation(plain) is None
    assert plain.generation_config.cache_implementation == "static"


@pytest.mark.parametrize("layers,runs", [("all", True), ("every_3", False)], ids=["all-layers", "mixed"])
def test_cli_generates_past_the_context_only_when_every_layer_is_linearized(tmp_path, reference_tokenizer, layers,
                                                                            runs):
    """A recurrent state has no context limit: `compress generate` lets a fully linearized model run past
    max_position_embeddings (1024 here); a model that keeps softmax layers is still held to it."""
    from click.testing import CliRunner

    from compress.cli import main

    model, _ = compress.apply(compress.load("builtin:tiny"),
                              [compress.get_pass("linearize")(variant="hybrid", window=16, layers=layers)],
                              progress=False)
    out = compress.save(model, tmp_path / "out", tokenizer=reference_tokenizer)
    prompt = " ".join(["Python"] * 1100)  # the prompt alone past the context (it was refused: a helper's audit)
    assert len(reference_tokenizer(prompt)["input_ids"]) > 1024
    import logging

    import transformers.utils.logging as hf_logging

    reminder = logging.getLogger("transformers.generation.stopping_criteria")
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    reminder.addHandler(handler)
    hf_logging.warning_once.cache_clear()  # (said once per process)
    try:
        result = CliRunner().invoke(main, ["generate", str(out), "--prompt", prompt, "--max-new-tokens", "24"])
    finally:
        reminder.removeHandler(handler)
    if runs:
        assert result.exit_code == 0, result.output
        assert result.output.startswith(prompt) and len(result.output) > len(prompt)
        # transformers' reminder that the length passed max_position_embeddings ("you may observe exceptions"),
        # and the logger as it was after the command
        assert not [m for m in said if "predefined maximum length" in m]
        assert reminder.isEnabledFor(logging.WARNING)
    else:
        assert result.exit_code == 2 and "exceed the model's context of 1024" in result.output


@pytest.mark.parametrize("args,match", [
    (dict(layers="every_1"), "every_K needs K >= 2"),
    (dict(layers="some"), "layers must be"),
    (dict(layers=[]), "nothing would be linearized"),
    (dict(layers="every_0"), "every_K needs K >= 2 \\(got 'every_0'"),
    (dict(variant="hybrid", alpha=-1.0), "greater than or equal to 0"),
    (dict(variant="hybrid", alpha=0.0, beta=0.0), "both 0"),
    (dict(window=1), "greater than or equal to 2"),
    (dict(variant="ssm"), "variant"),
    (dict(gate="gsa", normalize=True), "normalize applies to"),
    (dict(variant="mom", normalize=True), "normalize applies to"),
    (dict(variant="gla", window=32), "window applies to variant hybrid only \\(this is variant gla\\)"),
    (dict(variant="hybrid", num_memories=2, top_k=1), "num_memories, top_k apply to variant mom only"),
    (dict(gate="hgrn2", num_slots=4), "num_slots applies to gate gsa only"),
    # `layers` selects; these were accepted and every layer was linearized anyway
    (dict(targets=["model.layers.3.self_attn"]), "picks its layers with `layers:`.*not with `targets`"),
    (dict(ignore=["re:.*layers\\.0\\..*"]), "not with `ignore`: remove it"),
])
def test_bad_arguments(args, match):
    with pytest.raises(CompressError, match=match):
        compress.get_pass("linearize")(**args)


def test_layers_that_do_not_exist(tiny_model):
    model = tiny_model("llama")
    with pytest.raises(CompressError, match=r"layers \[7\] do not exist"):
        compress.apply(model, [compress.get_pass("linearize")(layers=[0, 7])], progress=False)
    with pytest.raises(CompressError, match="one layer of every 7, but the model has 3 layers, so none would keep"):
        compress.apply(model, [compress.get_pass("linearize")(layers="every_7")], progress=False)
    with pytest.raises(CompressError, match=r"lists \[1\] more than once"):  # (older versions dropped one)
        compress.apply(model, [compress.get_pass("linearize")(layers=[1, 0, 1])], progress=False)


def test_more_slots_than_the_head_dimension_is_refused(tiny_model):
    """Slots pool the head dimension's gates: past one dimension a slot they repeat each other (the same outputs
    for 4x the state at 256 slots on a 64-wide head), so the model's head size bounds them."""
    model = tiny_model("llama")  # head_dim 16
    with pytest.raises(CompressError, match="num_slots 17 is more than the head dimension \\(16\\)"):
        compress.apply(model, [compress.get_pass("linearize")(gate="gsa", num_slots=17)], progress=False)
    compress.apply(model, [compress.get_pass("linearize")(gate="gsa", num_slots=16)], progress=False)


@pytest.mark.parametrize("variant", ["hybrid", "mom"])
def test_linearized_checkpoint_loads_with_max_memory(tmp_path, reference_tokenizer, variant):
    """--max-memory builds the model under accelerate's empty weights: the RoPE probe ran there on meta tensors and
    every linearized checkpoint failed to load (a traceback); then MoM's routing read its router's weight directly,
    which a layer left on disk holds on meta (garbage logits). Offloaded, each computes what it computed."""
    model = compress.load("builtin:tiny")
    lin = compress.get_pass("linearize")(**({"variant": "hybrid", "window": 8} if variant == "hybrid" else
                                            {"variant": "mom", "num_memories": 3, "top_k": 1}))
    model, _ = compress.apply(model, [lin], progress=False)
    out = compress.save(model, tmp_path / "out", tokenizer=reference_tokenizer)
    ids = torch.tensor([reference_tokenizer("The Python tutorial explains")["input_ids"]])
    offloaded = compress.load(out, max_memory="6MB")
    assert len(offloaded.compress_offloaded_layers) >= 4  # most layers stay on disk
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        a = offloaded.generate(ids, max_new_tokens=6, do_sample=False)
        b = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


def test_a_checkpoint_an_older_version_wrote_with_lax_layers_still_loads(tmp_path):
    """Checkpoints record the layers as given; older versions took [1, 0, 1] and every_K past the depth (all
    layers), so loading one builds what they built instead of refusing its record."""
    import json

    model, _ = compress.apply(compress.load("builtin:tiny"), [compress.get_pass("linearize")(layers=[0, 1])],
                              progress=False)
    out = compress.save(model, tmp_path / "lin")
    config = json.loads((out / "config.json").read_text())
    config["compression"]["passes"][0]["args"]["layers"] = [1, 0, 1]
    config["compression"]["passes"][0]["args"]["window"] = 32  # a gla run with the hybrid's window, taken then
    (out / "config.json").write_text(json.dumps(config))
    loaded = compress.load(out)
    assert [type(layer.self_attn).__name__ for layer in loaded.model.layers][:3] == \
        [type(model.model.layers[i].self_attn).__name__ for i in range(3)]


@pytest.mark.parametrize("layers,match", [("every_0", "K >= 2"), ("bogus", "layers must be"), ([], "empty list"),
                                          ([True], "integers"), ([0, 0], "more than once")])
def test_linearize_model_checks_its_layers_as_the_pass_does(tiny_model, layers, match):
    """The public function skipped the pass's checks (a ZeroDivisionError, an AttributeError, silent no-ops)."""
    from compress.linearize import LinearizeSettings, linearize_model

    with pytest.raises(CompressError, match=match):
        linearize_model(tiny_model("llama"), LinearizeSettings(), layers)


@pytest.mark.parametrize("name", ["liger-gla", "liger-hybrid", "mom"])
def test_recipes_validate(name):
    recipe = compress.Recipe.from_yaml(RECIPES / f"{name}.yaml")
    passes = recipe.build_passes()
    assert [p.name for p in passes][0] == "linearize"


def test_inspect_budget_counts_what_a_partly_linearized_cache_holds(tmp_path, reference_tokenizer):
    """`compress inspect` of a hybrid (every 2nd layer softmax) + KIVI-8 checkpoint: the per-token KV figure and the
    constant recurrent bytes are those a GEARCache really holds while the model runs (its growth between two
    lengths, and its `recurrent` item), and GEARCache.nbytes() counts the linearized layers' slots."""
    import json

    from click.testing import CliRunner

    from compress.cli import main
    from compress.kvcache import GEARCache

    passes = [compress.get_pass("linearize")(variant="hybrid", layers="every_2"),
              compress.get_pass("gear_kv")(method="kivi", bits=8)]
    model, report = compress.apply(compress.load("builtin:tiny", dtype="float32"), passes, progress=False)
    gear = report.passes[1]  # the linearized layers hold no KV cache: listed as skipped, not counted compressed
    assert gear.details["layers_compressed"] == 3 and sorted(gear.skipped) == [
        f"model.layers.{i}.self_attn" for i in (0, 2, 4)]
    out = compress.save(model, tmp_path / "out", tokenizer=reference_tokenizer)
    result = CliRunner().invoke(main, ["inspect", str(out), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    kv = json.loads(result.stdout)["budget"]["kv_per_token"]
    held = {}
    for tokens in (512, 1024):
        cache = GEARCache(model.config, method="kivi", bits=8)
        with torch.no_grad():
            model(torch.randint(100, 8000, (1, tokens), generator=torch.Generator().manual_seed(0)), cache=cache,
                  use_cache=True)
        held[tokens] = cache.nbytes()
    assert held[512]["recurrent"] == held[1024]["recurrent"] == kv["recurrent_bytes"] > 0
    # at whole chunks (512, 1024: the uncompressed window empty) a token costs the cycle's least
    assert held[1024]["total"] - held[512]["total"] == kv["compressed_min"] * 512
    assert kv["compressed_min"] < kv["compressed"] < kv["compressed_max"] and kv["tokens_cycle"] == [1024, 1087]
    assert kv["compressed"] < kv["uncompressed"] / 2  # three of six layers, each at ~8 bits of 16
    assert kv["cache"] == "kivi 8-bit; 3 of 6 layers linearized"
    # the whole cache at the model's context (1024 tokens): what a cache of 1024 tokens holds, states included
    at = kv["total_at"]
    assert at["tokens"] == 1024 and at["compressed"] == held[1024]["total"]
    assert kv["compressed_min"] * 1024 + kv["recurrent_bytes"] == held[1024]["total"]  # at a whole chunk: the least
    assert at["uncompressed"] == kv["uncompressed"] * 1024
    table = CliRunner().invoke(main, ["inspect", str(out)], catch_exceptions=False).output
    assert "recurrent state, any length" in table and "KV cache + states at 1024 tokens (batch 1)" in table


def test_inspect_totals_show_a_state_larger_than_a_sliding_window_cache(tmp_path, tiny_model):
    """A Mistral with a 16-token sliding window, linearized: per token the cache went 'from 1024 B to 0 B', while
    the recurrent states it holds at any length outweigh the window-capped cache they replace. The totals at the
    context length say so, and match a real DynamicCache of the original and the linearized cache's bytes."""
    import json

    from click.testing import CliRunner

    from compress.cli import main
    from compress.linearize.cache import LinearizedCache

    original = tiny_model("mistral", sliding_window=16)
    ids = torch.randint(0, 128, (1, 256), generator=torch.Generator().manual_seed(0))  # the context: 256 tokens
    with torch.no_grad():
        dense = original(ids, use_cache=True).past_key_values
    fp16_bytes = sum(2 * (layer.keys.numel() + layer.values.numel()) for layer in dense.layers)  # (KV at fp16)
    model, _ = compress.apply(original, [compress.get_pass("linearize")(variant="gla")], progress=False)
    out = compress.save(model, tmp_path / "gla")
    kv = json.loads(CliRunner().invoke(main, ["inspect", str(out), "--json"]).stdout)["budget"]["kv_per_token"]
    cache = LinearizedCache(model)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    assert kv["total_at"] == {"tokens": 256, "uncompressed": fp16_bytes, "compressed": cache.nbytes()["total"]}
    assert kv["compressed"] == 0 and cache.nbytes()["total"] > fp16_bytes


def test_inspect_of_a_linearized_model_without_a_kv_pass_has_no_cache_cycle(tmp_path, reference_tokenizer):
    import json

    from click.testing import CliRunner

    from compress.cli import main

    model, _ = compress.apply(compress.load("builtin:tiny", dtype="float32"),
                              [compress.get_pass("linearize")(variant="hybrid")], progress=False)
    out = compress.save(model, tmp_path / "out", tokenizer=reference_tokenizer)
    kv = json.loads(CliRunner().invoke(main, ["inspect", str(out), "--json"]).stdout)["budget"]["kv_per_token"]
    assert "tokens_cycle" not in kv and kv["recurrent_bytes"] > 0
    table = CliRunner().invoke(main, ["inspect", str(out)], catch_exceptions=False).output
    assert "mean over" not in table and "recurrent state, any length" in table


def test_linearizing_after_gear_kv_says_what_it_took():
    passes = [compress.get_pass("gear_kv")(method="kivi", bits=4),
              compress.get_pass("linearize")(variant="gla", layers="every_2")]
    _, report = compress.apply(compress.load("builtin:tiny", dtype="float32"), passes, progress=False)
    assert report.passes[0].details["layers_compressed"] == 6  # as gear_kv saw them
    assert report.passes[1].notes == ["3 layer(s) the earlier gear_kv pass compresses are linearized now: their "
                                      "cache slots hold recurrent states (gear_kv's layer count is from before)"]


def test_gear_kv_skips_mixture_of_memories_layers_too():
    passes = [compress.get_pass("linearize")(variant="mom", layers="every_2"),
              compress.get_pass("gear_kv")(method="kivi", bits=4)]
    _, report = compress.apply(compress.load("builtin:tiny", dtype="float32"), passes, progress=False)
    assert report.passes[1].details["layers_compressed"] == 3 and len(report.passes[1].skipped) == 3


def test_gear_kv_after_linearizing_every_layer_is_refused_before_work(tmp_path):
    passes = [compress.get_pass("linearize")(variant="gla"), compress.get_pass("gear_kv")(method="kivi", bits=4)]
    with pytest.raises(CompressError, match="every attention layer is linearized"):
        compress.apply(compress.load("builtin:tiny"), passes, progress=False)
    # and on a model loaded linearized
    model, _ = compress.apply(compress.load("builtin:tiny"), passes[:1], progress=False)
    linearized = compress.load(compress.save(model, tmp_path / "gla"))
    with pytest.raises(CompressError, match="every attention layer is linearized"):
        compress.apply(linearized, passes[1:], progress=False)


def test_linearizing_every_layer_a_gear_kv_cache_compresses_is_refused_before_work(tmp_path):
    """gear_kv then linearize-all wrote a KIVI cache that compressed nothing, and its eval read KL 0 as if the
    2-bit cache were lossless (the other order was refused)."""
    gear, linearize = compress.get_pass("gear_kv"), compress.get_pass("linearize")
    said = "linearize converts every attention layer the compressed KV cache"
    for passes in ([gear(method="kivi", bits=2), linearize(variant="gla")],
                   [gear(method="kivi", bits=2, ignore=["model.layers.5.self_attn"]),
                    linearize(variant="gla", layers=[0, 1, 2, 3, 4])],
                   [gear(method="kivi", bits=2), linearize(layers=[0, 1, 2]), linearize(layers=[3, 4, 5])]):
        with pytest.raises(CompressError, match=said):
            compress.apply(compress.load("builtin:tiny"), passes, progress=False)
    # and on a model loaded with the cache
    model, _ = compress.apply(compress.load("builtin:tiny"), [gear(method="kivi", bits=2)], progress=False)
    loaded = compress.load(compress.save(model, tmp_path / "kivi"))
    with pytest.raises(CompressError, match=said):
        compress.apply(loaded, [linearize(variant="gla")], progress=False)
    compress.apply(loaded, [linearize(variant="gla", layers="every_2")], progress=False)  # some layers: fine


def test_inspect_says_what_linearized_layers_run(tmp_path, monkeypatch):
    """inspect printed no runtime path for linearized layers (an audit's find): each says its decoding step and its
    prompt path, and which one runs without the C kernels."""
    from compress.cli_inspect import inspect_checkpoint

    passes = [compress.get_pass("linearize")(layers=[0, 1]), compress.get_pass("linearize")(variant="mom", layers=[2])]
    model, _ = compress.apply(compress.load("builtin:tiny"), passes, progress=False)
    out = compress.save(model, tmp_path / "lin")
    paths = inspect_checkpoint(str(out), "auto", "cpu")["runtime"]["paths"]
    assert paths["model.layers.0.self_attn"] == ("linearized, GLA: decoding one C call a token (csrc/linear_decode.c; "
                                                 "the torch recurrence where gradients are on); prompts the chunked "
                                                 "torch path")
    assert "Mixture-of-Memories" in paths["model.layers.2.self_attn"] and "prompts the C step token after token" \
        in paths["model.layers.2.self_attn"] and "model.layers.3.self_attn" not in paths
    monkeypatch.setenv("COMPRESS_CPU_KERNELS", "off")
    paths = inspect_checkpoint(str(out), "auto", "cpu")["runtime"]["paths"]
    assert "decoding the torch recurrence a token (no C kernels" in paths["model.layers.0.self_attn"]
    assert paths["model.layers.2.self_attn"].endswith("prompts the chunked torch path")
    assert "one Triton step a token" in inspect_checkpoint(str(out), "auto", "cuda")["runtime"]["paths"][
        "model.layers.1.self_attn"]
    # what the fused steps do not take says so, on either device (a review's find)
    hybrid_gsa = compress.get_pass("linearize")(variant="hybrid", gate="gsa", layers=[0]).settings()
    from compress.linearize.convert import linearize_model

    lin = compress.load("builtin:tiny")
    linearize_model(lin, hybrid_gsa, [0])
    for device in ("cpu", "cuda"):
        assert "the torch recurrence a token (the window branch is fused for the GLA gates only)" in \
            lin.model.layers[0].self_attn.runtime_path(device)
    gla = compress.load("builtin:tiny", dtype="float32").double()
    linearize_model(gla, compress.get_pass("linearize")(layers=[0]).settings(), [0])
    for device in ("cpu", "cuda"):
        assert "the torch recurrence a token (the fused steps compute in float32)" in \
            gla.model.layers[0].self_attn.runtime_path(device)
