"""What one training step of the recover pass holds in memory, judged from shapes before any work, and the check that
refuses a batch that would not fit (as `compress.api.check_calibration_memory` does for the calibration passes, under
the same COMPRESS_MEMORY_CHECK=off): a batch_size of thousands of windows was killed by the kernel (out of memory),
with no word of which setting to lower."""
from __future__ import annotations

import os

from torch import nn

from ..errors import ConfigError


def step_activation_bytes(model: nn.Module, windows: int, seq_len: int, kl: bool, checkpointing: bool) -> int:
    """A lower bound of the activations one forward and backward of `windows` windows of `seq_len` tokens holds at
    its peak: the logits over the vocabulary as float32, or one block of them (chunked_loss.py; the loss's upcast,
    its log-softmax, their gradient: three copies; the KL term adds the teacher's logits and both log-softmaxes and
    its pointwise terms: four more), and what each decoder layer keeps for backward (its norms' and MLP's inputs; with
    gradient checkpointing, only the layer's input)."""
    from ..models import text_config
    from .chunked_loss import LOSS_BLOCK_ELEMENTS, WHOLE_LOGITS_ELEMENTS

    cfg = text_config(model.config)
    vocabulary, hidden = getattr(cfg, "vocab_size", None) or 0, getattr(cfg, "hidden_size", None) or 0
    layers = getattr(cfg, "num_hidden_layers", None) or 0  # (a config without these: what it names is counted)
    item = next(model.parameters()).element_size()
    tokens = windows * seq_len
    whole = tokens * vocabulary
    logits = (whole if whole <= WHOLE_LOGITS_ELEMENTS else LOSS_BLOCK_ELEMENTS) * 4 * (3 + (4 if kl else 0))
    intermediate = getattr(cfg, "intermediate_size", None) or 4 * hidden
    per_layer = hidden if checkpointing else 2 * hidden + 2 * intermediate
    return logits + layers * tokens * per_layer * item


def check_step_memory(model: nn.Module, device: str, batch_size: int, micro_batch_size: int | None, seq_len: int,
                      kl: bool, checkpointing: bool) -> None:
    """A ConfigError naming batch_size / micro_batch_size when one micro-batch's activations would not fit in the
    compute device's free memory (on the CPU, shared by the launcher's processes on this machine)."""
    from ..environment import setting
    from ..models import text_config
    from ..sequential import free_bytes

    if setting("COMPRESS_MEMORY_CHECK") == "off":
        return
    free = free_bytes(device)
    if free is None:
        return
    sharing = _local_processes() if not str(device).startswith("cuda") else 1

    def need(windows: int) -> int:
        return sharing * step_activation_bytes(model, windows, seq_len, kl, checkpointing)

    windows = micro_batch_size or batch_size
    needed = need(windows)
    if not needed or needed <= free:
        return
    per_forward = (f"micro_batch_size {windows}" if micro_batch_size
                   else f"batch_size {windows} (micro_batch_size unset)")
    shared = f" x {sharing} processes" if sharing > 1 else ""
    # a micro-batch with room to spare: the estimate is a lower bound (a run on builtin:tiny peaked about 1.5 times it)
    fitting = next((d for d in range(windows - 1, 0, -1) if batch_size % d == 0 and 2 * need(d) <= free), None)
    if fitting:
        fix = (f"set micro_batch_size to {fitting}{' or less' if fitting > 1 else ''} (a step then accumulates "
               "batch_size / micro_batch_size forwards: the same update)")
    else:
        fix = "lower seq_len" + ("" if checkpointing else " or set gradient_checkpointing: true")
    vocabulary = text_config(model.config).vocab_size
    raise ConfigError(f"recover: {per_forward} x seq_len {seq_len}{shared} would hold at least "
                      f"{needed / 1e9:.2f} GB of activations in a forward and backward (the logits over "
                      f"{vocabulary} tokens as float32, or a block of them, several copies, and the decoder layers'), "
                      f"more than the {free / 1e9:.2f} GB free on {device}: {fix}, or set COMPRESS_MEMORY_CHECK=off to "
                      "run it anyway")


def _local_processes() -> int:
    """The launcher's processes on this machine (torchrun sets LOCAL_WORLD_SIZE), which share its memory."""
    raw = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    return int(raw) if raw.isascii() and raw.isdigit() and int(raw) > 0 else 1
