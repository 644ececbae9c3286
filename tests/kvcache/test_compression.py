"""Quantization error bounds, exact outliers, the low-rank term, streaming append-only storage."""
import pytest
import torch

from compress.kernels.kv_pages import outlier_coordinates
from compress.kvcache.gear_math import power_iteration
from compress.kvcache.store import CompressedStore


def make_store(axis, bits, outlier_ratio=0.0, chunk=64, group=64):
    return CompressedStore(axis=axis, bits=bits, group_size=group, chunk_len=chunk, outlier_ratio=outlier_ratio,
                           power_iters=3)


def kv_like(n=128, seed=0):
    """Keys-like data: channels with very different scales plus a few spikes (what KV caches look like)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, n, 64, generator=g) * torch.linspace(0.2, 4.0, 64)
    spikes = torch.rand(x.shape, generator=g) < 0.01
    return torch.where(spikes, x * 8, x)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_error_within_half_a_step(bits, axis):
    x = kv_like()
    s = make_store(axis, bits)
    s.append(x, rank=0)
    err = (s.dequantize() - x).abs()
    # the step of each entry's group, expanded to entries
    step = s.pages[0].scale.float().repeat_interleave(64, dim=2 if axis == "token" else 3)
    assert torch.all(err <= step / 2 + 1e-3 * x.abs().amax()), "an entry is further than half a step from its code"
    assert len(s.pages) == 1 and s.pages[0].codes.shape[-1] == 64 * bits // 8, "codes are not packed"


def test_more_bits_less_error():
    x = kv_like()
    errs = []
    for bits in (2, 3, 4, 8):
        s = make_store("token", bits)
        s.append(x, rank=0)
        errs.append((s.dequantize() - x).norm().item())
    assert errs == sorted(errs, reverse=True) and errs[-1] < errs[0] / 20


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_outliers_restored_exactly(axis):
    x = kv_like()
    s = make_store(axis, 2, outlier_ratio=0.02)
    s.append(x, rank=0)
    page = s.pages[0]
    assert page.outlier_offsets.dtype == torch.uint8 and page.outlier_values.dtype == torch.float16
    assert page.outlier_values.shape == (2, 2, 2, 64 * 64 // 64 * 2)  # 2 per group of 64, per chunk
    tok, ch = outlier_coordinates(s, page)
    pos = tok * 64 + ch
    flat_x, flat_hat = x.reshape(2, 2, -1), s.dequantize().reshape(2, 2, -1)
    at_x, at_hat = flat_x.gather(-1, pos), flat_hat.gather(-1, pos)
    # exact up to the fp16 rounding of the stored correction
    assert torch.allclose(at_hat, at_x, atol=2e-3 * x.abs().amax().item(), rtol=0)
    # the outliers are each group's extremes, and the codes alone are far off there
    assert (at_x - s.quantized_only().reshape(2, 2, -1).gather(-1, pos)).abs().mean() > 10 * (at_x - at_hat).abs().mean()
    grouped = x.reshape(2, 2, 2, 64, 64)                                  # [.., chunk, token, channel]
    grouped = grouped.transpose(-1, -2) if axis == "token" else grouped   # groups along the last axis
    assert torch.equal(at_x.reshape(2, 2, -1, 2)[..., 0], grouped.reshape(2, 2, -1, 64).amax(-1))


def test_lowrank_reduces_error_and_rank_helps():
    g = torch.Generator().manual_seed(1)
    # data with low-rank structure across tokens and channels: what the low-rank term is for
    x = kv_like() + 3 * torch.randn(2, 2, 128, 2, generator=g) @ torch.randn(2, 2, 2, 64, generator=g)
    errs = {}
    for r in (0, 2, 4):
        s = make_store("channel", 2)
        s.append(x, rank=r)
        errs[r] = (s.dequantize() - x).norm().item()
    assert errs[2] < 0.97 * errs[0] and errs[4] < errs[2]


def test_power_iteration_near_svd_optimum():
    g = torch.Generator().manual_seed(2)
    e = torch.randn(3, 64, 4, generator=g) @ torch.randn(3, 4, 64, generator=g) + 0.1 * torch.randn(3, 64, 64, generator=g)
    a, b = power_iteration(e, 4, 3)
    u, sv, vh = torch.linalg.svd(e)
    best = (e - u[..., :4] @ torch.diag_embed(sv[..., :4]) @ vh[..., :4, :]).norm()
    ours = (e - a @ b.transpose(-1, -2)).norm()
    assert a.shape == (3, 64, 4) and b.shape == (3, 64, 4)
    assert ours <= 1.05 * best


def test_append_only_chunks_never_change():
    x = kv_like(n=192)
    s = make_store("token", 4, outlier_ratio=0.02)
    s.append(x[:, :, :64], rank=2)
    first = s.pages[0]
    snap = [t.clone() for t in first.tensors()]
    s.append(x[:, :, 64:192], rank=4)
    assert s.num_chunks == 3 and len(s.pages) == 1 and s.pages[0].rank == 2  # the open page keeps its basis
    assert all(torch.equal(a, b) for a, b in zip(first.tensors(), snap))   # replaced, never written in place
    new = s.pages[0]
    assert torch.equal(new.codes[:, :, :64], snap[0]) and torch.equal(new.a[:, :, :64], first.a)
