"""What `compress apply` and `compress eval` share to evaluate a model: its held-out windows, the model it was made
from (the default baseline), the evaluation with the KV cache's own quality block."""
from __future__ import annotations

import math
from pathlib import Path

import click

from .errors import CompressError
from .progress import phase

EVAL_SEQ_LEN = 256


def source_record(folder: Path) -> tuple[str | None, str | None]:
    """(the model a checkpoint at `folder` records it was made from, or None; where it is now: the `builtin:` name or
    the resolved path, None where it is not here; the record is relative to the checkpoint's folder)."""
    from . import models

    source = (models.compression_section(folder) or {}).get("source_model")
    if not source or source.startswith("builtin:"):
        return source, source
    found = models.recorded_source_path(folder, source)
    return source, str(found) if found is not None else None


def _recorded_source(model_src: str) -> str | None:
    """The model a compressed checkpoint was made from, if its `compression` section names one that exists here."""
    from . import models

    source, found = source_record(models.resolve_model_path(model_src))
    if source and not found:  # said, not silently dropped: without a baseline there is no KL / top-1 agreement
        click.echo(f"note: {model_src} was made from {source}, which is not here; no KL or top-1 agreement "
                   "(pass --baseline MODEL)", err=True)
    return found


def _check_baseline_not_itself(model_src: str, baseline: str) -> None:
    """A compressed checkpoint given as its own --baseline is refused (KL 0 and agreement 1 by construction, exit 0
    and a note about "two different models"); the same uncompressed model twice (speed figures) is said."""
    from . import models

    if model_src.startswith("builtin:") or baseline.startswith("builtin:"):
        return
    folder = models.resolve_model_path(model_src).resolve()
    if folder != models.resolve_model_path(baseline).resolve():
        return
    source, found = source_record(folder)
    if source:
        raise CompressError(f"the baseline {baseline} is the model itself: KL and top-1 agreement would be 0 and 1 "
                            "by construction; " + (f"leave out --baseline to compare with the model it was made from "
                                                   f"({found})" if found else f"give the model it was made from "
                                                   f"({source}, not found here) as --baseline"))
    click.echo(f"note: the baseline {baseline} is the model itself: KL 0 and top-1 agreement 1 by construction",
               err=True)


def _baseline_not_source(model_src: str, baseline: str) -> str | None:
    """The model a checkpoint records it was made from, when a --baseline given is another one (KL and agreement
    then compare two unrelated models, which is allowed but must not pass for the compression's cost)."""
    from . import models

    folder = models.resolve_model_path(model_src)
    source = (models.compression_section(folder) or {}).get("source_model")
    if not source:
        return None
    if source.startswith("builtin:") or baseline.startswith("builtin:"):
        return None if source == baseline else source
    found = models.recorded_source_path(folder, source)
    given = models.resolve_model_path(baseline).resolve()
    return None if found is None or found == given else source


def _read_text(path: str) -> str:
    import stat

    mode = Path(path).stat().st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):  # /dev/zero was read until memory ran out
        raise CompressError(f"{path} is not a regular file (a device?); give a text file")
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise CompressError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save it as UTF-8") from None


def _eval_windows(tokenizer, text, seq_len: int, max_windows, config):
    """The held-out windows, checked against the model's context before any work."""
    from .evaluate import heldout_windows
    from .models import check_token_ids

    _check_context(seq_len, config, "model's")
    windows = heldout_windows(tokenizer, text=text, seq_len=seq_len, max_windows=max_windows)
    check_token_ids(windows, config, "held-out text")
    return windows


def _unscored_tail(tokenizer, text: str, windows) -> int:
    """How many tokens of `text` lie after the last of its `windows` [n, seq_len] when it holds no further whole
    window (0 where --max-windows stopped it short: that cut is the user's)."""
    from .evaluate import text_token_ids

    n, seq_len = windows.shape
    left = text_token_ids(tokenizer, text).numel() - n * seq_len
    return left if left < seq_len else 0


def _check_context(seq_len: int, config, whose: str) -> None:
    """Windows of `seq_len` tokens must fit the context of the model (`whose`: "model's", "baseline's") scoring them."""
    from .models import context_length

    context = context_length(config)
    if context is not None and seq_len > context:
        raise CompressError(f"--seq-len {seq_len} is longer than the {whose} context ({context} tokens); "
                            f"use at most {context}")


def _check_baseline(baseline: str) -> None:
    """A --baseline that is not there, said as the baseline's problem before any work ("model X does not exist"
    named no option)."""
    from .models import resolve_model_path

    try:
        resolve_model_path(baseline)
    except CompressError as exc:
        raise CompressError(f"--baseline: {exc}") from None


def _check_baseline_tokenizer(baseline: str, tokenizer) -> None:
    """The baseline is scored on the ids the model's `tokenizer` cuts: its own tokenizer must read them as the same
    tokens (a tokenizer of the same size with its ids in another order gave a KL of 6 and exit 0), checked before
    any model loads. A baseline saved without tokenizer files is taken to read the model's ids: there is nothing
    to compare, its vocabulary size is still checked against the model's, and a weights-only copy of the model a
    checkpoint was made from is the usual such baseline (refusing it would leave no way to evaluate against it)."""
    from .models import saved_tokenizer_difference

    difference = saved_tokenizer_difference(tokenizer, baseline)
    if difference:
        raise CompressError(f"the baseline {baseline} has another tokenizer than the model: {difference}; KL and "
                            "top-1 agreement need the same token ids: pass the model it was made from")


def _residual_length(model, passes) -> int | None:
    """The full-precision window of the compressed KV cache the model has, or one of `passes` installs (None: none)."""
    settings = getattr(model, "kv_cache_settings", None)
    if settings is not None:
        return settings.residual_length
    return next((p.config.residual_length for p in passes if p.name == "gear_kv"), None)


def _check_kv_text(tokenizer, text: str | None, residual_length: int | None, config) -> None:
    """A model with a compressed KV cache (`residual_length`: its full-precision window; None: no such cache) is also
    scored with it, on windows longer than that window: checked before any work (it failed after the checkpoint
    was written)."""
    if residual_length is not None:
        from .kvcache.quality import check_summary_text

        check_summary_text(tokenizer, text, residual_length, config)


def _calibration_overlap(model, windows) -> float | None:
    """The share of `windows` that the model's calibration or training text held (from the sketch its checkpoint
    keeps), when it is more than the odd shared phrase; None otherwise, or with no sketch (older checkpoints)."""
    from .calibration import sketch_overlap

    found = sketch_overlap((getattr(model.config, "compression", None) or {}).get("calibration_sketch"), windows)
    if found is None:
        return None
    share, picked = found
    return share if share >= 0.02 and round(share * picked) >= 2 else None


# what the evaluation holds beyond the two models' weights: one window's activations and logits, CUDA's context
EVAL_GPU_MARGIN = 1.2, 1 << 30


def eval_device(device: str, max_memory, folders: list[Path], dtype: str) -> tuple[str, str | None]:
    """(where `compress apply` evaluates, a note or None): the GPU its passes ran on when the checkpoint and the
    original (`folders`) fit its free memory together at the compute `dtype` (an evaluation of a GPU-sized model
    on the CPU takes hours); else the CPU, said. --max-memory evaluates on the CPU (layers read from disk)."""
    if device != "cuda" or max_memory:
        return "cpu", None
    from .checkpoint import folder_bytes
    from .models import compute_dtype, read_config, storage_dtype
    from .sequential import free_bytes

    need = 0
    for folder in folders:
        stored = storage_dtype(read_config(folder), folder)
        widening = compute_dtype(dtype, stored, "cuda").itemsize / stored.itemsize  # (as load will compute there)
        need += folder_bytes(folder) * max(1.0, widening)  # (integer codes do not widen: an excess)
    scale, extra = EVAL_GPU_MARGIN
    need = int(need * scale) + extra
    free = free_bytes("cuda")  # (with what torch's allocator holds cached from the passes: the driver counts it used)
    if free is not None and need > free:
        return "cpu", (f"the evaluation runs on the CPU: the checkpoint and the original need about "
                       f"{need / 2**30:.1f} GiB on the GPU, which has {free / 2**30:.1f} GiB free (slow for a large "
                       "model: --eval-windows N, or --no-eval and `compress eval` on a larger GPU)")
    return "cuda", None


def _evaluate(model, baseline_src, tokenizer, windows, progress, seq_len: int = EVAL_SEQ_LEN, text: str | None = None,
              allow_pickle: bool = False, dtype: str = "auto", prepared=None, max_memory=None, baseline_model=None,
              device: str = "cpu"):
    """Evaluate a loaded `model` against the model at `baseline_src` (if any; `baseline_model`: it, loaded already,
    else loaded here on `device`) on held-out windows (`prepared`, or cut here from `text`)."""
    from . import models
    from .evaluate import evaluate

    w = prepared if prepared is not None else _eval_windows(tokenizer, text, seq_len, windows, model.config)
    baseline = baseline_model
    if baseline is None and baseline_src:
        with phase(f"loading the baseline {baseline_src}", enabled=progress and not max_memory):
            baseline = models.load(baseline_src, allow_pickle=allow_pickle, dtype=dtype, max_memory=max_memory,
                                   device=device)
    vocab = [getattr(models.text_config(m.config), "vocab_size", None) for m in (model, baseline) if m is not None]
    if len(set(vocab)) > 1:
        raise CompressError(f"the baseline {baseline_src} has a vocabulary of {vocab[1]} tokens, the model {vocab[0]}: "
                            "KL and top-1 agreement need the same vocabulary; pass the model it was made from")
    if baseline is not None:  # it scores the same windows, which must fit its context too
        _check_context(w.shape[1], baseline.config, "baseline's")
    out = evaluate(model, w, baseline, progress=progress)
    if not all(math.isfinite(out[k]) for k in ("perplexity", "kl") if k in out):  # (--json: null; NaN is not JSON)
        whose = "model's" if not math.isfinite(out["perplexity"]) else "model's or the baseline's"
        out["warning"] = (f"the {whose} logits hold NaN or inf on this text, or its perplexity overflows: the "
                          "perplexity, KL or agreement are not numbers (a damaged weight, or an overflow in the "
                          "dtype: try --dtype float32)")
        click.echo(f"warning: {out['warning']}", err=True)
        if "kl" in out and not math.isfinite(out["kl"]):  # non-finite logits: their argmax agreement means nothing
            out["top1_agreement"] = None
    n = w.shape[0]
    out["protocol"] = (f"{n} non-overlapping window{'s' if n != 1 else ''} of {seq_len} tokens of "
                       + ("the given text" if text is not None else "held-out text"))
    tail = _unscored_tail(tokenizer, text, w) if text is not None else 0
    if tail:  # (a text of 511 tokens read as 1 window of 256: its other half was dropped without a word)
        out["protocol"] += f" (its last {tail} tokens, less than a window, not scored)"
    settings = getattr(model, "kv_cache_settings", None)
    base_cached = getattr(baseline, "kv_cache_settings", None) is not None
    if settings is not None:  # (score_windows reads each model through its cache)
        out["protocol"] += (f"; the model read through its compressed KV cache as it generates (each window fed in "
                            f"chunks of {settings.residual_length} tokens), the baseline "
                            + ("through its own" if base_cached else "by a plain forward"))
    elif base_cached:
        out["protocol"] += "; the baseline read through its compressed KV cache as it generates"
    shared = _calibration_overlap(model, w)
    if shared is not None:
        out["calibration_overlap"] = round(shared, 3)
        out["protocol"] += f", about {shared:.0%} of it text the model was calibrated or trained on"
        click.echo(f"note: about {shared:.0%} of the scored text is text the model was calibrated or trained on (its "
                   "checkpoint's sketch of that text): these numbers flatter it; score other text (--text), or "
                   "calibrate on other text", err=True)
    if settings is not None:
        from .kvcache.quality import cache_quality_summary

        out["kv_cache"] = cache_quality_summary(model, tokenizer, settings, text, windows, progress=progress)
    return out
