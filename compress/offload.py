"""Models larger than memory: decoder layers left on disk and brought in one at a time.

`compress.load(source, max_memory="8GB")` builds the model on the meta device and plans, with accelerate's
`infer_auto_device_map`, which decoder layers fit in `max_memory` of CPU RAM; the others stay where they are on
disk. An offloaded layer's tensors are meta tensors behind an accelerate `AlignDevicesHook` whose weights map reads
the safetensors files in place (accelerate's `OffloadedWeightsLoader` index: file + tensor name, no copy), so a
plain forward (evaluation, generation) loads each layer for its forward and drops it afterwards.

Compression goes through the sequential runner, which calls `materialized(layer)`: the layer's tensors are read
onto the compute device, the pass compresses it, and on exit the (now compressed) layer is written to a spill
file in the offload folder (compute dtype, so results are bit-identical to an in-memory run) and returns to meta
behind a hook that reads the spill file. `compress.save` then streams every tensor, shard by shard, from wherever
it lives. Peak memory: the resident modules (embeddings, final norm, head: always resident, passes and the
calibration capture need them) + the layers that fit the cap + one layer being compressed + the calibration
activations. Disk: the spill files (about the compressed model's size) beside the source.
"""
from __future__ import annotations

import glob
import math
import os
import re
import shutil
import socket
import tempfile
import uuid
import weakref
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import CheckpointError, CompressError, disk_full_error
from .heap import map_buffers_from_1mb
from .paths import user_path
from .progress import progress_bar

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value: int | str, what: str = "max_memory") -> int:
    """`8GB`, `512MiB`, `1.5e9` or an int -> bytes (`what`: the setting's name, for the error messages)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise CompressError(f"{what} must be positive, got {value}")
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
    if isinstance(value, bool) or not m or m.group(2).upper() not in _UNITS:
        raise CompressError(f"cannot read {what} {value!r}; write e.g. 8GB, 512MiB or a number of bytes")
    number = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if number < 1:
        raise CompressError(f"{what} must be at least one byte, got {value!r}")
    if not math.isfinite(number) or number >= 2**63:
        raise CompressError(f"{what} {value!r} is more memory than any machine has; write e.g. 8GB")
    return int(number)


def _signature(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def weight_index(files: list[Path], dtype: torch.dtype) -> dict[str, dict]:
    """accelerate's OffloadedWeightsLoader index: tensor name -> where it lives, read in place and cast to `dtype`
    (floating tensors only; integer codes and indices keep their type), with the file's signature as loaded."""
    index = {}
    for f in files:
        signature = _signature(f)
        with safe_open(f, framework="pt") as sf:
            for key in sf.keys():
                entry = {"safetensors_file": str(f), "weight_name": key, "signature": signature}
                if sf.get_slice(key).get_dtype() in ("F16", "BF16", "F32", "F64"):
                    entry["dtype"] = str(dtype).removeprefix("torch.")
                index[key] = entry
    return index


class CheckedWeights(Mapping):
    """accelerate's OffloadedWeightsLoader over `index`, refusing to read a file that changed since it was indexed: a
    layer left on disk is read at each forward, and a save over the folder meanwhile (a new file under the same
    name) would have mixed another model's layers into this one, silently."""

    def __init__(self, index: dict[str, dict]):
        from accelerate.utils import OffloadedWeightsLoader

        self.loader = OffloadedWeightsLoader(index=index)

    def __getitem__(self, key: str) -> torch.Tensor:
        info = self.loader.index.get(key, {})
        if "signature" in info:
            path = Path(info["safetensors_file"])
            try:
                same = _signature(path) == tuple(info["signature"])
            except OSError:
                same = False
            if not same:
                raise CheckpointError(f"{path} changed on disk after this model was loaded from it (saved over, or "
                                      "removed): its layers left on disk can no longer be read; load it again")
        return self.loader[key]

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def is_offloaded(module: nn.Module) -> bool:
    return getattr(module, "_compress_weights", None) is not None


def _attach(module: nn.Module, weights: dict[str, dict], prefix: str, device) -> None:
    """Leave `module` on meta behind accelerate hooks that load its tensors from `weights` (an index) for each
    forward. One hook per submodule that holds tensors (accelerate's attach_align_device_hook), so each hook
    knows its own non-persistent buffers; those (derived, e.g. row offsets) stay resident."""
    from accelerate.hooks import attach_align_device_hook
    from accelerate.utils import PrefixedDataset, set_module_tensor_to_device

    for name in module.state_dict():
        set_module_tensor_to_device(module, name, "meta")
    module._compress_weights = PrefixedDataset(CheckedWeights(weights), prefix + ".")
    attach_align_device_hook(module, execution_device=device, offload=True, offload_buffers=True,
                             weights_map=module._compress_weights)


def _tensors(module: nn.Module):
    yield from module.named_parameters(recurse=True)
    yield from module.named_buffers(recurse=True)


def check_offload_folder(folder: str | Path | None) -> None:
    """An offload folder that holds a model (config.json and safetensors files) is refused: spill files left there by
    a killed run would make it a folder of two models that neither loads."""
    where = user_path(folder) if folder is not None else None
    if where is not None and (where / "config.json").exists() and any(where.glob("*.safetensors")):
        raise CompressError(f"--offload-folder {folder} holds a model (config.json, *.safetensors): the spilled "
                            "layers would mix with its files; give an empty or new folder")
    if where is not None:  # writable, found now (a traceback after the model loaded and layer 0 was compressed)
        created = []  # the folders the probe makes, removed after it (the run makes them again when it spills)
        for parent in [where, *where.parents]:
            if parent.exists() or parent.is_symlink():
                break
            created.append(parent)
        try:
            where.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=where, prefix=".compress-probe-"):
                pass
        except OSError as exc:
            raise CompressError(f"--offload-folder {folder}: cannot write there ({exc.strerror or exc}); give a "
                                "writable folder") from None
        finally:
            for made in created:  # deepest first
                if made.is_dir() and not any(made.iterdir()):
                    made.rmdir()


SPILL_PREFIX = "compress-offload-"  # + host + "-" + PID + "-" + mkdtemp's suffix: a temporary spill folder


def _spill_prefix() -> str:
    """This machine's spill-folder prefix: a pid means something only on the host (container) that ran it, and
    containers sharing a /tmp have their own pids."""
    return f"{SPILL_PREFIX}{re.sub(r'[^A-Za-z0-9.]', '_', socket.gethostname())}-"


def _sweep_stale_spill_folders(tmp: Path) -> None:
    """Remove this host's temporary spill folders whose process is gone: a run killed by SIGKILL or the OOM killer
    (what a --max-memory run risks) cannot remove its own, and a model's worth of layers stayed in /tmp for good."""
    prefix = _spill_prefix()
    for folder in tmp.glob(f"{glob.escape(prefix)}*"):
        if _of_a_dead_run(re.fullmatch(r"(\d+)-\w+", folder.name[len(prefix):])) and folder.is_dir() \
                and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)


def _sweep_stale_spill_files(folder: Path) -> None:
    """The same for the spill files in a user's --offload-folder, named with the host and pid of their run."""
    prefix = _spill_prefix()
    for file in folder.glob(f"*.{glob.escape(prefix)}*.safetensors"):
        pid = re.search(rf"\.{re.escape(prefix)}(\d+)-[0-9a-f]{{8}}\.safetensors$", file.name)
        if _of_a_dead_run(pid) and file.is_file() and not file.is_symlink():
            file.unlink(missing_ok=True)


def _of_a_dead_run(pid: re.Match | None) -> bool:
    from .output_folder import pid_alive

    return pid is not None and int(pid[1]) != os.getpid() and not pid_alive(int(pid[1]))


class OffloadState:
    """Where the offloaded layers of one model live; kept on the model as `model.compress_offload`."""

    def __init__(self, folder: Path | None, device):
        check_offload_folder(folder)
        map_buffers_from_1mb()
        self._own_folder = folder is None
        if folder is None:
            _sweep_stale_spill_folders(Path(tempfile.gettempdir()))
        else:
            _sweep_stale_spill_files(Path(folder))
        self.folder = Path(folder) if folder else Path(tempfile.mkdtemp(prefix=f"{_spill_prefix()}{os.getpid()}-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.device = device
        self._spilled: dict[str, Path] = {}  # prefix -> its current spill file
        self._copied = False  # a deepcopy of the model shares this state (and reads its files)
        # when the state goes away, and at interpreter exit for a model still alive then (__del__ does not run for
        # those: a script that ended with its model in a variable left the spill files behind)
        self._finalizer = weakref.finalize(self, _remove_spills, self.folder, self._own_folder, self._spilled)

    def spill(self, module: nn.Module, prefix: str) -> None:
        """Write `module` (compressed or not) to a spill file and leave it on meta, read back on demand; the layer's
        previous spill file (a pass before this one) is removed, so the folder holds one copy of each layer."""
        path = self.folder / f"{prefix}.{_spill_prefix()}{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"
        state = {f"{prefix}.{k}": v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
        # held for cleanup from before the file exists until it is the layer's copy: a signal (Ctrl-C / SIGTERM)
        # anywhere in between still finds it (one arriving between the write and the record left it behind)
        writing = f"{prefix} (being written)"
        self._spilled[writing] = path
        try:
            save_file(state, path)
        except BaseException as exc:
            path.unlink(missing_ok=True)
            del self._spilled[writing]
            full = disk_full_error(exc, self.folder)
            if full is not None:  # the user's disk: one line (errors.user_error), as a full disk at the save gets
                raise full from None
            raise
        signature = _signature(path)
        _attach(module, {k: {"safetensors_file": str(path), "weight_name": k, "signature": signature} for k in state},
                prefix, self.device)
        previous = self._spilled.get(prefix)
        if previous is not None:  # still held until it is gone (a signal between the two would leave it)
            self._spilled[f"{prefix} (previous)"] = previous
        self._spilled[prefix] = path
        del self._spilled[writing]
        if previous is not None:
            if self._copied:  # a copy of the model may still read it: kept, removed with the rest at the end
                self._spilled[f"{prefix} ({path.stem})"] = self._spilled.pop(f"{prefix} (previous)")
                return
            previous.unlink(missing_ok=True)
            del self._spilled[f"{prefix} (previous)"]

    def cleanup(self) -> None:
        """Remove what this state wrote: its own temporary folder, or in a folder the user named only the spill
        files it wrote there (the folder and anything else in it stay)."""
        _remove_spills(self.folder, self._own_folder, self._spilled)

    def __deepcopy__(self, memo):
        """A copy of the model reads the same spill files: it shares this state, so the files go with the last of
        them (a copy that cleaned up on its own would delete what the other still reads). From then on a layer's
        earlier files stay until the end: one copy compressing a layer removed the file the other read."""
        self._copied = True
        return self



def _remove_spills(folder: Path, own_folder: bool, spilled: dict[str, Path]) -> None:
    if own_folder:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for path in spilled.values():
        path.unlink(missing_ok=True)
    spilled.clear()


@contextmanager
def materialized(module: nn.Module, prefix: str, device, model: nn.Module) -> Iterator[nn.Module]:
    """`module` with real tensors on `device` for the duration. A resident module returns to its device after; an
    offloaded one is read in first and written back to a spill file after (its submodules may have been replaced
    by compressed ones meanwhile)."""
    if not is_offloaded(module):  # resident: visits the compute device, then goes home
        home = next(module.parameters(), torch.empty(0)).device
        try:
            yield module.to(device)
        finally:
            module.to(home)
        return
    from accelerate.hooks import remove_hook_from_submodules
    from accelerate.utils import set_module_tensor_to_device

    from .inspection import derived_tensor_names, rebuild_derived

    weights = module._compress_weights
    remove_hook_from_submodules(module)
    _drop_bound_forward(module)
    module._compress_weights = None
    derived = derived_tensor_names(module)  # not in the checkpoint: rebuilt from what is
    for name, t in module.state_dict().items():
        value = torch.empty(t.shape, dtype=t.dtype) if name in derived else weights[name]
        set_module_tensor_to_device(module, name, device, value=value)
    rebuild_derived(module)
    try:
        yield module
    finally:
        model.compress_offload.spill(module, prefix)


def _drop_bound_forward(module: nn.Module) -> None:
    """Undo what accelerate's hook removal leaves behind: it puts the original `forward` back as a bound method in
    each submodule's own __dict__, a module -> method -> module cycle that only the cyclic garbage collector frees. A
    dense Linear the pass then replaces (by a SparseLinear, a QuantizedLinear) would stay in memory, with its weights
    read from disk, until a collection ran: layer after layer of them. Without the attribute the class's forward
    applies again, the same method, and the replaced module goes as soon as nothing refers to it."""
    for m in module.modules():
        forward = m.__dict__.get("forward")
        if getattr(forward, "__self__", None) is m and getattr(forward, "__func__", None) is type(m).forward:
            del m.__dict__["forward"]


def resident_bytes(model: nn.Module) -> int:
    """Bytes of tensors the model holds in memory (meta tensors of offloaded layers excluded), each storage once
    (pass_api.storage_bytes, which `tensor_bytes` counts by too)."""
    from .pass_api import storage_bytes

    return storage_bytes([t for _, t in _tensors(model) if t.device.type != "meta"])


class LazyTensor:
    """A tensor of an offloaded layer in a state dict being saved: shape and dtype now, data when its shard is
    written (so saving holds one shard in memory, not the model)."""

    def __init__(self, shape, dtype: torch.dtype, load):
        self.shape, self.dtype, self._load = tuple(shape), dtype, load

    @classmethod
    def of(cls, model: nn.Module, name: str, meta: torch.Tensor, storage_dtype: torch.dtype) -> "LazyTensor":
        dtype = storage_dtype if meta.is_floating_point() else meta.dtype
        read = tensor_source(model, name)
        return cls(meta.shape, dtype, lambda: read().detach().to("cpu", dtype).contiguous())

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def load(self) -> torch.Tensor:
        return self._load()


def tensor_source(model: nn.Module, name: str):
    """A zero-argument function that reads the offloaded tensor `name` (a state-dict key) from disk."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        owner = model.get_submodule(".".join(parts[:cut]))
        if is_offloaded(owner):
            weights, key = owner._compress_weights, ".".join(parts[cut:])
            return lambda: weights[key]
    raise CompressError(f"tensor {name} is on the meta device and no offload hook knows where it lives")


def load_offloaded_folder(path: Path, config, section: dict | None, *, dtype: torch.dtype, max_memory,
                          offload_folder=None, device="cpu") -> nn.Module:
    """`compress.load(..., max_memory=...)`: a Hugging Face folder or a compressed checkpoint, layers that do not
    fit left on disk."""
    from .checkpoint import check_format_version, extra_folders, weight_files
    from .checkpoint_validation import check_against_model, check_weight_files
    from .errors import CheckpointError

    if section is not None:
        check_format_version(path, section)
        extra = extra_folders(path, section)
        if extra:
            raise CheckpointError(f"{path} keeps {extra[0].name}/ beside its weights (an unmerged LoRA adapter), "
                                  "which max_memory loading cannot attach: load it without max_memory, or recover "
                                  "with merge: true")
    files = [f for f in weight_files(path) if f.suffix == ".safetensors"]
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors weights; offloaded loading reads safetensors only")
    from .quantize.bnb import Bnb4bitLinear
    from .sequential import decoder_layers

    model = empty_structure(config, section, dtype, path)
    # the checks of an in-memory load, on headers (they were skipped: damaged files gave tracebacks or ran); a
    # Hugging Face folder's names are transformers' business (older ones store e.g. rotary inv_freq)
    headers = check_weight_files(path, files)
    if section is not None:
        check_against_model(path, headers, model, _tied_names_meta(model))
    layers = decoder_layers(model)[1]
    offloaded = offload_plan(model, dtype, max_memory)
    # a 4-bit layer's quant state is no plain tensor, which accelerate's offload hooks need
    if any(isinstance(m, Bnb4bitLinear) for i in offloaded for m in layers[i].modules()):
        raise CheckpointError(f"{path} holds bitsandbytes 4-bit layers, which max_memory loading cannot leave on "
                              "disk: load it without max_memory, or with a cap it fits in (int8 and compress's own "
                              "int4 offload fine)")
    return load_offloaded(path, files, model, dtype=dtype, offloaded=offloaded, offload_folder=offload_folder,
                          device=device)


def offload_plan(model: nn.Module, dtype: torch.dtype, max_memory) -> set[int]:
    """Indices of the decoder layers of a meta-device `model` that do not fit `max_memory` at `dtype`."""
    from accelerate import infer_auto_device_map

    from .sequential import decoder_layers

    prefix, layers = decoder_layers(model)
    plan = infer_auto_device_map(model, max_memory={"cpu": parse_bytes(max_memory), "disk": 1 << 60},
                                 no_split_module_classes=[type(layers[0]).__name__], dtype=dtype)
    offloaded = set()
    for i in range(len(layers)):
        name = f"{prefix}.{i}"
        if next((d for k, d in plan.items() if k in ("", name) or name.startswith(k + ".")), "cpu") == "disk":
            offloaded.add(i)
    return offloaded


def load_offloaded(path: Path, files: list[Path], model: nn.Module, *, dtype: torch.dtype, offloaded: set[int],
                   offload_folder=None, device="cpu") -> nn.Module:
    """Fill a meta-device `model` from `files`: the decoder layers in `offloaded` (`offload_plan`) left on disk
    behind offload hooks, everything else in RAM."""
    from .checkpoint_validation import check_loaded_modules
    from .inspection import derived_tensor_names, rebuild_derived
    from .sequential import decoder_layers

    prefix, layers = decoder_layers(model)
    index = weight_index(files, dtype)
    state_names = set(model.state_dict())
    missing = sorted(state_names - set(index) - _tied_names_meta(model) - derived_tensor_names(model))
    if missing:
        raise CompressError(f"{path} lacks tensors the model needs: {', '.join(missing[:5])}")
    model.compress_offload = OffloadState(offload_folder, device)
    loader = CheckedWeights(index)
    _fill(model, {k: loader[k] for k in index if k in state_names and not k.startswith(prefix + ".")},
          skip=prefix + ".")
    from .models import nonfinite_weights

    nonfinite = []  # of the layers left on disk, found while each is read (apply refuses them as for any model)
    for i in progress_bar(range(len(layers)), description="loading layers", enabled=len(offloaded) > 0):
        layer_prefix = f"{prefix}.{i}"
        weights = {k: v for k, v in index.items() if k.startswith(layer_prefix + ".")}
        # read each layer once so that buffers its modules derive on load (row offsets, ...) are computed, then
        # leave the layers that do not fit on disk
        _fill(layers[i], {k[len(layer_prefix) + 1:]: loader[k] for k in weights})
        check_loaded_modules(path, layers[i], prefix=layer_prefix)  # while it is in memory
        if i in offloaded:
            nonfinite += [(f"{layer_prefix}.{n}", count, nan) for n, count, nan in nonfinite_weights(layers[i])]
            _attach(layers[i], weights, layer_prefix, device)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    rebuild_derived(model)  # in the layers held in memory (a layer on disk computes without them)
    check_loaded_modules(path, model, skip=prefix + ".")  # the rest (e.g. a VQ head); the layers were checked
    model.compress_offloaded_layers = sorted(offloaded)
    model.compress_nonfinite_on_disk = nonfinite
    return model


def empty_structure(config, section: dict | None, dtype: torch.dtype, path: Path) -> nn.Module:
    """The model with its compressed modules rebuilt, parameters on meta. Buffers that the constructor computes
    (rotary frequencies) stay real; whatever the passes' `restore` creates stays meta until filled. `path`: the
    checkpoint's folder, named in the error a damaged restore record gives."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .checkpoint import _no_init, restore_pass

    with init_empty_weights(include_buffers=False), _no_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with init_empty_weights(include_buffers=True):
        for i, entry in enumerate((section or {}).get("passes", [])):
            restore_pass(path, i, entry, model)
    return model


def _fill(module: nn.Module, state: dict[str, torch.Tensor], skip: str | None = None) -> None:
    """Give `module`'s meta tensors (outside `skip`) real storage and load `state` through load_state_dict, so
    that modules' load hooks run."""
    from accelerate.utils import set_module_tensor_to_device

    for name, t in list(_tensors(module)):
        if t.device.type == "meta" and not (skip and name.startswith(skip)):
            set_module_tensor_to_device(module, name, "cpu", value=torch.empty(t.shape, dtype=t.dtype))
    module.load_state_dict(state, strict=False)


def _tied_names_meta(model: nn.Module) -> set[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return {n for n in model.state_dict() if n.startswith("lm_head.")}
