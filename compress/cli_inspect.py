"""`compress inspect`: what a checkpoint holds (passes, bytes per component, the budget of weights and KV cache,
the runtime path per compressed layer, the recipe), as a dict and as the printed report."""
from __future__ import annotations

import json
from pathlib import Path

from .cli_format import _console, _mb, _print_wrapped, _table


def inspect_checkpoint(checkpoint: str, sparse_runtime: str, device: str | None) -> dict:
    """The report of `compress inspect --json`."""
    import torch

    from . import models
    from .checkpoint import verify_files
    from .checkpoint import folder_bytes
    from .inspection import bytes_by_component
    from .prune.runtime import runtime_plan

    path = models.resolve_model_path(checkpoint)
    section = models.compression_section(path) or {}
    model = models.load(checkpoint, meta=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    from .checkpoint import weight_files
    from .checkpoint_validation import check_weight_files
    from .checkpoint_validation import headers_float_dtype

    vllm_unloadable = []  # an export's formats vLLM builds no layer from
    if section.get("export_format") or _quantized_by_transformers(path, section):
        # transformers builds these layers (its compressed-tensors or bitsandbytes integration), or reads an export
        # whose layers all stayed dense (no quantization_config): the meta model is the dense one at the storage
        # dtype, so the files are checked for damage and counted from their headers
        from .budget import original_headers
        from .checkpoint_validation import check_export_quantization, read_config_json
        from .inspection import bytes_by_component_from_headers

        headers = check_weight_files(path, weight_files(path))
        # (the layers an export stored dense in float32 are not the model's dtype: they could outweigh the rest)
        stored_as = headers_float_dtype(original_headers(headers, section)) or model.compress_storage_dtype
        quantization = read_config_json(path).get("quantization_config")
        if section.get("export_format") and isinstance(quantization, dict):
            check_export_quantization(path, quantization, headers, model)
            from .export.compressed_tensors import vllm_unloadable_formats

            vllm_unloadable = vllm_unloadable_formats(quantization)
        comps = bytes_by_component_from_headers(headers)
        paths = {}
    else:
        verify_files(path, model)  # a damaged weight file is an error here too, without reading the tensors
        headers = check_weight_files(path, weight_files(path))
        # each tensor at the dtype its file holds: config.json's dtype may differ, one file may hold several
        stored_as = headers_float_dtype(headers) or model.compress_storage_dtype
        comps = bytes_by_component(model, storage_dtype=stored_as, headers=headers)
        paths = runtime_plan(model, sparse_runtime, device)
        comps.update(_extra_folder_components(path, section, model))
    recipe, recipe_problem = _stored_recipe(path)
    findings, report_problem = _stored_findings(path)
    from .budget import budget

    return {"checkpoint": str(path), "compression": section, "components": comps,
            "budget": budget(model, section, stored_as, comps, headers),
            "checkpoint_bytes": folder_bytes(path), "recipe": recipe, "recipe_problem": recipe_problem,
            "findings": findings, "report_problem": report_problem, "vllm_unloadable": vllm_unloadable,
            "runtime": {"device": device, "sparse_runtime": sparse_runtime, "paths": paths}}


def print_inspection(result: dict) -> None:
    """The report as `compress inspect` prints it."""
    path, section, comps = result["checkpoint"], result["compression"], result["components"]
    paths, recipe = result["runtime"]["paths"], result["recipe"]
    device, sparse_runtime = result["runtime"]["device"], result["runtime"]["sparse_runtime"]
    con = _console()
    passes = section.get("passes", [])
    layout = (f"a {section['export_format']} export ({_loaders(result.get('vllm_unloadable'))}), "
              if section.get("export_format") else "")
    _print_wrapped(con, f"{path}  {layout}format {section.get('format_version', '-')}, compress "
                        f"{section.get('library_version', '-')}, calibration {section.get('calibration_hash') or '-'}",
                   indent=0, hang=2, bold=str(path))
    if section.get("source_model"):  # the model first compressed (a recipe's `model:` may have been overridden)
        _print_wrapped(con, f"original model: {section['source_model']}", indent=2, hang=4)
    dense = list((section.get("export") or {}).get("stored_dense") or ())
    if dense:
        _print_wrapped(con, f"stored dense (compressed-tensors needs whole groups): {', '.join(dense[:3])}"
                       + (f" and {len(dense) - 3} more" if len(dense) > 3 else ""), indent=2, hang=4)
    for e in passes:
        _print_wrapped(con, f"pass {e['pass']}: " + ", ".join(f"{k}={v}" for k, v in (e.get("args") or {}).items()),
                       indent=2, hang=4)
    for name, text in result.get("findings") or []:
        _print_wrapped(con, f"{name} found: {text}", indent=2, hang=4)
    if result.get("report_problem"):
        _print_wrapped(con, f"what the passes found: not shown: {result['report_problem']}", indent=2, hang=4)
    if not passes:
        con.print("  no compression passes (a dense model)")
    total = {k: sum(v[k] for v in comps.values()) for k in ("dense", "compressed")}
    rows = [[c, _mb(v["dense"]), _mb(v["compressed"])] for c, v in sorted(comps.items())]
    rows.append(["total", _mb(total["dense"]), _mb(total["compressed"])])
    con.print(_table("bytes per component", ["component", "dense", "compressed"], rows,
                     caption="at the dtypes the files hold"))
    _print_budget(con, result["budget"])
    con.print(f"safetensors on disk: {_mb(result['checkpoint_bytes'])}")
    if paths:
        con.print(_table(f"runtime path per layer on {device} (sparse runtime {sparse_runtime})", ["module", "path"],
                         [[name, p] for name, p in paths.items()]))
    if recipe:
        con.print("recipe:\n" + recipe)
    elif result.get("recipe_problem"):
        con.print(f"recipe: not shown: {result['recipe_problem']}")


def _loaders(vllm_unloadable: list[str] | None) -> str:
    """Who loads an export: vLLM builds no weight-only layer from an int-quantized group (asymmetric codes)."""
    if not vllm_unloadable:
        return "transformers and vLLM load it"
    return (f"transformers loads it; vLLM does not: its {'/'.join(vllm_unloadable)} layers (asymmetric codes) have no "
            "vLLM scheme, symmetric: true exports pack-quantized")


def _stored_findings(path: Path) -> tuple[list[tuple[str, str]], str | None]:
    """([(pass, what it found)], None) from the report.json `compress apply` writes beside the weights (activation
    sparsity's inactive share and calibration perplexity, VQ-Logits' calibration KLs: cli_format._found), or ([],
    why it cannot be read). No report.json (a checkpoint saved from Python): ([], None)."""
    from .cli_format import _found

    f = path / "report.json"
    if not f.exists():
        return [], None
    try:
        passes = json.loads(f.read_text(encoding="utf-8")).get("passes") or []
        found = [(p["name"], _found(p)) for p in passes]
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError) as exc:
        return [], f"{f} cannot be read ({type(exc).__name__})"
    return [(name, text) for name, text in found if text], None


def _stored_recipe(path: Path) -> tuple[str | None, str | None]:
    """(the recipe.yaml a checkpoint stores, None), or (None, why it cannot be shown): an unreadable or edited recipe
    is said in the report, the rest of it (the weights, the budget) still inspects. (None, None): no recipe stored."""
    f = path / "recipe.yaml"
    if not f.exists():
        return None, None
    try:
        raw = f.read_bytes()
    except OSError as exc:
        return None, f"{f} cannot be read ({exc.strerror or type(exc).__name__})"
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return None, f"{f}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x})"


def _extra_folder_components(path: Path, section: dict, model) -> dict:
    """Tensors a pass keeps in its own folder (an unmerged LoRA adapter) that the meta model does not hold: one
    component per folder, counted from the files' headers, so the budget's total is what the checkpoint stores."""
    from .checkpoint import extra_folders
    from .checkpoint_validation import header_nbytes, read_header

    if any(".lora_A." in name for name in model.state_dict()):
        return {}  # already counted with the model's tensors
    out = {}
    for folder in extra_folders(path, section):
        total = sum(header_nbytes(*info) for f in folder.glob("*.safetensors") for info in read_header(f).values())
        if total:
            out[f"{folder.name} (own folder)"] = {"dense": total, "compressed": 0}
    return out


def _quantized_by_transformers(path, section: dict) -> bool:
    """A folder whose quantized layers transformers builds from config.json's quantization_config: a
    compressed-tensors export, or a quantized folder no compress quantize pass wrote (e.g. transformers' own
    bitsandbytes save, whose double-quant tensors compress's layers do not hold). `section`: its compression record."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(quantization, dict):
        return False
    ours = any(isinstance(e, dict) and e.get("pass") == "quantize" for e in section.get("passes") or [])
    return quantization.get("quant_method") == "compressed-tensors" or not ours


def _print_budget(con, b: dict) -> None:
    """One table: weights per component (the head on its own line), then the KV cache per token."""
    def ratio(new, old):
        return f"{new / old:.3f}x" if old else "-"

    rows = [[c, _mb(v["original"]), _mb(v["stored"]), ratio(v["stored"], v["original"])]
            for c, v in b["weights"].items()]
    t = b["weights_total"]
    rows.append(["weights total", _mb(t["original"]), _mb(t["stored"]), ratio(t["stored"], t["original"])])
    kv = b["kv_per_token"]
    kv_stored = kv["compressed"] if kv["compressed"] is not None else kv["uncompressed"]
    rows.append([f"KV cache per token ({kv.get('cache', 'uncompressed')})", f"{kv['uncompressed']:.0f} B",
                 f"{kv_stored:.0f} B", ratio(kv_stored, kv["uncompressed"])])
    small = lambda n: _mb(n) if n >= 1e6 else f"{n / 1e3:.1f} KB"  # noqa: E731 (a tiny model's state: a few KB)
    if kv.get("recurrent_bytes"):
        rows.append(["recurrent state, any length (batch 1)", "-", small(kv["recurrent_bytes"]), "-"])
    at = kv.get("total_at")
    if at and at["compressed"] is not None:  # a constant state can outweigh a sliding window's capped cache
        rows.append([f"KV cache + states at {at['tokens']} tokens (batch 1)", small(at["uncompressed"]),
                     small(at["compressed"]), ratio(at["compressed"], at["uncompressed"])])
    measured = f"measured over {kv['tokens_measured']} tokens"
    if kv.get("tokens_cycle"):
        first, last = kv["tokens_cycle"]
        measured = (f"compressed: mean over {first}-{last} tokens (the uncompressed window of recent tokens in every "
                    f"state it takes), {kv['compressed_min']:.0f}-{kv['compressed_max']:.0f} B")
    con.print(_table("budget", ["", "original", "compressed", "ratio"], rows,
                     caption=f"weights at the dtypes the files hold; KV at fp16, {measured}"))
