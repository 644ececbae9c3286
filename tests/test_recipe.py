"""Recipe validation: every problem reported with FILE:LINE:COLUMN and a message that says what to fix."""
from __future__ import annotations

import textwrap

import pytest

from compress import Recipe, RecipeError

BAD_RECIPES = [
    # (recipe text, expected line, fragment of the message)
    ("model: builtin:tiny\npasses:\n  - prune: {sparsity: 1.5}\n", 3, "sparsity: sparsity is the fraction of weights to zero, in [0, 1); got 1.5"),
    ("model: builtin:tiny\npasses:\n  - prune: {sparsity: -0.1}\n", 3, "in [0, 1); got -0.1"),
    ("model: builtin:tiny\npasses:\n  - prune: {sparsity: half}\n", 3, "valid number"),
    ("model: builtin:tiny\npasses:\n  - prune:\n      methd: magnitude\n", 4, "unknown key 'methd' (did you mean 'method'"),
    ("model: builtin:tiny\npasses:\n  - prun: {}\n", 3, "unknown pass 'prun' (did you mean 'prune'"),
    ("model: builtin:tiny\npasses:\n  - prune: {method: random}\n", 3, "method"),
    ("model: builtin:tiny\npasses:\n  - prune: {structure: '4:2'}\n", 3, "structure '4:2'"),
    ("model: builtin:tiny\npasses:\n  - prune: {structure: 'two:four'}\n", 3, '"unstructured" or "N:M"'),
    ("model: builtin:tiny\npases:\n  - prune: {}\n", 2, "unknown key 'pases' (did you mean 'passes'"),
    ("model: builtin:tiny\n", 1, "no `passes:` list"),
    ("model: builtin:tiny\npasses: []\n", 2, "non-empty list"),
    ("model: builtin:tiny\npasses:\n  - prune: {}\n    quantize: {}\n", 3, "one `pass_name: {arguments}` mapping"),
    ("model: builtin:tiny\npasses:\n  - prune: 0.5\n", 3, "must be a mapping"),
    ("model: [1, 2]\npasses:\n  - prune: {}\n", 1, "model must be a local folder path or builtin:NAME"),
    ("model: builtin:tiny\ncalibration: {num_samples: 0}\npasses:\n  - prune: {}\n", 2, "num_samples"),
    ("model: builtin:tiny\ncalibration:\n  sorce: data.txt\npasses:\n  - prune: {}\n", 3,
     "unknown key 'sorce' (did you mean 'source'"),
    ("model: builtin:tiny\ncalibration: {seq_len: many}\npasses:\n  - prune: {}\n", 2, "seq_len"),
    ("model: builtin:tiny\npasses:\n  - prune: {targets: {Linear: 1}}\n", 3, "targets: Input should be a valid list"),
    ("model: builtin:tiny\npasses:\n  - prune: {targets: [Linear, 3]}\n", 3, "targets.1: Input should be a valid string"),
    ("model: builtin:tiny\noutput: 3\npasses:\n  - prune: {}\n", 2, "output must be a folder path"),
    ("model: builtin:tiny\npasses:\n  - prune: {sparsity: 0.5\n", 4, "not valid YAML"),
    ("- just\n- a list\n", 1, "a recipe is a mapping"),
    ("model: builtin:tiny\nmodel: other\npasses:\n  - prune: {}\n", 2, "duplicate key 'model'"),
    ("model: builtin:tiny\npasses:\n  - prune: {sparsity: 0.2}\n  - prune: {method: wanda}\n", 4,
     "pass 'prune' with these arguments needs calibration data"),
    # regexes compile without a model: `compress validate` finds them
    ("model: builtin:tiny\npasses:\n  - prune: {targets: ['re:[unclosed']}\n", 3, "'re:[unclosed' is not a valid regex"),
    ("model: builtin:tiny\npasses:\n  - prune: {ignore: ['re:(x']}\n", 3, "ignore: target 're:(x' is not a valid regex"),
    ("model: builtin:tiny\ncalibration: {source: builtin:calibration}\npasses:\n  - recover: {train_modules: ['re:(']}\n",
     4, "train_modules: target 're:(' is not a valid regex"),
    ("model: builtin:tiny\ncalibration: {source: builtin:calibration}\npasses:\n  - recover: {lr: 1e-4}\n", 4,
     "lr: Input should be a valid number (got '1e-4'); YAML reads 1e-4 as text: write 1.0e-4"),
    ("model: builtin:tiny\ncalibration: {source: builtin:calibration}\npasses:\n  - recover: {max_tokens: 2.5e3}\n",
     4, "(got '2.5e3'); YAML reads 2.5e3 as text: write 2.5e+3 or 2500"),  # (1.0e3: text too, it needs the sign)
    # quoted, a number is text by the quotes: the hint said to write what was written ("1.0e-4")
    ("model: builtin:tiny\ncalibration: {source: builtin:calibration}\npasses:\n  - recover: {lr: \"1.0e-4\"}\n",
     4, "(got '1.0e-4'); the quotes make '1.0e-4' text: write 1.0e-4 without them"),
    ("model: builtin:tiny\ncalibration: {source: builtin:calibration}\npasses:\n  - recover: {max_tokens: 1e23}\n",
     4, "YAML reads 1e23 as text: write 1.0e+23"),
    # a bound equal to the input: the message named the bound and the input was left out ("0" was "in" it)
    ("model: builtin:tiny\ncalibration: {source: builtin:calibration}\npasses:\n  - vq_logits: {distill_lr: 0}\n",
     4, "distill_lr: Input should be greater than 0 (got 0)"),
    # built-in names are known without a model: `compress validate` finds a typo (it passed, apply failed later)
    ("model: builtin:tiy\npasses:\n  - prune: {}\n", 1, "unknown built-in model 'builtin:tiy'; available: "),
    ("model: builtin:tiny\ncalibration: {source: builtin:calibraton}\npasses:\n  - prune: {method: wanda}\n", 2,
     "unknown built-in corpus 'builtin:calibraton'; use one of builtin:calibration, builtin:heldout"),
    # keys that are not names, and merge keys (`<<`) naming no mapping, ended in a traceback
    ("model: builtin:tiny\npasses:\n  - prune: {1: 2}\n", 3, "key 1 is not a name"),
    ("model: builtin:tiny\npasses:\n  - prune: {? [a, b] : 1}\n", 3, "key ['a', 'b'] is not a name"),
    ("model: builtin:tiny\npasses:\n  - prune: {<<: 3}\n", 3, "`<<` merges mappings"),
    ("model: builtin:tiny\nx: &a {sparsity: 0.5}\npasses:\n  - prune: {<<: *a, <<: *a}\n", 4, "duplicate key '<<'"),
    # a key written out is reported at its own line, written before `<<` too (the merged one's line was given)
    ("model: builtin:tiny\npasses:\n  - prune: &p {method: magnitude}\n  - prune: {sparsity: 2.0,\n     <<: *p}\n", 4,
     "sparsity: sparsity is the fraction"),
    # a merged value's mistake is reported where that value is written (the anchor's line)
    ("model: builtin:tiny\npasses:\n  - prune: &p {method: magnitude, sparsity: 0.5}\n  - quantize: {<<: *p}\n", 3,
     "pass 'quantize': unknown key 'sparsity'"),
    # an empty section or value was taken as absent: validate passed, apply then asked for what was there
    ("model: builtin:tiny\ncalibration:\npasses:\n  - prune: {method: wanda}\n", 2, "calibration is empty"),
    ("model: builtin:tiny\noutput: ''\npasses:\n  - prune: {}\n", 2, "output is empty"),
    ("model: ' '\npasses:\n  - prune: {}\n", 1, "model is empty"),
    # read only from JSON / datasets sources: elsewhere they did nothing, silently
    ("model: builtin:tiny\ncalibration: {source: builtin:calibration, text_field: body}\npasses:\n  - prune: {}\n", 2,
     "calibration.text_field does nothing for builtin:calibration"),
    ("model: builtin:tiny\ncalibration: {source: builtin:calibration, split: test}\npasses:\n  - prune: {}\n", 2,
     "calibration.split does nothing"),
    ("model: builtin:tiny\ncalibration: {source: '~no-such-user-here/x.txt'}\npasses:\n  - prune: {}\n", 2,
     "cannot expand '~no-such-user-here'"),  # (pathlib's RuntimeError: a traceback)
    # seeds past what numpy / torch generators take failed after the earlier passes' work
    ("model: builtin:tiny\ncalibration: {source: builtin:calibration}\npasses:\n  - recover: {seed: 4294967296}\n", 4,
     "seed: Input should be less than or equal to 4294967295"),
    ("model: builtin:tiny\ncalibration: {source: builtin:calibration}\npasses:\n  - vq_logits: {seed: 1180591620717411303424}\n",
     4, "seed: Input should be less than or equal to 18446744073709551615"),
]


def test_merge_keys_share_arguments_and_the_keys_written_out_win():
    recipe = Recipe.from_text(textwrap.dedent("""\
        model: builtin:tiny
        passes:
          - prune: &attention {method: magnitude, sparsity: 0.5, targets: ['re:.*self_attn.*']}
          - prune: {<<: [*attention, {storage: dense}], sparsity: 0.3, targets: ['re:.*mlp.*']}
        """))
    assert recipe.passes[1].args == {"method": "magnitude", "storage": "dense", "sparsity": 0.3,
                                     "targets": ["re:.*mlp.*"]}


@pytest.mark.parametrize("text,line,fragment", BAD_RECIPES)
def test_bad_recipe_reports_line_and_message(text, line, fragment):
    with pytest.raises(RecipeError) as err:
        Recipe.from_text(text, source="bad.yaml")
    message = str(err.value)
    assert f"bad.yaml:{line}:" in message, message
    assert fragment in message, message


def test_number_hints():
    from compress.recipe import _yaml_hint

    assert _yaml_hint("1e6") == "; YAML reads 1e6 as text: write 1.0e+6 or 1000000"
    assert _yaml_hint("1e23") == "; YAML reads 1e23 as text: write 1.0e+23"  # not a 24-digit integer
    assert _yaml_hint("1.0e-4", quoted=True) == "; the quotes make '1.0e-4' text: write 1.0e-4 without them"
    assert _yaml_hint("fast") == _yaml_hint(3) == ""


def test_every_problem_is_reported_at_once():
    text = "model: builtin:tiny\nextra: 1\npasses:\n  - prune: {sparsity: 2}\n  - nope: {}\n"
    with pytest.raises(RecipeError) as err:
        Recipe.from_text(text, source="r.yaml")
    problems = err.value.problems
    assert [p.split(":")[1] for p in problems] == ["2", "4", "5"], problems


def test_good_recipe_builds_passes(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(textwrap.dedent("""\
        model: builtin:tiny
        calibration: {source: builtin:calibration, num_samples: 4, seq_len: 32}
        passes:
          - prune: {method: magnitude, structure: "2:4"}
          - prune
        output: out/x
    """))
    recipe = Recipe.from_yaml(path)
    passes = recipe.build_passes()
    assert [p.name for p in passes] == ["prune", "prune"]
    assert passes[0].config.structure == "2:4" and passes[1].config.structure == "unstructured"
    assert recipe.calibration.num_samples == 4 and recipe.output == "out/x"


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        Recipe.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="is not a regular file"):  # a device: it exists, and is no recipe
        Recipe.from_yaml("/dev/null")


def test_every_shipped_recipe_validates():
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    assert len(recipes) >= 3
    for path in recipes:
        recipe = Recipe.from_yaml(path)
        assert recipe.model in ("builtin:tiny", "builtin:small") and recipe.output, path  # runs with no download
        assert recipe.build_passes()


def test_passes_import_on_first_use(tmp_path):
    """A recipe's check imports only the passes it names: the KV cache pass loads transformers' attention and mask
    registries (6-9 s on a slow CPU), which `compress validate` of a pruning recipe should not wait for."""
    import subprocess
    import sys

    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - prune: {sparsity: 0.5}\n")
    script = (f"import sys\nfrom compress.recipe import Recipe\nRecipe.from_yaml({str(recipe)!r})\n"
              "print('compress.kvcache' in sys.modules, 'compress.linearize' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.stdout.split() == ["False", "False"], proc.stderr[-2000:]


def test_importing_the_kv_cache_registers_its_attention():
    """`import compress.kvcache` imports its attention module, which registers "gear_kv" with transformers (a model
    loaded with that attention needs it; making the import lazy broke such models)."""
    import compress.kvcache as kvcache
    from transformers import AttentionInterface

    assert "gear_attention_forward" in vars(kvcache)  # imported by the package itself, not on attribute access
    assert AttentionInterface._global_mapping["gear_kv"] is kvcache.gear_attention_forward
