"""Quality against a baseline on held-out text, with a stated protocol.

Protocol: the held-out text (by default the built-in reference model's `heldout.txt`, cut from documents the
model never saw) is tokenized once and cut into non-overlapping windows of `seq_len` tokens; every window is scored
from its first token (no context carried across windows); a model with a compressed KV cache is scored through it,
each window fed in chunks of the cache's residual_length as when generating (`logits_as_served`). Perplexity =
exp(mean next-token NLL over all predicted positions); KL = mean over positions of KL(baseline || model) of the
next-token distributions; top-1 agreement = fraction of positions where both models' argmax agree. With a
baseline, the perplexity change and the KL also get 95% intervals over windows (`paired_change`): the windows are
the independent samples, each model's per-window NLL paired with the baseline's on the same text, so the interval
says whether a change is more than the sample's noise."""
from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CompressError
from .head_blocks import final_hidden_states, has_head_and_decoder
from .intervals import paired_figures
from .progress import progress_bar


def text_token_ids(tokenizer, text: str) -> torch.Tensor:
    """The token ids [N] of `text`, as the evaluation reads it (no special tokens)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)


def heldout_windows(tokenizer, text: str | None = None, seq_len: int = 256, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seq_len] of token ids from `text` (default: the built-in held-out text)."""
    if text is None:
        from .calibration import builtin_text

        text = builtin_text("builtin:heldout")
    ids = text_token_ids(tokenizer, text)
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        from .errors import CalibrationError

        raise CalibrationError(f"the evaluation text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def logits_as_served(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits [B, T, V] of `input_ids` [B, T], read through the model's compressed KV cache when it has one
    (gear_kv): a plain forward never reads the cache, so a suite scored that way measured the weights alone. The
    ids go in chunks of the cache's residual_length (as `compress eval`'s cache rows feed them): every token after
    the first chunk attends to the compressed past, as when generating; computed in one forward that gives the same
    logits where it can (kvcache/served.py). On the model's device."""
    settings = getattr(model, "kv_cache_settings", None)
    device = next(model.parameters()).device
    if settings is None:
        return model(input_ids=input_ids.to(device), use_cache=False).logits.float()
    from .kvcache.cache import GEARCache
    from .kvcache.quality import chunked_logits
    from .kvcache.served import served_logits

    ids = input_ids.to(device)
    one_pass = served_logits(model, ids, settings)  # the same logits from one forward, where it applies
    if one_pass is not None:
        return one_pass
    return chunked_logits(model, ids, lambda: GEARCache(model.config, settings), settings.residual_length)


@torch.no_grad()
def hidden_as_served(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor | None:
    """The final hidden states [B, T, d] that `logits_as_served` applies the head to (the caller applies it, in
    blocks); None for a module that is not a model with a decoder and an output head."""
    if not has_head_and_decoder(model):
        return None  # (a plain module around a model: whole logits)
    with final_hidden_states(model) as captured:
        logits_as_served(model, input_ids)
    if len(captured) > 1 and captured[0] is not None and captured[0].shape[1] == input_ids.shape[1]:
        captured = captured[1:]  # (a one-forward try that served.py found did not read the cache, then the chunks)
    if not captured or any(h is None for h in captured):
        return None
    hidden = torch.cat(captured, dim=1)
    return hidden if hidden.shape[:2] == input_ids.shape else None


def exp_or_inf(x: float) -> float:
    """e**x, inf where it overflows a float (a damaged model's mean NLL above ~709 raised OverflowError); NaN stays
    NaN (logits holding NaN are not an infinitely bad model, and callers tell the two apart)."""
    if math.isnan(x):
        return math.nan
    return math.exp(x) if x < 709.78 else math.inf


def budget_base_perplexity(ppl: float, what: str) -> float:
    """`ppl`, the dense perplexity that a relative budget (`ppl * (1 + increase)`) is set from; a CalibrationError
    where it is NaN or inf, under which every candidate would pass (NaN compares false, inf * 1.01 is inf)."""
    if not math.isfinite(ppl):
        from .errors import CalibrationError

        raise CalibrationError(f"{what}: the uncompressed model's perplexity on the calibration text is {ppl}, so no "
                               "perplexity budget can be set from it (a damaged weight, or an overflow in the dtype: "
                               "try --dtype float32)")
    return ppl


class MetricAccumulator:
    """Sums NLL, KL and top-1 agreement over positions, batch by batch, so memory stays at one batch of logits;
    per window too (each row of a batch), for the intervals of `paired_change`."""

    def __init__(self) -> None:
        self.nll = self.kl = 0.0
        self.agree = self.positions = 0
        self.window_nll: list[torch.Tensor] = []  # per window: sum of NLL over its positions
        self.window_kl: list[torch.Tensor] = []
        self.window_positions: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor, targets: torch.Tensor, base_logits: torch.Tensor | None = None) -> None:
        """logits [..., V] predicting `targets` [...]; base_logits of the same shape for KL and agreement. With
        targets [B, ...], each of the B rows is one window; 1-D targets are one window."""
        rows = targets.shape[0] if targets.dim() >= 2 else 1
        vocab = logits.shape[-1]
        logits, targets = logits.reshape(rows, -1, vocab), targets.reshape(rows, -1)
        base_logits = base_logits.reshape(rows, -1, vocab) if base_logits is not None else None
        self.commit(*self.sums(logits, targets, base_logits), targets.shape[1], base_logits is not None)

    def commit(self, nll: torch.Tensor, kl: torch.Tensor, agree: int, positions: int, with_base: bool) -> None:
        """Count windows whose sums `sums` gave (over all their `positions`, perhaps block by block)."""
        self.nll += nll.sum().item()
        self.positions += nll.numel() * positions
        self.window_nll.append(nll)
        self.window_positions.append(torch.full((nll.numel(),), positions, dtype=torch.float64))
        if with_base:
            self.kl += kl.sum().item()
            self.window_kl.append(kl)
            self.agree += agree

    @staticmethod
    def sums(logits: torch.Tensor, targets: torch.Tensor, base_logits: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Per row of logits [R, P, V]: summed NLL of targets [R, P] and KL(base || logits) (float64 [R]), and
        the positions where both argmaxes agree."""
        rows, vocab = logits.shape[0], logits.shape[-1]
        nll = torch.zeros(rows, dtype=torch.float64)
        kl = torch.zeros(rows, dtype=torch.float64)
        # float64 a slice of positions at a time: over a whole batch the copies were ~45 bytes per position and
        # vocabulary entry (12 GB for 8 windows of 255 tokens at a 128k vocabulary)
        step = max(1, (1 << 22) // vocab)
        for r in range(rows):
            for p in range(0, targets.shape[1], step):
                logp = F.log_softmax(logits[r, p:p + step].double(), dim=-1)
                nll[r] -= logp.gather(-1, targets[r, p:p + step].unsqueeze(-1)).sum().cpu()
                if base_logits is not None:
                    base_logp = F.log_softmax(base_logits[r, p:p + step].double(), dim=-1)
                    kl[r] += (base_logp.exp() * (base_logp - logp)).sum().cpu()
        agree = (logits.argmax(-1) == base_logits.argmax(-1)).sum().item() if base_logits is not None else 0
        return nll, kl, agree

    def result(self, with_baseline: bool) -> dict[str, float]:
        out = {"perplexity": exp_or_inf(self.nll / self.positions), "tokens": self.positions}
        if with_baseline:
            out["kl"] = self.kl / self.positions
            out["top1_agreement"] = self.agree / self.positions
        return out


def paired_change(model: MetricAccumulator, baseline: MetricAccumulator) -> dict[str, Any]:
    """The perplexity change of `model` against `baseline` scored on the same windows, and model's KL to it, each
    with a 95% interval over windows (compress/intervals.py): ppl_delta_pct (+ _ci95 [lo, hi]), ppl_ratio (+ _ci95),
    kl_ci95, windows; the bounds are None with a single window."""
    pos = torch.cat(model.window_positions)
    if not torch.equal(pos, torch.cat(baseline.window_positions)):
        raise ValueError("paired_change needs both accumulators over the same windows")
    out: dict[str, Any] = paired_figures(torch.cat(model.window_nll), torch.cat(baseline.window_nll), pos,
                                         torch.cat(model.window_kl) if model.window_kl else None)
    out.pop("kl", None)  # the accumulator's own figure stands
    out["windows"] = int(pos.numel())
    return out


@torch.no_grad()
def score_windows(model: nn.Module, windows: torch.Tensor, baseline: nn.Module | None = None, *, batch_size: int = 8,
                  progress: bool = True) -> tuple[MetricAccumulator, MetricAccumulator]:
    """`model`'s metrics on `windows` (against `baseline` where given) and the baseline's own, window by window.
    Both are scored as served (`logits_as_served`: through a compressed KV cache where one has it; a plain forward
    skipped the cache, and KIVI-2 read as lossless; a baseline with a cache, e.g. `apply`'s compressed input, reads
    its own, so the figures are what the model changed)."""
    acc, base_acc = MetricAccumulator(), MetricAccumulator()
    batch_size = max(1, min(batch_size, LONG_WINDOW_TOKENS // windows.shape[1]))  # (the bar moves per long window)
    batches = range(0, windows.shape[0], batch_size)
    # the bar counts batches: say so, or "3/25" reads as windows
    description = f"evaluating {windows.shape[0]} windows, batches of {batch_size}"
    for i in progress_bar(batches, description=description, enabled=progress):
        x = windows[i : i + batch_size]
        hidden = hidden_as_served(model, x)
        base_hidden = hidden_as_served(baseline, x) if baseline is not None and hidden is not None else None
        if hidden is None or (baseline is not None and base_hidden is None):  # (whole logits, as before)
            logits = logits_as_served(model, x).cpu()[:, :-1]
            base = logits_as_served(baseline, x).cpu()[:, :-1] if baseline is not None else None
            acc.add(logits, x[:, 1:], base)
            if base is not None:
                base_acc.add(base, x[:, 1:])
            continue
        _score_in_blocks(acc, base_acc, model, hidden[:, :-1], x[:, 1:], baseline,
                         base_hidden[:, :-1] if base_hidden is not None else None)
    return acc, base_acc


LONG_WINDOW_TOKENS = 8192  # tokens per evaluated batch at most, where windows are long (one window at least)
HEAD_BLOCK_ELEMENTS = 1 << 26  # logits per block of positions (x4 bytes, per model): 256 MB


def _score_in_blocks(acc: MetricAccumulator, base_acc: MetricAccumulator, model: nn.Module, hidden: torch.Tensor,
                     targets: torch.Tensor, baseline: nn.Module | None, base_hidden: torch.Tensor | None) -> None:
    """Score final hidden states [B, P, d] (and the baseline's) against targets [B, P], the heads applied a block
    of positions at a time: memory of one block of logits per model, whatever the window's length."""
    from .models import text_config

    head = model.get_output_embeddings()
    base_head = baseline.get_output_embeddings() if baseline is not None else None
    rows, positions = targets.shape
    step = max(1, HEAD_BLOCK_ELEMENTS // (rows * text_config(model.config).vocab_size))
    totals = [torch.zeros(rows, dtype=torch.float64), torch.zeros(rows, dtype=torch.float64), 0]
    base_totals = [torch.zeros(rows, dtype=torch.float64), torch.zeros(rows, dtype=torch.float64), 0]

    def add(total: list, part: tuple) -> None:
        for i, value in enumerate(part):
            total[i] += value

    for p in range(0, positions, step):
        block = targets[:, p:p + step]
        logits = head(hidden[:, p:p + step]).float().cpu()
        base = base_head(base_hidden[:, p:p + step]).float().cpu() if base_head is not None else None
        add(totals, acc.sums(logits, block, base))
        if base is not None:
            add(base_totals, base_acc.sums(base, block))
    acc.commit(*totals, positions, base_head is not None)
    if base_head is not None:
        base_acc.commit(*base_totals, positions, False)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    windows: torch.Tensor,
    baseline: nn.Module | None = None,
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of `model` on `windows`; with `baseline`, also KL(baseline || model), top-1 agreement, the
    baseline's own perplexity (from the same forward passes) and the change's 95% intervals (`paired_change`)."""
    acc, base_acc = score_windows(model, windows, baseline, batch_size=batch_size, progress=progress)
    out = acc.result(baseline is not None)
    if baseline is not None:
        out["baseline_perplexity"] = base_acc.result(False)["perplexity"]
        out.update(paired_change(acc, base_acc))
    return out


@torch.no_grad()
def paired_generation_speed(model: nn.Module, baseline: nn.Module, tokenizer, rounds: int = 4,
                            progress: bool = False) -> tuple[float, float, list[float]]:
    """Greedy decoding tokens/s of `model` and of `baseline`, timed in turn so that both see the same machine load,
    the order swapped every round (A B, B A, ...: the one timed second ran 1-5% differently): (the medians over
    `rounds`, each round's ratio model / baseline). The ratios are the speed figure to read, their spread its noise;
    either speed alone moves with the machine. `progress`: a bar over the 2 x rounds timed runs."""
    import statistics

    from .progress import progress_bar

    prompt = speed_prompt(model, tokenizer)
    times: dict[int, list[float]] = {0: [], 1: []}
    pairs = ((0, model), (1, baseline))
    runs = [run for r in range(rounds) for run in (pairs if r % 2 == 0 else pairs[::-1])]
    for which, m in progress_bar(runs, description="timing generation (the model and the baseline in turn)",
                                 enabled=progress):
        times[which].append(generation_speed(m, tokenizer, prompt))
    ratios = [a / b for a, b in zip(times[0], times[1])]
    return statistics.median(times[0]), statistics.median(times[1]), ratios


SPEED_NEW_TOKENS = 64


def speed_prompt(model: nn.Module, tokenizer, new_tokens: int = SPEED_NEW_TOKENS) -> torch.Tensor:
    """The timed decoding's prompt, ids [1, P] of the built-in held-out text: 128 tokens, or 4 chunks of a compressed
    KV cache's full-precision window (`residual_length`), so that every timed step reads the compressed past (a
    2-token prompt read it on 1 step of 64), within the context."""
    from .calibration import builtin_text
    from .models import text_config

    settings = getattr(model, "kv_cache_settings", None)
    length = max(128, 4 * settings.residual_length) if settings is not None else 128
    context = getattr(text_config(model.config), "max_position_embeddings", None)
    if context:
        length = max(1, min(length, context - new_tokens))
    ids = tokenizer(builtin_text("builtin:heldout")[:16 * length], add_special_tokens=False, verbose=False)
    return torch.tensor(ids["input_ids"][:length], dtype=torch.long)[None]


def generation_speed(model: nn.Module, tokenizer, prompt: torch.Tensor | None = None,
                     new_tokens: int = SPEED_NEW_TOKENS, **generate_kwargs) -> float:
    """Greedy decoding tokens per second after `prompt` (default `speed_prompt`), from the first new token to the
    last within one generate call: the prompt's forward is not counted (wall clock; compare as ratios within one run
    only)."""
    device = next(model.parameters()).device
    ids = (speed_prompt(model, tokenizer, new_tokens) if prompt is None else prompt).to(device)
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, **generate_kwargs)  # warm-up
    clock = _TokenClock()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock,
                   **generate_kwargs)
    return clock.tokens_per_second()


class _TokenClock:
    """A generate streamer that only notes when each put arrives: the prompt's, then one per new token (greedy
    decoding puts each token after its step; generate waits for the step's result anyway, so no sync is added)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def tokens_per_second(self) -> float:
        if len(self.times) < 3:  # (a generation stopped before two new tokens)
            raise CompressError("timing generation: the model produced fewer than two tokens")
        return (len(self.times) - 2) / (self.times[-1] - self.times[1])
