"""`load` copies a checkpoint in a decoder layer at a time (the whole state dict read first held about twice the
weights at the peak), each layer's tensors together even where shards split a layer."""
from __future__ import annotations

import re

import torch

import compress
from compress import checkpoint


def test_load_reads_a_layer_at_a_time_across_shards(tmp_path, monkeypatch):
    model = compress.load("builtin:tiny", dtype="float32")
    compress.apply(model, [compress.get_pass("prune")(method="magnitude", sparsity=0.5),
                           compress.get_pass("quantize")(method="rtn", bits=4, group_size=64)], progress=False)
    folder = compress.save(model, tmp_path / "sharded", max_shard_bytes=300_000)  # layers split over shards
    assert len(list(folder.glob("*.safetensors"))) > 12
    groups = []
    read = checkpoint.read_state_by_layer

    def recorded(files):
        for group in read(files):
            groups.append(set(group))
            yield group

    monkeypatch.setattr(checkpoint, "read_state_by_layer", recorded)
    reloaded = compress.load(folder, dtype="float32")
    layers = [{re.match(r"model\.layers\.(\d+)\.", k).group(1) if k.startswith("model.layers.") else None
               for k in g} for g in groups]
    assert all(len(ids) == 1 for ids in layers)  # one layer (or one module outside the layers) per group
    per_layer = [g for g, ids in zip(groups, layers) if ids == {"0"}]
    assert len(per_layer) == 1 and len(per_layer[0]) > 7  # all of layer 0's tensors, read together
    want, got = model.state_dict(), reloaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    ids = torch.randint(0, 8192, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
