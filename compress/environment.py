"""The environment variables compress reads, checked once: a misspelt value was silently ignored, and
COMPRESS_KERNELS=triton on a machine with neither a GPU nor Triton's interpreter ended in a driver traceback."""
from __future__ import annotations

import os

from .errors import CompressError

# variable -> accepted values (lower case; unset or empty = the default)
CHOICES = {
    "COMPRESS_KERNELS": ("torch", "triton"),  # force the torch references or the Triton kernels (kernels/dispatch.py)
    "COMPRESS_CPU_KERNELS": ("auto", "on", "off"),  # off: the C kernels' torch references (kernels/cpu_build.py)
    "COMPRESS_CPU_HALF_PRECISION": ("auto", "on", "off", "0", "1", "false", "true", "no", "yes"),  # models.py
}


def check_environment() -> None:
    """Raise CompressError naming the variable and its accepted values for a value compress would not understand."""
    for name, allowed in CHOICES.items():
        value = os.environ.get(name, "").strip().lower()
        if value and value not in allowed:
            raise CompressError(f"{name}={os.environ[name]!r} is not understood; use one of: {', '.join(allowed)} "
                                "(or leave it unset)")
    if os.environ.get("COMPRESS_KERNELS", "").strip().lower() == "triton":
        import torch

        from .kernels.dispatch import interpreted, triton_available

        if not triton_available():
            raise CompressError("COMPRESS_KERNELS=triton but triton is not installed: pip install 'compress[triton]'")
        if not torch.cuda.is_available() and not interpreted():
            raise CompressError("COMPRESS_KERNELS=triton needs a CUDA GPU, or TRITON_INTERPRET=1 for Triton's (slow) "
                                "CPU interpreter; unset it to run the CPU kernels")
