"""Fixtures of the hostile-input suite: small checkpoints (random weights, the built-in tokenizer) to damage, and a
CLI runner that asserts how a user mistake must end: exit 2, one or two lines, no traceback."""
from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner

import compress
from compress.cli import main

VOCAB = 8192  # the built-in tokenizer's vocabulary, so that eval/generate run on these checkpoints


def small_model(arch: str = "llama", seed: int = 0, **overrides):
    """A random-init model of the tests' tiny shapes with the built-in tokenizer's vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **kwargs), dtype=torch.float32).eval()


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def user_error(result, *fragments: str) -> str:
    """Exit 2, an `error:` of one or two lines containing every fragment, and no traceback."""
    out = result.output
    assert result.exit_code == 2, out + repr(result.exception)
    assert "Traceback" not in out
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in out.strip().splitlines() if line.strip()]
    error = [line for line in lines if line.startswith(("error:", "Error:"))]
    assert error, out
    start = lines.index(error[0])
    assert len(lines) - start <= 2, out
    for f in fragments:
        assert f in out, f"{f!r} not in {out!r}"
    return out


@pytest.fixture(name="small_model")
def small_model_fixture():
    return small_model


@pytest.fixture(name="cli")
def cli_fixture():
    return run_cli


@pytest.fixture(name="user_error")
def user_error_fixture():
    return user_error


@pytest.fixture(scope="session")
def tokenizer():
    return compress.load_tokenizer("builtin:tiny")


@pytest.fixture(scope="session")
def packed_checkpoints(tmp_path_factory, tokenizer):
    """{"bitmask" | "nm" | "vq" | "int4" | "nm_int4": folder}: checkpoints with packed modules, written by
    compress.save."""
    root = tmp_path_factory.mktemp("packed")
    out = {}
    for name, passes in {
        "bitmask": [compress.passes.Prune(method="magnitude", sparsity=0.5, storage="packed")],
        "nm": [compress.passes.Prune(method="magnitude", structure="2:4", storage="packed")],
        "vq": [compress.get_pass("vq_logits")(num_codes=16, scale_bias=False, weighting="uniform")],
        "int4": [compress.passes.Quantize(method="rtn", bits=4, group_size=32)],
        "nm_int4": [compress.passes.Prune(method="magnitude", structure="2:4", storage="packed"),
                     compress.passes.Quantize(method="rtn", bits=4, group_size=32)],
    }.items():
        model = small_model()
        compress.apply(model, passes, progress=False)
        out[name] = compress.save(model, root / name, tokenizer=tokenizer)
    return out


@pytest.fixture
def copy_of(tmp_path):
    def copy(folder):
        return shutil.copytree(folder, tmp_path / folder.name)
    return copy
