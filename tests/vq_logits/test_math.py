"""k-means, least-squares scale/bias and the head module: checked against direct computations."""
import pytest
import torch
import torch.nn.functional as F

from compress.vq_logits.fit import fit_scale_bias
from compress.vq_logits.head import VQLogitsHead, smallest_int_dtype
from compress.vq_logits.kmeans import cluster_means, spherical_kmeans


def clustered_rows(n=300, d=16, groups=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(groups, d, generator=g), dim=1)
    label = torch.randint(0, groups, (n,), generator=g)
    rows = (centers[label] + 0.05 * torch.randn(n, d, generator=g)) * (torch.rand(n, 1, generator=g) + 0.5)
    return rows, label


def test_kmeans_assignments_valid_and_nearest():
    rows, _ = clustered_rows()
    res = spherical_kmeans(rows, 10, iterations=50, seed=0)
    assert res.assignments.dtype == torch.long and res.assignments.shape == (300,)
    assert int(res.assignments.min()) >= 0 and int(res.assignments.max()) < 10
    assert torch.bincount(res.assignments, minlength=10).min() > 0            # no empty cluster
    assert torch.allclose(res.centroids.norm(dim=1), torch.ones(10), atol=1e-5)
    # converged: every row sits with its most similar centroid
    sims = F.normalize(rows, dim=1) @ res.centroids.t()
    assert torch.equal(sims.argmax(1), res.assignments)


def test_kmeans_recovers_planted_groups():
    rows, label = clustered_rows(groups=6)
    res = spherical_kmeans(rows, 6, iterations=50, seed=3)
    # the same partition up to renaming: each found cluster is one planted group
    for c in range(6):
        assert label[res.assignments == c].unique().numel() == 1


def test_kmeans_deterministic_by_seed():
    rows, _ = clustered_rows(n=400, d=8, groups=20, seed=1)
    a = spherical_kmeans(rows, 16, iterations=3, seed=5)
    b = spherical_kmeans(rows, 16, iterations=3, seed=5)
    c = spherical_kmeans(rows, 16, iterations=3, seed=6)
    assert torch.equal(a.assignments, b.assignments) and torch.equal(a.centroids, b.centroids)
    assert not torch.equal(a.assignments, c.assignments)


def test_frequency_weights_pull_the_centroid():
    rows = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    assign = torch.tensor([0, 0, 1, 1])
    heavy = cluster_means(rows, assign, 2, torch.tensor([100.0, 1.0, 1.0, 1.0]))
    flat = cluster_means(rows, assign, 2)
    assert torch.allclose(flat[0], torch.tensor([0.9, 0.3]))
    assert (heavy[0] - rows[0]).norm() < (flat[0] - rows[0]).norm() / 10


def test_least_squares_recovers_planted_scale_and_bias():
    # dense rows that ARE scaled code vectors: logits = s * (h . c) exactly, so the fit must find s and b = 0
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(7, 12, generator=g)
    codes = torch.randint(0, 7, (50,), generator=g)
    s_true = torch.rand(50, generator=g) * 2 + 0.1
    dense = s_true[:, None] * codebook[codes]
    hidden = torch.randn(400, 12, generator=g)
    scales, biases = fit_scale_bias(hidden, dense, codebook, codes, chunk=64)
    assert torch.allclose(scales, s_true, rtol=1e-4)
    assert biases.abs().max() < 1e-4


def test_blocks_sized_by_the_vocabulary_give_the_same_fit(monkeypatch):
    """At a 128k vocabulary 1024 positions a block held 2.7 GB of temporaries; the block now shrinks with the
    vocabulary (BLOCK_BYTES a temporary), in whole 32-row sums: the same figures up to float64 association."""
    import compress.vq_logits.fit as fit

    g = torch.Generator().manual_seed(2)
    dense, codebook = torch.randn(300, 8, generator=g), torch.randn(6, 8, generator=g)
    codes, hidden = torch.randint(0, 6, (300,), generator=g), torch.randn(700, 8, generator=g)
    whole = fit_scale_bias(hidden, dense, codebook, codes)  # one block of 700
    monkeypatch.setattr(fit, "BLOCK_BYTES", 64 * 4 * 300)  # 64 positions a block: 11 blocks
    sized = fit.fit_scale_bias(hidden, dense, codebook, codes)
    for a, b in zip(whole, sized):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("weighting", ["uniform", "probability"])
def test_least_squares_is_optimal(weighting):
    # against torch.linalg.lstsq (rows scaled by sqrt(weight)), token by token, on unstructured rows
    g = torch.Generator().manual_seed(1)
    dense, codebook = torch.randn(20, 8, generator=g), torch.randn(4, 8, generator=g)
    codes, hidden = torch.randint(0, 4, (20,), generator=g), torch.randn(300, 8, generator=g)
    scales, biases = fit_scale_bias(hidden, dense, codebook, codes, weighting=weighting, share=0.4, ridge=0.0)
    z, gl = hidden.double() @ dense.double().t(), hidden.double() @ codebook.double().t()
    p = torch.softmax(z, -1)
    om = 0.4 * p / p.sum(0) + 0.6 / 300 if weighting == "probability" else torch.ones_like(z)
    for i in range(20):
        a = torch.stack([gl[:, codes[i]], torch.ones(300, dtype=torch.float64)], 1) * om[:, i:i + 1].sqrt()
        sol = torch.linalg.lstsq(a, z[:, i:i + 1] * om[:, i:i + 1].sqrt()).solution.flatten()
        assert torch.allclose(torch.tensor([scales[i], biases[i]], dtype=torch.float64), sol, rtol=1e-4, atol=1e-4)


def test_head_logits_equal_reference_and_shortlist_is_exact():
    g = torch.Generator().manual_seed(2)
    v, d, k = 90, 16, 8
    dense = torch.randn(v, d, generator=g)
    codes = torch.randint(0, k, (v,), generator=g)
    codebook, scales, biases = torch.randn(k, d, generator=g), torch.rand(v, generator=g) + .5, torch.randn(v, generator=g)
    shortlist = torch.tensor([3, 17, 50])
    head = VQLogitsHead.from_parts(codebook, codes, scales, biases, shortlist, dense[shortlist])
    assert head.codes.dtype == torch.uint8 and head.shortlist_ids.dtype == torch.uint8
    h = torch.randn(2, 5, d, generator=g)
    out = head(h)
    assert out.shape == (2, 5, v)
    want = scales * (h @ codebook[codes].t()) + biases                 # per-token formula, written out
    rest = torch.ones(v, dtype=torch.bool)
    rest[shortlist] = False
    assert torch.allclose(out[..., rest], want[..., rest], atol=1e-5)
    assert torch.allclose(out[..., shortlist], h @ dense[shortlist].t(), atol=1e-5)   # exact dense rows
    assert torch.allclose(head.logsumexp(h), torch.logsumexp(out, -1), atol=1e-5)
    vals, ids = head.topk(h, 2)
    assert torch.equal(ids, out.topk(2).indices)
    assert head.num_float_parameters() == k * d + 3 * d + 2 * v


def test_smallest_int_dtype():
    assert smallest_int_dtype(255) == torch.uint8
    assert smallest_int_dtype(256) == torch.int16
    assert smallest_int_dtype(32767) == torch.int16
    assert smallest_int_dtype(40000) == torch.int32


@pytest.mark.parametrize("rows", [1, 31, 32, 1000, 1024])
def test_blocked_column_sums_stay_at_float32_rounding_of_the_terms(rows):
    """The fit's sums (float32 over 32-row blocks, float64 across them) against float64 sums of the same terms:
    within float32 rounding of the sum of magnitudes."""
    from compress.vq_logits.fit import _column_sums

    x = torch.randn(rows, 300, generator=torch.Generator().manual_seed(rows)) * 1e3
    exact = x.double().sum(0)
    assert _column_sums(x).dtype == torch.float64
    assert ((_column_sums(x) - exact).abs() <= 32 * 2 ** -24 * x.double().abs().sum(0)).all()
