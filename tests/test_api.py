"""The Python API: apply a list of passes built in code, the registry, third-party passes by entry point."""
from __future__ import annotations

import pytest
import torch

import compress
from compress import CompressError, ConfigError
from compress import registry


def test_apply_passes_in_code_and_record_them(tiny_model, tmp_path):
    model = tiny_model("llama", hidden_size=128, intermediate_size=256)
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    model, report = compress.apply(model, [compress.passes.Prune(method="magnitude", sparsity=0.25, storage="dense")],
                                   progress=False)
    up = model.model.layers[0].mlp.up_proj
    w = up.dense_weight() if hasattr(up, "dense_weight") else up.weight  # packed or dense storage
    assert (w == 0).float().mean().item() == pytest.approx(0.25, abs=1e-3)
    kept = w != 0
    assert torch.equal(w[kept], before[kept])  # magnitude pruning only zeroes: kept weights are unchanged
    assert report.passes[0].name == "prune" and len(report.passes[0].modules) == 21
    assert model.config.compression["passes"][0]["args"]["sparsity"] == 0.25
    # applying again appends to the record: the checkpoint lists both passes in order
    compress.apply(model, [compress.passes.Prune(sparsity=0.5)], progress=False)
    assert [e["args"]["sparsity"] for e in model.config.compression["passes"]] == [0.25, 0.5]
    # now every decoder Linear is packed: a third prune finds nothing to prune and says so
    with pytest.raises(ConfigError, match="already pruned \\(packed\\) by an earlier pass"):
        compress.apply(model, [compress.passes.Prune(sparsity=0.5)], progress=False)


def test_bad_arguments_in_code_are_config_errors():
    with pytest.raises(ConfigError, match="sparsity"):
        compress.passes.Prune(sparsity=1.0)
    with pytest.raises(ConfigError, match="unexpected|Extra inputs"):
        compress.passes.Prune(sparsity=0.5, bogus=1)
    with pytest.raises(ConfigError, match="Prune: the keys of its settings are names, got 1"):  # was a TypeError
        compress.passes.Prune({1: 2})
    with pytest.raises(CompressError, match="apply\\(\\) takes a Recipe or a list of Pass"):
        compress.apply(torch.nn.Linear(2, 2), ["prune"])


def test_pass_classes_show_their_settings():
    """help(compress.passes.Prune) showed (config=None, **kwargs); dir(compress.passes) listed no pass class."""
    import inspect

    signature = inspect.signature(compress.passes.Prune)
    assert signature.parameters["sparsity"].default == 0.5 and signature.parameters["targets"].default == ["Linear"]
    assert list(signature.parameters)[0] == "config" and "Quantize" in dir(compress.passes)


def test_pass_classes_whose_settings_make_no_signature_still_define():
    """A setting named `config`, a default computed from the other settings, a Config that is not pydantic's: the
    class failed to define (a plugin failed to import)."""
    from pydantic import Field

    class Named(compress.Pass):
        class Config(compress.PassConfig):
            config: int = 1

    class Computed(compress.Pass):
        class Config(compress.PassConfig):
            width: int = 4
            height: int = Field(default_factory=lambda data: data["width"] * 2)

    class Plain(compress.Pass):
        Config = None

    assert Computed().config.height == 8 and Named(config=None).config.config == 1
    assert "height" in str(__import__("inspect").signature(Computed)) and Plain.Config is None


def test_injected_peft_lora_layers_are_refused(tiny_model):
    """LoRA injected into the model itself (peft.inject_adapter_in_model, transformers' add_adapter): its lora_A /
    lora_B were quantized as layers."""
    from peft import LoraConfig, inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"]), tiny_model("llama"))
    with pytest.raises(CompressError, match="holds PEFT LoRA layers .*merge them into the weights first"):
        compress.apply(model, [compress.passes.Quantize(method="rtn", bits=4, group_size=32)], progress=False)


def test_unknown_pass_suggests_close_names():
    with pytest.raises(CompressError, match="did you mean 'prune'"):
        compress.get_pass("prnue")
    for wrong in (3, None, compress.passes.Prune):
        with pytest.raises(CompressError, match="get_pass\\(\\) takes a pass name such as 'prune'"):
            compress.get_pass(wrong)


def test_third_party_pass_registers_through_entry_points(monkeypatch):
    class FakeEntryPoint:
        name = "scale_weights"

        def load(self):
            @compress.register_pass("scale_weights")
            class ScaleWeights(compress.Pass):
                """Multiply target weights by a factor (a plugin, for the test)."""

                class Config(compress.PassConfig):
                    factor: float = 1.0

                def apply(self, model, ctx):
                    for m in self.target_modules(model).values():
                        m.weight.data.mul_(self.config.factor)
                    return compress.PassReport(name=self.name)

            return ScaleWeights

    monkeypatch.setattr(registry, "entry_points", lambda group: [FakeEntryPoint()] if group == "compress.passes" else [])
    monkeypatch.setattr(registry, "_ENTRY_POINTS_LOADED", False)
    monkeypatch.setattr(registry, "_PASSES", dict(registry._PASSES))
    recipe = compress.Recipe.from_text("model: builtin:tiny\npasses:\n  - scale_weights: {factor: 2.0}\n")
    (p,) = recipe.build_passes()
    lin = torch.nn.Sequential(torch.nn.Linear(3, 3))
    w = lin[0].weight.clone()
    p.apply(lin, compress.PassContext(progress=False))
    assert torch.equal(lin[0].weight, 2 * w)


def test_duplicate_registration_is_refused():
    with pytest.raises(ConfigError, match="already registered"):  # (and still a ValueError)
        @compress.register_pass("prune")
        class Other(compress.Pass):
            pass
    with pytest.raises(ValueError, match="already registered"):
        @compress.register_pass("prune")
        class Another(compress.Pass):
            pass


def test_a_pass_class_defined_again_takes_its_name_over(monkeypatch):
    """A notebook cell run twice defines the class again: that was refused as another class's name."""
    monkeypatch.setattr(registry, "_PASSES", dict(registry._PASSES))

    def define():
        @compress.register_pass("cell_pass")
        class CellPass(compress.Pass):
            pass
        return CellPass

    first, second = define(), define()
    assert first is not second and compress.get_pass("cell_pass") is second
    with pytest.raises(ConfigError, match="already registered by .*CellPass; register Another under another name"):
        @compress.register_pass("cell_pass")
        class Another(compress.Pass):
            pass


class Reseeding(compress.Pass):
    """Draws from (and reseeds) every global generator, as transformers' Trainer does in recover."""

    name = "reseeding"

    def apply(self, model, ctx):
        import random

        import numpy as np

        torch.manual_seed(1), random.seed(1), np.random.seed(1)
        torch.rand(3), random.random(), np.random.rand()
        return compress.PassReport(name=self.name, modules=[])


class Forgetful(Reseeding):
    def apply(self, model, ctx):
        super().apply(model, ctx)  # and returns nothing


def test_apply_leaves_the_callers_random_state_alone(tiny_model):
    import random

    import numpy as np

    def draws():
        return torch.rand(2).tolist(), random.random(), float(np.random.rand())

    model = tiny_model("llama")  # (seeds torch)
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    expected = draws()
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    compress.apply(model, [Reseeding()], progress=False)
    assert draws() == expected


def test_a_pass_that_returns_no_report_is_named(tiny_model):
    """It was an AttributeError on NoneType inside apply (the README's stub pass has a `...` body)."""
    with pytest.raises(CompressError, match="pass 'reseeding': apply\(\) returned NoneType, not a PassReport"):
        compress.apply(tiny_model("llama"), [Forgetful()], progress=False)


def test_loads_in_two_threads_build_one_model_at_a_time(monkeypatch):
    """transformers builds under torch's process-wide default dtype: two loads at once gave a model with float32
    tensors among bfloat16 ones, and left the default at bfloat16."""
    import threading
    import time

    from compress import models

    inside, most, read = [0], [0], models._read_folder
    counting = threading.Lock()

    def slow_read(*args, **kwargs):
        with counting:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.3)  # long enough for the other thread to arrive
        try:
            return read(*args, **kwargs)
        finally:
            with counting:
                inside[0] -= 1

    monkeypatch.setattr(models, "_read_folder", slow_read)
    loaded = []
    threads = [threading.Thread(target=lambda: loaded.append(compress.load("builtin:tiny"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and len(loaded) == 2 and torch.get_default_dtype() == torch.float32
    assert {p.dtype for m in loaded for p in m.parameters()} == {next(loaded[0].parameters()).dtype}


def test_a_peft_wrapped_model_is_refused_in_one_line(tiny_model, tmp_path):
    """apply quantized LoRA's own matrices as layers, and the checkpoint it saved did not load."""
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(CompressError, match="apply\(\) takes the transformers model, not PEFT's PeftModel"
                                            ".*merge_and_unload"):
        compress.apply(wrapped, [compress.passes.Quantize(method="rtn", bits=4, group_size=32)], progress=False)
    with pytest.raises(CompressError, match="save\(\) takes the transformers model, not PEFT's"):
        compress.save(wrapped, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_compiled_model_is_compressed_and_saved_as_its_module(tiny_model, tmp_path):
    """The checkpoint held `_orig_mod.`-prefixed names, and compress.load refused it."""
    model = tiny_model("llama")
    compiled = torch.compile(model)
    same, report = compress.apply(compiled, [compress.passes.Quantize(method="rtn", bits=4, group_size=32)],
                                  progress=False)
    assert same is compiled and not any(m.startswith("_orig_mod") for m in report.passes[0].modules)
    compress.save(compiled, tmp_path / "x")
    ids = torch.arange(3, 20).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(compress.load(tmp_path / "x", dtype="float32")(ids).logits, model(ids).logits,
                              atol=1e-5)


def test_bitsandbytes_cpu_kernel_warning_is_filtered():
    """bitsandbytes (imported by PEFT) logs a warning about an optional hub kernel on AVX512-BF16 CPUs on every
    run; compress filters that one message and nothing else from that logger."""
    import logging

    import compress  # noqa: F401  (installs the filter)

    log = logging.getLogger("bitsandbytes.backends.cpu.ops")

    def record(msg):
        return logging.LogRecord(log.name, logging.WARNING, __file__, 1, msg, (), None)

    assert not log.filter(record("Failed to load CPU gemm_4bit_forward from kernels-community: x"))
    assert log.filter(record("some other warning"))


def test_report_totals_stored_bytes_are_what_the_checkpoint_holds(tmp_path, reference_tokenizer):
    """report.json's `stored_bytes_after` is the checkpoint's tensor bytes (counted here from the file), while
    `bytes_after` is what memory holds (a packed layer's row offsets too, so it may exceed the file)."""
    from safetensors import safe_open

    model = compress.load("builtin:tiny")
    model, report = compress.apply(model, [compress.passes.Prune(method="magnitude", sparsity=0.5)], progress=False)
    out = compress.save(model, tmp_path / "out", tokenizer=reference_tokenizer)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        on_disk = sum(f.get_tensor(k).nbytes for k in f.keys())
    d = report.to_dict()
    assert d["stored_bytes_after"] == on_disk == report.passes[-1].stored_bytes_after
    assert d["stored_bytes_before"] == report.passes[0].stored_bytes_before > on_disk
    assert d["bytes_after"] > d["stored_bytes_after"]  # int64 row offsets of the packed layers live in memory only


def test_api_mistakes_are_one_line_errors_before_any_work(tmp_path):
    """What a careless call passes (a helper's audit): each is a CompressError saying what to pass, raised before any
    pass touches the model (a bare TypeError / AttributeError from inside before, or a half-compressed model)."""
    from compress import CompressError

    P = compress.passes
    model = compress.load("builtin:tiny")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    cal = {"source": "builtin:calibration", "num_samples": 4, "seq_len": 32}
    cases = [
        (lambda: compress.apply(model, P.Prune), "takes a Recipe or a list of Pass instances"),
        (lambda: compress.apply(model, None), "takes a Recipe or a list of Pass instances"),
        (lambda: compress.apply("builtin:tiny", [P.Prune()]), "takes a model from compress.load"),
        (lambda: compress.apply(model, [P.Prune(method="wanda")], calibration="builtin:calibration"),
         "calibration= takes a dict"),
        (lambda: compress.apply(model, [P.Prune()], device="gpu"), "use 'cpu' or 'cuda'"),
        (lambda: compress.apply(compress.load("builtin:tiny", meta=True), [P.Prune()]), "on the meta device"),
        (lambda: compress.apply(model, [P.VQLogits(num_codes=16), P.VQLogits(num_codes=16)], calibration=cal),
         "vq_logits appears twice"),
        (lambda: compress.apply(model, [P.GearKV(bits=4), P.GearKV(bits=2)]), "gear_kv appears twice"),
        (lambda: compress.Recipe.from_text(b"passes: []"), "takes the YAML text as a str, got bytes"),
        (lambda: compress.save(model, tmp_path / "o", overwrite="no"), "overwrite must be True or False"),
        (lambda: compress.save(model, tmp_path / "o", tokenizer="builtin:tiny"), "tokenizer= takes a tokenizer"),
        (lambda: compress.save(model, tmp_path / "o", report="done"), "report= takes the report compress.apply"),
        (lambda: compress.apply(model, [P.Prune(method="wanda")], tokenizer="builtin:tiny", calibration=cal),
         "tokenizer= takes a tokenizer"),  # a str has .encode too: it passed, then failed inside calibration
        (lambda: P.Prune("magnitude"), "Prune takes keyword arguments or a dict of its settings, got 'magnitude'"),
        (lambda: P.Prune({"method": "magnitude"}, sparsity=0.3), "not both"),
        (lambda: P.Prune(P.Quantize.Config()), "Prune takes a Prune.Config, got Quantize.Config"),
    ]
    for call, message in cases:
        with pytest.raises(CompressError, match=message):
            call()
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    assert getattr(model.config, "compression", None) is None and not (tmp_path / "o").exists()
    compress.apply(model, [P.GearKV(bits=4)], progress=False)  # a second apply may not replace the first's cache
    with pytest.raises(CompressError, match="already has a compressed KV cache \\(gear, 4 bits\\)"):
        compress.apply(model, [P.GearKV(bits=2)], progress=False)


def test_config_fields_assigned_after_construction_are_checked_whole_before_any_work(monkeypatch):
    """`p.config.sparsity = 0.7` after `structure="2:4"` passed its field's own check; apply pruned 2:4, recorded 0.7,
    and the save refused the record after all the work (an audit's find)."""
    p = compress.passes.Prune(structure="2:4")
    p.config.sparsity = 0.7
    ran = []
    monkeypatch.setattr(type(p), "apply", lambda *a, **k: ran.append(1))
    with pytest.raises(ConfigError, match="structure 2:4 fixes sparsity at 0.5"):
        compress.apply(compress.load("builtin:tiny"), [p], progress=False)
    assert ran == []
    g = compress.passes.GearKV(method="kivi", key_rank=0, value_rank=0, outlier_ratio=0.0)
    with pytest.raises(ConfigError, match="^pass 'gear_kv': key_rank = 4: method 'kivi' has no outliers and no "
                                          "low-rank term"):  # not pydantic's; the pass by its name, not class
        g.config.key_rank = 4


def test_save_takes_the_report_apply_returns(tmp_path):
    """It wrote the ApplyReport's repr as report.json, which `inspect` then could not read (an audit's find)."""
    import json

    model, report = compress.apply(compress.load("builtin:tiny"), [compress.passes.Prune(sparsity=0.3)],
                                   progress=False)
    folder = compress.save(model, tmp_path / "out", report=report)
    assert json.loads((folder / "report.json").read_text()) == json.loads(json.dumps(report.to_dict(), default=str))


def test_a_float32_model_built_in_code_keeps_its_weights_and_other_architectures_are_refused():
    """A model built in code names no dtype in its config: bf16 was assumed, and apply rounded every float32 weight
    to it (16 of 21 tensors changed with no pass). An architecture load refuses went through apply and save, and
    its checkpoint then did not load."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    from compress.errors import UnsupportedModelError

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    assert base.config.dtype is None
    model = copy.deepcopy(base)
    compress.apply(model, [], progress=False)
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), model.state_dict().values()))
    opt = OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                   num_attention_heads=2, word_embed_proj_dim=32)).eval()
    with pytest.raises(UnsupportedModelError, match="model type 'opt' is not supported"):
        compress.apply(opt, [], progress=False)


def test_configs_and_tokenizers_replaced_after_construction_are_user_errors(reference_tokenizer):
    """`p.config = {...}` ended in an AttributeError deep in the run; a CalibrationSpec's field assigned out of
    range in a torch RuntimeError; a raw tokenizers.Tokenizer in an AttributeError inside calibration."""
    from compress.calibration import CalibrationSpec
    from compress.passes import Prune

    model = compress.load("builtin:tiny")
    p = Prune()
    p.config = {"sparsity": 0.9}
    with pytest.raises(ConfigError, match="its config is a dict, not a Prune.Config"):
        compress.apply(model, [p], progress=False)
    spec = CalibrationSpec(num_samples=4, seq_len=64)
    with pytest.raises(ConfigError, match="calibration: num_samples = -5: Input should be greater than or equal to 1"):
        spec.num_samples = -5
    object.__setattr__(spec, "__dict__", {**spec.__dict__, "num_samples": -5})  # past the check: apply checks again
    with pytest.raises(ConfigError, match="num_samples"):
        compress.apply(model, [Prune(method="wanda")], calibration=spec, tokenizer=reference_tokenizer,
                       progress=False)
    with pytest.raises(CompressError, match="takes a tokenizer"):
        compress.apply(model, [Prune(method="wanda")], calibration={"num_samples": 4, "seq_len": 64},
                       tokenizer=reference_tokenizer.backend_tokenizer, progress=False)
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)  # nothing ran
