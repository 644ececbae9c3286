"""Small C kernels for the CPU paths, built with the system C compiler on first use (~1 s) into a per-user cache and
loaded with ctypes. torch has no fused op for what they do (a gather fused into a GEMV; decode attention over packed
codes); a C extension module would need a build step at install, this needs only a compiler at run time. Sources
live in csrc/; the library name carries a digest of the source, so an edited source never loads a stale build.
Without a compiler (or with COMPRESS_CPU_KERNELS=off) `load_c_library` returns None and callers run their torch
reference instead (same results, slower)."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..environment import setting

SOURCES = Path(__file__).parent / "csrc"


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "compress"


# -fno-trapping-math: nothing here reads floating-point exception flags, and without it GCC keeps a float
# comparison as a branch (it may trap) and leaves loops such as csrc/linear_decode.c's exp_vec unvectorized
FLAGS = ["-O3", "-fno-trapping-math", "-shared", "-fPIC"]
_MARCH = ["native"]  # the -march the kernels are built for; build_target() changes it


@contextlib.contextmanager
def build_target(march: str):
    """Inside the block the C kernels build and load for `march` (x86-64-v3: AVX2 and FMA; x86-64: SSE2 only), so
    the vector paths of older CPUs, and the plain C loops, run and are tested on this one (which must support that
    level). Each target is a separate library in the cache."""
    _MARCH.append(march)
    try:
        yield
    finally:
        _MARCH.pop()


def _compilers() -> list[str]:
    """$CC first, then cc, gcc, clang: each that exists, once (a broken $CC falls back to the others)."""
    found = [shutil.which(c) for c in (os.environ.get("CC", ""), "cc", "gcc", "clang") if c]
    return list(dict.fromkeys(c for c in found if c))


def _cpu_line() -> str:
    """/proc/cpuinfo's feature line ("flags" on x86, "Features" on ARM), or "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def cpu_flags() -> set[str]:
    """This CPU's feature names (avx2, avx512f, ...), empty where /proc/cpuinfo is missing."""
    return set(_cpu_line().split(":")[-1].split())


def _host_tag(march: str) -> str:
    """What the build depends on besides the source: flags, the machine and its CPU features (-march=native code
    from another CPU in a shared cache directory could die of an illegal instruction)."""
    return " ".join([*FLAGS, f"-march={march}", platform.machine(), _cpu_line()])


def _build(source: str, target: Path, march: str) -> bool:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "kernel.c"
        src.write_text(source)
        out = Path(tmp) / target.name
        for compiler in _compilers():
            for flags in (["-fopenmp"], ["-fopenmp-simd"]):  # OpenMP threads if the toolchain has them
                cmd = [compiler, *FLAGS, f"-march={march}", *flags, f"-I{SOURCES}", str(src), "-o", str(out),
                       "-lm"]
                if subprocess.run(cmd, capture_output=True).returncode == 0:
                    os.replace(out, target)  # atomic: concurrent builders never see half a library
                    return True
    return False


def cpu_kernels_enabled() -> bool:
    return setting("COMPRESS_CPU_KERNELS") != "off"


def load_c_library(name: str, signatures: tuple = (), requires: str | None = None):
    """The compiled csrc/<name>.c (ctypes CDLL) with `signatures` ((function, argtypes, restype), ...) applied, or
    None where it cannot be built, CPU kernels are turned off (checked per call, so tests and users can switch them
    at run time), or the library's function `requires` returns 0 (a kernel this build's instruction set lacks; asked
    once per build, not per call)."""
    return _load(name, signatures, _MARCH[-1], requires) if cpu_kernels_enabled() else None


@functools.lru_cache(maxsize=None)
def _load(name: str, signatures: tuple, march: str, requires: str | None = None):
    source = (SOURCES / f"{name}.c").read_text()
    headers = "".join(h.read_text() for h in sorted(SOURCES.glob("*.h")))  # an edited header rebuilds too
    digest = hashlib.sha256((source + headers + _host_tag(march)).encode()).hexdigest()[:12]
    target = _cache_dir() / f"{name}_{digest}.so"
    try:
        if not target.exists() and not _build(source, target, march):
            return None
        lib = ctypes.CDLL(str(target))
    except OSError:
        return None
    for function, argtypes, restype in signatures:
        getattr(lib, function).argtypes = list(argtypes)
        getattr(lib, function).restype = restype
    return lib if requires is None or getattr(lib, requires)() else None
