"""`compress eval`, `generate`, `inspect` and `passes`: the commands that read a model or the registry and write
nothing."""
from __future__ import annotations

import logging

import click

from . import json_out
from .checkpoint import folder_bytes
from .cli_eval import (EVAL_SEQ_LEN, _baseline_not_source, _check_baseline, _check_baseline_not_itself,
                       _check_baseline_tokenizer, _check_kv_text, _evaluate, _read_text, _recorded_source,
                       _residual_length)
from .cli_format import _console, _finite, _mb, _non_empty, _print_eval, _print_wrapped, _table
from .cli_options import (_DEVICE_GENERATE, _DEVICE_READ, _DTYPE, _MAX_MEMORY_GENERATE, _MAX_MEMORY_READ,
                          _SPARSE_RUNTIME, _check_read_device, _read_offload, _say_offloaded)
from .errors import CompressError, first_line
from .progress import phase


@click.command("eval")
@click.argument("model_src", metavar="MODEL")
@click.option("--baseline", help="Model to compare against (KL divergence, top-1 agreement); default: the model a "
                                "compressed checkpoint was made from, when it can be found.")
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False),
              help="Held-out text file (default: the built-in reference model's held-out text).")
@click.option("--seq-len", default=EVAL_SEQ_LEN, show_default=True, type=click.IntRange(min=2),
              help="Tokens per window (at most the model's context).")
@click.option("--max-windows", default=None, type=click.IntRange(min=1), help="Evaluate at most this many windows.")
@click.option("--speed/--no-speed", default=True, show_default=True, help="Measure greedy generation tokens/s.")
@click.option("--activation-sparsity", is_flag=True,
              help="Also report the FFN neuron sparsity reachable at 1% perplexity increase (CETT-PPL-1%).")
@click.option("--suite", type=click.Choice(["kick"]), default=None,
              help="Also run an evaluation suite on lm-eval (kick: agreement with the baseline, pass key, copy, "
                   "open/closed-book cloze, multiple choice; LLM-KICK style).")
@click.option("--suite-dir", type=click.Path(exists=True, file_okay=False),
              help="A suite folder written by scripts/build_eval_fixtures.py --out DIR (bigger fixtures).")
@click.option("--suite-limit", default=None, type=click.IntRange(min=1),
              help="At most this many examples per suite task.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False),
              help="Write a PNG of each suite score against the baseline (needs matplotlib).")
@_SPARSE_RUNTIME
@click.option("--allow-pickle", is_flag=True, help="Allow loading a model stored as pickled .bin (trusted files only).")
@_DTYPE
@_MAX_MEMORY_READ
@_DEVICE_READ
@click.option("--json", "as_json", is_flag=True)
def eval_cmd(model_src, baseline, text_file, seq_len, max_windows, speed, activation_sparsity, sparse_runtime,
             allow_pickle, dtype, as_json, suite=None, suite_dir=None, suite_limit=None, plot_file=None,
             max_memory=None, device="cpu"):
    """Perplexity, KL and top-1 agreement vs a baseline on held-out text; parameters, bytes, tokens/s."""
    from . import models
    from .evaluate import generation_speed, paired_generation_speed
    from .offload import resident_bytes
    from .pass_api import stored_parameters

    if suite or suite_dir or plot_file or suite_limit is not None:
        from .eval.report import check_suite_options

        check_suite_options(suite, suite_dir, plot_file, suite_limit)
    _check_read_device(device, max_memory)
    offload = _read_offload(max_memory)
    not_source = None
    if baseline is None:
        baseline = _recorded_source(model_src)
    else:
        _check_baseline(baseline)
        _check_baseline_not_itself(model_src, baseline)
        not_source = _baseline_not_source(model_src, baseline)
        if not_source:
            click.echo(f"note: {model_src} records it was made from {not_source}, not the baseline {baseline}: "
                       "unless that is a copy of it, KL and top-1 agreement measure two different models, not what "
                       "the compression cost", err=True)
    tokenizer = models.load_tokenizer(model_src)
    if tokenizer is not None and baseline:  # (without its own, the model is scored with the baseline's)
        _check_baseline_tokenizer(baseline, tokenizer)
    tokenizer = tokenizer or (models.load_tokenizer(baseline) if baseline else None)
    if tokenizer is None:
        raise CompressError(f"{model_src} has no tokenizer files; save the tokenizer with the model")
    text = _read_text(text_file) if text_file else None
    with phase(f"loading {model_src}", enabled=not max_memory):
        model = models.load(model_src, sparse_runtime=sparse_runtime, allow_pickle=allow_pickle, dtype=dtype,
                            device=device, **offload)
    _say_offloaded(model, max_memory)
    _check_kv_text(tokenizer, text, _residual_length(model, []), model.config)
    if activation_sparsity and getattr(model, "compress_offloaded_layers", None):  # (a traceback after the eval)
        raise CompressError("--activation-sparsity reads every down projection's weight, and --max-memory left "
                            "layers on disk: run it without --max-memory, or with a cap the model fits in")
    if activation_sparsity:  # before the evaluation, not after it
        from .prune.activation_sparsity import check_down_weights

        check_down_weights(model)
    # the baseline is loaded once: the evaluation and the suite compare against it, the speed is timed with it
    with phase(f"loading the baseline {baseline}", enabled=bool(baseline) and not max_memory):
        base = (models.load(baseline, allow_pickle=allow_pickle, dtype=dtype, device=device, **offload)
                if baseline else None)
    if base is not None:
        _say_offloaded(base, max_memory, how="read for each forward of the baseline")
    result = _evaluate(model, baseline, tokenizer, max_windows, progress=True, seq_len=seq_len, text=text,
                       allow_pickle=allow_pickle, dtype=dtype, baseline_model=base)
    result["baseline"] = baseline
    result["device"] = device
    if not_source:
        result["source_model"] = not_source  # (beside a baseline that is not it)
    result["parameters"] = stored_parameters(model)
    result["bytes"] = folder_bytes(models.resolve_model_path(model_src))
    result["resident_bytes"] = resident_bytes(model)  # (not the layers --max-memory leaves on disk)
    on_disk = _layers_on_disk(model, base)
    if speed and base is not None and not on_disk:  # timed in turn with the baseline: a ratio within one run
        import statistics

        result["tokens_per_second"], result["baseline_tokens_per_second"], ratios = paired_generation_speed(
            model, base, tokenizer, progress=True)
        result["speedup_vs_baseline"] = statistics.median(ratios)  # (paired round by round)
        result["speedup_rounds"] = ratios
    elif speed:
        with phase("timing generation"):
            result["tokens_per_second"] = generation_speed(model, tokenizer)
        if on_disk and base is not None:
            # a baseline read from disk at every forward beside a compressed model that fits: a 3x "speed-up" of
            # disk reads, not of the compression
            result["speed_note"] = (f"no speed ratio: --max-memory left {on_disk} on disk, read at every forward, "
                                    "so it would time the disk; run without --max-memory (or with a cap both "
                                    "fit in) to compare speeds")
    if activation_sparsity:
        from .evaluate import heldout_windows
        from .prune.activation_sparsity import activation_sparsity as cett_search

        windows = heldout_windows(tokenizer, text=text, seq_len=seq_len, max_windows=max_windows)
        result["activation_sparsity"] = cett_search(model, windows, 0.01, progress=True)
    if suite or suite_dir:
        from .eval.report import suite_result

        result.update(suite_result(model, tokenizer, base, suite, suite_dir, suite_limit, plot_file,
                                   model_src, baseline))
    if as_json:
        click.echo(json_out.dumps(result))
        return
    con = _console()
    _print_eval(con, result)
    if suite or suite_dir:
        from .eval.report import SUITE_COLUMNS, suite_table_rows

        con.print(_table("evaluation suite", SUITE_COLUMNS, suite_table_rows(result), caption=result["suite_protocol"]))
    if activation_sparsity:
        a = result["activation_sparsity"]
        rows = [[f"layer {i}", f"{x:.3f}"] for i, x in enumerate(a["layer_sparsity"])]
        rows.append(["total", f"{a['sparsity']:.3f}"])
        con.print(_table(f"FFN activation sparsity at CETT {a['cett']:.4f} (ppl {a['perplexity_dense']:.3f} -> "
                         f"{a['perplexity']:.3f}, {100 * a['ppl_increase']:+.2f}%)", ["layer", "sparsity"], rows))
        from .activation_sparsity.mlp import ActivationSparseMLP

        if any(isinstance(m, ActivationSparseMLP) for m in model.modules()):
            # its own skipped neurons count as inactive, and the +1% is over this model, not the original
            con.print("note: this model is already activation-sparse (an activation_sparsity pass): the figures are "
                      "measured on top of it, against its own perplexity, not the original's")
    con.print(f"stored floats {result['parameters']:,}  checkpoint {_mb(result['bytes'])}  "
              f"resident {_mb(result['resident_bytes'])}"
              + (f"  {result['tokens_per_second']:.1f} tokens/s" if speed else "")
              + (f" ({result['speedup_vs_baseline']:.2f}x the baseline's {result['baseline_tokens_per_second']:.1f}, "
                 f"timed in turn: {min(result['speedup_rounds']):.2f}-{max(result['speedup_rounds']):.2f}x over "
                 f"{len(result['speedup_rounds'])} rounds)" if "speedup_vs_baseline" in result else ""))
    if result.get("speed_note"):
        con.print(f"note: {result['speed_note']}", soft_wrap=True)


@click.command()
@click.argument("model_src", metavar="MODEL")
@click.option("--prompt", required=True, callback=lambda ctx, param, value: _non_empty(value))
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--sample", is_flag=True, help="Sample (with --temperature and --top-p) instead of greedy decoding.")
@click.option("--temperature", default=0.8, show_default=True, type=click.FloatRange(min=1e-3, max=100),
              callback=lambda ctx, param, value: _finite(param, value), help="Sampling temperature (with --sample).")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True, max=1),
              callback=lambda ctx, param, value: _finite(param, value),
              help="Nucleus sampling: keep the smallest set of tokens whose probability reaches this (with --sample).")
# torch's CPU generator keeps a seed's low 32 bits: 1 and 2**32 + 1 sampled the same text
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1),
              help="Seed of the sampling (with --sample).")
@click.option("--allow-pickle", is_flag=True, help="Allow loading a model stored as pickled .bin (trusted files only).")
@_DTYPE
@_SPARSE_RUNTIME
@_MAX_MEMORY_GENERATE
@_DEVICE_GENERATE
@click.option("--chat", is_flag=True, help="Send the prompt as a user message in the tokenizer's chat template (an "
                                           "instruct model) and print only the reply.")
def generate(model_src, prompt, max_new_tokens, sample, temperature, top_p, seed, allow_pickle, dtype,
             sparse_runtime, max_memory=None, device="cpu", chat=False):
    """Generate text with a (compressed) model, as it will be used."""
    import torch

    from . import models
    from .progress import GenerationProgress

    given = [f"--{name.replace('_', '-')}" for name in ("temperature", "top_p", "seed")
             if click.get_current_context().get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE]
    if given and not sample:
        verb, them = ("only applies", "it") if len(given) == 1 else ("only apply", "them")
        named = given[0] if len(given) == 1 else f"{', '.join(given[:-1])} and {given[-1]}"
        raise CompressError(f"{named} {verb} to sampling; add --sample (greedy decoding ignores {them})")

    _check_read_device(device, max_memory)
    offload = _read_offload(max_memory)
    torch.manual_seed(seed)  # (seeds CUDA's generators too)
    tokenizer = models.load_tokenizer(model_src)  # before the model: a mistake found without the wait
    if tokenizer is None:
        raise CompressError(f"{model_src} has no tokenizer files; save the tokenizer with the model")
    ids = _chat_ids(tokenizer, prompt, model_src) if chat else tokenizer(prompt, return_tensors="pt",
                                                                          verbose=False).input_ids
    if ids.shape[1] == 0:  # (the length is checked once the model's context is known)
        raise CompressError(f"the prompt {prompt!r} gives no tokens; give some text to continue")
    with phase(f"loading {model_src}", enabled=not max_memory):
        model = models.load(model_src, sparse_runtime=sparse_runtime, allow_pickle=allow_pickle, dtype=dtype,
                            device=device, **offload)
    _say_offloaded(model, max_memory)
    limited = _check_context(model, ids.shape[1], max_new_tokens)  # the prompt's length, with the new tokens
    models.check_token_ids(ids, model.config, "--prompt", check_context=limited)
    kwargs = ({"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None} if sample
              else {"do_sample": False})
    # transformers' "exceeded the model's predefined maximum length ... exceptions" does not apply without a limit
    reminder = logging.getLogger("transformers.generation.stopping_criteria")
    level = reminder.level
    if not limited:
        reminder.setLevel(logging.ERROR)
    progress, error = GenerationProgress(ids.shape[1], max_new_tokens), None
    try:
        with torch.no_grad():
            out = model.generate(ids.to(device), max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id,
                                 streamer=progress, **kwargs)
    except BaseException as exc:  # (the prompt's line then says "stopped", before the error)
        error = exc
        raise
    finally:  # (main called from Python: its logging as it was)
        progress.end(error)
        reminder.setLevel(level)
    # a chat's prompt is the template's text (role headers, the system message): the reply alone is the answer
    click.echo(tokenizer.decode(out[0, ids.shape[1]:] if chat else out[0], skip_special_tokens=True))


def _chat_ids(tokenizer, prompt: str, model_src: str):
    """ids [1, P] of `prompt` as the user's message in the tokenizer's chat template, ready for the reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise CompressError(f"--chat: the tokenizer of {model_src} has no chat template (a base model, or a "
                            "tokenizer_config.json without `chat_template`); leave --chat out to continue the text")
    try:
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True, return_tensors="pt")
    except Exception as exc:  # a Jinja template's own error (raise_exception(...), a syntax error)
        raise CompressError(f"--chat: the chat template of {model_src} fails: {first_line(str(exc))}") from None
    return encoded["input_ids"]


def _layers_on_disk(model, base) -> str:
    """Which of the two models --max-memory left with decoder layers on disk ("" for none), e.g. "3 of the
    baseline's layers"."""
    parts = [f"{len(on_disk)} of the {who} layers" for who, m in (("model's", model), ("baseline's", base))
             if m is not None and (on_disk := getattr(m, "compress_offloaded_layers", None))]
    return " and ".join(parts)


def _check_context(model, prompt_tokens: int, new_tokens: int) -> bool:
    """Whether the model has a context limit; if it has, the prompt and the new tokens must fit it."""
    from . import models
    from .linearize.cache import linearized_windows

    if len(linearized_windows(model)) == getattr(model.config, "num_hidden_layers", None):
        return False  # recurrent states and RoPE windows of a few dozen tokens: no context limit (linearizing's point)
    context = models.context_length(model.config)
    if context is not None and prompt_tokens + new_tokens > context:
        raise CompressError(f"the prompt ({prompt_tokens} tokens) plus --max-new-tokens {new_tokens} exceed the "
                            f"model's context of {context} tokens; shorten one of them")
    return True


@click.command()
@click.argument("checkpoint", type=click.Path())
@_SPARSE_RUNTIME
@click.option("--device", default=None, type=click.Choice(["cpu", "cuda"]),
              help="Device whose runtime paths to show (default: cuda when torch sees a GPU, else cpu).")
@click.option("--json", "as_json", is_flag=True)
def inspect(checkpoint, sparse_runtime, device, as_json):
    """Passes applied, bytes per component (dense vs compressed), runtime path per compressed layer, the recipe."""
    from .cli_inspect import inspect_checkpoint, print_inspection

    result = inspect_checkpoint(checkpoint, sparse_runtime, device)
    if as_json:
        click.echo(json_out.dumps(result))
        return
    print_inspection(result)


@click.command("passes")
@click.option("--json", "as_json", is_flag=True)
def list_passes(as_json):
    """Every registered pass with its arguments, types and defaults."""
    from .registry import available_passes

    out = {}
    for name, cls in available_passes().items():
        fields = {}
        for fname, f in cls.Config.model_fields.items():
            default = f.get_default(call_default_factory=True)
            fields[fname] = {"type": _type_name(f.annotation), "default": default, "description": f.description}
        summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())  # the first paragraph, unwrapped
        out[name] = {"doc": summary, "arguments": fields}
    if as_json:
        click.echo(json_out.dumps(out))
        return
    con = _console()
    for name, info in out.items():
        _print_wrapped(con, f"{name}: {info['doc']}", indent=0, hang=2, bold=name)
        for fname, f in info["arguments"].items():
            line = f"{fname}: {f['type']} = {f['default']!r}" + (f"  # {f['description']}" if f["description"] else "")
            _print_wrapped(con, line, indent=4, hang=4)


def _type_name(annotation) -> str:
    s = str(annotation)
    return annotation.__name__ if isinstance(annotation, type) else s.replace("typing.", "")
