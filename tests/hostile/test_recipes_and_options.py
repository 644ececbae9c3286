"""Hostile recipes (alias bombs, deep nesting, tags, other encodings, over-long paths) and out-of-range command-line
numbers: each a one-line error naming where, exit 2, before any model loads."""
from __future__ import annotations

import pytest
import torch

import compress
from compress.errors import RecipeError

BOMB = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else ', '.join(['x'] * 9)}]\n" for i in range(8))

RECIPES = {
    # name: (bytes, message fragment)
    "alias bomb": ((BOMB + "passes: [prune]\n").encode(), "once aliases are expanded"),
    "recursive alias": (b"passes: &a [*a]\n", "once aliases are expanded"),
    "too many aliases": (("x: &x 1\n" + "".join(f"k{i}: *x\n" for i in range(100)) + "passes: [prune]\n").encode(),
                         "more than 64 aliases"),
    "deep nesting": (b"passes: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested deeper than 32 levels"),
    "python tag": (b"model: !!python/object/apply:os.system [ls]\npasses: [prune]\n",
                   "tag !!python/object/apply:os.system is not allowed"),
    "custom tag": (b"model: !local x\npasses: [prune]\n", "tag !local is not allowed"),
    "standard tag": (b"passes:\n  - prune: {sparsity: !!float 0.5}\n", "tag !!float is not allowed"),
    "UTF-16": ("passes: [prune]\n".encode("utf-16"), "UTF-16 text; save it as UTF-8"),
    "Latin-1": ("# r\xe9sum\xe9\npasses: [prune]\n".encode("latin-1"), ":1: not UTF-8 text (byte 0xe9)"),
    "over-long model path": (b"model: " + b"m" * 300 + b"\npasses: [prune]\n", ":1:8: model: path too long"),
    "over-long output path": (b"passes: [prune]\noutput: " + b"/".join([b"d" * 200] * 30) + b"\n",
                              ":2:9: output: path too long"),
    "over-long calibration path": (b"calibration: {source: " + b"c" * 300 + b"}\npasses: [prune]\n",
                                   "calibration source: path too long"),
    "too large": (b"passes: [prune]\n#" + b"x" * (2 * 1024 * 1024) + b"\n", "larger than a recipe can be"),
    "NUL byte": (b"passes: [prune]\n\x00\n", ":2: not valid YAML (character #x0000"),
    "two KV caches": (b"passes:\n  - gear_kv: {}\n  - gear_kv: {bits: 2}\n",
                      ":3:5: pass 'gear_kv' appears twice; the second would replace the first"),
    "calibration seed beyond 64 bits": (b"calibration: {source: builtin:calibration, seed: 99999999999999999999999}\n"
                                        b"passes: [prune]\n", ":1:50: calibration: seed: Input should be less than or equal to"),
    # values as written (compress/strict_config.py): pydantic's lax mode read each of these as something else
    "float for whole-number choices": (b"passes:\n  - quantize: {method: rtn, bits: 4.0}\n",
                                       ":2:35: pass 'quantize': bits: Input should be a whole number, not 4.0"),
    "float for an integer": (b"passes:\n  - gear_kv: {bits: 4.0}\n", ":2:21: pass 'gear_kv': bits: Input should be a "
                             "valid integer (got 4.0)"),
    "quoted number": (b'passes:\n  - prune: {sparsity: "0.5"}\n', ":2:23: pass 'prune': sparsity: Input should be a "
                      "valid number (got '0.5')"),
    "boolean for a number": (b"passes:\n  - prune: {sparsity: true}\n", "sparsity: Input should be a valid number"),
    "number for a boolean": (b"passes:\n  - recover: {merge: 1}\n", ":2:22: pass 'recover': merge: Input should be a "
                             "valid boolean (got 1)"),
    "infinite number": (b"passes:\n  - recover: {lr: .inf}\n", "lr: Input should be a finite number (got inf)"),
    "missing calibration file": (b"calibration: {source: no_such_file.txt}\npasses:\n  - prune: {method: wanda}\n",
                                 ":1:23: calibration source no_such_file.txt does not exist"),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_hostile_recipe_is_one_line(name, tmp_path, cli, user_error):
    data, message = RECIPES[name]
    path = tmp_path / "r.yaml"
    path.write_bytes(data)
    with pytest.raises(RecipeError) as info:
        compress.Recipe.from_yaml(path)
    assert message in str(info.value) and len(str(info.value).splitlines()) == 1
    user_error(cli("validate", path), message)
    if name in ("alias bomb", "python tag", "Latin-1"):  # apply reads recipes through the same loader
        user_error(cli("apply", path, "--model", "builtin:tiny", "--output", tmp_path / "o"), message)
        assert not (tmp_path / "o").exists()


def test_over_long_recipe_path(tmp_path, cli, user_error):
    user_error(cli("validate", tmp_path / ("r" * 300 + ".yaml")), "path too long")


def test_recipe_that_is_a_folder(tmp_path, cli, user_error):
    (tmp_path / "dir.yaml").mkdir()
    user_error(cli("validate", tmp_path / "dir.yaml"))


def test_anchors_within_limits_still_work():
    r = compress.Recipe.from_text("passes:\n  - prune: &c {sparsity: 0.5}\n  - prune: *c\n")
    assert [p.args for p in r.passes] == [{"sparsity": 0.5}, {"sparsity": 0.5}]


OPTIONS = [
    (["generate", "builtin:tiny", "--prompt", ""], "the prompt is empty"),
    (["generate", "builtin:tiny", "--prompt", "hi", "--max-new-tokens", "0"], "'--max-new-tokens': 0 is not in the range"),
    (["generate", "builtin:tiny", "--prompt", "hi", "--max-new-tokens", "-5"], "'--max-new-tokens'"),
    (["generate", "builtin:tiny", "--prompt", "hi", "--max-new-tokens", "100000"], "exceed the model's context of 1024"),
    (["generate", "builtin:tiny", "--prompt", "hi", "--sample", "--temperature", "0"], "'--temperature': 0.0 is not"),
    (["generate", "builtin:tiny", "--prompt", "hi", "--sample", "--temperature", "nan"], "'--temperature'"),
    (["generate", "builtin:tiny", "--prompt", "hi", "--sample", "--temperature", "1e-300"],
     "'--temperature': 1e-300 is not"),
    (["generate", "builtin:tiny", "--prompt", "hi", "--sample", "--top-p", "1.5"], "'--top-p'"),
    (["eval", "builtin:tiny", "--seq-len", "1"], "'--seq-len': 1 is not in the range"),
    (["eval", "builtin:tiny", "--seq-len", "4096", "--no-speed"], "longer than the model's context (1024 tokens)"),
    (["eval", "builtin:tiny", "--max-windows", "0"], "'--max-windows'"),
    (["eval", "builtin:tiny", "--baseline", "/nonexistent", "--no-speed"], "--baseline: model /nonexistent does not"),
    (["eval", "builtin:tiny", "--baseline", "builtin:nope", "--no-speed"], "--baseline: unknown built-in model"),
    (["generate", "builtin:tiny", "--prompt", "hi", "--top-p", "0.5", "--seed", "3"],
     "--top-p and --seed only apply to sampling"),
    (["apply", "recipes/magnitude-50.yaml", "--eval-windows", "-1", "--output", "never"], "'--eval-windows'"),
    (["apply", "recipes/magnitude-50.yaml", "--dtype", "int8", "--output", "never"], "'--dtype'"),
    (["generate", "builtin:tiny", "--prompt", "hi", "--sample", "--seed", "99999999999999999999999"], "'--seed'"),
    (["generate", "builtin:tiny", "--prompt", "hi", "--sample", "--seed", str(2**32 + 1)], "'--seed'"),  # = seed 1
    (["generate", "builtin:tiny", "--prompt", "hi", "--sample", "--seed", "-1"], "'--seed'"),
    (["generate", "builtin:tiny", "--prompt", "hi", "--temperature", "0.5"], "--temperature only applies to sampling; add --sample"),
    (["generate", "builtin:tiny", "--prompt", "hi", "--seed", "3"], "--seed only applies to sampling; add --sample"),
    (["eval", "builtin:tiny", "--suite-limit", "3"], "--suite-limit limits the suite's examples: add --suite kick"),
    (["apply", "recipes/magnitude-50.yaml", "--max-memory", "1e400GB", "--output", "never"],
     "is more memory than any machine has"),
    (["apply", "recipes/magnitude-50.yaml", "--max-memory", "1e400GB", "--output", "never", "--dry-run"],
     "is more memory than any machine has"),
    (["apply", "recipes/magnitude-50.yaml", "--max-memory", "1MB", "--offload-folder", "never/spill", "--output",
      "never"], "where this run writes while it works (a pass's checkpoint_dir or --offload-folder)"),
    (["apply", "recipes/magnitude-50.yaml", "--offload-folder", "never/spill", "--output", "never"],
     "give --max-memory too"),  # it was ignored without --max-memory
    (["apply", "recipes/activation-sparse.yaml", "--max-memory", "1MB", "--output", "never", "--dry-run"],
     "cannot run with decoder layers left on disk"),
]


@pytest.mark.parametrize("args,message", OPTIONS, ids=[" ".join(a[2:]) or a[0] for a, _ in OPTIONS])
def test_numeric_options_are_range_checked(args, message, cli, user_error, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    user_error(cli(*args), message)
    assert not Path("never").exists()


def test_a_whitespace_prompt_is_a_prompt(cli):
    """"\n" (start a paragraph) tokenizes to a token: it generates, only "" is refused."""
    result = cli("generate", "builtin:tiny", "--prompt", "\n", "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("\n") and len(result.output) > 2  # the prompt, new text, echo's newline


def test_sample_help_names_only_options_that_exist(cli):
    out = cli("generate", "--help").output
    assert "--top-p" in out and "--temperature" in out


APPLY_MISTAKES = {
    # name: (recipe text, {TEXTS}: a folder of .txt files; message fragments)
    "calibration folder that is no datasets folder": (
        "calibration: {{source: {texts}, num_samples: 2, seq_len: 16}}\npasses:\n  - prune: {{method: wanda}}\n",
        ["is a folder but not a datasets folder"]),
    "calibration longer than the context": (
        "calibration: {{source: builtin:calibration, num_samples: 1, seq_len: 2048}}\n"
        "passes:\n  - prune: {{method: wanda}}\n",
        ["r.yaml:1:60: calibration: sequences of 2048 tokens are longer than the model's context (1024 tokens)"]),
    "prune after quantize": ("passes:\n  - quantize: {{method: rtn}}\n  - prune: {{}}\n",
                             [":3:5: prune: every layer the targets match is quantized or pruned (packed) by an "
                              "earlier pass", "put prune before quantize"]),
    "prune twice (packed)": ("passes:\n  - prune: {{}}\n  - prune: {{structure: '2:4'}}\n",
                             [":3:5: prune: every layer", "prune each layer once"]),
    "recover checkpoint_dir inside the output": (
        "calibration: {{source: builtin:calibration, num_samples: 2, seq_len: 32}}\n"
        "passes:\n  - recover: {{checkpoint_dir: {out}/trainer, max_tokens: 256}}\n",
        ["trainer, where this run writes while it works (a pass's checkpoint_dir"]),
    "linearize twice over the same layers": (
        "passes:\n  - linearize: {{layers: [0, 1]}}\n  - linearize: {{variant: hybrid, layers: [1, 2]}}\n",
        [":3:5: the linearize pass before this one converts model.layers.1.self_attn too", "disjoint `layers`"]),
    "quantize twice": ("passes:\n  - quantize: {{method: rtn}}\n  - quantize: {{method: rtn, bits: 8}}\n",
                       [":3:5: quantize: every layer the targets match is quantized by an earlier quantize pass"]),
    "bitsandbytes after a packing prune": ("passes:\n  - prune: {{structure: '2:4'}}\n  - quantize: {{method: nf4}}\n",
                                           [":3:5: quantize (method nf4): every layer the targets match is stored "
                                            "packed by an earlier prune pass", "use method gptq or rtn"]),
    "a residual window as long as the context": (
        "passes:\n  - gear_kv: {{residual_length: 1024}}\n",
        [":2:5: gear_kv: residual_length 1024 leaves no room in the model's context (1024 tokens)"]),
    "a hybrid window longer than the context": (
        "passes:\n  - linearize: {{variant: hybrid, window: 100000}}\n",
        [":2:5: linearize: window 100000 is longer than the model's context (1024 tokens)"]),
    "an option of another linearize variant": (
        "passes:\n  - linearize: {{variant: gla, window: 32, alpha: 0.3}}\n",
        ["window, alpha apply to variant hybrid only (this is variant gla): drop them or set variant: hybrid"]),
    "prune with sparsity 0": ("passes:\n  - prune: {{sparsity: 0.0}}\n", ["sparsity 0 prunes nothing"]),
    "activation sparsity after quantize": (
        "calibration: {{source: builtin:calibration, num_samples: 2, seq_len: 32}}\n"
        "passes:\n  - quantize: {{method: rtn}}\n  - activation_sparsity: {{}}\n",
        [":4:5: activation_sparsity needs the MLPs' dense weights", "put activation_sparsity first"]),
    "activation sparsity after an unmerged adapter on the MLPs": (
        "calibration: {{source: builtin:calibration, num_samples: 2, seq_len: 32}}\npasses:\n"
        "  - recover: {{targets: ['re:.*mlp\\..*_proj$'], merge: false, max_tokens: 256}}\n"
        "  - activation_sparsity: {{}}\n",
        [":4:5: activation_sparsity needs the MLPs' dense weights, but the recover pass before it"]),
}


@pytest.mark.parametrize("name", list(APPLY_MISTAKES))
def test_recipe_mistakes_apply_finds_before_any_work(name, tmp_path, cli, user_error):
    text, fragments = APPLY_MISTAKES[name]
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("some text " * 100)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text.format(texts=tmp_path / "texts", out=tmp_path / "o"))
    user_error(cli("apply", recipe, "--model", "builtin:tiny", "--output", tmp_path / "o", "--no-eval"), *fragments)
    assert not (tmp_path / "o").exists()
    user_error(cli("apply", recipe, "--model", "builtin:tiny", "--output", tmp_path / "o", "--dry-run"), *fragments)


@pytest.mark.parametrize("name,value,message", [
    ("COMPRESS_KERNELS", "bogus", "COMPRESS_KERNELS='bogus' is not understood; use one of: auto, torch, triton"),
    ("COMPRESS_CPU_KERNELS", "of", "COMPRESS_CPU_KERNELS='of' is not understood"),
    ("COMPRESS_CPU_HALF_PRECISION", "maybe", "COMPRESS_CPU_HALF_PRECISION='maybe' is not understood"),
    ("COMPRESS_SPARSE_PATH", "cublas", "COMPRESS_SPARSE_PATH='cublas' is not a sparse path; use one of: packed_gemv"),
])
def test_misspelt_environment_settings_are_one_line(name, value, message, cli, user_error, monkeypatch):
    """They were silently ignored (the run went on with the default the user meant to change)."""
    monkeypatch.setenv(name, value)
    user_error(cli("inspect", "builtin:tiny"), message)
    with pytest.raises(compress.CompressError, match=message):
        compress.load("builtin:tiny")


def test_triton_forced_without_a_gpu_or_interpreter_is_one_line(cli, user_error, monkeypatch):
    """It ended in a driver traceback ("0 active drivers") in the middle of generating."""
    from compress.kernels import dispatch

    monkeypatch.setenv("COMPRESS_KERNELS", "triton")
    monkeypatch.setattr(dispatch, "interpreted", lambda: False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # a CPU machine, also when run on a GPU one
    user_error(cli("generate", "builtin:tiny", "--prompt", "hi", "--max-new-tokens", "2"),
               "COMPRESS_KERNELS=triton needs a CUDA GPU, or TRITON_INTERPRET=1")


def test_every_accepted_environment_value_reads(monkeypatch):
    """Each value a variable accepts (on/1/true/yes were accepted, as anything-but-off, before the check) maps to
    what it means, spaces and case aside."""
    from compress.environment import CHOICES, check_environment, setting

    for name, allowed in CHOICES.items():
        for value, meaning in allowed.items():
            monkeypatch.setenv(name, f" {value.upper()} ")
            assert setting(name) == meaning
            check_environment() if name != "COMPRESS_KERNELS" or meaning != "triton" else None
        monkeypatch.delenv(name)


def test_environment_values_are_read_as_they_are_checked(monkeypatch):
    """The check and the code that acts on a value parse it alike: " off " used to pass one and be ignored by the
    other."""
    from compress.environment import setting
    from compress.models import native_dtype

    monkeypatch.setenv("COMPRESS_CPU_HALF_PRECISION", " No ")
    assert setting("COMPRESS_CPU_HALF_PRECISION") == "off" and not native_dtype(torch.bfloat16, "cpu")
    pytest.importorskip("triton")
    from compress.kernels.dispatch import use_triton

    monkeypatch.setenv("COMPRESS_KERNELS", " Triton")  # forced: Triton even for a CPU tensor (interpreted here)
    assert setting("COMPRESS_KERNELS") == "triton" and use_triton(torch.zeros(1))


@pytest.mark.parametrize("args, fragment", [
    (["apply", "--outpt", "x"], "No such option '--outpt'. Did you mean '--output'? See 'compress apply --help'."),
    (["apply"], "Missing argument 'RECIPE'. See 'compress apply --help'."),
    (["nosuch"], "No such command 'nosuch'. See 'compress --help'."),
    (["--bogus"], "No such option '--bogus'. See 'compress --help'."),
    (["generate", "builtin:tiny", "--dtype", "float8"], "Invalid value for '--dtype'"),
])
def test_command_line_mistakes_take_one_line(args, fragment):
    """click's own usage errors took four lines (usage, hint, blank, error): one line now, the help hint in it."""
    from click.testing import CliRunner

    from compress.cli import main

    result = CliRunner().invoke(main, args, prog_name="compress")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert fragment in result.output


def test_a_misspelt_setting_name_is_refused(cli, user_error, monkeypatch):
    """COMPRESS_KERNEL=torch (no S) used to be ignored, so the user ran the kernels they meant to avoid; a name far
    from every setting may belong to another program and is left alone."""
    from compress.environment import misspelt_names

    monkeypatch.setenv("COMPRESS_KERNEL", "torch")
    monkeypatch.setenv("COMPRESS_LEVEL", "9")
    assert misspelt_names() == {"COMPRESS_KERNEL": "COMPRESS_KERNELS"}
    user_error(cli("validate", "recipes/liger-gla.yaml"), "COMPRESS_KERNEL is not a compress setting; did you mean "
               "COMPRESS_KERNELS?")
    monkeypatch.delenv("COMPRESS_KERNEL")
    assert cli("validate", "recipes/liger-gla.yaml").exit_code == 0


def test_python_api_takes_tuples_and_ints_for_floats():
    """Strict types are for what a recipe writes; the API's natural spellings still work: a tuple of patterns, an
    integer where a float goes."""
    p = compress.passes.Prune(targets=("re:.*mlp.*",), sparsity=[0, 1 / 2])
    assert p.config.targets == ["re:.*mlp.*"] and p.config.sparsity == [0.0, 0.5]
    with pytest.raises(compress.CompressError, match="bits: Input should be a whole number"):
        compress.passes.Quantize(method="rtn", bits=8.0)


def test_one_pattern_is_a_list_of_one(tmp_path):
    """`targets: Linear` (llm-compressor's spelling) reads as ["Linear"] in every pass's pattern fields; a pattern
    that is not one is still refused where it is written."""
    path = tmp_path / "r.yaml"
    path.write_text("calibration: {source: builtin:calibration}\npasses:\n"
                    "  - prune: {targets: Linear, ignore: re:.*lm_head, sparsity: 0.5}\n"
                    "  - recover: {train_modules: re:.*norm}\n")
    prune, recover = compress.Recipe.from_yaml(path).build_passes()
    assert (prune.config.targets, prune.config.ignore, recover.config.train_modules) == (
        ["Linear"], ["re:.*lm_head"], ["re:.*norm"])
    path.write_text("passes:\n  - prune: {targets: 're:(('}\n")
    with pytest.raises(RecipeError, match=r":2:22: pass 'prune': targets: target 're:\(\(' is not a valid regex"):
        compress.Recipe.from_yaml(path)


def test_bare_command_still_shows_the_help():
    """click raises a bare `compress` as a usage error too: it keeps its help, not one error line."""
    from click.testing import CliRunner

    from compress.cli import main

    result = CliRunner().invoke(main, [], prog_name="compress")
    assert result.output.startswith("Usage: compress") and "apply" in result.output and "error:" not in result.output


class _Plugin:
    """A `compress.passes` entry point whose module runs `body` on its first load (a module imports once)."""

    def __init__(self, name, body):
        self.name, self.value, self._body, self._loaded = name, "scalepkg.passes:ScaleWeights", body, None

    def load(self):
        self._loaded = self._loaded or self._body()
        return self._loaded


def _registers(name):
    def body():
        @compress.register_pass(name)
        class ScaleWeights(compress.Pass):
            pass
        return ScaleWeights
    return body


def _fails():
    raise ModuleNotFoundError("No module named 'scalepkg'")


PLUGIN_MISTAKES = {
    # name: (entry point name, its module's body, the pass the recipe names, message fragments)
    "fails to import": ("scale_weights", _fails, "scale_weights",
                        ("plugin scalepkg.passes:ScaleWeights failed to import: ModuleNotFoundError: No module",)),
    "registers another name": ("scale_weights", _registers("scale"), "scale_weights",
                               ("registered no pass of that name", "register_pass('scale_weights')")),
    "claims a built-in name": ("prune", _registers("prune"), "prune",
                               ("pass 'prune' is built in, and the installed plugin scalepkg",)),
    "registers a built-in name": ("my_prune", _registers("quantize"), "my_prune",
                                  ("failed to import: RegistrationError: pass name 'quantize' is already registered",)),
}


@pytest.mark.parametrize("name", list(PLUGIN_MISTAKES))
def test_a_broken_plugin_is_one_line_naming_it(name, tmp_path, cli, user_error, monkeypatch):
    """A third-party pass (entry point group `compress.passes`) that fails to import, registers nothing under its
    entry point's name, or claims a built-in pass's name: one line naming the plugin, when a recipe names the pass
    and when `compress passes` lists them all."""
    from compress import registry

    entry, body, used, fragments = PLUGIN_MISTAKES[name]
    registry.available_passes()  # every built-in registered first: the copy below must not swallow a registration
    plugin = _Plugin(entry, body)
    monkeypatch.setattr(registry, "entry_points", lambda group: [plugin])
    monkeypatch.setattr(registry, "_ENTRY_POINTS_LOADED", False)
    monkeypatch.setattr(registry, "_PASSES", dict(registry._PASSES))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"passes:\n  - {used}: {{}}\n")
    user_error(cli("validate", recipe), *fragments)
    user_error(cli("passes"), *fragments)


def test_a_calibration_too_big_for_memory_is_refused_before_any_work(tmp_path, monkeypatch, cli, user_error):
    """num_samples 100000 x seq_len 1024 for SparseGPT on builtin:tiny holds ~109 GB of hidden states: it churned
    until killed. Refused at the start of apply and by --dry-run, with the size and the free memory."""
    import compress
    from compress import sequential

    monkeypatch.setattr(sequential, "free_bytes", lambda device: 10**9)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("calibration: {source: builtin:calibration, num_samples: 8192, seq_len: 256}\n"
                      "passes:\n  - quantize: {method: gptq}\n")
    message = ("calibration: pass 'quantize' would hold", "at num_samples 8192 x seq_len 256",
               "more than the 1.00 GB free on cpu: lower num_samples or seq_len")
    for extra in (["--dry-run"], ["--no-eval"]):
        user_error(cli("apply", recipe, "--model", "builtin:tiny", "--output", tmp_path / "o", *extra), *message)
    assert not (tmp_path / "o").exists()
    monkeypatch.setenv("COMPRESS_MEMORY_CHECK", "off")  # the way to run it anyway (it would swap): no refusal
    assert cli("apply", recipe, "--model", "builtin:tiny", "--dry-run").exit_code == 0
    monkeypatch.delenv("COMPRESS_MEMORY_CHECK")
    small = compress.Recipe.from_text(recipe.read_text().replace("8192", "4").replace("256", "32"))
    compress.apply(compress.load("builtin:tiny"), small, progress=False,
                   tokenizer=compress.load_tokenizer("builtin:tiny"))  # a few MB: runs
