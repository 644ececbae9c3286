"""Shared fixtures: tiny random-init configs of each supported architecture (shapes and plumbing only) and the
built-in reference model (every quality assertion)."""
from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels are checked on the CPU through the interpreter; it must be on before any kernel is
# defined. With a GPU the kernels compile for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# dtype "auto" keeps bf16 on CPUs with AVX512-BF16/AMX; the suite's tolerances are float32's, so it pins float32 on
# every runner (subprocesses inherit it). tests/hostile/test_models_and_passes.py checks the switch itself.
os.environ.setdefault("COMPRESS_CPU_HALF_PRECISION", "off")

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


def tiny_config(arch: str, **overrides):
    from transformers import AutoConfig

    kwargs = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return AutoConfig.for_model(arch, **kwargs)


def tiny_model(arch: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    return model.eval()


REPO = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)
def _script(relative: str):
    spec = importlib.util.spec_from_file_location(Path(relative).stem + "_script", REPO / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(name="script_module")
def script_module_fixture():
    """`script_module("benchmarks/kv_serving.py")`: a script of the repository (benchmarks/, scripts/) imported as
    a module, once per session."""
    return _script


@pytest.fixture(name="tiny_model")
def tiny_model_factory():
    """`tiny_model(arch, seed=0, **config_overrides)` -> a random-init model (shapes and plumbing only)."""
    return tiny_model


@pytest.fixture(name="save_hf_folder")
def save_hf_folder_factory():
    return save_hf_folder


@pytest.fixture(params=ARCHITECTURES)
def arch(request):
    return request.param


@pytest.fixture(scope="session")
def reference_model():
    import compress

    return compress.load("builtin:tiny")


@pytest.fixture(scope="session")
def reference_tokenizer():
    import compress

    return compress.load_tokenizer("builtin:tiny")


@pytest.fixture(scope="session")
def small_model():
    """builtin:small in fp32 (stored in bf16): the reference model that copies and finds pass keys."""
    import compress

    return compress.load("builtin:small", dtype="float32")


def save_hf_folder(model, path, tokenizer=None):
    """A plain Hugging Face folder (what users point recipes at)."""
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def gathers_at_every_size(monkeypatch):
    """The test models' MLPs are far below ActivationSparseMLP.MIN_GATHER_WEIGHTS, where decoding takes the masked
    dense path: tests of the gather path lower the bar to 0 (test_small_mlps_decode_masked_dense checks the default)."""
    from compress.activation_sparsity import ActivationSparseMLP

    monkeypatch.setattr(ActivationSparseMLP, "MIN_GATHER_WEIGHTS", 0)


# x86 levels below this CPU's own whose C paths the kernel tests also run (kernels/cpu_build.build_target): the
# AVX-512 float32 loops on a CPU with AVX512-BF16 (whose bf16 inputs take the bf16 dot products natively), the AVX2
# loops on an AVX-512 machine, the plain C loops everywhere. CI machines differ (an AMD EPYC with AVX2 only ran
# code the AVX-512 Xeon never had), so each runs every path its CPU can execute.
AVX512 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
CPU_LEVELS = {"x86-64-v4": AVX512, "x86-64-v3": {"avx2", "fma", "f16c", "bmi2"}, "x86-64": set()}
# what the native build has beyond each level; a level whose CPUs lack none of it is the native build again
_BEYOND = {"x86-64-v4": {"avx512_bf16", "avx512vbmi", "avx512_vbmi2"}, "x86-64-v3": AVX512, "x86-64": {"avx2"}}


def _levels_to_test() -> list[str]:
    """This CPU's own level, then each lower one it can execute and that differs from its own; only native off x86
    or without a compiler."""
    import platform

    from compress.kernels import cpu_build

    flags = cpu_build.cpu_flags()
    if platform.machine() not in ("x86_64", "AMD64") or not cpu_build._compilers():
        return ["native"]
    return ["native", *(level for level, needs in CPU_LEVELS.items() if needs <= flags and _BEYOND[level] & flags)]


@pytest.fixture(params=_levels_to_test())
def cpu_level(request):
    """Run the test with the C kernels built for this CPU, then for each lower x86 level it can execute."""
    from compress.kernels import cpu_build

    if request.param == "native":
        yield request.param
        return
    with cpu_build.build_target(request.param):
        # every source builds at this level too: a kernel that did not would leave the test on its torch fallback
        for source in sorted(cpu_build.SOURCES.glob("*.c")):
            assert cpu_build.load_c_library(source.stem) is not None, f"csrc/{source.name} fails at {request.param}"
        yield request.param
