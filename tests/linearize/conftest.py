"""Shared check of the linear-attention kernels: the chunked path against its step-by-step reference."""
import pytest
import torch


def _grads(out, state, inputs):
    """Gradients of a fixed random projection of the output plus the final state, w.r.t. every input."""
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return torch.autograd.grad((out * w).sum() + (state * 0.3).sum(), inputs)


@pytest.fixture
def assert_chunked_matches_reference():
    """check(reference, chunked, inputs, chunk): outputs, final state and every input's gradient agree (float64)."""

    def check(reference, chunked, inputs, chunk):
        ref_o, ref_s = reference(*inputs)
        o, s = chunked(*inputs, chunk_size=chunk)
        torch.testing.assert_close(o, ref_o, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(s, ref_s, rtol=1e-10, atol=1e-12)
        for a, b in zip(_grads(o, s, inputs), _grads(ref_o, ref_s, inputs)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)

    return check
