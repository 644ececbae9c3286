"""CompressedStore's capacity-doubling buffers: appends write into spare capacity (no re-concatenation), readers see
only the filled prefix, snapshots stay fixed across later appends and growths, bytes held include the capacity."""
import pytest
import torch

from compress.kernels import kv_attention as A
from compress.kvcache.gear_math import compress_chunks
from compress.kvcache.store import CompressedStore
from compress.pass_api import storage_bytes

C, G, D = 32, 32, 64
FLAT = ("codes", "scale", "zero", "outlier_values", "outlier_positions")


def make_store(axis, outlier_ratio=0.05):
    return CompressedStore(axis=axis, bits=4, group_size=G, chunk_len=C, outlier_ratio=outlier_ratio, power_iters=2)


def data(n_chunks, b=2, h=2, seed=0):
    return torch.randn(b, h, n_chunks * C, D, generator=torch.Generator().manual_seed(seed))


def state(store):
    """Clones of everything a reader sees."""
    return ({k: getattr(store, k).clone() for k in FLAT if getattr(store, k) is not None},
            [(s.first_chunk, s.a.clone(), s.b.clone()) for s in store.segments], store.dequantize())


def assert_state(store, want):
    flat, segs, dense = want
    assert {k for k in FLAT if getattr(store, k) is not None} == set(flat)
    for k, t in flat.items():
        assert torch.equal(getattr(store, k), t), k
    assert len(store.segments) == len(segs)
    for s, (first, a, b) in zip(store.segments, segs):
        assert s.first_chunk == first and torch.equal(s.a, a) and torch.equal(s.b, b)
    assert torch.equal(store.dequantize(), dense)


def buffers_grown(store):
    return store.codes.untyped_storage().nbytes() // (store.codes[:, :, :1].numel())  # token capacity of codes


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_many_appends_equal_one_big_append(axis):
    x = data(21)
    grown, whole = make_store(axis), make_store(axis)
    moves, ptr = 0, None
    for i in range(21):
        grown.append(x[:, :, i * C:(i + 1) * C], rank=2)
        moves += ptr is not None and grown.codes.data_ptr() != ptr
        ptr = grown.codes.data_ptr()
    whole.append(x, rank=2)
    assert moves == 5, "reallocations: capacity 1 chunk, then 2, 4, 8, 16, 32"
    assert grown.num_tokens == whole.num_tokens == 21 * C and len(grown.segments) == 1
    assert buffers_grown(grown) == 32 * C and not grown.codes.is_contiguous()  # a prefix view of a larger buffer
    for k in FLAT:
        assert getattr(grown, k).shape == getattr(whole, k).shape, k
        torch.testing.assert_close(getattr(grown, k), getattr(whole, k), rtol=0, atol=0)
    torch.testing.assert_close(grown.dequantize(), whole.dequantize(), rtol=1e-6, atol=1e-6)


def test_mixed_appends_and_ranks_equal_concatenation():
    """Several appends of several chunks, a prompt rank and a decode rank: the same as concatenating the pieces."""
    x = data(40, seed=1)
    pieces = [(0, 5, 1), (5, 6, 2), (6, 9, 2), (9, 10, 2), (10, 25, 2), (25, 26, 0), (26, 27, 2), (27, 40, 2)]
    s = make_store("token")
    parts = []
    for lo, hi, rank in pieces:
        s.append(x[:, :, lo * C:hi * C], rank)
        parts.append(compress_chunks(x[:, :, lo * C:hi * C].reshape(2, 2, hi - lo, C, D), bits=4, group_size=G,
                                     axis="token", outlier_ratio=0.05, rank=rank, power_iters=2))
    for k in FLAT:
        assert torch.equal(getattr(s, k), torch.cat([getattr(p, k) for p in parts], 2)), k
    assert [(seg.first_chunk, seg.num_chunks, seg.a.shape[-1]) for seg in s.segments] == [(0, 5, 1), (5, 20, 2),
                                                                                          (26, 14, 2)]
    assert torch.equal(s.segments[1].a, torch.cat([p.lowrank_a for p in parts[1:5]], 2))
    assert torch.equal(s.segments[2].b, torch.cat([p.lowrank_b for p in parts[6:]], 2))


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_snapshot_unchanged_by_later_appends_and_growth(axis):
    x = data(20, seed=2)
    s = make_store(axis)
    s.append(x[:, :, :3 * C], rank=1)            # exact size: the next append grows
    s.append(x[:, :, 3 * C:4 * C], rank=2)       # grown to 6 chunks, 4 filled: spare capacity
    snap = s.snapshot()
    want = state(snap)
    ptr = s.codes.data_ptr()
    s.append(x[:, :, 4 * C:5 * C], rank=2)       # written in place, into the buffer the snapshot views
    assert s.codes.data_ptr() == ptr and snap.codes.data_ptr() == ptr
    assert_state(snap, want)
    for i in range(5, 20):                        # several growths: the snapshot keeps the old buffer
        s.append(x[:, :, i * C:(i + 1) * C], rank=2)
    assert s.codes.data_ptr() != ptr and s.num_tokens == 20 * C
    assert_state(snap, want)
    assert snap.num_tokens == 4 * C and [seg.num_chunks for seg in snap.segments] == [3, 1]
    # the store itself still holds the snapshot's tokens unchanged
    assert torch.equal(s.dequantize()[:, :, :4 * C], want[2])


def test_append_to_snapshot_does_not_touch_the_store():
    x = data(8, seed=3)
    s = make_store("channel")
    s.append(x[:, :, :2 * C], rank=2)
    s.append(x[:, :, 2 * C:3 * C], rank=2)       # capacity 4 chunks, 3 filled
    snap = s.snapshot()
    s.append(x[:, :, 3 * C:4 * C], rank=2)       # the store fills its spare chunk
    want = state(s)
    snap.append(x[:, :, 4 * C:5 * C], rank=2)    # the snapshot appends other data at the same position
    assert_state(s, want)
    ref = make_store("channel")
    ref.append(torch.cat([x[:, :, :3 * C], x[:, :, 4 * C:5 * C]], 2), rank=2)
    torch.testing.assert_close(snap.dequantize(), ref.dequantize(), rtol=1e-6, atol=1e-6)


def test_pop_then_append_keeps_an_older_snapshot():
    x = data(12, seed=4)
    s = make_store("token")
    s.append(x[:, :, :C], rank=2)
    for i in range(1, 6):
        s.append(x[:, :, i * C:(i + 1) * C], rank=2)  # capacity 8 chunks, 6 filled
    snap = s.snapshot()
    want = state(snap)
    tail = s.pop_chunks(2)
    torch.testing.assert_close(tail, want[2][:, :, 4 * C:])
    assert storage_bytes([s.codes]) == s.codes.numel()  # compact after a crop: the capacity is released
    for i in range(6, 12):                              # other data where the popped chunks were
        s.append(x[:, :, i * C:(i + 1) * C], rank=2)
    assert_state(snap, want)
    assert torch.equal(s.dequantize()[:, :, :4 * C], want[2][:, :, :4 * C])


def test_batch_select_and_repeat_then_append():
    x = data(6, b=3, seed=5)
    s, ref = make_store("token"), make_store("token")
    for i in range(3):
        s.append(x[:, :, i * C:(i + 1) * C], rank=2)
    idx = torch.tensor([2, 0])
    s.index_batch(idx)
    s.repeat_batch(2)
    for i in range(3, 6):
        s.append(x[idx].repeat_interleave(2, 0)[:, :, i * C:(i + 1) * C], rank=2)
    ref.append(x[idx].repeat_interleave(2, 0), rank=2)
    assert s.codes.shape[0] == 4
    for k in FLAT:
        assert torch.equal(getattr(s, k), getattr(ref, k)), k
    torch.testing.assert_close(s.dequantize(), ref.dequantize(), rtol=1e-6, atol=1e-6)


def test_bytes_held_count_the_spare_capacity():
    x = data(5, seed=6)
    s = make_store("token")
    s.append(x[:, :, :3 * C], rank=2)
    exact = storage_bytes([t for ts in s.tensors_by_kind().values() for t in ts])
    assert exact == sum(t.numel() * t.element_size() for ts in s.tensors_by_kind().values() for t in ts)
    s.append(x[:, :, 3 * C:4 * C], rank=2)  # grows every tensor to 6 chunks (2 x 3), 4 filled
    held = s.tensors_by_kind()
    assert storage_bytes([t for ts in held.values() for t in ts]) == 2 * exact
    assert storage_bytes(held["codes"]) == s.codes[:, :, :1].numel() * 6 * C
    snap = s.snapshot()  # shares the buffers: no bytes of its own
    assert storage_bytes([t for ts in snap.tensors_by_kind().values() for t in ts]) == 2 * exact


@pytest.mark.parametrize("bits", (4, 8))
def test_attention_over_a_grown_store(bits):
    """The kernels' torch reference reads the prefix views (strided along tokens) correctly."""
    x = data(9, seed=7)
    stores = {}
    for ax in ("token", "channel"):
        s = CompressedStore(axis=ax, bits=bits, group_size=G, chunk_len=C, outlier_ratio=0.05, power_iters=2)
        for i in range(9):
            s.append(x[:, :, i * C:(i + 1) * C], rank=2 if i else 1)
        assert not s.codes.is_contiguous()
        stores[ax] = s
    q, w = torch.randn(2, 4, 1, D), torch.randn(2, 2, 3, D)
    got = A.compressed_attention_reference(q, stores["token"], stores["channel"], w, w)
    k = torch.cat([stores["token"].dequantize(), w], 2).repeat_interleave(2, 1)
    v = torch.cat([stores["channel"].dequantize(), w], 2).repeat_interleave(2, 1)
    want = torch.softmax(q @ k.transpose(-1, -2) / D ** 0.5, -1) @ v
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
