"""Options and helpers that several `compress` commands share."""
from __future__ import annotations

import click

from .cli_format import _mb


_DTYPE = click.option(
    "--dtype", default="auto", show_default=True,
    type=click.Choice(["auto", "stored", "float32", "bfloat16", "float16"]),
    help="Compute dtype: auto = the checkpoint's dtype where the device computes it natively, float32 on CPUs without "
         "native bf16/fp16; stored = always the checkpoint's dtype (least memory). Checkpoints keep their dtype.")


_SPARSE_RUNTIME = click.option(
    "--sparse-runtime", default="auto", show_default=True, type=click.Choice(["auto", "dense", "packed"]),
    help="How pruned layers run: dense = decoded once at load (dense speed, packed on disk), packed = smallest "
         "memory (C kernels on the CPU, faster than dense when decoding large layers), auto = packed on CUDA and "
         "for large layers on the CPU (float32; bf16 where the CPU has AVX512-BF16 and VBMI2), dense otherwise.")


def _device_read(who: str) -> click.Option:
    return click.option(
        "--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]),
        help=f"Device {who} on: cuda runs compressed layers and caches on their GPU kernels (the model must fit "
             "the GPU; not with --max-memory).")


_DEVICE_READ = _device_read("the model (and a baseline) run")
_DEVICE_GENERATE = _device_read("the model runs")  # (generate has no baseline)


def _check_read_device(device: str, max_memory: str | None) -> None:
    """--device cuda needs a GPU torch sees, and a model held whole on it (--max-memory leaves layers on disk and the
    rest in CPU memory): both said before anything loads."""
    from .bench_args import check_device
    from .errors import CompressError

    check_device(device)
    if device == "cuda" and max_memory:
        raise CompressError("--max-memory runs a model larger than memory on the CPU; with --device cuda the model "
                            "must fit the GPU: drop one of the two")


def _max_memory_read(baseline: str) -> click.Option:
    return click.option(
        "--max-memory", default=None,
        help="Cap the CPU memory the weights take (e.g. 8GB): decoder layers that do not fit are read from the "
             f"checkpoint's files for each forward (slow, for models larger than memory){baseline}.")


_MAX_MEMORY_READ = _max_memory_read("; a baseline gets its own cap")
_MAX_MEMORY_GENERATE = _max_memory_read("")


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
