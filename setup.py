"""One distribution, one import package: the root folders install into the `compress` namespace.

kvcache/, linearize/ and kernels/ become compress.kvcache, compress.linearize and compress.kernels; there is no
top-level `kernels` module (transformers probes for the unrelated `kernels` distribution by that name)."""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
MAPPED = {"compress": "compress", "compress.kvcache": "kvcache", "compress.linearize": "linearize",
          "compress.kernels": "kernels"}


def packages_and_dirs():
    packages, package_dir = [], {}
    for name, folder in MAPPED.items():
        package_dir[name] = folder
        packages.append(name)
        for sub in find_packages(where=folder, exclude=["tests", "tests.*"]):
            if name == "compress" and sub.split(".")[0] in ("kvcache", "linearize", "kernels"):
                continue
            packages.append(f"{name}.{sub}")
            package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"
    return packages, package_dir


packages, package_dir = packages_and_dirs()

setup(
    name="compress",
    version="0.1.0",
    description="Make pretrained causal language models smaller and faster from one YAML recipe.",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={"compress": ["builtin/tiny/*", "builtin/small/*", "eval/data/*"], "compress.kernels": ["csrc/*.c", "csrc/*.h"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "transformers>=5.24,<6",  # 5.24: models take `cache=` (earlier 5.x: `past_key_values=`)
        "safetensors>=0.4",
        "click>=8.1",
        "pyyaml>=6.0",
        "pydantic>=2.5,<3",
        "rich>=13",
        "peft>=0.13",
        "accelerate>=1.0",
        "tokenizers>=0.20",
        "numpy",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "bnb": ["bitsandbytes>=0.50"],  # quantize nf4/fp4/int8; its CPU backend runs them here
        "eval": ["lm_eval>=0.4.13,<0.5"],
        "plot": ["matplotlib>=3.7"],
        "fla": ["fla-core>=0.6"],  # GPU: flash-linear-attention kernels for linearized layers (chunk_gla)
        "ct": ["compressed-tensors>=0.20,<0.21"],  # --format compressed-tensors (transformers and vLLM read it)
        "bench": ["optimum-quanto>=0.2.5", "hqq>=0.2"],  # outside KV-cache baselines in benchmarks/kv_serving.py
        # hqq (bench) is left out: where it is installed, transformers.cache_utils imports it, and torch's compiler
        # with it, in every process (~4.5 s each on a slow CPU); its cache-bytes test runs with `.[test,bench]`
        "test": ["pytest>=8", "triton>=3.0", "lm_eval>=0.4.13,<0.5", "matplotlib>=3.7",
                 "compressed-tensors>=0.20,<0.21", "bitsandbytes>=0.50", "optimum-quanto>=0.2.5"],
    },
    entry_points={"console_scripts": ["compress=compress.cli:main"]},
)
