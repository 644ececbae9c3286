"""The gear_kv pass: recipe arguments validated, recorded in the checkpoint, and a reloaded model generates with
the compressed cache by default."""
import warnings
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import compress
from compress.errors import CompressError
from compress.kvcache import GEARCache

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_apply_save_load_generate_uses_compressed_cache(tmp_path, heldout_ids, reference_tokenizer):
    model = compress.load("builtin:tiny")
    gear = compress.get_pass("gear_kv")(bits=4, key_rank=2, value_rank=1, outlier_ratio=0.02, skip_layers=[0],
                                        scale_format="log8")
    model, report = compress.apply(model, [gear], progress=False)
    assert report.bytes_before == report.bytes_after  # no weight changes
    assert report.passes[0].modules == [f"model.layers.{i}.self_attn" for i in range(1, 6)]
    reloaded = compress.load(compress.save(model, tmp_path / "out", tokenizer=reference_tokenizer))
    entry = reloaded.config.compression["passes"][0]
    assert entry["pass"] == "gear_kv" and entry["args"]["value_rank"] == 1 and entry["args"]["skip_layers"] == [0]
    ids = heldout_ids[:, :150]
    with torch.no_grad():
        out = reloaded.generate(ids, max_new_tokens=20, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.cache, GEARCache) and out.cache.settings.value_rank == 1
    assert out.cache.settings.scale_format == "log8"
    assert out.cache.layers[1].key_store.pages[0].scale.dtype == torch.uint8
    assert out.cache.layers[1].key_store.num_tokens == 128 and reloaded.config._attn_implementation == "gear_kv"
    # the same tokens as an explicit cache with these settings on the original model
    with torch.no_grad():
        explicit = model.generate(ids, max_new_tokens=20, do_sample=False, cache=GEARCache(model.config, out.cache.settings))
    assert torch.equal(out.sequences, explicit)
    # a cache the caller passes wins
    with torch.no_grad():
        own = reloaded.generate(ids, max_new_tokens=3, do_sample=False, cache=DynamicCache(config=reloaded.config),
                                return_dict_in_generate=True)
    assert isinstance(own.cache, DynamicCache)


@pytest.mark.parametrize("args,match", [
    (dict(bits=5), "bits=5 is not supported"),
    (dict(group_size=48), "multiple of group_size"),
    (dict(method="kivi", key_rank=2), "kivi"),
    (dict(outlier_ratio=0.6), "outlier_ratio"),
    (dict(rank=2), "rank"),
    (dict(scale_format="fp8"), "scale_format"),
    (dict(value_bits=5), "value_bits=5 is not supported"),
])
def test_bad_arguments(args, match):
    with pytest.raises(CompressError, match=match):
        compress.get_pass("gear_kv")(**args)


@pytest.mark.parametrize("args,match", [(dict(key_rank=65), "exceeds"), (dict(skip_layers=[6]), "out of range"),
                                        (dict(skip_layers=[0, 1, 2, 3, 4, 5]), "leave no attention layer"),
                                        (dict(targets=["model.layers.1.self_attn"], skip_layers=[1]),
                                         "leave no attention layer"),
                                        (dict(targets=["re:.*q_proj"]), "which have no layer_idx"),
                                        (dict(residual_length=1024),
                                         "leaves no room in the model's context \\(1024 tokens\\)"),
                                        (dict(method="kivi", group_size=1, residual_length=1023), "leaves no room")])
def test_arguments_impossible_for_the_model(args, match):
    with pytest.raises(CompressError, match=match):
        compress.apply(compress.load("builtin:tiny"), [compress.get_pass("gear_kv")(**args)], progress=False)


@pytest.mark.parametrize("args,compressed", [(dict(targets=["model.layers.1.self_attn"]), [1]),
                                             (dict(ignore=["re:model\\.layers\\.0\\..*"]), [1, 2, 3, 4, 5]),
                                             (dict(ignore=["model.layers.0.self_attn"], skip_layers=[5]),
                                              [1, 2, 3, 4])])
def test_targets_and_ignore_pick_the_compressed_layers(args, compressed, tmp_path, heldout_ids):
    """targets/ignore were only a listing: the report said 1 layer, the cache compressed all 6 (an audit's find)."""
    model, report = compress.apply(compress.load("builtin:tiny"), [compress.get_pass("gear_kv")(bits=4, **args)],
                                   progress=False)
    assert report.passes[0].details["layers_compressed"] == len(compressed)
    assert report.passes[0].modules == [f"model.layers.{i}.self_attn" for i in compressed]
    for m in (model, compress.load(compress.save(model, tmp_path / "out"))):
        cache = GEARCache(m.config, m.kv_cache_settings)
        with torch.no_grad():
            m(heldout_ids[:, :200], cache=cache)
        assert [i for i, layer in enumerate(cache.layers) if hasattr(layer, "key_store")] == compressed


def test_a_record_from_before_targets_picked_layers_restores_as_it_was_measured(tmp_path):
    """Before, targets/ignore only named modules (any pattern passed, every layer compressed): such a record restores
    with every layer compressed, not refused or narrowed; a new record keeps the layers skipped as skip_layers."""
    import json

    model, _ = compress.apply(compress.load("builtin:tiny"), [compress.get_pass("gear_kv")(bits=4)], progress=False)
    folder = compress.save(model, tmp_path / "old")
    config = json.loads((folder / "config.json").read_text())
    config["compression"]["passes"][0]["args"].update(targets=["re:.*self_attn.*"], ignore=["model.layers.0.self_attn"])
    (folder / "config.json").write_text(json.dumps(config))
    assert compress.load(folder).kv_cache_settings.skip_layers == []
    new, _ = compress.apply(compress.load("builtin:tiny"), [compress.get_pass("gear_kv")(
        bits=4, ignore=["model.layers.0.self_attn"])], progress=False)
    assert new.config.compression["passes"][0]["args"]["skip_layers"] == [0]


@pytest.mark.parametrize("name,method", [("gear-kv4.yaml", "gear"), ("kivi-2.yaml", "kivi")])
def test_recipes_apply(name, method, tmp_path):
    recipe = compress.Recipe.from_yaml(RECIPES / name)
    model, report = compress.apply(compress.load(recipe.model), recipe, progress=False)
    assert model.kv_cache_settings.method == method
    reloaded = compress.load(compress.save(model, tmp_path / "out", recipe_text=recipe.text))
    assert reloaded.kv_cache_settings == model.kv_cache_settings


def test_default_cache_respects_the_generation_config_and_survives_deepcopy(heldout_ids):
    import copy

    model = compress.load("builtin:tiny")
    compress.apply(model, [compress.get_pass("gear_kv")(bits=4)], progress=False)
    ids = heldout_ids[:, :40]
    # the model's own generation config turns the cache off: no compressed cache is forced on it
    model.generation_config.use_cache = False
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    assert out.cache is None or not isinstance(out.cache, GEARCache)
    model.generation_config.use_cache = True
    # a deep copy generates with its own weights, not the original's
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.lm_head.weight.zero_()  # every logit 0: greedy picks token 0 (which is also end-of-text)
        out = clone.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    n = ids.shape[1]
    assert out.sequences[0, n].item() == 0 and isinstance(out.cache, GEARCache)
    with torch.no_grad():
        mine = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert mine[0, n].item() != 0


def test_a_cache_implementation_the_source_names_is_removed_at_apply_and_load(heldout_ids, tmp_path):
    """Named by the source model's generation_config: the compressed cache replaces it anyway, so apply removes it
    with a note, and compress.load of a checkpoint that still names it too (it warned at every generate, a raw
    Python warning under `compress generate`)."""
    import json

    model = compress.load("builtin:tiny")
    model.generation_config.cache_implementation = "static"
    _, report = compress.apply(model, [compress.get_pass("gear_kv")(bits=4)], progress=False)
    assert "cache_implementation='static'" in " ".join(report.passes[0].notes)
    out = compress.save(model, tmp_path / "out")
    path = out / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "cache_implementation": "static"}))
    reloaded = compress.load(out)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        result = reloaded.generate(heldout_ids[:, :40], max_new_tokens=2, do_sample=False,
                                   return_dict_in_generate=True)
    assert isinstance(result.cache, GEARCache)


def test_a_cache_implementation_in_the_checkpoint_does_not_replace_the_compressed_cache(heldout_ids):
    """A source model's generation_config.json may name a cache (e.g. "static"); it used to win silently, so a gear_kv
    checkpoint generated with an uncompressed cache while inspect and eval reported the compressed one."""

    model = compress.load("builtin:tiny")
    compress.apply(model, [compress.get_pass("gear_kv")(bits=4)], progress=False)
    model.generation_config.cache_implementation = "dynamic"
    ids = heldout_ids[:, :80]
    with torch.no_grad(), pytest.warns(UserWarning, match="cache_implementation='dynamic'; its gear_kv cache"):
        out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.cache, GEARCache) and model.generation_config.cache_implementation == "dynamic"
    from transformers import GenerationConfig  # a caller's config that names no cache: transformers fills it in

    with torch.no_grad():
        out = model.generate(ids, generation_config=GenerationConfig(max_new_tokens=3, do_sample=False,
                                                                     return_dict_in_generate=True))
    assert isinstance(out.cache, GEARCache)
    with torch.no_grad():  # the caller's own choice still opts out
        out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                             cache_implementation="dynamic")
    assert isinstance(out.cache, DynamicCache) and not isinstance(out.cache, GEARCache)
    with warnings.catch_warnings():  # no cache, or the caller's own: nothing to say (and transformers takes them)
        warnings.simplefilter("error")
        with torch.no_grad():
            model.generate(ids, max_new_tokens=2, do_sample=False, use_cache=False)
            out = model.generate(ids, max_new_tokens=2, do_sample=False, cache=DynamicCache(),
                                 return_dict_in_generate=True)
    assert not isinstance(out.cache, GEARCache)


def test_the_timed_decoding_reads_the_compressed_past(monkeypatch, reference_tokenizer):
    """`compress eval`'s tokens/s: its prompt was 2 tokens, so with residual_length 64 one timed step of 64 read the
    compressed past (a helper's count: 6 of 408 layer calls); now 4 chunks of the window, every step."""
    from compress.evaluate import generation_speed, speed_prompt
    from compress.kvcache import cache as cache_module

    model = compress.load("builtin:tiny")
    assert speed_prompt(model, reference_tokenizer).shape == (1, 128)
    compress.apply(model, [compress.get_pass("gear_kv")(bits=4, residual_length=64, group_size=32)], progress=False)
    prompt = speed_prompt(model, reference_tokenizer)
    assert prompt.shape == (1, 256)
    calls, read_past = [0], [0]
    update = cache_module.GEARLayer.update

    def counting(self, keys, values, *args, **kwargs):
        calls[0] += 1
        read_past[0] += bool(self.is_initialized and self.key_store.num_tokens)
        return update(self, keys, values, *args, **kwargs)

    monkeypatch.setattr(cache_module.GEARLayer, "update", counting)
    assert generation_speed(model, reference_tokenizer, prompt, new_tokens=8) > 0
    per_generate = [4, 8]  # warm-up, the timed tokens: each a prefill then steps
    layers = model.config.num_hidden_layers
    assert calls[0] == sum(per_generate) * layers
    assert read_past[0] == sum(n - 1 for n in per_generate) * layers  # every decoding step


def test_the_token_clock_times_from_the_first_new_token():
    """The prompt's put and the first token's (the prompt's forward) are not in the rate."""
    from compress.evaluate import _TokenClock

    clock = _TokenClock()
    clock.times = [0.0, 5.0, 5.5, 6.0, 6.5]  # prompt, token 1 (after the forward), tokens 2-4 every 0.5 s
    assert clock.tokens_per_second() == pytest.approx(2.0)
    clock.times = [0.0, 5.0]
    with pytest.raises(CompressError, match="fewer than two tokens"):
        clock.tokens_per_second()


def test_generate_pickles_as_an_object_holding_the_model():
    """generate was a bound method, which pickle stores as getattr(model, name): dumps worked, loading failed before
    the model's state existed. Checked on what pickle writes, without unpickling anything (the project never
    unpickles): the replacement reduces to its class with the model as state, and no getattr is in the stream.
    Rebuilding from that same reduction is what deepcopy does (the test above)."""
    import pickle

    from compress.kvcache.pass_ import GenerateWithCompressedCache

    model = compress.load("builtin:tiny")
    compress.apply(model, [compress.get_pass("gear_kv")(bits=4)], progress=False)
    _, args, state = model.generate.__reduce_ex__(pickle.DEFAULT_PROTOCOL)[:3]
    assert args == (GenerateWithCompressedCache,) and state["model"] is model
    assert b"getattr" not in pickle.dumps(model)


def test_entry_written_before_the_paged_format_restores(heldout_ids):
    """A gear_kv entry from format version 1 (no page_chunks / lowrank_dtype): the checkpoint holds only cache
    settings, so it restores onto the paged (v2) cache with the new fields at their defaults."""
    old_args = dict(method="gear", bits=4, group_size=64, residual_length=64, key_rank=1, value_rank=0,
                    key_prefill_rank=None, value_prefill_rank=None, outlier_ratio=0.0, power_iters=3, skip_layers=[],
                    targets=["re:.*self_attn"], ignore=[])
    model = compress.load("builtin:tiny")
    compress.get_pass("gear_kv")(old_args).restore(model, {"pass": "gear_kv", "args": old_args})
    with torch.no_grad():
        out = model.generate(heldout_ids[:, :140], max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    store = out.cache.layers[0].key_store
    assert out.cache.settings.page_chunks == 32 and len(store.pages) == 1 and store.pages[0].rank == 1


def test_apply_scores_a_long_residual_window_on_longer_windows_before_writing(tmp_path):
    """A residual window of 512 tokens left nothing to score in the summary's 512-token windows: the error came after
    the checkpoint was written (an audit's find). The windows now grow with it (up to the model's context); a
    window as long as the context is refused before any work."""
    import json

    from click.testing import CliRunner

    from compress.cli import main

    def run(residual: int, out: str):
        recipe = tmp_path / f"r{residual}.yaml"
        recipe.write_text(f"model: builtin:tiny\npasses:\n  - gear_kv: {{method: kivi, bits: 4, residual_length: "
                          f"{residual}}}\n")
        return CliRunner().invoke(main, ["apply", str(recipe), "--output", str(tmp_path / out), "--eval-windows", "1",
                                         "--json"])

    done = run(512, "ok")
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)["eval"]["kv_cache"]
    assert summary["protocol"].startswith("1 window of 768 tokens fed in chunks of 512")
    assert summary["tokens_scored"] == 255
    refused = run(1024, "no")
    assert refused.exit_code == 2 and "leaves no room in the model's context (1024 tokens)" in refused.stderr
    assert "Traceback" not in refused.output and not (tmp_path / "no").exists()
