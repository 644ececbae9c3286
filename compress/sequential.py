"""The sequential runner: calibration one decoder layer at a time, with forward hooks (no FX tracing).

1. Capture the inputs of decoder layer 0 (hidden states and the keyword arguments the model passes it: attention
   mask, position embeddings, ...) by a pre-hook that stops the forward there.
2. For each layer in order: move it to the compute device, hand a `LayerStep` to the pass, which collects statistics
   with `step.run(hooks)` and compresses the layer; then run the (now compressed) layer over the stored inputs, and
   its outputs become the next layer's inputs. Only the current layer sits on the compute device.

Memory: the stored activations are num_samples x seq_len x hidden, never sized by the model's maximum positions.
A layer left on disk (compress.load(max_memory=...)) is read in for its step and written back compressed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .errors import UnsupportedModelError
from .offload import materialized
from .progress import progress_bar


class _StopForward(Exception):
    pass


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layer list of a causal LM (Llama, Mistral, Qwen2, Qwen3 keep it at `model.layers`)."""
    for prefix in ("model.layers", "model.decoder.layers", "transformer.h"):
        obj: Any = model
        for part in prefix.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return prefix, obj
    raise UnsupportedModelError(
        f"cannot find the decoder layers of {type(model).__name__}; supported: Llama, Mistral, Qwen2, Qwen3 layouts"
    )


@dataclass
class LayerStep:
    """One decoder layer during sequential calibration."""

    index: int
    name: str                      # dotted prefix, e.g. "model.layers.3"
    layer: nn.Module
    inputs: list[torch.Tensor]     # hidden states per calibration batch, on the compute device
    kwargs: list[dict[str, Any]]   # the keyword arguments the model passed this layer, per batch

    @torch.no_grad()
    def run(self, hooks: dict[nn.Module, Callable] | None = None) -> list[torch.Tensor]:
        """Run the layer over every stored batch with `hooks` (module -> forward hook) attached; return outputs."""
        handles = [m.register_forward_hook(h) for m, h in (hooks or {}).items()]
        try:
            outs = []
            for x, kw in zip(self.inputs, self.kwargs):
                out = self.layer(x, **kw)
                outs.append(out[0] if isinstance(out, tuple) else out)
            return outs
        finally:
            for h in handles:
                h.remove()


def mixed_layer_types(model: nn.Module) -> list[str] | None:
    """The attention type of each decoder layer where they differ (Qwen2/Qwen3 with `use_sliding_window`, Gemma-like
    configs: sliding and full attention), else None. The model passes each layer the mask of its own type."""
    from .models import text_config

    types = getattr(text_config(model.config), "layer_types", None)
    return list(types) if types and len(set(types)) > 1 else None


@torch.no_grad()
def capture_layer0_inputs(model: nn.Module, batches: torch.Tensor, batch_size: int, device: str):
    """Layer 0's inputs per batch and the keyword arguments the model passes it; with mixed attention types, the
    keyword arguments per type: {type: [kwargs per batch]} (the mask differs, the rest is shared)."""
    _, layers = decoder_layers(model)

    def capture() -> tuple[list, list]:
        inputs, kwargs = [], []

        def grab(module, args, kw):
            inputs.append(args[0] if args else kw.pop("hidden_states"))
            kw = {k: v for k, v in kw.items() if k not in ("hidden_states", "cache", "past_key_values")}
            kw["use_cache"] = False
            kwargs.append(kw)
            raise _StopForward

        handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for i in range(0, batches.shape[0], batch_size):
                try:
                    model(input_ids=batches[i : i + batch_size].to(device), use_cache=False)
                except _StopForward:
                    pass
        finally:
            handle.remove()
        return inputs, kwargs

    inputs, kwargs = capture()
    types = mixed_layer_types(model)
    if types is None:
        return inputs, kwargs
    # the model picks each layer's mask by config.layer_types[i]: give layer 0 each other type in turn, and keep
    # only the mask of that run (layer 0's mask for every layer calibrated sliding layers with full attention)
    from .models import text_config

    cfg = text_config(model.config)
    by_type = {types[0]: kwargs}
    try:
        for t in dict.fromkeys(types[1:]):
            if t not in by_type:
                cfg.layer_types = [t] + types[1:]
                by_type[t] = [{**kw, "attention_mask": other["attention_mask"]}
                              for kw, other in zip(kwargs, capture()[1])]
    finally:
        cfg.layer_types = types
    return inputs, by_type


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    batches: torch.Tensor,
    on_layer: Callable[[LayerStep], None],
    *,
    device: str = "cpu",
    batch_size: int = 8,
    progress: bool = True,
    description: str = "calibrating",
) -> None:
    """Call `on_layer(step)` for each decoder layer, feeding each layer the outputs of the already-processed ones."""
    prefix, layers = decoder_layers(model)
    # Everything before layer 0 (embeddings, rotary) runs on the compute device for the capture.
    offload = next(model.parameters()).device
    base = model.get_submodule(prefix.rsplit(".", 1)[0])
    pre_layer = [m for n, m in base.named_children() if n != prefix.rsplit(".", 1)[1]]
    for m in pre_layer:
        m.to(device)
    try:
        inputs, kwargs = capture_layer0_inputs(model, batches, batch_size, device)
        types = mixed_layer_types(model)
    finally:
        for m in pre_layer:
            m.to(offload)
    for i in progress_bar(range(len(layers)), description=description, enabled=progress):
        # on the compute device for its step; a layer on disk (compress.load(max_memory=...)) is read in and
        # written back compressed
        with materialized(layers[i], f"{prefix}.{i}", device, model) as layer:
            step = LayerStep(index=i, name=f"{prefix}.{i}", layer=layer, inputs=inputs,
                             kwargs=kwargs[types[i]] if types else kwargs)
            on_layer(step)
            inputs = step.run()


def for_each_layer(model: nn.Module, fn: Callable[[int, str, nn.Module], None], device: str = "cpu", *,
                   progress: bool = False, description: str = "layers") -> None:
    """Call `fn(index, name, layer)` on every decoder layer with real weights (no calibration): a layer left on
    disk is read in for the call and written back afterwards, so passes that need no activations still work on
    models larger than memory. A progress bar over the layers with `progress`."""
    prefix, layers = decoder_layers(model)
    for i in progress_bar(range(len(layers)), description=description, enabled=progress):
        with materialized(layers[i], f"{prefix}.{i}", device, model) as layer:
            fn(i, f"{prefix}.{i}", layer)


def modules_in_layer(names: list[str], layer_name: str, layer: nn.Module) -> dict[str, nn.Module]:
    """The modules among `names` (dotted, from the model's root) inside decoder layer `layer_name`, by name: what a
    pass working layer by layer looks up when the layer is reached (it keeps names, not modules it replaces)."""
    return {n: layer.get_submodule(n[len(layer_name) + 1:]) for n in names if n.startswith(layer_name + ".")}


def calibration_bytes(model: nn.Module, num_samples: int, seq_len: int, targets: dict[str, nn.Module],
                      hessians: bool, batch_size: int = 8) -> int:
    """What `run_sequential` holds at once, from shapes alone (a meta model will do): every window's hidden states
    into and out of the current layer, the per-batch keyword arguments (rotary cos/sin, position ids), the token
    ids, the masks of further attention types (sliding beside full), and for an OBS pass (`hessians`) one float32
    in x in Hessian per target Linear of the decoder layer that has the most (`targets`: the pass's Linears, named
    from the model's root)."""
    from .models import text_config

    cfg = text_config(model.config)
    item = next(model.parameters()).element_size()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    batches = -(-num_samples // batch_size)
    held = 2 * num_samples * seq_len * cfg.hidden_size * item + batches * seq_len * (2 * head_dim * item + 8)
    held += num_samples * seq_len * 8  # the calibration token ids (int64)
    types = mixed_layer_types(model)
    if types:  # a mask per further attention type (bool under SDPA, the model's dtype under eager: counted so)
        held += (len(set(types)) - 1) * num_samples * seq_len * seq_len * item
    if hessians:
        from .hessian import SAME_INPUT_LINEARS

        prefix = decoder_layers(model)[0] + "."
        per_layer: dict[str, dict[str, int]] = {}
        for name, module in targets.items():
            layer = name[len(prefix):].split(".", 1)[0] if name.startswith(prefix) else name
            parent, _, leaf = name.rpartition(".")
            # one Hessian per input (compress/hessian.py: input_statistics): q/k/v share one, gate/up one
            group = next((f"{parent}.{'/'.join(g)}" for g in SAME_INPUT_LINEARS if leaf in g), name)
            per_layer.setdefault(layer, {})[group] = 4 * module.in_features ** 2
        held += max((sum(groups.values()) for groups in per_layer.values()), default=0)
    return held


def free_bytes(device: str) -> int | None:
    """Memory a run can still take on `device`: the GPU's free memory, or the kernel's MemAvailable (Linux); None
    where neither can be read (the check is skipped)."""
    if str(device).startswith("cuda"):
        try:
            where = torch.device(device)
            # what the driver has free, and what torch's allocator holds cached but unused (the driver counts it used)
            return torch.cuda.mem_get_info(where)[0] + torch.cuda.memory_reserved(where) - torch.cuda.memory_allocated(
                where)
        except (RuntimeError, AssertionError):
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
