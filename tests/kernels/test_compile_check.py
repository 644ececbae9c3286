"""Every Triton kernel compiled for an H100/H200 (sm_90) without a GPU (compress.kernels.compile_check, ptxas from
Triton's wheel): each compiles, fits a block's shared memory and registers without spilling, the KV decode kernel's
dots run on tensor cores; its fp8 variant compiles for an A100 (sm_80) too. The interpreter runs in every other kernel test, so
this one compiles in a subprocess without TRITON_INTERPRET."""
import json
import os
import subprocess
import sys

import pytest
import torch

# a subset: every kernel, the decode kernel at each head_dim
# the sm_90 catalogue: on a GPU machine the other kernel tests compile every kernel for real
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the kernel tests compile for this GPU for real")

# label prefix: seconds it took to compile on one core of a slow 2-core machine, so the work splits evenly over the
# processes (the autotuned sparse GEMVs compile every configuration: 34 for 2:4 at one token)
ENTRIES = {"sparse 2:4 1 tokens": 32, "sparse bitmask 1 tokens": 17, "linear_decode": 9.4, "sparse 2:4 16 tokens": 8,
           "kv_quantize d128": 7.8, "kv_decode d128 gear-4": 7.7, "activation_sparse": 5, "sparse bitmask 16 tokens": 4,
           "vq_logits": 4, "kv_decode d128 kivi-2": 3.3, "kv_decode d256 gear-4": 2.7, "kv_decode d64 gear-4": 2.4,
           "sparse linear kernels": 1.9, "kv_decode d256 kivi-4": 1.2, "sparse 2:4 512 tokens": 1,
           "sparse bitmask 512 tokens": 0.8}


def require_compiler():
    pytest.importorskip("triton")
    from compress.kernels import compile_check

    if any(compile_check.tool(name) is None for name in ("ptxas", "cuobjdump", "nvdisasm")):
        pytest.skip("triton's wheel has no ptxas/cuobjdump/nvdisasm here")


def compile_for(arch, *only, workers: int = 1, seconds: dict | None = None):
    """compile_check's (exit code, report) for the entries `only`, split over `workers` processes run at once
    (the pytest process waits); `seconds`: each entry's compile time, so that the longest go first, each to the
    process with the least work so far."""
    require_compiler()
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "COMPRESS_KERNELS")}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    parts, load = [[] for _ in range(max(1, min(workers, len(only))))], [0.0] * max(1, min(workers, len(only)))
    for entry in sorted(only, key=lambda e: -(seconds or {}).get(e, 1.0)):
        least = load.index(min(load))
        parts[least].append(entry)
        load[least] += (seconds or {}).get(entry, 1.0)
    procs = [subprocess.Popen([sys.executable, "-m", "compress.kernels.compile_check", "--json", "--sass", "--arch",
                               str(arch), "--only", *part], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for part in parts]
    code, report = 0, {"arch": arch, "kernels": [], "failures": []}
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert out, err[-3000:]
        part = json.loads(out)
        code = max(code, proc.returncode)
        report["kernels"] += part["kernels"]
        report["failures"] += part["failures"]
    return code, report


def launched_kernels() -> set[str]:
    import importlib
    import pkgutil

    import compress.kernels

    names = set()
    for info in pkgutil.iter_modules(compress.kernels.__path__):
        module = importlib.import_module(f"compress.kernels.{info.name}")
        names |= {name for name, value in vars(module).items() if name.endswith("_kernel")
                  and type(value).__name__ in ("JITFunction", "InterpretedFunction")}
    return names


@pytest.fixture(scope="module")
def compiled():
    return compile_for(90, *ENTRIES, workers=min(4, os.cpu_count() or 1), seconds=ENTRIES)


@cpu_only
def test_every_kernel_compiles_and_fits_an_h200_block(compiled):
    code, report = compiled
    assert report["failures"] == []
    problems = [(k["entry"], k["kernel"], k["problems"]) for k in report["kernels"] if k["problems"]]
    assert problems == [] and code == 0
    # every launched kernel of compress.kernels (a *_kernel JIT function) is in the catalogue: a new kernel without
    # an entry in compile_targets.py fails here
    assert launched_kernels() <= {k["kernel"] for k in report["kernels"]}
    assert len(launched_kernels()) >= 17
    # an autotuned kernel compiles every configuration that fits (sparse_gemv._tile_fits_registers)
    assert sum(k["kernel"] == "_nm_gemv_kernel" and k["constexprs"]["BLOCK_T"] == 16 for k in report["kernels"]) >= 4
    for k in report["kernels"]:
        assert 0 <= k["shared_bytes"] <= 232_448 and 0 < k["registers"] <= 255
        # no register spills (but the padding mask's bias tile at head_dim 128: see below)
        assert k["spill_bytes"] <= (64 if k["entry"].endswith("masked") else 0), (k["entry"], k["spill_bytes"])


@cpu_only
def test_kv_decode_uses_tensor_cores_without_spilling(compiled):
    _, report = compiled
    decode = [k for k in report["kernels"] if k["kernel"] == "_paged_decode_kernel"]
    # the prefixes also pick the -fp8 rows, d128 gear-4 masked / bf16 / values 2-bit, kivi-2 unaligned, the two log8
    assert len(decode) == 14
    assert [(k["constexprs"]["BITS"], k["constexprs"]["BITS_V"]) for k in decode].count((4, 2)) == 1
    assert [k["constexprs"]["ALIGN16"] for k in decode].count(False) == 1  # the unaligned page's variant
    assert sorted(k["entry"] for k in decode if k["constexprs"]["SCALE8"]) == [
        "kv_decode d128 kivi-2 log8", "kv_decode d256 gear-4-fp8 log8"]  # one-byte scales
    for k in decode:
        assert k["constexprs"]["DOT16"] is True  # fp16 operands on a GPU (fp32 only under the interpreter)
        assert k["tensor_cores"] is True, k["entry"]
        # a padding mask adds a [rows, chunk] bias tile: 52 B of spill stores at head_dim 128 (4 warps; 8 warps made
        # every scale load per element: kv_attention_triton.launch_config)
        assert k["spill_bytes"] <= (64 if k["entry"].endswith("masked") else 0), (k["entry"], k["spill_bytes"])
        assert k["blocks_per_sm"] * k["num_warps"] >= 8, k["entry"]  # >= 8 resident warps per SM
    # codes arrive as asynchronous vector copies, each byte once: no byte-wide global loads at 2 bits
    kivi2 = next(k for k in decode if k["entry"] == "kv_decode d128 kivi-2")
    assert "LDG.E.U8" not in kivi2["memory_ops"] and kivi2["memory_ops"].get("LDGSTS.E.BYPASS.128", 0) > 0
    by_dim = {k["constexprs"]["D"]: k for k in decode if k["entry"].endswith("gear-4")}
    assert set(by_dim) == {64, 128, 256}
    # the tile grows with head_dim; 256 takes 8 warps and no pipelining (launch_config)
    assert by_dim[64]["shared_bytes"] < by_dim[128]["shared_bytes"] < by_dim[256]["shared_bytes"]
    assert (by_dim[256]["num_warps"], by_dim[256]["num_stages"]) == (8, 1)


def test_fp8_factors_compile_for_an_a100():
    """sm_80 has no fp8 conversion (Triton refused `float8e4nv` there): the kernel decodes the bytes itself."""
    code, report = compile_for(80, "kv_decode d128 gear-4-fp8")
    assert report["failures"] == [] and code == 0
    assert [k["constexprs"]["A_FP8"] for k in report["kernels"]] == [True]
    assert report["kernels"][0]["shared_bytes"] <= 166_912  # an A100 block


def test_a_kernel_that_does_not_compile_is_reported(tmp_path):
    """The harness itself: a kernel the interpreter runs but the compiler rejects (two returns of different
    shapes, the bug this check first found in the decode kernel) is a failure, not a silent pass."""
    script = tmp_path / "bad.py"
    script.write_text('''
import json, torch, triton, triton.language as tl
from compress.kernels.compile_check import compile_entries

@triton.jit
def _pick(x, FIRST: tl.constexpr):
    if FIRST:
        return x
    return tl.reshape(x, (4, 4))

@triton.jit
def _bad(x_ptr, FIRST: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, 16))
    tl.store(x_ptr + tl.arange(0, 16), tl.reshape(_pick(x, FIRST), (16,)))

kernels, failures = compile_entries({"bad": lambda: _bad[(1,)](torch.zeros(16), FIRST=True)})
print(json.dumps([f["entry"] for f in failures]))
''')
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    require_compiler()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["bad"], proc.stderr[-2000:]


def test_cli_lists_its_entry_points():
    proc = subprocess.run([sys.executable, "-m", "compress.kernels.compile_check", "--list"], capture_output=True,
                          text=True, timeout=120)
    labels = proc.stdout.split("\n")
    assert proc.returncode == 0 and "kv_decode d128 gear-4" in labels and "vq_logits" in labels


def test_cli_refuses_to_run_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "compress.kernels.compile_check"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2 and "TRITON_INTERPRET is set" in proc.stderr and "Traceback" not in proc.stderr


def test_two_architectures_in_one_process_compile_for_each(tmp_path):
    """A JIT function keeps its compile target per device id: each --arch gets an id of its own, so a second arch
    in the same process is not silently compiled for the first."""
    script = tmp_path / "two.py"
    script.write_text('''
import json
from compress.kernels import compile_targets as ct
from compress.kernels.compile_check import compile_only

archs = []
for arch in (90, 80):
    with compile_only(arch) as compiled:
        ct.activation_sparse(8)
    archs.append(sorted({k.metadata.target.arch for _, k in compiled}))
print(json.dumps(archs))
''')
    require_compiler()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [[90], [80]], proc.stderr[-2000:]


def test_resource_usage_is_read_for_the_named_function_or_refused():
    from compress.kernels.compile_check import _usage_fields

    usage = ("Resource usage:\n Common:\n  GLOBAL:0\n Function helper:\n  REG:12 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:8\n"
             " Function _k:\n  REG:40 STACK:16 SHARED:1024 LOCAL:8 CONSTANT[0]:568 TEXTURE:0\n")
    assert _usage_fields(usage, "_k") == {"REG": 40, "STACK": 16, "SHARED": 1024, "LOCAL": 8}
    with pytest.raises(RuntimeError, match="LOCAL"):
        _usage_fields(usage.replace(" LOCAL:8", ""), "_k")
    with pytest.raises(RuntimeError, match="REG"):
        _usage_fields(usage, "_absent")
