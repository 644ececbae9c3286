"""In-context copy and pass-key retrieval probes, scored on the continuation only, with fixed seeds.

Copy: a random token string (ids in [100, vocab)) followed by itself; greedy next-token accuracy over the second
copy from its second token on (the first token of the repeat cannot be known). This is the KV-cache benchmark's
copy probe, run as one forward pass (a model with a compressed KV cache: in chunks through it, `logits_as_served`).

Pass key: a sentence stating a 5-digit key, buried at a seeded depth in held-out text, then a question; the model's
greedy continuation must reproduce the key's digits exactly. `builtin:small` saw this wording (with other keys and
training text as filler) during training, so the probe measures retrieval over distance, not following an
instruction it never saw."""
from __future__ import annotations

import random

import torch
from torch import nn

from ..evaluate import logits_as_served


def passkey_parts(key: int) -> tuple[str, str, str]:
    """(needle, question, answer) for one pass key."""
    needle = f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
    question = "\nWhat is the pass key? The pass key is"
    return needle, question, f" {key}."


@torch.no_grad()
def copy_probe(model: nn.Module, span_len: int = 128, num: int = 16, vocab_size: int | None = None,
               seed: int = 0) -> float:
    vocab_size = vocab_size or model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    span = torch.randint(100, vocab_size, (num, span_len), generator=gen)
    ids = torch.cat([span, span], dim=1).to(next(model.parameters()).device)
    pred = logits_as_served(model, ids)[:, span_len:-1].argmax(-1)  # (through a compressed KV cache: as served)
    return (pred == ids[:, span_len + 1:]).float().mean().item()


def passkey_prompts(tokenizer, filler_text: str, context_len: int, num: int, seed: int = 0):
    """[(prompt ids, answer ids)]: each prompt ~context_len tokens, the needle at a seeded depth in the filler."""
    rng = random.Random(seed)
    filler = tokenizer(filler_text, add_special_tokens=False, verbose=False)["input_ids"]
    out = []
    for _ in range(num):
        key = rng.randrange(10_000, 100_000)
        needle, question, answer = (tokenizer(p, add_special_tokens=False, verbose=False)["input_ids"]
                                    for p in passkey_parts(key))
        budget = context_len - len(needle) - len(question)
        start = rng.randrange(0, max(1, len(filler) - budget))
        text = filler[start:start + budget]
        depth = rng.randint(0, len(text))
        out.append((text[:depth] + needle + text[depth:] + question, answer))
    return out


@torch.no_grad()
def passkey_probe(model: nn.Module, tokenizer, filler_text: str, context_len: int = 1024, num: int = 16,
                  seed: int = 0, cache_factory=None) -> float:
    """Share of prompts whose greedy continuation starts with the key's digits (compared as text, so the
    tokenization of the key next to the closing period does not matter)."""
    device = next(model.parameters()).device
    hits = 0
    for prompt, answer in passkey_prompts(tokenizer, filler_text, context_len, num, seed):
        key = tokenizer.decode(answer).strip().rstrip(".")
        ids = torch.tensor([prompt], device=device)
        kwargs = {"cache": cache_factory()} if cache_factory else {}
        out = model.generate(ids, max_new_tokens=len(answer), do_sample=False, pad_token_id=0, **kwargs)
        hits += int(tokenizer.decode(out[0, ids.shape[1]:]).strip().startswith(key))
    return hits / num
