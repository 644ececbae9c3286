"""Compile every Triton kernel for a GPU this machine does not have, and read what the compiled code asks of it.

The interpreter (TRITON_INTERPRET=1, the tests on a CPU) checks what a kernel computes, not whether it compiles for
a GPU or fits one: an H200 run once found the KV decode kernel asking 303,104 bytes of shared memory (a block may
use 232,448). Here each GPU entry point runs on small CPU tensors while Triton compiles instead of launching
(`compile_only`): the same path as on the GPU (TTIR -> TTGIR -> PTX -> ptxas cubin for the target architecture, the
same constexprs, warps and stages the wrapper picks, every configuration of an autotuned kernel). Then `cuobjdump`
reads each cubin's registers, stack frame and the shared memory the launch asks for, `ptxas -v` (with Triton's own
flags, where a stack frame shows up) says whether it spills, `nvdisasm` whether its `tl.dot`s became tensor-core
instructions, and the blocks one SM holds follow. No driver and no GPU are needed: Triton's wheel carries ptxas,
cuobjdump and nvdisasm.

Run it in a process without TRITON_INTERPRET (the interpreter is chosen when a kernel is defined):
    python -m compress.kernels.compile_check [--arch 90] [--only kv_decode ...] [--json] [--list]
It exits 1 when a kernel fails to compile or does not fit a block of the target (shared memory, registers); a
kernel that spills registers to local memory is flagged in the table (and `warnings` in --json).
Context length and batch are runtime arguments of every kernel here, so small tensors compile the kernels that
serving shapes run (head_dim, bits, group and tile sizes are the constexprs)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

# Bytes of shared memory one block may use (the opt-in maximum) and registers per thread, per compute capability;
# an SM's shared memory and resident warps (occupancy)
SHARED_MEMORY_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
SHARED_MEMORY_PER_SM = {80: 167_936, 86: 102_400, 89: 102_400, 90: 233_472}
WARPS_PER_SM = {80: 64, 86: 48, 89: 48, 90: 64}
BLOCKS_PER_SM = {80: 32, 86: 16, 89: 24, 90: 32}
MAX_REGISTERS = 255
REGISTERS_PER_SM = 65_536  # per block at most, on every architecture from sm_80 to sm_90
FAKE_DEVICE = 1_000_000
TENSOR_CORE_OPS = re.compile(r"\b(HMMA|HGMMA|IMMA|IGMMA|QGMMA)\b")
MEMORY_OPS = re.compile(r"\b((?:LDG|LDGSTS|STG|LDS|STS)(?:\.[A-Z0-9]+)*)\b")


@dataclass
class CompiledKernel:
    entry: str                 # the entry point that compiled it (catalogue label)
    kernel: str                # the Triton kernel's name
    constexprs: dict           # its compile-time arguments
    num_warps: int
    num_stages: int
    shared_bytes: int          # shared memory the launch asks for (Triton's dynamic allocation + static)
    registers: int
    local_bytes: int           # per thread: stack frame + local memory (cuobjdump)
    spill_bytes: int           # bytes of spill-store instructions in the code (ptxas -v, static; 0 = no spills)
    uses_dot: bool             # the kernel has a tl.dot
    tensor_cores: bool | None  # its SASS has MMA instructions (None when it has no dot)
    blocks_per_sm: int = 0     # resident blocks per SM its registers, shared memory and warps allow
    memory_ops: dict = field(default_factory=dict)  # with --sass: load/store instructions in its SASS, by kind
    problems: list = field(default_factory=list)   # does not compile or does not fit: exit status 1
    warnings: list = field(default_factory=list)   # register spills


def tool(name: str) -> str | None:
    """Path of a CUDA binary shipped in Triton's wheel (ptxas, cuobjdump, nvdisasm), or None."""
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.access(path, os.X_OK) else None


def available() -> str | None:
    """None when this machine can compile for a GPU, else why not."""
    from .dispatch import interpreted

    if interpreted():
        return "TRITON_INTERPRET is set: kernels are defined for the interpreter"
    for name in ("ptxas", "cuobjdump", "nvdisasm"):
        if tool(name) is None:
            return f"triton's {name} is missing (pip install triton)"
    return None


@contextlib.contextmanager
def compile_only(arch: int = 90):
    """Inside, a Triton launch compiles its kernel for compute capability `arch` and returns without running it;
    an autotuned launch compiles every configuration. Yields the list the compiled kernels are appended to, as
    (kernel name, Triton's CompiledKernel)."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    class CompileOnlyDriver(DriverBase):
        """What compiling asks of a driver: the target, a device and a stream id (never used to launch)."""

        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_current_device(self):
            # a device id of its own per architecture: a JIT function keeps its compile target per device id, so
            # reusing 0 would compile for whatever target (a real GPU's, another --arch) device 0 saw first
            return FAKE_DEVICE + arch

        def get_current_stream(self, device=None):
            return 0

        def get_benchmarker(self):
            raise RuntimeError("compile_only: nothing is timed")

    compiled: list = []
    run, tune = JITFunction.run, Autotuner.run

    def compile_run(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.__name__, kernel))
        return kernel

    def compile_configs(self, *args, warmup=False, **kwargs):  # kwargs hold the launch's grid
        return self.warmup(*args, **kwargs)

    previous = driver._active  # not `driver.active`: on a machine without a GPU that raises (no driver)
    driver.set_active(CompileOnlyDriver())
    JITFunction.run, Autotuner.run = compile_run, compile_configs
    try:
        yield compiled
    finally:
        JITFunction.run, Autotuner.run = run, tune
        driver._active = previous


def read_resources(name: str, kernel, entry: str, arch: int, sass_ops: bool = False) -> CompiledKernel:
    """Registers, local memory and shared memory of one compiled kernel, and whether its dots use tensor cores
    (`sass_ops`: also its global / shared-memory load and store instructions, counted by kind)."""
    meta = kernel.metadata
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
        uses_dot = "tt.dot" in kernel.asm["ttir"]
        sass = subprocess.run([tool("nvdisasm"), cubin], capture_output=True, text=True, check=True).stdout \
            if uses_dot or sass_ops else ""
    fields = _usage_fields(usage, name)
    fn = kernel.src.fn  # the JITFunction: constants are keyed by argument position; keep its constexpr params
    constexprs = {fn.arg_names[k[0]]: v for k, v in kernel.src.constants.items()
                  if len(k) == 1 and k[0] in fn.constexprs and isinstance(v, (bool, int, float, str))}
    out = CompiledKernel(
        entry=entry, kernel=name, constexprs=constexprs, num_warps=meta.num_warps, num_stages=meta.num_stages,
        shared_bytes=int(meta.shared) + fields["SHARED"], registers=fields["REG"],
        local_bytes=fields["LOCAL"] + fields["STACK"], spill_bytes=0, uses_dot=uses_dot,
        tensor_cores=bool(TENSOR_CORE_OPS.search(sass)) if uses_dot else None)
    out.blocks_per_sm = occupancy(out, arch)
    if sass_ops:
        out.memory_ops = dict(sorted(Counter(MEMORY_OPS.findall(sass)).items(), key=lambda kv: -kv[1]))
    limit = SHARED_MEMORY_LIMIT.get(arch)
    if limit is not None and out.shared_bytes > limit:
        out.problems.append(f"needs {out.shared_bytes:,} bytes of shared memory, a block may use {limit:,}")
    threads = 32 * out.num_warps
    if out.registers > MAX_REGISTERS or out.registers * threads > REGISTERS_PER_SM:
        out.problems.append(f"{out.registers} registers x {threads} threads (at most {MAX_REGISTERS} per thread, "
                            f"{REGISTERS_PER_SM:,} per block)")
    if out.local_bytes:  # a stack frame is not always a spill: ask ptxas (the same flags as Triton's build)
        out.spill_bytes = ptxas_spill_stores(kernel, arch)
    if out.spill_bytes:  # runs, slower: a warning, not a failure (the tests require none where they look)
        out.warnings.append(f"spills registers ({out.spill_bytes} B of spill stores, a {out.local_bytes} B stack "
                            f"frame per thread)")
    return out


def ptxas_spill_stores(kernel, arch: int) -> int:
    """Bytes of register spill-store instructions in the kernel (static: summed over the code, not per thread at
    run time), from `ptxas -v` run on its PTX with the flags Triton's own build uses; nonzero means it spills
    (cuobjdump's stack frame also holds things that are not spills)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        fmad = [] if kernel.metadata.enable_fp_fusion else ["--fmad=false"]
        log = subprocess.run([get_ptxas(arch).path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(arch)}", ptx, "-o", ptx + ".o"],
                             capture_output=True, text=True, check=True).stderr
    found = re.search(r"(\d+) bytes spill stores", log)
    if found is None:
        raise RuntimeError(f"ptxas -v gave no spill figure:\n{log}")
    return int(found.group(1))


def occupancy(k: CompiledKernel, arch: int) -> int:
    """Blocks of this kernel one SM holds at once: the least of what its registers (allocated per warp in units
    of 256), its shared memory (+1 KB reserved per block), its warps and the architecture's block limit allow."""
    warps = k.num_warps
    regs_per_warp = -(-max(k.registers, 1) * 32 // 256) * 256
    by_regs = REGISTERS_PER_SM // (regs_per_warp * warps)
    by_shared = SHARED_MEMORY_PER_SM.get(arch, 233_472) // (k.shared_bytes + 1024)
    by_warps = WARPS_PER_SM.get(arch, 64) // warps
    return max(0, min(by_regs, by_shared, by_warps, BLOCKS_PER_SM.get(arch, 32)))


def _usage_fields(usage: str, name: str) -> dict:
    """REG / STACK / SHARED / LOCAL of kernel `name` in `cuobjdump -res-usage` output; an error if any is missing
    (a silent 0 would read as 'no spills')."""
    block = re.search(rf"Function {re.escape(name)}:\s*\n\s*(.*)", usage)
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", block.group(1))) if block else {}
    missing = {"REG", "STACK", "SHARED", "LOCAL"} - set(found)
    if missing:
        raise RuntimeError(f"cuobjdump gave no {', '.join(sorted(missing))} for {name}:\n{usage}")
    return {k: int(v) for k, v in found.items()}


def compile_entries(entries: dict, arch: int = 90, progress=None,
                    sass_ops: bool = False) -> tuple[list[CompiledKernel], list[dict]]:
    """Run each entry point (label -> zero-argument callable) under `compile_only`; returns the compiled kernels
    with their resources and the entry points that failed ({"entry", "error"})."""
    kernels, failures = [], []
    for label, call in entries.items():
        started = time.perf_counter()
        compiled = []
        try:
            with compile_only(arch) as compiled:
                call()
        except Exception as error:  # noqa: BLE001 - a compiler error is this tool's finding, reported per entry
            failures.append({"entry": label, "error": f"{type(error).__name__}: {str(error).strip()[:2000]}"})
        seen = set()  # what compiled before a failure is reported too
        for name, kernel in compiled:
            if kernel is not None and id(kernel) not in seen:
                seen.add(id(kernel))
                kernels.append(read_resources(name, kernel, label, arch, sass_ops))
        if progress:
            progress(label, time.perf_counter() - started)
    return kernels, failures


def main(argv=None) -> int:
    from .compile_targets import entry_points

    parser = argparse.ArgumentParser(prog="python -m compress.kernels.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200, 80: A100)")
    parser.add_argument("--only", nargs="+", metavar="PREFIX", help="entry points whose label starts with one of these")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--list", action="store_true", help="print the entry points' labels and exit")
    parser.add_argument("--sass", action="store_true",
                        help="also count each kernel's load/store instructions in its SASS (memory_ops)")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(entry_points()))
        return 0
    # Triton 3.9 warns once per process that this default will change; keep today's default (fusion on, as the
    # GPU runs compile) and say so
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    why_not = available()
    if why_not:
        print(f"error: cannot compile for a GPU here: {why_not}", file=sys.stderr)
        return 2
    entries = entry_points()
    if args.only:
        entries = {k: v for k, v in entries.items() if any(k.startswith(p) for p in args.only)}
        if not entries:
            print(f"error: no entry point starts with {' or '.join(args.only)}", file=sys.stderr)
            return 2

    def progress(label, seconds):
        print(f"  compiled {label} ({seconds:.1f} s)", file=sys.stderr)

    kernels, failures = compile_entries(entries, args.arch, progress, args.sass)
    if args.json:
        print(json.dumps({"arch": args.arch, "kernels": [asdict(k) for k in kernels], "failures": failures}, indent=1))
    else:
        print(format_table(kernels, failures, args.arch))
    return 1 if failures or any(k.problems for k in kernels) else 0


def tiles(k: CompiledKernel) -> str:
    """The tile constexprs of a kernel (BLOCK_*, SPLIT_*, and D / BITS / outliers of the KV kernels), compactly."""
    keep = ("D", "BITS", "PK", "PV", "PER_SIDE", "G", "ALIGN16")
    return " ".join(f"{n}={v}" for n, v in k.constexprs.items() if n.startswith(("BLOCK_", "SPLIT_")) or n in keep)


def format_table(kernels: list[CompiledKernel], failures: list[dict], arch: int) -> str:
    lines = [f"Triton kernels compiled for sm_{arch} (shared-memory limit "
             f"{SHARED_MEMORY_LIMIT.get(arch, 0):,} bytes per block; spill B: bytes of spill-store instructions, static (ptxas -v), 0 = no spills; "
             f"MMA: tensor-core instructions for tl.dot)",
             f"{'entry':<38} {'kernel':<26} {'tiles':<40} {'warps':>5} {'stages':>6} {'shared B':>9} {'regs':>4} "
             f"{'spill B':>7} {'MMA':>4} {'blocks/SM':>9}"]
    for k in kernels:
        mma = "-" if k.tensor_cores is None else "yes" if k.tensor_cores else "no"
        lines.append(f"{k.entry:<38} {k.kernel:<26} {tiles(k):<40} {k.num_warps:>5} {k.num_stages:>6} "
                     f"{k.shared_bytes:>9,} {k.registers:>4} {k.spill_bytes:>7} {mma:>4} {k.blocks_per_sm:>9}"
                     + ("  <- " + "; ".join(k.problems + k.warnings) if k.problems or k.warnings else ""))
        if k.memory_ops:
            lines.append(" " * 40 + "memory ops: " + ", ".join(f"{op} x{n}" for op, n in k.memory_ops.items()))
    for f in failures:
        lines.append(f"{f['entry']:<38} FAILED: {f['error'].splitlines()[0] if f['error'] else ''}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
