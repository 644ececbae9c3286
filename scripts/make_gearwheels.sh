#!/usr/bin/env bash
# Fill .gearwheels/ (git-ignored) with the wheels a lent GPU machine needs, for scripts/gpu_check.sh to carry there.
# That machine cannot download and its image has torch and triton but not pydantic, and an older transformers whose
# hub/tokenizers pins a newer transformers would not import with. So this takes the whole dependency closure of what
# the GPU runs import (transformers, pydantic, peft, accelerate, rich, pyyaml, safetensors) at the versions installed
# here, minus torch/triton/nvidia-* (the image's own) and scipy (34 MB, never imported by this package; the carry
# limit is 64 MiB), as cp312 manylinux wheels. gpu_check.sh then installs from the folder with pip resolving against
# what the image already has, so only missing or too-old packages change.
#   bash scripts/make_gearwheels.sh [python-version, default 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
PINS=$(python - <<'EOF'
import importlib.metadata as md
from packaging.requirements import Requirement

roots = ["transformers", "pydantic", "peft", "accelerate", "rich", "pyyaml", "safetensors", "numpy"]
skip = {"torch", "triton", "scipy"}
seen, stack = {}, list(roots)
while stack:
    name = stack.pop()
    key = name.lower().replace("_", "-")
    if key in seen or key in skip or key.startswith("nvidia-"):
        continue
    dist = md.distribution(name)  # every one is installed here: the test extra's environment
    seen[key] = dist.version
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            stack.append(req.name)
print(" ".join(f"{k}=={v}" for k, v in sorted(seen.items())))
EOF
)
rm -rf .gearwheels
# shellcheck disable=SC2086
python -m pip download -q --disable-pip-version-check --only-binary :all: --no-deps --implementation cp \
  --python-version "$PYVER" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 -d .gearwheels $PINS
echo "$(ls .gearwheels | wc -l) wheels, $(du -sh .gearwheels | cut -f1) in .gearwheels/ (carry limit 64 MiB)"
