"""`compress export`: a checkpoint `compress apply` saved natively, written in a format other tools load."""
from __future__ import annotations

import json
from pathlib import Path

import click

from . import json_out
from .checkpoint import folder_bytes
from .cli_format import _mb, stored_dense_line
from .errors import CompressError
from .output_folder import check_output
from .progress import phase


@click.command("export")
@click.argument("checkpoint", metavar="CHECKPOINT")
@click.option("--output", "-o", required=True, help="Folder to write the exported checkpoint to.")
@click.option("--format", "export_format", type=click.Choice(["compressed-tensors"]), default="compressed-tensors",
              show_default=True, help="compressed-tensors: loads in transformers without compress, and in vLLM "
                                      "unless quantized asymmetric (symmetric: false).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder this tool wrote.")
@click.option("--json", "as_json", is_flag=True)
def export_cmd(checkpoint, output, export_format, overwrite, as_json):
    """Export a checkpoint `compress apply` saved natively, in a format other tools load (the same files as apply
    --format compressed-tensors)."""
    from . import models
    from .checkpoint_validation import read_config_json
    from .cli_eval import source_record
    from .export.compressed_tensors import already_native_advice, check_passes, check_plan, export

    folder = models.resolve_model_path(checkpoint)
    section = None if str(checkpoint).startswith("builtin:") else models.compression_section(folder)
    if not section:
        raise CompressError(f"{checkpoint} is not a checkpoint compress wrote (its config.json has no compression "
                            "record): compress it with `compress apply RECIPE --format compressed-tensors`")
    if section.get("export_format"):
        raise CompressError(f"{checkpoint} is already a {section['export_format']} export")
    if not section.get("passes"):
        raise CompressError(f"{checkpoint} records no compression pass: its export would be the dense model")
    check_passes([(e["pass"], e.get("args") or {}) for e in section.get("passes", [])],  # before loading weights
                 advice=already_native_advice(read_config_json(folder)))
    # the folder of the model it was made from, complete or not (the export never reads it)
    _, original = source_record(folder)  # (None where the record names no model that is here)
    made_from = None
    if original:
        made_from = models.BUILTIN_ROOT / original.removeprefix("builtin:") if original.startswith("builtin:") \
            else Path(original)
    check_output(output, overwrite=overwrite, source=folder,
                 made_from=made_from if made_from is not None and made_from.exists() else None)
    check_plan(models.load(checkpoint, meta=True))  # layers it cannot express or would store all dense: no wait
    # the files the export copies, read before the model: an edited one failed after all the work
    recipe_file, report_file = folder / "recipe.yaml", folder / "report.json"
    try:
        report = json.loads(report_file.read_text(encoding="utf-8")) if report_file.is_file() else None
        if report is not None and not isinstance(report, dict):
            raise ValueError(f"a JSON {type(report).__name__}, not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CompressError(f"{report_file}: not readable JSON ({exc}); move it aside to export without it") from None
    try:
        recipe_text = recipe_file.read_text(encoding="utf-8") if recipe_file.is_file() else None
    except UnicodeDecodeError as exc:
        raise CompressError(f"{recipe_file}: not UTF-8 text ({exc}); move it aside to export without it") from None
    with phase(f"loading {checkpoint}"):
        model = models.load(checkpoint, dtype="stored")  # the files' dtype: least memory, and what the export writes
    # a progress bar over the layers (minutes at 7B: each is checked against compressed-tensors' decompression)
    summary = export(model, output, tokenizer=models.load_tokenizer(checkpoint, strict=False), overwrite=overwrite,
                     recipe_text=recipe_text, report=report, progress=True)
    result = {"checkpoint": str(checkpoint), "output": str(output), "format": export_format,
              "export": summary.to_dict(), "checkpoint_bytes": folder_bytes(Path(output)),
              "native_checkpoint_bytes": folder_bytes(folder)}  # (apply's "original" is its input model)
    if as_json:
        click.echo(json_out.dumps(result))
        return
    click.echo(f"exported: {output}  ({_mb(result['checkpoint_bytes'])} of weights, the native checkpoint "
               f"{_mb(result['native_checkpoint_bytes'])}, format {export_format})")
    if summary.dense_fallback:  # as apply --format compressed-tensors says it
        click.echo(stored_dense_line(summary.dense_fallback))
    if summary.note:  # (in --json: export.note, export.int_quantized)
        click.echo(f"note: {summary.note}")
