"""Next-token agreement with the uncompressed model, on the continuation only.

Each fixture row is a held-out prefix and its true continuation. Prefixes (cut from the left) and continuations
(cut from the right) are trimmed to the fixture's shortest row in tokens (all its rows, however many are scored:
a row scores the same tokens whatever the limit), so every batch is one rectangular tensor, with no
padding to perturb either model. Scored positions are the continuation's tokens only:
- KL(baseline || model) and top-1 agreement of the next-token distributions (teacher-forced on the true text);
- greedy match: both models generate `greedy_tokens` tokens greedily from the prefix (each with its own default
  cache, so a compressed KV cache counts); the score is the mean fraction of those tokens that agree before the
  first disagreement."""
from __future__ import annotations

import torch

from ..errors import CompressError
from ..evaluate import MetricAccumulator, logits_as_served


def rectangular(tokenizer, rows: list[dict], limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefixes [n, P], continuations [n, C]) as token ids of the first `limit` rows (all: None), trimmed to the
    shortest of all `rows`."""
    enc = lambda s: tokenizer(s, add_special_tokens=False, verbose=False)["input_ids"]  # noqa: E731
    prefixes = [enc(r["context"]) for r in rows]
    continuations = [enc(r["continuation"]) for r in rows]
    p, c = min(map(len, prefixes), default=0), min(map(len, continuations), default=0)
    if not p or not c:  # (suite.check_suite_folder refuses empty texts; a tokenizer may still cut one to nothing)
        raise CompressError("the agreement rows need a context and a continuation of at least one token each: "
                            f"{'no rows' if not rows else 'one of them is no tokens in this tokenizer'}")
    return (torch.tensor([x[len(x) - p:] for x in prefixes[:limit]]),
            torch.tensor([x[:c] for x in continuations[:limit]]))


@torch.no_grad()
def greedy(model, prefixes: torch.Tensor, new_tokens: int) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model.generate(prefixes.to(device), attention_mask=torch.ones_like(prefixes, device=device),
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=model.config.pad_token_id or 0)
    return out[:, prefixes.shape[1]:].cpu()


def common_prefix_fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of (tokens equal before the first difference) / length."""
    same_so_far = (a == b).long().cumprod(dim=1)
    return same_so_far.sum(dim=1).float().div(a.shape[1]).mean().item()


@torch.no_grad()
def agreement_scores(model, baseline, tokenizer, rows: list[dict], greedy_tokens: int = 16,
                     batch_size: int = 8, limit: int | None = None) -> dict[str, float]:
    """Scores over the first `limit` rows (all: None), each trimmed as among all `rows`."""
    prefixes, continuations = rectangular(tokenizer, rows, limit)
    ids = torch.cat([prefixes, continuations], dim=1)
    p = prefixes.shape[1]
    acc = MetricAccumulator()
    for i in range(0, ids.shape[0], batch_size):
        x = ids[i:i + batch_size]
        # position t predicts token t+1: the continuation's tokens are predicted from positions p-1 .. end-1
        # (a model with a compressed KV cache is scored reading it, as served)
        ours, base = (logits_as_served(m, x).cpu()[:, p - 1:-1] for m in (model, baseline))
        acc.add(ours, x[:, p:], base)
    result = acc.result(with_baseline=True)
    match = common_prefix_fraction(greedy(model, prefixes, greedy_tokens), greedy(baseline, prefixes, greedy_tokens))
    return {"agreement_kl": result["kl"], "agreement_top1": result["top1_agreement"], "agreement_greedy": match}
