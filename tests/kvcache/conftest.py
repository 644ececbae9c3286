"""Fixtures of the KV-cache tests: our own copy of the reference model (the tests switch its attention
implementation and install caches, so the session-wide `reference_model` stays untouched) and held-out prompts."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def lm():
    import compress

    return compress.load("builtin:tiny")


@pytest.fixture(scope="module")
def heldout_ids(reference_tokenizer):
    from compress.calibration import builtin_text

    return reference_tokenizer(builtin_text("builtin:heldout")[:20000], return_tensors="pt").input_ids


@pytest.fixture
def attn(lm):
    """`attn(name)` switches the model's attention implementation; restored to sdpa afterwards."""
    yield lm.set_attn_implementation
    lm.set_attn_implementation("sdpa")


def _greedy(model, ids, cache, n, **kwargs):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, cache=cache, pad_token_id=0, **kwargs)


@pytest.fixture(name="greedy")
def greedy_fixture():
    """`greedy(model, ids, cache, n, **generate_kwargs)` -> greedy generate output ids."""
    return _greedy
