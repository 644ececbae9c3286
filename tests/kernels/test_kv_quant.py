"""KV quantizer: packing, error bounds per bit width, outliers, byte accounting, Triton (interpreted) vs reference."""

import pytest
import torch

from compress.errors import ConfigError
from compress.kernels import kv_quant as K

TRITON_KERNEL = K._quantize_keys_kernel  # checked by the triton_kernels fixture (tests/kernels/conftest.py)

BITS = (2, 3, 4, 8)
AXES = ("token", "channel")


def _expanded(p, stat):
    return stat.float().repeat_interleave(p.group_size, dim=-2 if p.axis == "token" else -1)


def _outlier_mask(p):
    t, d = p.shape[-2:]
    mask = torch.zeros(p.shape, dtype=torch.bool).view(-1, t * d)
    if p.outlier_positions is not None:
        mask.scatter_(1, p.outlier_positions.reshape(mask.shape[0], -1).long(), True)
    return mask.view(p.shape)


@pytest.mark.parametrize("bits", BITS)
def test_pack_round_trip_and_bit_layout(bits):
    torch.manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (3, 5, 64), dtype=torch.uint8)
    packed = K.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(K.unpack_codes(packed, bits), codes)
    # little-endian bit stream: code d occupies bits [d*bits, (d+1)*bits) of the row
    row = codes[1, 2].tolist()
    stream = sum(c << (i * bits) for i, c in enumerate(row))
    assert packed[1, 2].tolist() == [(stream >> (8 * i)) & 255 for i in range(64 * bits // 8)]


@pytest.mark.parametrize("bits", BITS)
def test_unpack_lanes_is_the_codes_lane_outer(bits):
    """unpack_lanes (the CPU decode path's unpacking): lane j holds channels j, j + S, ... as exact floats."""
    torch.manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (2, 3, 7, 64), dtype=torch.uint8)
    lanes = K.unpack_lanes(K.pack_codes(codes, bits), bits)
    stride = 8 if bits == 3 else 8 // bits
    assert lanes.dtype == torch.float32 and lanes.shape == (stride, 2, 3, 7, 64 // stride)
    assert torch.equal(lanes.movedim(0, -1).reshape(codes.shape), codes.float())


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bits", BITS)
def test_error_within_half_step(bits, axis):
    torch.manual_seed(0)
    x = torch.randn(2, 2, 64, 64, dtype=torch.float16) * 3
    p = K.quantize_pack_reference(x, bits, 32, axis)
    expected_stat = (2, 2, 2, 64) if axis == "token" else (2, 2, 64, 2)
    assert p.scale.shape == expected_stat and p.scale.dtype == torch.float16 and p.zero.dtype == torch.float16
    x_hat = p.dequantize()
    scale = _expanded(p, p.scale)
    # half a step, plus fp16 rounding of the stored zero (min) and of scale times the top level
    slack = 1e-3 * x.float().abs().amax() + (1 << bits) * scale * 2 ** -10
    err = (x.float() - x_hat).abs()
    assert (err <= scale / 2 + slack).all()
    # the bound is tight: the error uses most of the half step somewhere (so a wrong scale would show)
    assert (err / (scale / 2)).max() > 0.9
    # rounding error is about uniform over the step: mean a quarter step (a wrong level mapping would not be)
    assert 0.18 < (err / scale).mean() < 0.32


def test_constant_group_is_exact():
    x = torch.full((1, 1, 32, 64), 0.375)
    for axis in AXES:
        p = K.quantize_pack_reference(x, 2, 32, axis)
        assert (p.scale == 0).all() and torch.equal(p.dequantize(), x)


@pytest.mark.parametrize("axis", AXES)
def test_outliers_set_aside_and_restored(axis):
    torch.manual_seed(1)
    x = torch.randn(1, 2, 64, 64, dtype=torch.float16)
    # plant large spikes at distinct tokens and channels (so at most one per group, for either axis): without
    # outliers each would blow up its group's step
    x[..., torch.randperm(64)[:40], torch.randperm(64)[:40]] = 40.0
    plain = K.quantize_pack_reference(x, 4, 32, axis)
    p = K.quantize_pack_reference(x, 4, 32, axis, outlier_ratio=0.1)
    per_side = K.outliers_per_side(0.1, 32)
    assert per_side == 2 and K.outlier_fraction(0.1, 32) == 4 / 32
    n_groups = 64 * 64 // 32
    assert p.outlier_values.shape == p.outlier_positions.shape == (1, 2, n_groups * 2 * per_side)
    assert p.outlier_positions.dtype == torch.int16 and p.outlier_values.dtype == torch.float16
    # the set-aside entries are exactly each group's per_side largest and smallest
    xg = K._grouped(x.reshape(-1, 64, 64).float(), 32, axis)
    pos = p.outlier_positions.reshape(2, n_groups, 2 * per_side).long()
    picked = x.reshape(2, -1).float().gather(1, pos.reshape(2, -1)).reshape(2, n_groups, 2 * per_side)
    top = xg.topk(per_side, dim=-1).values
    bottom = xg.topk(per_side, dim=-1, largest=False).values
    assert torch.equal(picked[..., :per_side], top) and torch.equal(picked[..., per_side:], bottom)
    x_hat = p.dequantize()
    mask = _outlier_mask(p)
    # restored to fp16 precision: the stored correction x - dequant(code) is rounded to fp16 once
    out_err = (x_hat - x.float())[mask].abs()
    assert (out_err <= x.float()[mask].abs() * 2 ** -10 + 1e-6).all()
    # every other entry within half a step of its (now tighter) group range
    err = (x_hat - x.float()).abs()
    assert (err[~mask] <= (_expanded(p, p.scale) / 2 + 2e-3)[~mask]).all()
    # and the spikes no longer widen their groups
    assert err.mean() < 0.5 * (plain.dequantize() - x.float()).abs().mean()
    assert p.scale.float().amax() < 0.5 * plain.scale.float().amax()


def test_position_dtype_and_byte_accounting():
    assert K.position_dtype(64, 128) == torch.int16 and K.position_dtype(512, 128) == torch.int32
    x = torch.randn(1, 2, 64, 64)
    p = K.quantize_pack_reference(x, 4, 64, "token", outlier_ratio=0.02)
    nb = p.nbytes()
    held = {"codes": p.codes, "scales_zeros": (p.scale, p.zero), "outlier_values": p.outlier_values,
            "outlier_indices": p.outlier_positions}
    for name, tensors in held.items():
        tensors = tensors if isinstance(tensors, tuple) else (tensors,)
        assert nb[name] == sum(t.untyped_storage().nbytes() for t in tensors)
    # 4-bit codes + two fp16 per 64 tokens per channel + 2 outliers (fp16 + int16) per group of 64
    assert p.bits_per_element() == pytest.approx(4 + 32 / 64 + 2 * 32 / 64)
    p3 = K.quantize_pack_reference(x, 3, 64, "channel")
    assert p3.codes.shape[-1] == 24 and p3.bits_per_element() == pytest.approx(3 + 32 / 64)


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=5, group_size=32), "bits=5"),
    (dict(bits=4, group_size=48), "does not divide"),
    (dict(bits=4, group_size=32, axis="keys"), "axis"),
    (dict(bits=4, group_size=4, outlier_ratio=0.9), "every entry"),
    (dict(bits=4, group_size=32, scale_format="fp8"), "scale format"),
])
def test_bad_arguments_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        K.quantize_pack(torch.randn(1, 1, 64, 64), **kwargs)


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("outlier_ratio", (0.0, 0.1))
def test_log8_scales_dequantize_as_stored_and_beat_fp16_min_max(axis, outlier_ratio):
    """One-byte scales (kv_scale.py): codes * 2^(u/8 - 17) + zero (+ outliers) is the reconstruction; the searched
    step gives a lower squared error than fp16 min-max at 2-4 bits on channels with offsets and spreads like keys',
    and the scales take 3/4 of fp16 scale + zero."""
    torch.manual_seed(0)
    x = (torch.randn(2, 2, 64, 64) * torch.rand(64) * 3 + torch.randn(64) * 2).half()
    for bits in (2, 3, 4):
        p = K.quantize_pack_reference(x, bits, 32, axis, outlier_ratio, "log8")
        fp16 = K.quantize_pack_reference(x, bits, 32, axis, outlier_ratio)
        assert p.scale.dtype == torch.uint8 and p.zero.dtype == torch.float16 and p.scale.shape == fp16.scale.shape
        codes = K.unpack_codes(p.codes, bits).double()
        manual = codes * _expanded(p, torch.exp2(p.scale.double() / 8 - 17)).double() + _expanded(p, p.zero).double()
        manual = K.add_outliers(manual, p.outlier_values, p.outlier_positions)
        torch.testing.assert_close(p.dequantize(), manual.float(), rtol=1e-6, atol=1e-6)
        err, err16 = ((q.dequantize() - x.float()).square().sum().item() for q in (p, fp16))
        assert err < (0.9 if bits < 4 else 1.0) * err16
        assert 4 * p.nbytes()["scales_zeros"] == 3 * fp16.nbytes()["scales_zeros"]


def test_log8_search_never_loses_to_the_step_that_clips_nothing():
    """Per group, the chosen step's squared error is at most that of the smallest one-byte step covering the
    group's range (one of the candidates), with the same centred zero: the search's argmin."""
    from compress.kernels.kv_scale import log8_table

    torch.manual_seed(1)
    x = torch.randn(1, 4, 64, 64) * torch.rand(64) * 5
    for bits in (2, 4):
        p = K.quantize_pack_reference(x, bits, 64, "channel", 0.0, "log8")
        xg = K._grouped(x.reshape(-1, 64, 64), 64, "channel")
        lo, hi = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
        levels = (1 << bits) - 1
        table = log8_table()
        u = torch.searchsorted(table, ((hi - lo) / levels).contiguous())   # first table entry >= the min-max step
        s = table[u]
        z = ((lo + hi) / 2 - levels * s / 2).half().float()
        covering = (torch.floor((xg - z) / s + 0.5).clamp(0, levels) * s + z - xg).square().sum(-1)
        chosen = (K._grouped(p.dequantize().reshape(-1, 64, 64), 64, "channel") - xg).square().sum(-1)
        assert (chosen <= covering * (1 + 1e-5) + 1e-9).all()
        assert (chosen < covering * 0.99).float().mean() > 0.3  # and the clipping steps win often


def test_log8_constant_groups_are_exact_and_a_nan_is_no_crash():
    x = torch.full((1, 1, 32, 64), 0.375)
    x[..., 1] = 0.0
    for axis in AXES:
        assert torch.equal(K.quantize_pack_reference(x, 2, 32, axis, 0.0, "log8").dequantize(), x)
    y = torch.randn(1, 1, 64, 64)
    y[0, 0, 10, 3] = float("nan")  # a NaN group decodes to garbage (as with fp16 scales); the others are intact
    p = K.quantize_pack_reference(y, 4, 32, "token", 0.0, "log8")
    err = (p.dequantize() - y).abs()
    finite = torch.ones_like(y, dtype=torch.bool)
    finite[0, 0, :32, 3] = False                          # tokens 0-31 of channel 3: the NaN's group
    assert err[finite].max() < 0.5


def test_log8_runs_in_torch_where_triton_is_asked_for(monkeypatch):
    """The Triton quantizer computes fp16 min-max only: log8 quantizes (and dequantizes) in torch on any device."""
    monkeypatch.setenv("COMPRESS_KERNELS", "triton")
    monkeypatch.setattr(K, "quantize_pack_triton", lambda *a, **k: pytest.fail("Triton quantizer for log8"))
    monkeypatch.setattr(K, "unpack_dequantize_triton", lambda *a, **k: pytest.fail("Triton dequantizer for log8"))
    x = torch.randn(1, 1, 32, 64)
    p = K.quantize_keys(x, 2, 32, scale_format="log8")
    assert torch.equal(p.codes, K.quantize_pack_reference(x, 2, 32, "token", 0.0, "log8").codes)
    assert (p.dequantize() - x).abs().max() < 2


def test_public_functions_use_the_reference_on_cpu(monkeypatch):
    monkeypatch.setenv("COMPRESS_KERNELS", "")
    monkeypatch.setattr(K, "quantize_pack_triton", lambda *a, **k: pytest.fail("Triton path taken for CPU tensors"))
    x = torch.randn(1, 1, 32, 64)
    assert torch.equal(K.quantize_values(x, 4, 32).codes, K.quantize_pack_reference(x, 4, 32, "channel").codes)


@pytest.mark.parametrize("outlier_ratio", (0.0, 0.1))
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bits", BITS)
def test_triton_matches_reference(triton_kernels, bits, axis, outlier_ratio):
    torch.manual_seed(bits)
    x = (torch.randn(1, 2, 64, 64) * 2).half().to(triton_kernels)
    ref = K.quantize_pack_reference(x, bits, 32, axis, outlier_ratio)
    got = K.quantize_pack(x, bits, 32, axis, outlier_ratio)
    # Same fp32 arithmetic in the same order (the kernels divide with div_rn, IEEE round-to-nearest like torch, not
    # the GPU's approximate division), so the codes are identical.
    assert torch.equal(got.codes, ref.codes)
    torch.testing.assert_close(got.scale, ref.scale, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(got.zero, ref.zero, rtol=1e-3, atol=1e-4)
    if outlier_ratio:
        assert torch.equal(got.outlier_positions, ref.outlier_positions)
        torch.testing.assert_close(got.outlier_values, ref.outlier_values, rtol=1e-3, atol=1e-3)
    else:
        assert got.outlier_values is None
    torch.testing.assert_close(K.unpack_dequantize(got), K.unpack_dequantize_reference(ref), rtol=1e-5, atol=1e-5)


def test_triton_values_tail_block(triton_kernels):
    # a token count that is not a multiple of the kernel's token block (masked rows)
    x = torch.randn(2, 1, 40, 64).to(triton_kernels)
    ref = K.quantize_pack_reference(x, 2, 16, "channel", 0.1)
    got = K.quantize_pack(x, 2, 16, "channel", 0.1)
    assert torch.equal(got.codes, ref.codes) and torch.equal(got.outlier_positions, ref.outlier_positions)
    torch.testing.assert_close(K.unpack_dequantize(got), K.unpack_dequantize_reference(ref))


def test_triton_head_dim_128(triton_kernels):
    x = torch.randn(1, 2, 128, 128).to(triton_kernels)
    for axis, group in (("token", 128), ("channel", 64)):
        ref = K.quantize_pack_reference(x, 4, group, axis, 0.02)
        got = K.quantize_pack(x, 4, group, axis, 0.02)
        assert torch.equal(got.codes, ref.codes) and torch.equal(got.outlier_positions, ref.outlier_positions)
        assert got.outlier_positions.dtype == torch.int16  # 128 x 128 = 16384 positions fit
        torch.testing.assert_close(K.unpack_dequantize(got), K.unpack_dequantize_reference(ref))
