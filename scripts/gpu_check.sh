#!/usr/bin/env bash
# One run on a lent GPU machine (the device tool runs it in the repository root, $OUT comes back):
# every Triton kernel against its torch reference compiled for real (the kernel tests), then the GPU benchmarks.
# The machine cannot download: pydantic (which its image lacks) and transformers 5.24 (its image has 5.17, from
# before `cache=`; 5.25 would not import there) travel in .gearwheels/ (ignored; `bash scripts/make_gearwheels.sh`
# fills it, ~3.9 MB) and every call carries that folder; fla-core in .gearwheels-fla/ (1.1 MB) only where the total
# fits. A call sends the tracked tree (~59 MiB) plus what it carries, 64 MiB at most: make_gearwheels.sh prints both
# totals; carry nothing else.
# Two halves, each within one device call (600 s): `bash scripts/gpu_check.sh kv` (kernel tests + KV serving,
# ~520 s at most) and `bash scripts/gpu_check.sh sparse` (GPU kernels + sparse dispatch + sparse speed, ~500 s at
# most); no argument runs both (only where a call may run ~1,020 s). `bash scripts/gpu_check.sh lin` (~440 s at most):
# the linearized layers' Triton decode steps and their speed at Llama-3-8B layer shapes (issue 10).
# `bash scripts/gpu_check.sh quick` (~550 s at most; give the device call timeout_s 590): the headline figure of
# each of issues 8, 9 and 10 in one call, for a session whose 15 device minutes hold only one: the GPU kernel tests
# of all three (and the CLI's --device cuda), KV decode at batch 8 /
# head_dim 128 / 8k and 32k + the 32k end-to-end row, 2:4 and bitmask layers at 4096x4096 and 14336x4096 for 1, 16
# and 4096 tokens + the 2-layer end-to-end rows, the linearized hybrid and MoM decode at 1k/8k/32k. Every benchmark
# prints a line per row to its .log/.err as it goes, so a part cut by its timeout still returns what it measured.
set -u
PART=${1:-all}
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
nvidia-smi -L | tee "$OUT/device.txt"
if [ ! -d .gearwheels ]; then echo "no .gearwheels/ here: run bash scripts/make_gearwheels.sh and carry it" >&2; exit 2; fi
# beside the image's packages, not into them (as the device notes advise)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gearwheels/*.whl \
  $(ls .gearwheels-fla/*.whl 2>/dev/null) 2>&1 | tail -n 3  # (fla-core where the call carried it)
# 5.24 (`cache=`), ahead of the image's on PYTHONPATH; unpacked by Python's tarfile (its lzma: no xz binary needed)
python3 -m tarfile -e .gearwheels/transformers-*-trimmed.txz /tmp/site
# the image's pip cannot build the editable install offline: lay the package out as setup.py maps it instead
rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r compress /tmp/pkg/ && cp -r kvcache kernels linearize /tmp/pkg/compress/
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
if [ "$PART" = all ] || [ "$PART" = kv ]; then
# kernel tests (KV decode attention at head_dim 64/128/256 compiled for real) and the cache's CUDA tests; the
# compile check is a CPU-side stand-in for this run, skipped here
timeout -k 10 -s INT 260 python3 -P -m pytest -q -p no:cacheprovider tests/kernels tests/kvcache/test_cuda.py \
  --ignore=tests/kernels/test_compile_check.py 2>&1 | tail -n 25 \
  | tee "$OUT/kernel_tests.txt"
# KV cache at serving shapes (Llama-3-8B attention, batch 1/8, 8k/32k/128k; e2e 2-layer model at 32k, batch 8)
timeout 240 python3 -P benchmarks/kv_serving.py --json --max-seconds 200 > "$OUT/kv_serving.json" 2> "$OUT/kv_serving.log"
tail -n 40 "$OUT/kv_serving.log"
fi
if [ "$PART" = all ] || [ "$PART" = sparse ]; then
timeout 100 python3 -P benchmarks/gpu_kernels.py 2>&1 | tee "$OUT/gpu_kernels.txt"
# issue 9 (sparse speed): the dispatcher's CUDA tests, then every GPU row of the sparse benchmark (packed GEMV,
# cuSPARSELt / expand + cuBLAS per shape, activation-sparse MLP, 2-layer Llama-3-8B-shaped e2e)
timeout -k 10 -s INT 90 python3 -P -m pytest -q -p no:cacheprovider tests/prune/test_gpu_dispatch.py 2>&1 | tail -n 15 | tee "$OUT/sparse_dispatch_tests.txt"
timeout 300 python3 -P benchmarks/sparse_speed.py --json --no-cpu --quality benchmarks/sparse_quality_int8_gate.json > "$OUT/sparse_speed.json" 2> "$OUT/sparse_speed.err"; tail -n 5 "$OUT/sparse_speed.err"
cp ~/.cache/compress/sparse_dispatch_*.json "$OUT/" 2>/dev/null || true
fi
if [ "$PART" = quick ]; then
timeout -k 10 -s INT 170 python3 -P -m pytest -q -p no:cacheprovider tests/kernels/test_kv_attention.py tests/kvcache/test_cuda.py \
  tests/prune/test_gpu_dispatch.py tests/test_cli_device.py 2>&1 | tail -n 20 | tee "$OUT/kernel_tests.txt"
timeout -k 10 -s INT 60 python3 -P -m pytest -q -p no:cacheprovider tests/linearize/test_models.py \
  tests/linearize/test_fla_cuda.py -k "triton_decode or fla" 2>&1 | tail -n 8 | tee "$OUT/linear_decode_tests.txt"
timeout 140 python3 -P benchmarks/kv_serving.py --json --shapes 8,32768,128 8,8192,128 --max-seconds 100 \
  > "$OUT/kv_serving.json" 2> "$OUT/kv_serving.log"; tail -n 20 "$OUT/kv_serving.log"
# the activation-sparsity thresholds from a file (the recipe's int8 gate, `sparse_speed.py --only-activation-sparse
# --no-cpu --save-quality F` on builtin:small, made on a CPU):
# calibrating here would spend ~35 s of device time on the CPU before the first GPU row
timeout 110 python3 -P benchmarks/sparse_speed.py --json --no-cpu --quick --quality benchmarks/sparse_quality_int8_gate.json \
  --tokens 1 16 4096 \
  --shapes 4096x4096 14336x4096 > "$OUT/sparse_speed.json" 2> "$OUT/sparse_speed.err"; tail -n 20 "$OUT/sparse_speed.err"
timeout 60 python3 -P benchmarks/linearize.py --json --serving-shape --device cuda --batch 8 --reps 1 --steps 8 \
  --only liger-hybrid mom > "$OUT/linearize_gpu.json" 2> "$OUT/linearize_gpu.err"; tail -n 5 "$OUT/linearize_gpu.err"
fi
if [ "$PART" = lin ]; then
# issue 10 on a GPU: the linearized layers' Triton decode steps against the torch step (compiled for real), then
# decode speed and cache bytes at Llama-3-8B layer shapes (2 layers, bf16, batch 8, 1k/8k/32k) vs DynamicCache
timeout -k 10 -s INT 120 python3 -P -m pytest -q -p no:cacheprovider tests/linearize/test_models.py \
  tests/linearize/test_fla_cuda.py -k "triton_decode or fla" 2>&1 | tail -n 15 | tee "$OUT/linear_decode_tests.txt"
timeout 300 python3 -P benchmarks/linearize.py --json --serving-shape --device cuda --batch 8 --reps 3 --steps 16 \
  > "$OUT/linearize_gpu.json" 2> "$OUT/linearize_gpu.err"; tail -n 5 "$OUT/linearize_gpu.err"
fi
