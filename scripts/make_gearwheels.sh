#!/usr/bin/env bash
# Fill .gearwheels/ and .gearwheels-fla/ (git-ignored) with what a lent GPU machine needs, for scripts/gpu_check.sh
# to carry there. That machine cannot download. Its image (/work/.library/device/KINDS.md: Python 3.12, torch 2.11,
# triton 3.6, transformers 5.17, huggingface-hub 1.33, peft, accelerate, rich, pyyaml, safetensors, scipy) lacks
# pydantic, and its transformers predates 5.24, the first with `cache=` (the whole package calls models with it).
# What a call sends (the tracked tree, ~59 MiB with the built-in models, plus what it carries) must stay under
# 64 MiB, and transformers' wheel is 13 MB: so
# - .gearwheels/: pydantic and its own dependencies as wheels, and transformers 5.24 (pinned below) as an xz tarball
#   without the model families this package's GPU runs never build (all but auto, llama, mistral, qwen2 and qwen3,
#   plus encoder_decoder, which AutoTokenizer imports, and bloom and gpt2, which peft imports; nor
#   pipelines/exporters/cli; ~1.3 MB), for gpu_check.sh to unpack beside the image's: carry it on every call;
# - .gearwheels-fla/: fla-core (the linearized layers' prefill kernels on CUDA; pure Python, 1 MB): carry it too
#   only where the total printed below fits (tests/linearize/test_fla_cuda.py skips without it).
#   bash scripts/make_gearwheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PINS=$(python -c 'import importlib.metadata as md; print(" ".join(f"{n}=={md.version(n)}" for n in ["pydantic",
"pydantic-core", "annotated-types", "typing-inspection", "typing-extensions"]))')
# transformers 5.24 whatever is installed here: 5.25 needs huggingface-hub >= 2.4 (the image has 1.33: transformers
# refuses to import) and Hugging Face's `kernels` distribution (absent there); 5.24 ran the image's tests (435 passed)
PINS="$PINS transformers==5.24.0"
rm -rf .gearwheels .gearwheels-fla && mkdir .gearwheels .gearwheels-fla
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# shellcheck disable=SC2086
python -m pip download -q --disable-pip-version-check --only-binary :all: --no-deps --implementation cp \
  --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 -d "$tmp/wheels" $PINS
# the `fla` extra: GLA / gated-delta-rule prefill on CUDA (not installed here: no GPU)
python -m pip download -q --disable-pip-version-check --only-binary :all: --no-deps -d .gearwheels-fla fla-core==0.6.0
mv "$tmp"/wheels/*.whl .gearwheels/ && mv .gearwheels/transformers-*.whl "$tmp/"
mkdir "$tmp/site" && (cd "$tmp/site" && python -m zipfile -e "$tmp"/transformers-*.whl .)
find "$tmp/site/transformers/models" -mindepth 1 -maxdepth 1 -type d \
  ! -name auto ! -name encoder_decoder ! -name bloom ! -name gpt2 ! -name llama ! -name mistral ! -name qwen2 ! -name qwen3 -exec rm -rf {} +
rm -rf "$tmp"/site/transformers/{pipelines,exporters,cli}  # imported lazily, never here
tar -cJf ".gearwheels/$(basename "$tmp"/transformers-*.whl .whl)-trimmed.txz" -C "$tmp/site" .  # (xz: 0.5 MB < gz)
# what a call sends besides what it carries: tracked files and untracked ones git does not ignore
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb | tail -n 1 | cut -f1)
core=$(du -sb .gearwheels | cut -f1)
fla=$(du -sb .gearwheels-fla | cut -f1)
limit=$(( 64 * 1048576 ))
echo "$(ls .gearwheels .gearwheels-fla | tr '\n' ' ')"
echo "a call carrying .gearwheels sends $(( tree + core )) bytes of $limit"
echo "with .gearwheels-fla too: $(( tree + core + fla )) bytes$([ $(( tree + core + fla )) -le $limit ] || echo ': too much, carry .gearwheels alone')"
[ $(( tree + core )) -le $limit ] || { echo "even .gearwheels alone does not fit: trim the tracked tree" >&2; exit 1; }
