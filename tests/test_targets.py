"""Target matching: class names, regexes, dotted names; ignore wins; a target matching nothing names close ones."""
from __future__ import annotations

import pytest

from compress import TargetError
from compress.targets import match_modules



def test_class_name_matches_every_linear_and_ignore_wins(tiny_model):
    model = tiny_model("llama")
    matched = match_modules(model, ["Linear"], ["re:.*lm_head"])
    assert "lm_head" not in matched
    assert len(matched) == 3 * 7  # q, k, v, o, gate, up, down per layer
    assert all(type(m).__name__ == "Linear" for m in matched.values())


def test_regex_and_dotted_names(tiny_model):
    model = tiny_model("llama")
    assert list(match_modules(model, ["re:.*mlp\\.down_proj"])) == [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
    assert list(match_modules(model, ["model.layers.1.self_attn.q_proj"])) == ["model.layers.1.self_attn.q_proj"]
    # a regex must match the whole name, not a substring
    assert match_modules(model, ["re:.*q_proj"], require_all=False)
    assert not match_modules(model, ["re:q_proj"], require_all=False)


def test_target_matching_nothing_names_the_closest(tiny_model):
    model = tiny_model("llama")
    with pytest.raises(TargetError, match="matches no module.*model.layers.1.self_attn.q_proj"):
        match_modules(model, ["model.layers.1.self_attn.qproj"])
    with pytest.raises(TargetError, match="matches no module.*Linear"):
        match_modules(model, ["Linaer"])
    # a regex: its literal word against the modules' own names (it suggested ModuleList)
    with pytest.raises(TargetError, match="closest module names: q_proj"):
        match_modules(model, ["re:.*q_prj$"])


def test_bad_regex_is_a_clear_error(tiny_model):
    with pytest.raises(TargetError, match="not a valid regex"):
        match_modules(tiny_model("llama"), ["re:(unclosed"])


def test_ignore_matching_nothing_and_a_leaf_name_regex_are_said(tiny_model):
    """An ignore with a typo (or a layer the model does not have) left out nothing, silently; a regex written as a
    leaf name matches nothing, since regexes match the whole dotted name."""
    model = tiny_model("llama")
    with pytest.raises(TargetError, match="ignore 'model.layers.9.mlp.down_proj' matches no module; closest"):
        match_modules(model, ["Linear"], ["model.layers.9.mlp.down_proj"])
    with pytest.raises(TargetError, match=r"ignore 're:.\*q_prj' matches no module"):
        match_modules(model, ["Linear"], ["re:.*q_prj"])
    with pytest.raises(TargetError, match=r"match the whole dotted name: write 're:.\*q_proj'"):
        match_modules(model, ["re:q_proj"])
    assert "model.layers.0.mlp.down_proj" not in match_modules(model, ["Linear"], ["re:.*down_proj"])
    # a class an earlier pass creates (quantize what prune left dense) is not a typo
    assert match_modules(model, ["Linear"], ["SparseLinear", "re:.*lm_head", "re:.*embed_tokens"])
    # the hint is given only where it helps: layer 9 does not exist, anchored or not
    with pytest.raises(TargetError) as info:
        match_modules(model, [r"re:model\.layers\.9\.mlp\..*"])
    assert "whole dotted name" not in str(info.value)
    # the user's own ignore: not told to drop it for ignore: []
    with pytest.raises(TargetError, match="leaves out: drop one of the two"):
        match_modules(model, ["re:.*mlp"], [r"re:.*layers\.[0-9]+\.mlp"])
    # the default ignore left the named head out, and prune said it "matches no Linear layer"
    with pytest.raises(TargetError, match="target 'lm_head' names only modules ignore 're:.\\*lm_head' leaves out"):
        match_modules(model, ["lm_head"], ["re:.*lm_head", "re:.*embed_tokens"])
