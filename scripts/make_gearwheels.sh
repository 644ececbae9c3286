#!/usr/bin/env bash
# Fill .gearwheels/ (git-ignored) with what a lent GPU machine needs, for scripts/gpu_check.sh to carry there.
# That machine cannot download. Its image (/work/.library/device/KINDS.md: Python 3.12, torch 2.11, triton 3.6,
# transformers 5.17, peft, accelerate, rich, pyyaml, safetensors, scipy) lacks pydantic, and its transformers predates
# 5.24, the first with `cache=` (the whole package calls models with it). What a call sends (the tracked tree, ~58
# MiB with the built-in models, plus what it carries) must stay under 64 MiB, and transformers' wheel is 13 MB: so
# - pydantic and its own dependencies, and fla-core (the linearized layers' prefill kernels; pure Python, 1 MB) as
#   wheels (the image's regex, einops, hub and tokenizers satisfy transformers 5.24 and fla), and
# - transformers, at the version installed here, as a tarball without the model families this package's GPU runs
#   never build (all but auto, llama, mistral, qwen2 and qwen3, plus encoder_decoder, which AutoTokenizer imports,
#   and bloom and gpt2, which peft imports; nor pipelines/exporters/cli; ~1.8 MB), for gpu_check.sh to unpack beside the image's.
#   bash scripts/make_gearwheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PINS=$(python -c 'import importlib.metadata as md; print(" ".join(f"{n}=={md.version(n)}" for n in ["pydantic",
"pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "transformers"]))')
PINS="$PINS fla-core==0.6.0"  # the `fla` extra: GLA / gated-delta-rule prefill on CUDA (not installed here: no GPU)
rm -rf .gearwheels && mkdir .gearwheels
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# shellcheck disable=SC2086
python -m pip download -q --disable-pip-version-check --only-binary :all: --no-deps --implementation cp \
  --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 -d "$tmp/wheels" $PINS
mv "$tmp"/wheels/*.whl .gearwheels/ && mv .gearwheels/transformers-*.whl "$tmp/"
mkdir "$tmp/site" && (cd "$tmp/site" && python -m zipfile -e "$tmp"/transformers-*.whl .)
find "$tmp/site/transformers/models" -mindepth 1 -maxdepth 1 -type d \
  ! -name auto ! -name encoder_decoder ! -name bloom ! -name gpt2 ! -name llama ! -name mistral ! -name qwen2 ! -name qwen3 -exec rm -rf {} +
rm -rf "$tmp"/site/transformers/{pipelines,exporters,cli}  # imported lazily, never here
tar -czf ".gearwheels/$(basename "$tmp"/transformers-*.whl .whl)-trimmed.tgz" -C "$tmp/site" .
tree=$(git ls-files -z | xargs -0 du -cb | tail -n 1 | cut -f1)
carried=$(du -sb .gearwheels | cut -f1)
echo "$(ls .gearwheels | tr '\n' ' ')"
echo "a call sends $(( (tree + carried) / 1048576 )) MiB of 64"
