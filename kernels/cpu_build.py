"""Small C kernels for the CPU paths, built with the system C compiler on first use (~1 s) into a per-user cache and
loaded with ctypes. torch has no fused op for what they do (a gather fused into a GEMV; decode attention over packed
codes); a C extension module would need a build step at install, this needs only a compiler at run time. Sources
live in csrc/; the library name carries a digest of the source, so an edited source never loads a stale build.
Without a compiler (or with COMPRESS_CPU_KERNELS=off) `load_c_library` returns None and callers run their torch
reference instead (same results, slower)."""
from __future__ import annotations

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


FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]


def _compilers() -> list[str]:
    """$CC first, then cc, gcc, clang: each that exists, once (a broken $CC falls back to the others)."""
    found = [shutil.which(c) for c in (os.environ.get("CC", ""), "cc", "gcc", "clang") if c]
    return list(dict.fromkeys(c for c in found if c))


def _host_tag() -> str:
    """What the build depends on besides the source: flags, the machine and its CPU features (-march=native code
    from another CPU in a shared cache directory could die of an illegal instruction)."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return " ".join([*FLAGS, platform.machine(), cpu])


def _build(source: str, target: Path) -> bool:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "kernel.c"
        src.write_text(source)
        out = Path(tmp) / target.name
        for compiler in _compilers():
            for flags in (["-fopenmp"], ["-fopenmp-simd"]):  # OpenMP threads if the toolchain has them
                cmd = [compiler, *FLAGS, *flags, f"-I{SOURCES}", str(src), "-o", str(out), "-lm"]
                if subprocess.run(cmd, capture_output=True).returncode == 0:
                    os.replace(out, target)  # atomic: concurrent builders never see half a library
                    return True
    return False


def cpu_kernels_enabled() -> bool:
    return setting("COMPRESS_CPU_KERNELS") != "off"


def load_c_library(name: str, signatures: tuple = ()):
    """The compiled csrc/<name>.c (ctypes CDLL) with `signatures` ((function, argtypes, restype), ...) applied, or
    None where it cannot be built or CPU kernels are turned off (checked per call, so tests and users can switch them
    at run time)."""
    return _load(name, signatures) if cpu_kernels_enabled() else None


@functools.lru_cache(maxsize=None)
def _load(name: str, signatures: tuple):
    source = (SOURCES / f"{name}.c").read_text()
    headers = "".join(h.read_text() for h in sorted(SOURCES.glob("*.h")))  # an edited header rebuilds too
    digest = hashlib.sha256((source + headers + _host_tag()).encode()).hexdigest()[:12]
    target = _cache_dir() / f"{name}_{digest}.so"
    try:
        if not target.exists() and not _build(source, target):
            return None
        lib = ctypes.CDLL(str(target))
    except OSError:
        return None
    for function, argtypes, restype in signatures:
        getattr(lib, function).argtypes = list(argtypes)
        getattr(lib, function).restype = restype
    return lib
