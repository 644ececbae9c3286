"""Masks have exactly the requested pattern; packing round-trips exactly; SparseLinear equals the masked Linear."""
import pytest
import torch
from torch import nn

from compress.errors import ConfigError
from compress.prune.masks import is_nm, nm_mask, parse_structure, unstructured_mask
from compress.prune.owl import owl_sparsities
from compress.prune.packing import bitmask_nbytes, nm_nbytes, pack_bit_fields, pack_bitmask, pack_nm
from compress.prune.sparse_linear import SparseLinear
from compress.prune.wanda import wanda_mask


def scores(rows=32, cols=64, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).abs()


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_mask_prunes_exactly_and_the_smallest(sparsity):
    s = scores()
    mask = unstructured_mask(s, sparsity)
    assert int((~mask).sum()) == round(s.numel() * sparsity)
    if 0 < sparsity:
        assert s[~mask].max() <= s[mask].min()
    per_row = unstructured_mask(s, sparsity, per_row=True)
    assert ((~per_row).sum(1) == round(64 * sparsity)).all()


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("sparsity", [0.01, 0.5, 0.9, 1.0])
def test_unstructured_mask_prunes_ties_as_the_reference_stable_sort_does(per_row, sparsity):
    # the reference code (Wanda's) sorts ascending, stably, and prunes the first k: at ties the lowest indices
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 5, (7, 37), generator=g).float()  # few distinct values: ties everywhere
    flat = scores if per_row else scores.reshape(1, -1)
    k = int(round(flat.shape[1] * sparsity))
    expected = torch.ones_like(flat, dtype=torch.bool)
    expected.scatter_(1, torch.argsort(flat, dim=1, stable=True)[:, :k], False)
    assert torch.equal(unstructured_mask(scores, sparsity, per_row=per_row), expected.view_as(scores))


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_bit_fields_pack_little_endian(bits):
    g = torch.Generator().manual_seed(0)
    fields = torch.randint(0, 2 ** bits, (5, 29), generator=g)
    packed = pack_bit_fields(fields.bool() if bits == 1 else fields, bits)
    stream = ((fields.unsqueeze(-1) >> torch.arange(bits)) & 1).reshape(5, -1)  # bit i of byte j: stream[8j + i]
    stream = torch.nn.functional.pad(stream, (0, (-stream.shape[1]) % 8)).view(5, -1, 8)
    assert packed.dtype == torch.uint8 and torch.equal(packed.long(), (stream << torch.arange(8)).sum(-1))


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_the_n_largest_of_every_m(n, m):
    s = scores()
    mask = nm_mask(s, n, m)
    assert is_nm(mask, n, m)
    blocks, keep = s.view(32, -1, m), mask.view(32, -1, m)
    kept_min = torch.where(keep, blocks, torch.inf).min(-1).values
    dropped_max = torch.where(keep, -torch.inf, blocks).max(-1).values
    assert (kept_min >= dropped_max).all()


def test_wanda_compares_within_rows_and_weighs_by_input_norm():
    w = torch.ones(4, 8)
    norms = torch.arange(1.0, 9.0)
    mask = wanda_mask(w, norms, 0.5, None)
    assert mask[:, 4:].all() and not mask[:, :4].any()  # equal weights: the larger inputs win in every row
    assert is_nm(wanda_mask(torch.randn(4, 8), norms, 0.5, (2, 4)), 2, 4)


@pytest.mark.parametrize("text", ["4:4", "5:4", "0:4", "2-4", "half"])
def test_bad_structures_are_config_errors(text):
    with pytest.raises(ConfigError, match="structure"):
        parse_structure(text)


@pytest.mark.parametrize("n,m,dtype", [(2, 4, torch.float32), (4, 8, torch.bfloat16), (3, 8, torch.float16)])
def test_nm_round_trip_is_exact(n, m, dtype):
    w = torch.randn(16, 48).to(dtype)
    mask = nm_mask(scores(16, 48, seed=3), n, m)
    lin = nn.Linear(48, 16, bias=True, dtype=dtype)
    lin.weight.data.copy_(w)
    sparse = SparseLinear.from_linear(lin, mask, (n, m))
    assert torch.equal(sparse.dense_weight(), w * mask)
    assert sparse.values.dtype == dtype and sparse.indices.dtype == torch.uint8
    held = sum(t.numel() * t.element_size() for t in (sparse.values, sparse.indices))
    assert held == nm_nbytes(16, 48, n, m, w.element_size())


def test_nm_packing_rejects_a_mask_that_is_not_nm():
    mask = torch.ones(4, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="not 2:4"):
        pack_nm(torch.randn(4, 8), mask, 2, 4)


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_bitmask_round_trip_is_exact(sparsity):
    w = torch.randn(24, 40)
    mask = unstructured_mask(scores(24, 40, seed=5), sparsity)
    lin = nn.Linear(40, 24, bias=False)
    lin.weight.data.copy_(w)
    sparse = SparseLinear.from_linear(lin, mask, None)
    assert torch.equal(sparse.dense_weight(), w * mask)
    stored = sum(t.numel() * t.element_size() for t in sparse.state_dict().values())
    assert set(sparse.state_dict()) == {"values", "bitmask"}
    assert stored == bitmask_nbytes(24, 40, int(mask.sum()), 4)
    values, bitmask, offsets = pack_bitmask(w, mask)
    fresh = SparseLinear.empty(lin, sparse.restore_spec())
    fresh.load_state_dict(sparse.state_dict())  # row offsets are rebuilt from the bitmask
    assert torch.equal(fresh.row_offsets, offsets) and torch.equal(fresh.dense_weight(), w * mask)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparse_linear_matches_the_masked_dense_linear(nm):
    torch.manual_seed(0)
    lin = nn.Linear(64, 40, bias=True)
    s = scores(40, 64, seed=7)
    mask = nm_mask(s, *nm) if nm else unstructured_mask(s, 0.6)
    sparse = SparseLinear.from_linear(lin, mask, nm)
    masked = nn.Linear(64, 40, bias=True)
    masked.weight.data = lin.weight.data * mask
    masked.bias.data = lin.bias.data.clone()
    x = torch.randn(3, 7, 64)
    torch.testing.assert_close(sparse(x), masked(x), rtol=1e-5, atol=1e-5)
    assert not any(True for _ in sparse.named_parameters() if _[0] != "bias")  # no dense weight held


def test_packed_bytes_at_half_sparsity_with_16_bit_values():
    assert nm_nbytes(256, 256, 2, 4, 2) / (256 * 256 * 2) == pytest.approx(0.5625)
    assert bitmask_nbytes(256, 256, 256 * 128, 2) / (256 * 256 * 2) <= 0.57


def test_owl_sparsities_keep_the_mean_and_favor_outlier_layers():
    ratios = [0.01, 0.05, 0.02, 0.03]
    s = owl_sparsities(ratios, 0.5, lam=0.08)
    assert sum(s) / len(s) == pytest.approx(0.5)
    assert max(s) - min(s) == pytest.approx(0.16)
    assert s[1] == min(s) and s[0] == max(s)  # most outliers -> least pruned
    assert owl_sparsities([0.02, 0.02], 0.5) == [0.5, 0.5]


@pytest.mark.parametrize("sparsity,lam", [(0.95, 0.49), (0.99, 0.3), (0.02, 0.3)])
def test_owl_keeps_the_recipes_mean_when_layers_hit_the_bounds(sparsity, lam):
    # a high target with a wide spread pushes layers past 0.999 (or below 0): clamping alone gave a mean of 0.848
    # for a recipe's 0.95, silently
    ratios = [0.01, 0.02, 0.05, 0.001, 0.03, 0.04]
    s = owl_sparsities(ratios, sparsity, lam=lam)
    assert sum(s) / len(s) == pytest.approx(sparsity, abs=1e-9)
    assert all(0.0 <= x <= 0.999 for x in s)
    order = sorted(range(len(ratios)), key=ratios.__getitem__)
    assert all(s[a] >= s[b] for a, b in zip(order, order[1:]))  # more outliers, never more pruning


def test_the_mask_of_a_pruned_layer_stored_dense():
    from compress.prune.packing import dense_pruned_mask

    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 3.0, 0.0],    # 2 of 4, then a group with one nonzero
                      [0.0, 5.0, 0.0, 6.0, 7.0, 0.0, 0.0, 8.0]])
    mask, nm = dense_pruned_mask(w, (2, 4))
    assert nm == (2, 4) and (mask.view(2, 2, 4).sum(-1) == 2).all()  # exactly 2 of 4: pack_nm's contract
    assert mask[w != 0].all()  # every nonzero kept; a kept 0 fills the group, at its lowest free position
    assert mask[0, 4] and not mask[0, 5]
    w[0, 1] = 9.0  # three nonzeros in a group: no longer 2:4, so unstructured (the zeros still the mask)
    mask, nm = dense_pruned_mask(w, (2, 4))
    assert nm is None and torch.equal(mask, w != 0)
    assert dense_pruned_mask(w, None)[1] is None
