"""`model.save_pretrained(folder)` on a compressed model: transformers' own save, then its config.json marked as
`compress.save` marks a checkpoint plain transformers cannot read.

transformers' save_pretrained wrote the packed tensors and the compression record under the original model type: a
folder plain transformers then loaded without an error and with random layers where packed ones were, or softmax
attention where linearized ones were (an audit's find). The files and the semantics stay transformers' (a Trainer's
checkpoints and resumes, `state_dict=`, `save_function=`, saving into a folder that holds other files: all as
before); only config.json gets the model type that makes transformers refuse it with a message naming
compress.load (export/native_marker.py), which reads such a folder, and the folder a manifest of the files this
save wrote (what `--overwrite` may later replace there; a user's own files beside them stop it). Models that
compress.apply or compress.load return carry this on the instance (`route_save_pretrained`, which also makes
`resize_token_embeddings` refuse a compressed head): the class is untouched."""
from __future__ import annotations

import json
import os
import weakref
from pathlib import Path

from torch import nn

from .errors import CompressError


class _ModelMethod:
    """A method set on one model instance. An object holding the model weakly: no reference cycle (the model is freed
    as it would be without this), a deepcopy of the model calls the copy, and pickle carries it with its model."""

    def __init__(self, model: nn.Module) -> None:
        self._model = weakref.ref(model)

    def __deepcopy__(self, memo):  # a copy of the model calls the copy
        original = self._model()
        return type(self)(memo.get(id(original), original))

    def __reduce__(self):  # pickled with its model (already in pickle's memo: no recursion)
        return type(self), (self._model(),)


class RefusesResizeOfACompressedHead(_ModelMethod):
    """`resize_token_embeddings` where the output head or the embeddings are compressed (a VQ codebook head, packed
    or quantized codes): transformers resized the embeddings first, then failed on the head, leaving the model with
    more embedding rows than its head has outputs. Refused before anything changes; dense ones resize as before."""

    def __call__(self, *args, **kwargs):
        model = self._model()
        head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
        compressed = [name for name, module, plain in (("output head", head, nn.Linear),
                                                        ("input embeddings", embeddings, nn.Embedding))
                      if module is not None and type(module) is not plain]
        if compressed:
            raise CompressError(f"resize_token_embeddings: the {compressed[0]} is compressed "
                                f"({type(head if compressed[0] == 'output head' else embeddings).__name__}) and cannot "
                                "be resized; resize the original model's embeddings, then compress it")
        return type(model).resize_token_embeddings(model, *args, **kwargs)


class MarksSavedConfig(_ModelMethod):
    """A compressed model's `save_pretrained` (see the module docstring); `push_to_hub` is refused (the upload would
    happen before the mark)."""

    def __call__(self, save_directory, *args, **kwargs):
        model = self._model()
        if kwargs.get("push_to_hub") or (len(args) > 2 and args[2]):
            raise CompressError("save_pretrained(push_to_hub=True) of a compressed model would upload a folder plain "
                                "transformers loads wrongly: save it (compress.save or save_pretrained), then upload "
                                "the folder")
        folder = Path(save_directory)
        config = folder / "config.json"
        before = _identities(folder)
        out = type(model).save_pretrained(model, save_directory, *args, **kwargs)
        # only a config.json this call wrote: other ranks write none (transformers: is_main_process and global rank
        # 0), nor does an adapter-only save; a file already there is not this model's
        main = kwargs.get("is_main_process", args[0] if args else True)
        on_this_rank = getattr(model, "should_save_on_this_rank", lambda main: main)(main)  # (transformers < 5.x)
        if on_this_rank and _identity(config) not in (None, before.get("config.json")):
            mark_saved_config(folder, model)
            _list_written_files(folder, before)
        return out


def _identity(path: Path) -> tuple | None:
    """What a new write of `path` changes (None: no such file)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _identities(folder: Path) -> dict[str, tuple]:
    try:
        return {p.name: _identity(p) for p in folder.iterdir() if p.is_file() and not p.is_symlink()}
    except OSError:
        return {}


def _list_written_files(folder: Path, before: dict[str, tuple]) -> None:
    """The manifest compress.save writes (output_folder.MANIFEST): the files this save wrote, and those an earlier
    manifest listed that are still there. Without one, `--overwrite` took every checkpoint-like name in the folder
    for the tool's (a user's vocab.json or merges.txt went with it)."""
    from .output_folder import MANIFEST, written_files

    after = _identities(folder)
    ours = {name for name, identity in after.items() if before.get(name) != identity}
    ours |= (written_files(folder) or set()) & set(after)
    ours.discard(MANIFEST)
    tmp = folder / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"files": sorted(ours)}, indent=1), encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)


def mark_saved_config(folder: Path, model: nn.Module) -> None:
    """Mark `folder`/config.json (written by transformers for `model`) as compress.save would, in place."""
    from .export.native_marker import MARKERS, mark_native

    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("model_type") in MARKERS:
        return
    marked = dict(config)
    mark_native(marked, model)
    if marked != config:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(marked, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)


def route_save_pretrained(model: nn.Module) -> None:
    """Make `model.save_pretrained` mark what it writes (see the module docstring), and `resize_token_embeddings`
    refuse a compressed head or embeddings."""
    model.save_pretrained = MarksSavedConfig(model)
    if hasattr(model, "resize_token_embeddings"):
        model.resize_token_embeddings = RefusesResizeOfACompressedHead(model)
