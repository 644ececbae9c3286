"""recover's loss with the head a block of positions at a time (chunked_loss.py): the model's own next-token loss
and `kl_to_teacher` from whole logits, values and gradients (a float64 model); the head never sees a whole window."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import compress
from compress.recover import chunked_loss
from compress.recover.training import kl_to_teacher


@pytest.mark.parametrize("with_teacher", [False, True])
def test_blocked_loss_and_gradients_equal_the_whole_logits(with_teacher, monkeypatch):
    teacher = compress.load("builtin:tiny", dtype="float32").double()
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # a student that differs from its teacher (KL > 0)
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    student = get_peft_model(student, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"],
                                                 init_lora_weights=False))
    ids = torch.randint(100, 8000, (2, 48), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :5] = -100  # positions without a loss are left out of the mean, as the model's own loss does

    out = student(input_ids=ids, labels=labels, use_cache=False)
    want = out.loss + (kl_to_teacher(out.logits, teacher(input_ids=ids).logits.detach()) if with_teacher else 0)
    trained = [p for p in student.parameters() if p.requires_grad]
    want_grads = torch.autograd.grad(want, trained)

    seen = []
    head = student.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, args, out: seen.append(out.shape[1]))
    monkeypatch.setattr(chunked_loss, "LOSS_BLOCK_ELEMENTS", 2 * 20 * 8192)  # blocks of 20 positions
    assert chunked_loss.blocked_losses(student, student, ids, labels) is None  # small: whole logits
    monkeypatch.setattr(chunked_loss, "WHOLE_LOGITS_ELEMENTS", 0)
    nll, kl = chunked_loss.blocked_losses(student, student, ids, labels, teacher if with_teacher else None)
    hook.remove()
    got = nll + (kl if with_teacher else 0)
    assert (kl is not None) == with_teacher
    # (both losses take the logits to float32, as transformers' does: float32 round-off in the sums' order)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for g, w in zip(torch.autograd.grad(got, trained), want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    assert seen == [1, 20, 20, 8]  # the forward's head: the last position only; then the blocks
