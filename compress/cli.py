"""The `compress` command line. Exit codes: 0 ok, 2 user error (one or two lines, no traceback), 1 internal error."""
from __future__ import annotations

import gc
import sys
from pathlib import Path

import click

from .cli_export import export_cmd
from .cli_eval import (EVAL_SEQ_LEN, _check_baseline, _check_baseline_tokenizer, _check_kv_text, _eval_windows,
                       _evaluate, _read_text, _recorded_source, _residual_length)
from .cli_format import (_console, _finite, _mb, _non_empty, _print_eval, _print_passes, _print_wrapped, _table,
                         check_utf8_arguments, stored_dense_line)
from . import json_out
from .checkpoint import folder_bytes  # noqa: F401 (also compress.cli.folder_bytes)
from .errors import CompressError
from .progress import phase


class _OneLineUsageError(click.UsageError):
    """click's usage error in one line (its own takes four: the usage, a hint, a blank line, the error)."""

    def show(self, file=None) -> None:
        where = self.ctx.command_path if self.ctx is not None else "compress"
        message = self.format_message().strip()
        end = "" if message.endswith((".", "?", "!")) else "."
        click.echo(f"error: {message}{end} See '{where} --help'.", file=file, err=True)


def _one_line(exc: click.UsageError) -> click.UsageError:
    # a bare `compress` shows the help (click raises it as a usage error): kept as click prints it
    if isinstance(exc, (_OneLineUsageError, getattr(click.exceptions, "NoArgsIsHelpError", ()))):
        return exc
    return _OneLineUsageError(exc.format_message(), exc.ctx)


class _Group(click.Group):
    def make_context(self, info_name, args, parent=None, **extra):
        if parent is None:  # bytes from a non-UTF-8 name or prompt: refused before any work, not at the end of it
            check_utf8_arguments(args)
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:  # `compress --bogus`
            raise _one_line(exc) from None

    def invoke(self, ctx):
        import signal

        # SIGTERM (`kill`, `timeout`, a scheduler) unwinds like Ctrl-C: temporary folders and spill files are
        # removed; the caller's handler is back afterwards (click's CliRunner, an application calling main())
        try:
            previous = signal.signal(signal.SIGTERM, _terminate)
        except ValueError:  # not the main thread (an embedding application's): left alone
            previous = None
        from .output_folder import COMPLETED

        ctx.meta[_COMPLETED_BEFORE] = len(COMPLETED)  # a save this command finishes counts as written (_written)
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # `compress nosuch`, `compress apply --bogus`, a bad option value
            raise _one_line(exc) from None
        except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM: the shell's codes (128 + signal), not 1 (a bug's)
            click.echo(f"error: interrupted{_written(ctx)}", err=True)
            ctx.exit(143 if isinstance(exc, _Terminated) else 130)
        except (CompressError, OSError) as exc:
            from .errors import user_error

            mapped = user_error(exc)
            if mapped is None:
                raise  # not the user's doing: a bug, with its traceback
            click.echo(f"error: {mapped}{_written(ctx)}", err=True)
            ctx.exit(2)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


@click.group(cls=_Group)
@click.version_option(package_name="compress")
def main() -> None:
    """Make pretrained causal language models smaller and faster from one YAML recipe."""
    from .environment import check_environment

    check_environment()  # a misspelt COMPRESS_* value: one line, before any work


WRITTEN = "compress_written"  # ctx.meta: the checkpoint a command wrote before what failed or was interrupted
_COMPLETED_BEFORE = "compress_completed_before"  # ctx.meta: how many swaps this process had finished before it


def _written(ctx) -> str:
    from .output_folder import COMPLETED

    written = ctx.meta.get(WRITTEN) or (str(COMPLETED[-1]) if len(COMPLETED) > ctx.meta.get(_COMPLETED_BEFORE, 0)
                                        else None)
    return f" (after the checkpoint at {written} was written: it is complete)" if written else ""


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Python is when it arrives, so that it unwinds as Ctrl-C does."""


def _terminate(signum, frame):
    raise _Terminated


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
def validate(recipe: str) -> None:
    """Check a recipe without loading any model (its syntax, passes and settings; what needs the model's modules,
    such as targets that match nothing or passes that conflict on a module, `compress apply --dry-run` checks)."""
    from .recipe import Recipe

    r = Recipe.from_yaml(recipe)
    click.echo(f"{recipe}: ok ({len(r.passes)} pass{'es' if len(r.passes) != 1 else ''}: "
               f"{', '.join(p.name for p in r.passes)}); checks that need the model: "
               f"compress apply {recipe} --dry-run")


_DTYPE = click.option(
    "--dtype", default="auto", show_default=True, type=click.Choice(["auto", "stored", "float32", "bfloat16", "float16"]),
    help="Compute dtype: auto = the checkpoint's dtype where the device computes it natively, float32 on CPUs without "
         "native bf16/fp16; stored = always the checkpoint's dtype (least memory). Checkpoints keep their dtype.")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--model", "model_src", help="Model folder or builtin:NAME (overrides the recipe's `model`).")
@click.option("--output", "-o", help="Output folder (overrides the recipe's `output`).")
@click.option("--dry-run", is_flag=True, help="Print the modules each pass would touch; load no weights.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]),
              help="Compute device for calibration; the model stays on the CPU and layers visit the device in turn.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--eval/--no-eval", "do_eval", default=True, show_default=True,
              help="Evaluate the exported checkpoint against the original model on held-out text.")
@click.option("--eval-windows", default=None, type=click.IntRange(min=1),
              help="Evaluate at most this many held-out windows (default: all).")
@click.option("--eval-text", type=click.Path(exists=True, dir_okay=False),
              help="Held-out text file for the evaluation (default: the built-in reference model's held-out text).")
@click.option("--allow-pickle", is_flag=True, help="Allow loading a model stored as pickled .bin (trusted files only).")
@_DTYPE
@click.option("--format", "export_format", type=click.Choice(["native", "compressed-tensors"]), default=None,
              help="Checkpoint format: native (default: everything compress can express) or compressed-tensors "
                   "(pruned / int-quantized weights that transformers and vLLM load without compress).")
@click.option("--max-memory", default=None,
              help="Cap the CPU memory the weights take (e.g. 8GB): decoder layers that do not fit stay on disk and "
                   "are compressed one at a time (models larger than memory).")
@click.option("--offload-folder", type=click.Path(file_okay=False),
              help="Where --max-memory writes compressed layers before the checkpoint (default: a temporary folder).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
def apply(recipe, model_src, output, dry_run, device, overwrite, do_eval, eval_windows, eval_text, allow_pickle,
          dtype, export_format, max_memory, offload_folder, as_json):
    """Run a recipe's passes on a model and export a compressed checkpoint."""
    from . import api, checkpoint, models
    from .environment import is_main_process, use_local_gpu
    from .recipe import Recipe

    r = Recipe.from_yaml(recipe)
    # under torchrun / accelerate launch every process runs the passes (recover trains data-parallel); the main one
    # alone checks and writes the output, evaluates and prints
    main = is_main_process()
    overrides = {"model": model_src, "output": output}  # as given on the command line (None: the recipe's)
    model_src = model_src or r.resolved_model()
    if not model_src:
        raise CompressError(f"{recipe}: no model: add `model: builtin:tiny` (or a local folder) or pass --model")
    if offload_folder and max_memory is None:
        raise CompressError("--offload-folder is where --max-memory writes the layers that do not fit; give "
                            "--max-memory too, or drop --offload-folder")
    passes = r.build_passes()
    output = output or r.output
    export_format = export_format or r.export_format or "native"
    if export_format == "compressed-tensors":
        from .export.compressed_tensors import check_passes, export, group_fallback

        check_passes([(p.name, p.args) for p in r.passes])  # what the format cannot express fails before any work
    if max_memory is not None:
        from .offload import check_offload_folder, parse_bytes

        parse_bytes(max_memory)  # a malformed size fails before any work
        check_offload_folder(offload_folder)
        source = _source_folder(model_src)
        if offload_folder and Path(offload_folder).expanduser().resolve().is_relative_to(source.resolve()):
            raise CompressError(f"--offload-folder {offload_folder} is inside the source model's folder: the layers "
                                "spilled there would mix with its files; put it elsewhere")
        if models.layers_left_on_disk(model_src, max_memory=max_memory, dtype=dtype):
            api.check_offload_support(passes)  # passes that cannot run so fail before any layer is read
            if export_format == "compressed-tensors":
                raise CompressError(f"--format compressed-tensors needs the whole model in memory, and --max-memory "
                                    f"{max_memory} leaves layers on disk: save natively, then `compress export` it "
                                    "on a machine where it fits")
    # folders written while the run works (Trainer checkpoints, --offload-folder): the output's swap must not hold them
    work_folders = tuple(f for p in passes for f in p.work_folders()) + ((Path(offload_folder),) if offload_folder
                                                                        and max_memory else ())
    if dry_run:  # (in --dtype: what the checks size by, the calibration's memory among them)
        model = models.load(model_src, meta=True, allow_pickle=allow_pickle, dtype=dtype)
        api.check_not_quantized_elsewhere(model)
        for i, p in enumerate(passes):
            p.checked(model, passes[:i])  # shapes a pass cannot take fail here, before any work, at their line
        if any(p.needs_calibration_for() for p in passes):  # the calibration text, as the real run reads it
            from .pass_api import PassContext

            api.check_calibration(model, passes, PassContext(
                calibration=r.calibration, tokenizer=models.load_tokenizer(model_src, strict=True),
                base_dir=r.base_dir, device=device))
        if output and main:
            check_output(output, overwrite=overwrite, source=_source_folder(model_src), protected=(Path(recipe),),
                         work=work_folders)
        # each pass against the model the passes before it leave (the meta model is the original one)
        plan = [(p.name, *p.planned(model, passes[:i])) for i, p in enumerate(passes)]
        if not main:
            return
        if as_json:
            click.echo(json_out.dumps({"model": model_src, "passes": [{"pass": k, "modules": v, "skipped": s}
                                                                  for k, v, s in plan]}))
        else:
            for i, (name, mods, skipped) in enumerate(plan, 1):
                click.echo(f"{i}. {name}: {len(mods)} module(s)")
                for m in mods:
                    click.echo(f"     {m}")
                for m, why in skipped.items():
                    click.echo(f"     (skipped: {m}: {why})")
        return
    if not output:
        raise CompressError(f"{recipe}: no output folder: add `output: out/NAME` to the recipe or pass --output")
    source_path = models.resolve_model_path(model_src)
    protected = (Path(recipe),) + ((Path(eval_text),) if eval_text else ())
    if main:  # (another process checking it could find the main one's finished checkpoint there)
        check_output(output, overwrite=overwrite, source=_source_folder(model_src), protected=protected,
                     work=work_folders)
    _check_device(device)
    use_local_gpu(device)
    do_eval = do_eval and main
    needs_text = do_eval or any(p.needs_calibration_for() for p in passes)
    tokenizer = models.load_tokenizer(model_src, strict=needs_text)
    if do_eval and tokenizer is None:
        raise CompressError(f"{model_src} has no tokenizer files, which the evaluation needs: save the tokenizer "
                            "with the model, or pass --no-eval")
    offload = {"max_memory": max_memory, "offload_folder": offload_folder} if max_memory else {}
    with phase(f"loading {model_src}", enabled=not max_memory):  # (layers on disk have a bar of their own)
        model = models.load(model_src, allow_pickle=allow_pickle, dtype=dtype, **offload)
    _say_offloaded(model, max_memory, "read, compressed and written back one at a time")
    text = _read_text(eval_text) if do_eval and eval_text else None
    eval_seq_len = EVAL_SEQ_LEN
    context = models.context_length(model.config)
    if do_eval and context is not None and context < EVAL_SEQ_LEN:  # apply has no --seq-len: fit the model
        eval_seq_len = context
        click.echo(f"note: the evaluation scores windows of {context} tokens, the model's context", err=True)
    windows = _eval_windows(tokenizer, text, eval_seq_len, eval_windows, model.config) if do_eval else None
    if export_format == "compressed-tensors":  # layers it will store dense: said before the work, all refused
        line = stored_dense_line(group_fallback(model, passes))
        if line:
            click.echo(f"note: {line}", err=True)
    if do_eval:
        _check_kv_text(tokenizer, text, _residual_length(model, passes), model.config)
    if r.calibration is not None and r.calibration.source == "builtin:heldout" and do_eval and not eval_text:
        click.echo("note: the recipe calibrates on builtin:heldout, the text the evaluation scores: the held-out "
                   "numbers will flatter the result (use builtin:calibration)", err=True)
    # progress is on stderr, --json included (stdout holds the result alone)
    model, report = api.apply(model, r, tokenizer=tokenizer, device=device, progress=main)
    if not main:  # the main process writes the checkpoint (every process holds the same trained model)
        return
    recipe_text = _recipe_as_run(r, overrides)
    if export_format == "compressed-tensors":  # (a progress bar over the layers it converts and checks)
        exported = export(model, output, tokenizer=tokenizer, recipe_text=recipe_text, report=report.to_dict(),
                          overwrite=overwrite, progress=True).to_dict()
    else:
        with phase(f"writing {output}"):
            checkpoint.save(model, output, tokenizer=tokenizer, recipe_text=recipe_text, report=report.to_dict(),
                            overwrite=overwrite, format="native")  # (--format native over the recipe's export)
        exported = {"format": "native"}
    click.get_current_context().meta[WRITTEN] = str(output)  # an error or Ctrl-C in the evaluation says so
    result = {"model": model_src, "output": str(output), **report.to_dict(), "export": exported}
    result["checkpoint_bytes"] = folder_bytes(Path(output))
    result["original_checkpoint_bytes"] = folder_bytes(source_path)
    stored_dtype = str(models.checkpoint_dtype(model)).removeprefix("torch.")
    if do_eval:
        # the model in memory goes first: with the checkpoint read back and the baseline it made three models at once
        del model
        gc.collect()
        with phase(f"loading {output} back", enabled=not max_memory):
            written = models.load(output, dtype=dtype, allow_pickle=allow_pickle, max_memory=max_memory)
        result["eval"] = _evaluate(written, model_src, tokenizer, eval_windows, progress=True, seq_len=eval_seq_len,
                                   text=text, allow_pickle=allow_pickle, dtype=dtype, prepared=windows,
                                   max_memory=max_memory)
    if as_json:
        click.echo(json_out.dumps(result))
        return
    con = _console()
    _print_passes(con, result, stored_dtype, export_format)
    con.print(f"checkpoint: {output}  ({_mb(result['checkpoint_bytes'])} of weights, "
              f"original {_mb(result['original_checkpoint_bytes'])}, format {export_format})")
    if not Path(output).expanduser().is_absolute():  # a recipe's relative `output` is taken from the current folder
        con.print(f"  at {Path(output).expanduser().resolve()}", soft_wrap=True)
    if exported.get("stored_dense"):
        con.print(stored_dense_line(exported["stored_dense"]), soft_wrap=True)
    if do_eval:
        _print_eval(con, result["eval"])


def _source_folder(model_src: str) -> Path:
    """The folder the source model is read from, a built-in model's packaged one included: neither the output nor
    --offload-folder may go inside it (spill files were written into the package's data folder)."""
    from . import models

    return models.resolve_model_path(model_src)


def _recipe_as_run(r, overrides: dict) -> str:
    """The recipe text the checkpoint stores, headed by the command-line options that overrode its `model:` /
    `output:` (it read `model: builtin:tiny` over a run on another model, and running it again compressed that)."""
    notes = [f"# compress apply ran this recipe with --{key} {value} (the recipe's {key}: {getattr(r, key) or '-'})\n"
             for key, value in overrides.items() if value is not None and str(value) != str(getattr(r, key))]
    return "".join(notes) + r.text


def check_output(output, **kwargs):
    from .output_folder import check_output as check

    return check(output, **kwargs)


def _check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise CompressError("--device cuda, but torch sees no CUDA GPU here; use --device cpu")


_SPARSE_RUNTIME = click.option(
    "--sparse-runtime", default="auto", show_default=True, type=click.Choice(["auto", "dense", "packed"]),
    help="How pruned layers run: dense = decoded once at load (dense speed, packed on disk), packed = smallest "
         "memory (C kernels on the CPU, faster than dense when decoding large layers), auto = packed on CUDA and "
         "for large float32 layers on the CPU, dense otherwise.")


_MAX_MEMORY_READ = click.option(
    "--max-memory", default=None,
    help="Cap the CPU memory the weights take (e.g. 8GB): decoder layers that do not fit are read from the "
         "checkpoint's files for each forward (slow, for models larger than memory); a baseline gets its own cap.")


def _say_offloaded(model, max_memory: str | None, how: str = "read for each forward") -> None:
    """One line (stderr) on what --max-memory left on disk and what stays in memory: a cap below the embeddings and
    head is not an error, but the user should know it was not met."""
    from .offload import parse_bytes, resident_bytes
    from .sequential import decoder_layers

    on_disk = getattr(model, "compress_offloaded_layers", None)
    if not max_memory or not on_disk:
        return
    resident = resident_bytes(model)
    over = resident > parse_bytes(max_memory)
    click.echo(f"--max-memory {max_memory}: {len(on_disk)} of {len(decoder_layers(model)[1])} decoder layers stay on "
               f"disk, {how}; {_mb(resident)} stay in memory"
               + (" (more than the cap: the embeddings, head and norms always do)" if over else ""), err=True)


def _read_offload(max_memory: str | None) -> dict:
    """load()'s keywords for --max-memory (a malformed size fails here, before anything is read)."""
    if max_memory is None:
        return {}
    from .offload import parse_bytes

    parse_bytes(max_memory)
    return {"max_memory": max_memory}


@main.command("eval")
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
@click.option("--suite-limit", default=None, type=click.IntRange(min=1), help="At most this many examples per suite task.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False),
              help="Write a PNG of each suite score against the baseline (needs matplotlib).")
@_SPARSE_RUNTIME
@click.option("--allow-pickle", is_flag=True, help="Allow loading a model stored as pickled .bin (trusted files only).")
@_DTYPE
@_MAX_MEMORY_READ
@click.option("--json", "as_json", is_flag=True)
def eval_cmd(model_src, baseline, text_file, seq_len, max_windows, speed, activation_sparsity, sparse_runtime,
             allow_pickle, dtype, as_json, suite=None, suite_dir=None, suite_limit=None, plot_file=None,
             max_memory=None):
    """Perplexity, KL and top-1 agreement vs a baseline on held-out text; parameters, bytes, tokens/s."""
    from . import models
    from .evaluate import generation_speed, paired_generation_speed
    from .offload import resident_bytes
    from .pass_api import stored_parameters

    if suite or suite_dir or plot_file or suite_limit is not None:
        from .eval.report import check_suite_options

        check_suite_options(suite, suite_dir, plot_file, suite_limit)
    offload = _read_offload(max_memory)
    if baseline is None:
        baseline = _recorded_source(model_src)
    else:
        _check_baseline(baseline)
    tokenizer = models.load_tokenizer(model_src)
    if tokenizer is not None and baseline:  # (without its own, the model is scored with the baseline's)
        _check_baseline_tokenizer(baseline, tokenizer)
    tokenizer = tokenizer or (models.load_tokenizer(baseline) if baseline else None)
    if tokenizer is None:
        raise CompressError(f"{model_src} has no tokenizer files; save the tokenizer with the model")
    text = _read_text(text_file) if text_file else None
    with phase(f"loading {model_src}", enabled=not max_memory):
        model = models.load(model_src, sparse_runtime=sparse_runtime, allow_pickle=allow_pickle, dtype=dtype,
                            **offload)
    _say_offloaded(model, max_memory)
    _check_kv_text(tokenizer, text, _residual_length(model, []), model.config)
    if activation_sparsity:  # before the evaluation, not after it
        from .prune.activation_sparsity import check_down_weights

        check_down_weights(model)
    # the baseline is loaded once: the evaluation and the suite compare against it, the speed is timed with it
    with phase(f"loading the baseline {baseline}", enabled=bool(baseline) and not max_memory):
        base = models.load(baseline, allow_pickle=allow_pickle, dtype=dtype, **offload) if baseline else None
    result = _evaluate(model, baseline, tokenizer, max_windows, progress=True, seq_len=seq_len, text=text,
                       allow_pickle=allow_pickle, dtype=dtype, baseline_model=base)
    result["baseline"] = baseline
    result["parameters"] = stored_parameters(model)
    result["bytes"] = folder_bytes(models.resolve_model_path(model_src))
    result["resident_bytes"] = resident_bytes(model)  # (not the layers --max-memory leaves on disk)
    if speed and base is not None:  # timed in turn with the baseline: a ratio within one run (tokens/s alone moves)
        result["tokens_per_second"], result["baseline_tokens_per_second"] = paired_generation_speed(
            model, base, tokenizer, progress=True)
        result["speedup_vs_baseline"] = result["tokens_per_second"] / result["baseline_tokens_per_second"]
    elif speed:
        with phase("timing generation"):
            result["tokens_per_second"] = generation_speed(model, tokenizer)
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
    con.print(f"stored floats {result['parameters']:,}  checkpoint {_mb(result['bytes'])}  resident {_mb(result['resident_bytes'])}"
              + (f"  {result['tokens_per_second']:.1f} tokens/s" if speed else "")
              + (f" ({result['speedup_vs_baseline']:.2f}x the baseline's {result['baseline_tokens_per_second']:.1f}, "
                 "timed in turn)" if "speedup_vs_baseline" in result else ""))


@main.command()
@click.argument("model_src", metavar="MODEL")
@click.option("--prompt", required=True, callback=lambda ctx, param, value: _non_empty(value))
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--sample", is_flag=True, help="Sample (with --temperature and --top-p) instead of greedy decoding.")
@click.option("--temperature", default=0.8, show_default=True, type=click.FloatRange(min=1e-3, max=100),
              callback=lambda ctx, param, value: _finite(param, value), help="Sampling temperature (with --sample).")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True, max=1),
              callback=lambda ctx, param, value: _finite(param, value), help="Nucleus sampling: keep the smallest set of tokens whose probability reaches this (with --sample).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(-(2**63), 2**64 - 1))
@click.option("--allow-pickle", is_flag=True, help="Allow loading a model stored as pickled .bin (trusted files only).")
@_DTYPE
@_SPARSE_RUNTIME
@_MAX_MEMORY_READ
def generate(model_src, prompt, max_new_tokens, sample, temperature, top_p, seed, allow_pickle, dtype,
             sparse_runtime, max_memory=None):
    """Generate text with a (compressed) model, as it will be used."""
    import torch

    from . import models

    given = [f"--{name.replace('_', '-')}" for name in ("temperature", "top_p", "seed")
             if click.get_current_context().get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE]
    if given and not sample:
        verb, them = ("only applies", "it") if len(given) == 1 else ("only apply", "them")
        named = given[0] if len(given) == 1 else f"{', '.join(given[:-1])} and {given[-1]}"
        raise CompressError(f"{named} {verb} to sampling; add --sample (greedy decoding ignores {them})")

    offload = _read_offload(max_memory)
    torch.manual_seed(seed)
    tokenizer = models.load_tokenizer(model_src)  # before the model: a mistake found without the wait
    if tokenizer is None:
        raise CompressError(f"{model_src} has no tokenizer files; save the tokenizer with the model")
    with phase(f"loading {model_src}", enabled=not max_memory):
        model = models.load(model_src, sparse_runtime=sparse_runtime, allow_pickle=allow_pickle, dtype=dtype,
                            **offload)
    _say_offloaded(model, max_memory)
    ids = tokenizer(prompt, return_tensors="pt", verbose=False).input_ids  # the length is checked below
    if ids.shape[1] == 0:
        raise CompressError(f"the prompt {prompt!r} gives no tokens; give some text to continue")
    limited = _check_context(model, ids.shape[1], max_new_tokens)  # the prompt's length, with the new tokens
    models.check_token_ids(ids, model.config, "--prompt", check_context=limited)
    kwargs = ({"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None} if sample
              else {"do_sample": False})
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id, **kwargs)
    click.echo(tokenizer.decode(out[0], skip_special_tokens=True))


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


@main.command()
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


main.add_command(export_cmd)


@main.command("passes")
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
