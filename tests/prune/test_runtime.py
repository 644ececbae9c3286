"""The runtime of pruned layers chosen at load: `dense` (decoded once) gives the packed model's outputs at dense
speed and still saves the packed format; `packed` holds only the packed tensors; `compress inspect` says which."""
import json

import pytest
import torch
from click.testing import CliRunner

import compress
from compress.cli import main
from compress.pass_api import tensor_bytes
from compress.prune import Prune, SparseLinear


@pytest.fixture(scope="module", params=["2:4", "unstructured"])
def pruned_checkpoint(request, tmp_path_factory):
    model = compress.load("builtin:tiny")
    model, _ = compress.apply(model, [Prune(method="magnitude", structure=request.param, sparsity=0.5)],
                              progress=False)
    return compress.save(model, tmp_path_factory.mktemp("rt") / "pruned")


def sparse_layers(model):
    return [m for m in model.modules() if isinstance(m, SparseLinear)]


def test_default_cpu_runtime_is_dense_and_matches_packed(pruned_checkpoint, tmp_path):
    packed = compress.load(pruned_checkpoint, sparse_runtime="packed")
    dense = compress.load(pruned_checkpoint)  # auto: dense on the CPU for builtin:tiny's small layers
    assert {m.runtime for m in sparse_layers(dense)} == {"dense"}
    assert {m.runtime for m in sparse_layers(packed)} == {"packed"}
    ids = torch.randint(0, 8192, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, packed(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    # memory: packed holds less than the dense runtime, which holds about the unpruned model
    assert tensor_bytes(packed) < 0.8 * tensor_bytes(dense)
    # the dense runtime still saves the packed format, tensor for tensor
    s_packed, s_dense = packed.state_dict(), dense.state_dict()
    assert set(s_packed) == set(s_dense) and all(torch.equal(s_packed[k], s_dense[k]) for k in s_packed)
    again = compress.save(dense, tmp_path / "again")
    assert (again / "model.safetensors").stat().st_size == (pruned_checkpoint / "model.safetensors").stat().st_size


def test_runtime_switches_both_ways_and_reloads_state(pruned_checkpoint):
    model = compress.load(pruned_checkpoint, sparse_runtime="packed")
    layer = sparse_layers(model)[0]
    x = torch.randn(3, layer.in_features)
    before, values = layer(x), layer.values.clone()
    layer.set_runtime("dense")
    assert layer.values.numel() == 0 and layer.weight_dense.shape == (layer.out_features, layer.in_features)
    torch.testing.assert_close(layer(x), before)
    layer.load_state_dict(layer.state_dict())  # loading into a dense-runtime layer decodes again
    torch.testing.assert_close(layer(x), before)
    layer.set_runtime("packed")
    assert torch.equal(layer.values, values)
    torch.testing.assert_close(layer(x), before)


def test_state_dict_round_trips_through_meta_to_empty_and_assign(pruned_checkpoint):
    """A user's own loading: a model built on meta (or moved there, then to_empty) takes a state dict in either
    runtime; the bitmask layer's unsaved row offsets come back on the right device (the C kernel read a meta pointer
    after assign=True), and a state of another sparsity is torch's size mismatch, not a failure to decode."""
    import copy

    ids = torch.randint(0, 8192, (1, 9), generator=torch.Generator().manual_seed(1))
    for runtime in ("packed", "dense"):
        source = compress.load(pruned_checkpoint, sparse_runtime=runtime, dtype=torch.float32)
        with torch.no_grad():
            expected = source(input_ids=ids).logits
        fresh = compress.load(pruned_checkpoint, meta=True, sparse_runtime=runtime, dtype=torch.float32)
        fresh.load_state_dict(source.state_dict(), strict=True, assign=True)
        fresh.model.rotary_emb = source.model.rotary_emb  # (transformers' own unsaved buffers stay on meta)
        assert all(b.device.type == "cpu" for b in fresh.buffers())
        moved = copy.deepcopy(source).to("meta")
        repr(moved)  # counted without reading the bitmask on meta
        assert set(moved.state_dict()) == set(source.state_dict())
        moved = moved.to_empty(device="cpu")
        moved.load_state_dict(source.state_dict(), strict=True)
        moved.model.rotary_emb = source.model.rotary_emb
        with torch.no_grad():
            torch.testing.assert_close(fresh(input_ids=ids).logits, expected)
            torch.testing.assert_close(moved(input_ids=ids).logits, expected)
    for runtime in ("packed", "dense"):  # another sparsity's state: refused whole (torch copied the bitmask beside
        layer = sparse_layers(compress.load(pruned_checkpoint, sparse_runtime=runtime))[0]  # the refused values)
        if layer.format != "bitmask":
            break
        before, state_before = layer.dense_weight().clone(), layer.state_dict()
        state = {k: v.clone() for k, v in state_before.items()}
        state["values"], state["bitmask"] = state["values"][:-3], torch.zeros_like(state["bitmask"])
        with pytest.raises(RuntimeError, match="size mismatch for values"):
            layer.load_state_dict(state)
        assert torch.equal(layer.dense_weight(), before) and layer.nnz() == state_before["values"].numel()
        assert all(torch.equal(v, state_before[k]) for k, v in layer.state_dict().items())


def test_pickles_in_both_formats(pruned_checkpoint):
    import io

    model = compress.load(pruned_checkpoint, sparse_runtime="packed")
    buffer = io.BytesIO()
    torch.save(model, buffer)  # a lambda hook made the bitmask layers unpicklable
    assert buffer.tell() > 0


def test_unknown_runtime_is_a_user_error(pruned_checkpoint):
    with pytest.raises(compress.CompressError, match="unknown sparse runtime 'fast'"):
        compress.load(pruned_checkpoint, sparse_runtime="fast")


def test_inspect_says_which_path_each_layer_runs(pruned_checkpoint):
    runner = CliRunner()
    out = runner.invoke(main, ["inspect", str(pruned_checkpoint), "--device", "cpu", "--json"])
    assert out.exit_code == 0, out.output
    paths = json.loads(out.stdout)["runtime"]["paths"]
    assert len(paths) == 42 and set(paths.values()) == {"dense (decoded at load)"}
    out = runner.invoke(main, ["inspect", str(pruned_checkpoint), "--device", "cpu", "--sparse-runtime", "packed"])
    assert out.exit_code == 0 and "packed: C product over the packed values" in out.output


def test_auto_on_the_cpu_packs_large_layers_where_the_product_pays(monkeypatch):
    """auto: packed where the C product beats the dense GEMV (float32 layers of >= PACKED_MIN_WEIGHTS weights, a
    compiler here; bf16 ones too where the CPU runs csrc/sparse_bf16.c's 32-lane dot products and the width is whole
    64-column steps), dense for small layers, other bf16 ones, fp16 ones, and without the C kernels."""
    from compress.kernels.sparse_linear_cpu import cpu_sparse_bf16_available
    from compress.prune.runtime import PACKED_MIN_WEIGHTS, set_sparse_runtime

    def layer(out_f, in_f, dtype=torch.float32):
        lin = torch.nn.Linear(in_f, out_f, bias=False, dtype=dtype)
        keep = torch.zeros(out_f, in_f // 4, 4, dtype=torch.bool)
        keep[..., :2] = True
        return SparseLinear.from_linear(lin, keep.view(out_f, in_f), (2, 4))

    big = PACKED_MIN_WEIGHTS // 1024
    model = torch.nn.Sequential(layer(big, 1024), layer(256, 256), layer(big, 1024, torch.bfloat16),
                                layer(big * 1024 // 1000 + 1, 1000, torch.bfloat16), layer(big, 1024, torch.float16))
    paths = set_sparse_runtime(model)
    bf16 = "packed" if cpu_sparse_bf16_available("nm", 2, 4, 1024) else "dense"
    assert [m.runtime for m in model] == ["packed", "dense", bf16, "dense", "dense"]
    assert paths["0"].startswith("packed: C product") and paths["1"] == "dense (decoded at load)"
    monkeypatch.setenv("COMPRESS_CPU_KERNELS", "off")
    set_sparse_runtime(model)
    assert [m.runtime for m in model] == ["dense"] * 5
