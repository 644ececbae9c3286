"""CompressedStore's pages: fixed spans of page_chunks chunks, an exact-size open page, snapshots unchanged by later
appends and edits, and bytes held equal to the format's data at every length (never spare capacity)."""
import pytest
import torch

from compress.kernels.kv_pages import PAGE_FIELDS
from compress.kvcache import GEARCache, KVCacheSettings
from compress.kvcache.store import CompressedStore
from compress.pass_api import storage_bytes

C, G, D = 32, 32, 64


def make_store(axis, outlier_ratio=0.05, page_chunks=4):
    return CompressedStore(axis=axis, bits=4, group_size=G, chunk_len=C, outlier_ratio=outlier_ratio, power_iters=2,
                           page_chunks=page_chunks)


def data(n_chunks, b=2, h=2, seed=0):
    return torch.randn(b, h, n_chunks * C, D, generator=torch.Generator().manual_seed(seed))


def state(store):
    return [[None if getattr(p, f) is None else getattr(p, f).clone() for f in PAGE_FIELDS] for p in store.pages]


def assert_state(store, want):
    assert len(store.pages) == len(want)
    for page, fields in zip(store.pages, want):
        for f, t in zip(PAGE_FIELDS, fields):
            got = getattr(page, f)
            assert (got is None) == (t is None) and (t is None or torch.equal(got, t)), f


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_chunk_by_chunk_equals_one_append_without_lowrank(axis):
    x = data(11)
    grown, whole = make_store(axis), make_store(axis)
    for i in range(11):
        grown.append(x[:, :, i * C:(i + 1) * C], rank=0)
    whole.append(x, rank=0)
    assert [p.codes.shape[2] // C for p in grown.pages] == [4, 4, 3]  # sealed pages of 4 chunks, an open one of 3
    assert_state(grown, state(whole))
    assert all(t.is_contiguous() for p in grown.pages for t in p.tensors())


def test_pages_are_lowrank_spans():
    x = data(6)
    s = make_store("channel")
    s.append(x[:, :, :5 * C], rank=2)   # a prompt of 5 chunks: one page of 4 (own basis), an open page of 1
    basis = s.pages[1].basis.clone()
    s.append(x[:, :, 5 * C:], rank=3)    # a decode chunk joins the open page: projected onto its basis, rank 2
    assert [p.rank for p in s.pages] == [2, 2] and torch.equal(s.pages[1].basis, basis)
    assert s.pages[1].a.shape == (2, 2, 2 * C, 2)
    s.append(data(3, seed=1), rank=3)   # fills the page (2 chunks: 4 in all), then opens one of rank 3
    assert [p.rank for p in s.pages] == [2, 2, 3] and [p.codes.shape[2] // C for p in s.pages] == [4, 4, 1]
    assert (s.dequantize()[:, :, :6 * C] - x).norm() < (s.quantized_only()[:, :, :6 * C] - x).norm()


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_snapshot_unchanged_by_later_appends_and_crops(axis):
    x = data(9)
    s = make_store(axis)
    s.append(x[:, :, :3 * C], rank=2)
    snap, want = s.snapshot(), state(s)
    dense = s.dequantize()
    for i in range(3, 9):
        s.append(x[:, :, i * C:(i + 1) * C], rank=2)
    s.pop_chunks(4)
    s.append(x[:, :, :2 * C], rank=1)
    assert_state(snap, want)
    assert torch.equal(snap.dequantize(), dense)


def test_pop_select_repeat():
    x = data(7)
    s = make_store("token")
    s.append(x, rank=2)
    dense = s.dequantize()
    tail = s.pop_chunks(2)
    torch.testing.assert_close(tail, dense[:, :, 5 * C:])
    assert s.num_tokens == 5 * C and [p.codes.shape[2] // C for p in s.pages] == [4, 1]
    torch.testing.assert_close(s.dequantize(), dense[:, :, :5 * C])
    s.index_batch(torch.tensor([1]))
    torch.testing.assert_close(s.dequantize(), dense[1:, :, :5 * C])
    s.repeat_batch(3)
    s.append(data(1, b=3), rank=2)
    assert s.pages[-1].codes.shape[0] == 3 and s.num_tokens == 6 * C


def format_bytes(store) -> int:
    """The format's data for what the store holds (kv_pages docstring), independently of the tensors."""
    total = 0
    for p in store.pages:
        b, h, t, _ = p.codes.shape
        per_token = D * store.bits // 8 + 2 * 2 * D // store.group_size                 # codes, scale + zero
        per_token += 3 * store.per_group * D // store.group_size + 2 * p.rank             # outliers, token factors
        total += b * h * (t * per_token + 2 * D * p.rank)                                # + basis
    return total


@pytest.mark.parametrize("kw", [dict(method="kivi", bits=2), dict(bits=4, key_rank=2, value_rank=1)],
                         ids=["kivi-2", "gear-4"])
def test_bytes_held_equal_the_data_at_every_length(kw):
    """Sweep 65 .. 32k tokens (a prompt, then appends of 1 .. 1000 tokens like decode steps and chunked prefill):
    bytes held / (data + window) stays within 1.03 at every length (here exactly 1: nothing spare is held)."""
    from types import SimpleNamespace

    config = SimpleNamespace(num_hidden_layers=1, hidden_size=64, num_attention_heads=1, head_dim=D)
    config.get_text_config = lambda decoder=True: config
    config._attn_implementation = "gear_kv"  # update hands attention the window (no dense reconstruction per step)
    settings = KVCacheSettings.build(**kw, residual_length=64, group_size=64, power_iters=1)
    cache = GEARCache(config, settings)
    gen = torch.Generator().manual_seed(0)
    n, worst, steps = 0, 0.0, [65, 1, 62, 1, 1, 700, 1000] + [1000] * 31 + [1] * 70 + [7]
    for step in steps:
        k = torch.randn(1, 1, step, D, generator=gen)
        cache.update(k, k.clone(), 0)
        n += step
        layer = cache.layers[0]
        data_bytes = sum(format_bytes(s) for s in (layer.key_store, layer.value_store))
        window = storage_bytes([layer.window_keys, layer.window_values])
        assert window == 2 * 2 * D * (n % 64)
        ratio = cache.nbytes()["total"] / (data_bytes + window)
        worst = max(worst, ratio)
        assert ratio <= 1.03, (n, ratio)
    assert n >= 32768 and worst == pytest.approx(1.0)


def test_fp8_factors_halve_the_lowrank_bytes():
    x = data(4)
    stores = {}
    for dtype in (torch.float16, torch.float8_e4m3fn):
        s = CompressedStore(axis="token", bits=2, group_size=G, chunk_len=C, outlier_ratio=0.0, power_iters=3,
                            page_chunks=4, factor_dtype=dtype)
        s.append(x, rank=4)
        stores[dtype] = s
    half, fp8 = stores[torch.float16], stores[torch.float8_e4m3fn]
    assert fp8.pages[0].a.dtype == torch.float8_e4m3fn and fp8.pages[0].a.nbytes * 2 == half.pages[0].a.nbytes
    err = {k: (s.dequantize() - x).norm().item() for k, s in stores.items()}
    base = (half.quantized_only() - x).norm().item()
    # fp8 keeps almost all of what the fp16 factors remove from the quantization error
    assert err[torch.float16] < err[torch.float8_e4m3fn] < base
    assert base - err[torch.float8_e4m3fn] > 0.9 * (base - err[torch.float16])
    fp8.index_batch(torch.tensor([1]))  # editing works on fp8 pages
    fp8.pop_chunks(1)
    assert fp8.num_tokens == 3 * C
