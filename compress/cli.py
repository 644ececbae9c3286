"""The `compress` command line. Exit codes: 0 ok, 2 user error (one or two lines, no traceback), 1 internal error."""
from __future__ import annotations

import gc
import signal
import sys
from pathlib import Path

import click

from .cli_export import export_cmd
from .cli_eval import (EVAL_SEQ_LEN, _check_kv_text, _eval_windows, _evaluate, _read_text, _residual_length,
                       eval_device)
from .cli_format import _console, _mb, _print_eval, _print_passes, check_utf8_arguments, stored_dense_line
from .cli_options import _DTYPE, _say_offloaded
from .cli_read import eval_cmd, generate, inspect, list_passes
from . import json_out
from .checkpoint import folder_bytes  # noqa: F401 (also compress.cli.folder_bytes)
from .errors import CompressError
from .output_folder import UNWINDING_SIGNALS
from .paths import user_path
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
        # SIGTERM (`kill`, `timeout`, a scheduler) and SIGHUP (the terminal or SSH session closing) unwind like
        # Ctrl-C: temporary folders and spill files are removed; the caller's handlers are back afterwards (click's
        # CliRunner, an application calling main())
        previous = {}
        try:
            for s in UNWINDING_SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:  # (`nohup compress ...` keeps running on SIGHUP)
                    previous[s] = signal.signal(s, _terminate)
        except ValueError:  # not the main thread (an embedding application's): left alone
            pass
        from .output_folder import COMPLETED

        ctx.meta[_COMPLETED_BEFORE] = len(COMPLETED)  # a save this command finishes counts as written (_written)
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # `compress nosuch`, `compress apply --bogus`, a bad option value
            raise _one_line(exc) from None
        except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, SIGHUP: the shell's codes (128 + signal), not 1 (a bug's)
            click.echo(f"error: interrupted{_written(ctx)}", err=True)
            ctx.exit(128 + (exc.signum if isinstance(exc, _Terminated) else signal.SIGINT))
        except (CompressError, OSError) as exc:
            from .errors import user_error

            mapped = user_error(exc)
            if mapped is None:
                raise  # not the user's doing: a bug, with its traceback
            click.echo(f"error: {mapped}{_written(ctx)}", err=True)
            ctx.exit(2)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


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
    """SIGTERM or SIGHUP, raised where Python is when it arrives, so that it unwinds as Ctrl-C does."""

    def __init__(self, signum: int):
        super().__init__()
        self.signum = int(signum)


def _terminate(signum, frame):
    raise _Terminated(signum)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
def validate(recipe: str) -> None:
    """Check a recipe without loading any model (its syntax, passes and settings; what needs the model's modules,
    such as targets that match nothing or passes that conflict on a module, `compress apply --dry-run` checks)."""
    from .recipe import Recipe

    r = Recipe.from_yaml(recipe)
    model = r.resolved_model()
    if model and not model.startswith("builtin:"):  # a local folder: known without loading it (apply --model may
        from .models import resolve_model_path     # override it, so the recipe's reader does not refuse it)

        try:
            resolve_model_path(model)
        except CompressError as exc:
            raise CompressError(f"{recipe}: model: {exc}") from None
    if r.output and user_path(r.output).is_file():
        raise CompressError(f"{recipe}: output {r.output} is a file; give a folder path")
    click.echo(f"{recipe}: ok ({len(r.passes)} pass{'es' if len(r.passes) != 1 else ''}: "
               f"{', '.join(p.name for p in r.passes)}); checks that need the model: "
               f"compress apply {recipe} --dry-run")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--model", "model_src", help="Model folder or builtin:NAME (overrides the recipe's `model`).")
@click.option("--output", "-o", help="Output folder (overrides the recipe's `output`).")
@click.option("--dry-run", is_flag=True, help="Print the modules each pass would touch; load no weights. Checks "
                                           "what the run would refuse first, the output folder included.")
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
                   "(pruned / int-quantized weights that transformers loads without compress, and vLLM "
                   "unless quantized asymmetric).")
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
    from .bench_args import check_device
    from .environment import check_launcher, is_main_process, process_rank, single_process, use_local_gpu
    from .recipe import Recipe

    for option, value in (("--model", model_src), ("--output", output)):
        if value is not None and not value.strip():  # ("" fell back to the recipe's, silently)
            raise CompressError(f"{option} is empty; give a path, or leave the option out to use the recipe's")
    r = Recipe.from_yaml(recipe)
    # under torchrun / accelerate launch every process runs the passes (recover trains data-parallel); the main one
    # alone checks and writes the output, evaluates and prints
    if not single_process() and process_rank() != 0:  # a rank other than 0 without its launcher (variables left in
        check_launcher()  # a shell) ran every pass and wrote nothing, silently
    main = is_main_process()
    overrides = {"model": model_src, "output": output}  # as given on the command line (None: the recipe's)
    model_src = model_src or r.resolved_model()
    if not model_src:
        raise CompressError(f"{recipe}: no model: add `model: builtin:tiny` (or a local folder) or pass --model")
    if offload_folder and max_memory is None:
        raise CompressError("--offload-folder is where --max-memory writes the layers that do not fit; give "
                            "--max-memory too, or drop --offload-folder")
    passes = r.build_passes()
    if r.calibration is not None and not any(p.needs_calibration_for() for p in passes) and main:
        click.echo("note: no pass of this recipe reads calibration data; its `calibration:` section is not used",
                   err=True)
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
        if offload_folder and user_path(offload_folder).resolve().is_relative_to(source.resolve()):
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
        if export_format == "compressed-tensors":  # the layers it would store dense, or its refusal, as the run's
            line = stored_dense_line(group_fallback(model, passes))
            if line and main:
                click.echo(f"note: {line}", err=True)
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
    check_device(device)  # (apply's --max-memory works with cuda: layers visit the GPU in turn)
    use_local_gpu(device)
    do_eval = do_eval and main
    needs_text = do_eval or any(p.needs_calibration_for() for p in passes)
    tokenizer = models.load_tokenizer(model_src, strict=needs_text)
    if do_eval and tokenizer is None:
        raise CompressError(f"{model_src} has no tokenizer files, which the evaluation needs: save the tokenizer "
                            "with the model, or pass --no-eval")
    offload = {"max_memory": max_memory, "offload_folder": offload_folder} if max_memory else {}
    # an export (another tool's layers) from its config, as --dry-run does: the full load took seconds to minutes
    # and printed compressed-tensors' progress bars before the refusal
    api.check_not_quantized_elsewhere(models.load(model_src, meta=True, allow_pickle=allow_pickle, dtype=dtype))
    with phase(f"loading {model_src}", enabled=not max_memory):  # (layers on disk have a bar of their own)
        model = models.load(model_src, allow_pickle=allow_pickle, dtype=dtype, **offload)
    if main:
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
    made_from = _made_from(source_path)  # an input compressed already: from what
    if made_from:
        result["input_made_from"] = made_from
    stored_dtype = str(models.checkpoint_dtype(model)).removeprefix("torch.")
    if do_eval:
        # the model in memory goes first: with the checkpoint read back and the baseline it made three models at once
        del model
        gc.collect()
        where, note = eval_device(device, max_memory, [Path(output), source_path], dtype)
        if note:
            click.echo(f"note: {note}", err=True)
        with phase(f"loading {output} back", enabled=not max_memory):
            written = models.load(output, dtype=dtype, allow_pickle=allow_pickle, max_memory=max_memory, device=where)
        result["eval"] = _evaluate(written, model_src, tokenizer, eval_windows, progress=True, seq_len=eval_seq_len,
                                   text=text, allow_pickle=allow_pickle, dtype=dtype, prepared=windows,
                                   max_memory=max_memory, device=where)
        result["eval"]["device"] = where
        result["eval"]["baseline"] = model_src  # (this run's input: what the recipe's passes changed)
        if made_from:  # said: `compress eval` on the output compares with made_from
            click.echo(f"note: the evaluation compares with this run's input {model_src}, itself compressed from "
                       f"{made_from}: it measures this recipe's passes alone (`compress eval {output}` compares "
                       f"with {made_from})", err=True)
    if as_json:
        click.echo(json_out.dumps(result))
        return
    con = _console()
    _print_passes(con, result, stored_dtype, export_format)
    con.print(f"checkpoint: {output}  ({_mb(result['checkpoint_bytes'])} of weights, "
              f"{'input' if made_from else 'original'} "
              f"{_mb(result['original_checkpoint_bytes'])}, format {export_format})")
    if not user_path(output).is_absolute():  # a recipe's relative `output` is taken from the current folder
        con.print(f"  at {user_path(output).resolve()}", soft_wrap=True)
    if exported.get("stored_dense"):
        con.print(stored_dense_line(exported["stored_dense"]), soft_wrap=True)
    if exported.get("note"):  # as compress export says it (vLLM and int-quantized layers)
        con.print(f"note: {exported['note']}", soft_wrap=True)
    if do_eval:
        _print_eval(con, result["eval"])


def _source_folder(model_src: str) -> Path:
    """The folder the source model is read from, a built-in model's packaged one included: neither the output nor
    --offload-folder may go inside it (spill files were written into the package's data folder)."""
    from . import models

    return models.resolve_model_path(model_src)


def _made_from(folder: Path) -> str | None:
    """The model a compressed input at `folder` records it was made from (where it is now, when it is here), or None
    for an input that is not a compressed checkpoint."""
    from .cli_eval import source_record

    source, found = source_record(folder)
    return found or (f"{source} (not found here)" if source else None)


def _recipe_as_run(r, overrides: dict) -> str:
    """The recipe text the checkpoint stores, headed by the command-line options that overrode its `model:` /
    `output:` (it read `model: builtin:tiny` over a run on another model, and running it again compressed that)."""
    notes = [f"# compress apply ran this recipe with --{key} {value} (the recipe's {key}: {getattr(r, key) or '-'})\n"
             for key, value in overrides.items() if value is not None and str(value) != str(getattr(r, key))]
    return "".join(notes) + r.text


def check_output(output, **kwargs):
    from .output_folder import check_output as check

    return check(output, **kwargs)


for _command in (eval_cmd, generate, inspect, export_cmd, list_passes):  # (in --help's order)
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
