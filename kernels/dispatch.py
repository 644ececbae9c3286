"""Choosing between a Triton kernel and its torch reference.

Triton runs for CUDA tensors when triton is importable; the torch reference runs elsewhere. The environment
variable COMPRESS_KERNELS=torch|triton forces one (tests force `triton` under TRITON_INTERPRET=1 on the CPU)."""
from __future__ import annotations

import contextlib
import functools
import os

import torch

from ..environment import TRITON_MISSING, setting
from ..errors import CompressError


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreted() -> bool:
    """Whether Triton kernels run under its CPU interpreter (TRITON_INTERPRET=1): fixed tile configurations (no
    driver to autotune with) and fp32 dot operands (bf16 `tl.dot` is wrong there, and fp32 keeps the tests' tight
    float64 tolerances); compiled kernels, on a GPU or for one (compile_check.py), take the GPU's choices. Tests
    reach the GPU's choices on a CPU by patching this function."""
    try:  # Triton's own reading of TRITON_INTERPRET (1, true, on, ...); `knobs` is Triton >= 3.4
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


def power_of_two(n: int) -> bool:
    """A tile side Triton can take (tl.arange needs powers of two)."""
    return n > 0 and n & (n - 1) == 0


@contextlib.contextmanager
def forced_kernels(mode: str):
    """COMPRESS_KERNELS=`mode` inside the block, the previous setting restored after it."""
    old = os.environ.get("COMPRESS_KERNELS")
    os.environ["COMPRESS_KERNELS"] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("COMPRESS_KERNELS", None)
        else:
            os.environ["COMPRESS_KERNELS"] = old


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the public kernel functions should run their Triton kernel for these inputs."""
    forced = setting("COMPRESS_KERNELS")
    if forced == "torch":
        return False
    if forced == "triton":
        if not triton_available():
            raise CompressError(TRITON_MISSING)
        return True
    return triton_available() and all(t.is_cuda for t in tensors)
