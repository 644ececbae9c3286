"""The recovery loss with the head applied a block of positions at a time, each block under activation
checkpointing: one block's logits (and their log-softmaxes and gradients) alive at once, instead of 3 float32
copies of a micro-batch's whole logits for the next-token loss and 4 more for the KL to the teacher (at Llama-3's
128k vocabulary, 2,048 tokens: 1 GB a copy). The same loss as the model's own and `kl_to_teacher`: NLL averaged
over the labelled positions, KL over every position."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..head_blocks import final_hidden_states, has_head_and_decoder

LOSS_BLOCK_ELEMENTS = 1 << 24  # logits per block (x4 bytes: 64 MB a copy)
# up to this many logits a micro-batch takes the model's own loss over whole logits (<= 1.8 GB in all): the blocks'
# recomputation in backward costs a step time (a 128k-vocabulary head on a 256-wide model: 1.5x) that only pays
# where the memory it saves matters
WHOLE_LOGITS_ELEMENTS = 1 << 26
IGNORE = -100  # transformers' label of a position without a loss


def blocked_losses(model: nn.Module, unwrapped: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   teacher: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(mean next-token NLL of `labels`, mean KL(teacher || model) or None) from one forward of `model` (perhaps
    wrapped for data parallelism; `unwrapped`: the module whose decoder and head the hooks hold); None where whole
    logits hold at most WHOLE_LOGITS_ELEMENTS, or the final hidden states cannot be taken (the caller then takes
    the loss from whole logits)."""
    vocab = unwrapped.config.get_text_config(decoder=True).vocab_size
    if input_ids.numel() * vocab <= WHOLE_LOGITS_ELEMENTS:
        return None
    if not has_head_and_decoder(unwrapped):
        return None
    with final_hidden_states(unwrapped) as captured:
        model(input_ids=input_ids, use_cache=False)
    teacher_hidden = None
    if teacher is not None:
        with torch.no_grad(), final_hidden_states(teacher) as taught:
            teacher(input_ids=input_ids, use_cache=False)
        if len(taught) != 1 or taught[0] is None:
            return None
        teacher_hidden = taught[0]
    if len(captured) != 1 or captured[0] is None:
        return None
    hidden = captured[0]
    head = unwrapped.get_output_embeddings()
    teacher_head = teacher.get_output_embeddings() if teacher is not None else None
    b, t, _ = hidden.shape
    step = max(1, LOSS_BLOCK_ELEMENTS // (b * vocab))
    targets = torch.cat([labels[:, 1:], labels.new_full((b, 1), IGNORE)], dim=1)  # position i predicts i + 1
    nll_sum = kl_sum = None
    for p in range(0, t, step):
        taught = teacher_hidden[:, p:p + step] if teacher_hidden is not None else None
        nll, kl = checkpoint(_block_sums, head, teacher_head, hidden[:, p:p + step], targets[:, p:p + step], taught,
                             use_reentrant=False)
        nll_sum = nll if nll_sum is None else nll_sum + nll
        if kl is not None:
            kl_sum = kl if kl_sum is None else kl_sum + kl
    labelled = (targets != IGNORE).sum().clamp_min(1)
    return nll_sum / labelled, (kl_sum / (b * t) if kl_sum is not None else None)


def _block_sums(head, teacher_head, hidden, targets, teacher_hidden):
    """Summed NLL of a block's targets and summed KL(teacher || model) over its positions, in float32."""
    logits = head(hidden).float()
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    if teacher_head is None:
        return nll, None
    student = F.log_softmax(logits, dim=-1)
    with torch.no_grad():
        teacher = F.log_softmax(teacher_head(teacher_hidden).float(), dim=-1)
    return nll, F.kl_div(student, teacher, log_target=True, reduction="sum")
