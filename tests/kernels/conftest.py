"""Running the Triton side of a kernel: compiled on a CUDA GPU, interpreted on the CPU (the root conftest turns
TRITON_INTERPRET on before any kernel module is imported)."""
import pytest
import torch


@pytest.fixture
def triton_kernels(request, monkeypatch):
    """Force the Triton path and return the device to put inputs on. A test module names the kernel it checks in
    `TRITON_KERNEL`, so that a kernel compiled before the interpreter was switched on fails loudly, not silently."""
    pytest.importorskip("triton")
    kernel = getattr(request.module, "TRITON_KERNEL", None)
    if not torch.cuda.is_available() and type(kernel).__name__ != "InterpretedFunction":
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set: run these tests with TRITON_INTERPRET=1")
    monkeypatch.setenv("COMPRESS_KERNELS", "triton")
    return "cuda" if torch.cuda.is_available() else "cpu"
