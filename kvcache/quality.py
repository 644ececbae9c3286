"""KV-cache quality protocol: how much a compressed cache changes the model's predictions.

Chunked scoring: each window of held-out text is fed in chunks of `chunk_len` tokens (default: the cache's
residual_length), so before chunk i is scored, chunks < i have been compressed; tokens of the first chunk see no
compressed past and are not scored. The same chunked pass with an uncompressed cache (transformers' DynamicCache,
in the model's dtype) is the reference. Reported: perplexity of both, its relative change, KL(reference || ours)
per token, and top-1 agreement; the perplexity change and the KL with 95% intervals over windows
(`compress.evaluate.paired_change`: each window's NLL paired with the reference's on the same text).

Copy probe: a random token string repeated twice; accuracy of greedy next-token predictions over the second copy
(from its second token on), while the first copy sits in the compressed past. It is where KV errors show first."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn
from transformers import DynamicCache

from ..errors import CompressError
from ..evaluate import MetricAccumulator, paired_change
from ..intervals import paired_figures
from ..models import context_length
from ..progress import progress_bar

CacheFactory = Callable[[], object]


@dataclass
class QualityResult:
    ppl: float
    ppl_reference: float
    ppl_delta_pct: float
    kl: float
    top1_agreement: float
    tokens_scored: int
    ppl_delta_pct_ci95: list[float] | None  # [lo, hi] over windows; None with a single window
    kl_ci95: list[float] | None
    windows: int
    # per window: summed NLL, summed KL and scored positions (to pair two caches on the same windows: compare_caches)
    window_nll: list[float]
    window_kl: list[float]
    window_positions: list[float]

    def to_dict(self, windows: bool = True) -> dict:
        """The fields; `windows=False` leaves out the per-window lists."""
        return {k: v for k, v in asdict(self).items() if windows or not k.startswith("window_")}


def heldout_windows(tokenizer, text: str, num_windows: int, window_len: int) -> torch.Tensor:
    """[num_windows, window_len] token ids, evenly spaced over the tokenized text (deterministic)."""
    return _windows(_token_ids(tokenizer, text), num_windows, window_len)


def _token_ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]  # windows are cut from these


def _windows(ids: torch.Tensor, num_windows: int, window_len: int) -> torch.Tensor:
    if ids.numel() < window_len:
        raise CompressError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {window_len}: "
                            f"give a text of at least {window_len} tokens")
    starts = torch.linspace(0, ids.numel() - window_len, num_windows).long()
    return torch.stack([ids[s:s + window_len] for s in starts.tolist()])


@torch.no_grad()
def chunked_logits(model: nn.Module, ids: torch.Tensor, make_cache: CacheFactory, chunk_len: int) -> torch.Tensor:
    """Logits [B, T, V] (float32) from feeding ids [B, T] in chunks of `chunk_len` through one cache."""
    cache = make_cache()
    out = []
    for start in range(0, ids.shape[1], chunk_len):
        logits = model(ids[:, start:start + chunk_len], cache=cache, use_cache=True).logits
        out.append(logits.float())
    return torch.cat(out, dim=1)


def compare_logits(ref: torch.Tensor, ours: torch.Tensor, targets: torch.Tensor) -> QualityResult:
    """ref/ours [W, P, V] logits at the scored positions of W windows; targets [W, P] the true next tokens."""
    if ours.dim() != 3 or targets.dim() != 2:  # flat [N, V] would count as one window (no interval)
        raise ValueError("compare_logits takes [windows, positions, vocabulary] logits and [windows, positions] "
                         "targets")
    ours_acc, ref_acc = MetricAccumulator(), MetricAccumulator()
    ours_acc.add(ours, targets, ref)
    ref_acc.add(ref, targets)
    return _quality_result(ours_acc, ref_acc, int(targets.numel()))


def _quality_result(ours_acc: MetricAccumulator, ref_acc: MetricAccumulator, positions: int) -> QualityResult:
    got, want = ours_acc.result(with_baseline=True), ref_acc.result(with_baseline=False)
    change = paired_change(ours_acc, ref_acc)
    return QualityResult(got["perplexity"], want["perplexity"], change["ppl_delta_pct"], max(got["kl"], 0.0),
                         got["top1_agreement"], positions, change["ppl_delta_pct_ci95"],
                         change["kl_ci95"], change["windows"], torch.cat(ours_acc.window_nll).tolist(),
                         torch.cat(ours_acc.window_kl).tolist(), torch.cat(ours_acc.window_positions).tolist())


def compare_caches(a: QualityResult, b: QualityResult) -> dict:
    """Two caches scored on the same windows, paired window by window: KL(a) / KL(b) and the perplexity of a over
    that of b, each with its 95% interval (compress/intervals.py; a difference smaller than the windows' spread
    shows as an interval around 1)."""
    if a.window_positions != b.window_positions:
        raise CompressError("compare_caches needs two results over the same windows")
    if not sum(b.window_kl) > 0:
        raise CompressError("compare_caches: the second cache has no KL to the reference (the reference itself?), "
                            "so a ratio to it is undefined")
    f64 = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    out = paired_figures(f64(a.window_nll), f64(b.window_nll), f64(a.window_positions), f64(a.window_kl),
                         f64(b.window_kl))
    return {"kl_ratio": out["kl"], "kl_ratio_ci95": out["kl_ci95"], "ppl_ratio": out["ppl_ratio"],
            "ppl_ratio_ci95": out["ppl_ratio_ci95"]}


@torch.no_grad()
def kv_quality(model: nn.Module, windows: torch.Tensor, make_cache: CacheFactory, chunk_len: int,
               reference: torch.Tensor | None = None, progress: bool = False,
               keep_reference: bool = True, settings=None) -> tuple[QualityResult, torch.Tensor | None]:
    """Score `windows` [W, T] with the compressed cache against the uncompressed chunked reference.
    Returns the result and the reference logits (pass them back in to reuse them across configurations; None with
    keep_reference=False, which holds one window's logits at a time). With `settings` (the KVCacheSettings that
    `make_cache` builds a GEARCache of), both sides come from one forward where served.py covers the model: the
    same logits as the chunked passes, the uncompressed one a plain forward (a DynamicCache fed in chunks is
    exact attention)."""
    from .served import served_in_one_pass, served_logits

    if settings is not None and settings.residual_length != chunk_len:  # (the one pass feeds residual_length)
        raise ValueError(f"kv_quality: settings.residual_length {settings.residual_length} is not chunk_len "
                         f"{chunk_len}; the one-forward path feeds chunks of residual_length")
    one_pass = settings is not None and served_in_one_pass(model)  # (a plain forward is the exact reference)
    if windows.shape[1] <= chunk_len:
        raise CompressError(f"windows of {windows.shape[1]} tokens leave nothing to score after the first chunk "
                            f"of {chunk_len}: use longer windows")
    passes = "uncompressed and compressed" if reference is None else "compressed"
    rows = progress_bar(range(len(windows)), enabled=progress,
                        description=f"KV cache quality: {len(windows)} windows, {passes}")
    scored = slice(chunk_len, windows.shape[1] - 1)  # positions after the first chunk that have a next token
    targets = windows[:, scored.start + 1:scored.stop + 1]
    ours_acc, ref_acc, refs = MetricAccumulator(), MetricAccumulator(), []
    for i in rows:  # scored window by window: all windows' logits at once were W x T x V floats, twice
        window = windows[i:i + 1]
        if reference is None:
            ref = (model(input_ids=window, use_cache=False).logits.float() if one_pass else
                   chunked_logits(model, window, lambda: DynamicCache(config=model.config), chunk_len))
            if keep_reference:
                refs.append(ref)
        else:
            ref = reference[i:i + 1]
        ours = served_logits(model, window, settings) if one_pass else None
        if ours is None:  # (not covered, or a model whose attention ignored the switch: served_logits says None)
            ours = chunked_logits(model, window, make_cache, chunk_len)
        ours_acc.add(ours[:, scored], targets[i:i + 1], ref[:, scored])
        ref_acc.add(ref[:, scored], targets[i:i + 1])
    if reference is None and keep_reference:
        reference = torch.cat(refs)
    return _quality_result(ours_acc, ref_acc, int(targets.numel())), reference


def copy_sequences(num: int, length: int, vocab_size: int, seed: int = 0, low: int = 100) -> torch.Tensor:
    """[num, 2*length]: random token strings (ids in [low, vocab)) each followed by itself."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randint(low, vocab_size, (num, length), generator=gen)
    return torch.cat([s, s], dim=1)


@torch.no_grad()
def copy_accuracy(model: nn.Module, seqs: torch.Tensor, make_cache: CacheFactory, chunk_len: int) -> float:
    """Greedy accuracy over the second copy (predicting its tokens 1.. from the ones before)."""
    length = seqs.shape[1] // 2
    logits = chunked_logits(model, seqs, make_cache, chunk_len)
    pred = logits[:, length:-1].argmax(-1)        # predictions for tokens length+1 .. 2*length-1
    return (pred == seqs[:, length + 1:]).float().mean().item()


SUMMARY_WINDOW_LEN = 512
SUMMARY_SCORED = 256  # tokens at least scored per window after the full-precision first chunk, where the context allows


SUMMARY_MIN_SCORED = 32  # a text shorter than the windows: one window of all of it, if it leaves this many


def summary_window_len(residual_length: int, context: int | None, text_tokens: int | None = None) -> int:
    """Windows of SUMMARY_WINDOW_LEN tokens, longer where the first chunk (`residual_length`, fed in full precision)
    would leave fewer than SUMMARY_SCORED to score, at most the model's context: a 512-token residual window left
    nothing to score in 512-token windows, an error raised after the checkpoint was written. A text of fewer tokens
    (`text_tokens`) is one window of all of it, where that leaves SUMMARY_MIN_SCORED to score after the first chunk
    (a CompressError naming the check otherwise: `compress eval --text` of a few hundred tokens was refused for
    "fewer than one window of 512", a length the user never asked for)."""
    length = max(SUMMARY_WINDOW_LEN, residual_length + SUMMARY_SCORED)
    length = min(length, context) if context else length
    if text_tokens is not None and text_tokens < length:
        need = min(residual_length + SUMMARY_MIN_SCORED + 1, length)  # (a short context: its own windows' length)
        if text_tokens < need:
            raise CompressError(
                f"the KV-cache check scores the tokens after the first {residual_length} (the cache's full-precision "
                f"window), and the evaluation text has {text_tokens}: give a text of at least {need} tokens")
        length = text_tokens
    return length



def residual_beyond_context(residual_length: int, config) -> str | None:
    """What is wrong with a full-precision window as long as the model's context (None: nothing)."""
    context = context_length(config)
    # + 2: a token compressed and one after it to score (cache_quality_summary's windows end at the context)
    if context is not None and residual_length + 2 > context:
        return (f"gear_kv: residual_length {residual_length} leaves no room in the model's context ({context} "
                f"tokens): the cache would keep every token in full precision and compress nothing; use a "
                f"residual_length well below {context} (KIVI: 32-128)")
    return None


def check_summary_text(tokenizer, text: str | None, residual_length: int, config) -> None:
    """Before any work: `cache_quality_summary` can score windows of `text` (default: the held-out text) with this
    residual window in this model's context."""
    from ..calibration import builtin_text

    problem = residual_beyond_context(residual_length, config)
    if problem:
        raise CompressError(problem)
    text = text if text is not None else builtin_text("builtin:heldout")
    summary_window_len(residual_length, context_length(config), _token_ids(tokenizer, text).numel())


def cache_quality_summary(model: nn.Module, tokenizer, settings, text: str | None, windows: int | None,
                          window_len: int | None = None, progress: bool = False) -> dict:
    """What `compress eval`/`apply` report for a model with a compressed KV cache (a plain forward does not use it):
    tokens scored chunk by chunk with the compressed past against the same chunked pass with an uncompressed cache,
    on at most 16 windows of `text` (default: the held-out text), without the per-window lists."""
    from ..calibration import builtin_text
    from .cache import GEARCache

    ids = _token_ids(tokenizer, text if text is not None else builtin_text("builtin:heldout"))
    if window_len is None:
        window_len = summary_window_len(settings.residual_length, context_length(model.config), ids.numel())
    # at most the windows the text holds without overlap: 16 windows spread over a text of 520 tokens were 16 near
    # copies of one, and their interval an artefact (the whole text as one window: 1)
    n = max(1, min(windows or 16, 16, ids.numel() // window_len))
    w = _windows(ids, n, window_len)
    result, _ = kv_quality(model, w, lambda: GEARCache(model.config, settings), settings.residual_length,
                           progress=progress, keep_reference=False, settings=settings)
    summary = result.to_dict(windows=False)
    return {**summary, "protocol": f"{n} window{'s' if n != 1 else ''} of {window_len} tokens fed in chunks of "
                                   f"{settings.residual_length}; tokens after the first chunk scored"}
