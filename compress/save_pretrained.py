"""`model.save_pretrained(folder)` on a compressed model writes what `compress.save` writes.

transformers' own save_pretrained wrote the packed tensors and the compression record under the original model
type: a folder plain transformers then loaded silently wrong (random layers where packed ones were, softmax
attention where linearized ones were; an audit's find). `compress.save` marks such a folder so that transformers
refuses it with a message naming compress.load (export/native_marker.py). Models that compress.apply or
compress.load return carry this on the instance (`route_save_pretrained`): the class is untouched, and a model
transformers loaded itself keeps transformers' method."""
from __future__ import annotations

import weakref

from torch import nn

from .errors import CompressError

# save_pretrained's arguments that change nothing compress.save writes (`token` is for push_to_hub, refused below)
_NO_EFFECT = {"save_peft_format", "save_original_format", "safe_serialization", "token"}


class SavesThroughCompress:
    """A model's `save_pretrained`: `compress.save(model, folder, overwrite=True)` (a folder compress did not write
    is still refused), with save_pretrained's `max_shard_size`; its other options are refused by name."""

    def __init__(self, model: nn.Module) -> None:
        self._model = weakref.ref(model)  # no reference cycle: the model is freed as it would be without this

    def __call__(self, save_directory, is_main_process: bool = True, state_dict=None, push_to_hub: bool = False,
                 max_shard_size=None, variant=None, distributed_checkpoint: bool = False, **kwargs):
        from .checkpoint import save

        if not is_main_process:  # (transformers: only the main process writes)
            return None
        given = [name for name, value in (("state_dict", state_dict), ("push_to_hub", push_to_hub),
                                          ("variant", variant), ("distributed_checkpoint", distributed_checkpoint))
                 if value] + sorted(k for k in kwargs if k not in _NO_EFFECT)
        if kwargs.get("safe_serialization") is False:
            given.append("safe_serialization=False")
        if given:
            raise CompressError(f"save_pretrained of a compressed model writes what compress.save writes, which "
                                f"takes no {', '.join(given)}: call compress.save(model, folder) (and upload the "
                                "folder yourself)")
        save(self._model(), save_directory, overwrite=True,
             **({"max_shard_bytes": max_shard_size} if max_shard_size is not None else {}))
        return None

    def __deepcopy__(self, memo):  # a copy of the model saves the copy
        original = self._model()
        return SavesThroughCompress(memo.get(id(original), original))


def route_save_pretrained(model: nn.Module) -> None:
    """Make `model.save_pretrained` write a compress checkpoint (see the module docstring)."""
    model.save_pretrained = SavesThroughCompress(model)
