"""How the command line prints (rich tables on a terminal, sizes and numbers formatted one way everywhere), and the
checks of its arguments' text and values."""
from __future__ import annotations

import click


def _console():
    import shutil

    from rich.console import Console

    # piped or redirected output has no terminal width: rich would wrap at 80 columns and split lines mid-value.
    # markup and emoji codes off: what is printed holds the user's paths, recipe text and model names, where
    # `out_[v2]` or `[/]` is text, not a style (styles are given as rich Text / style=, never in the string)
    return Console(stderr=False, width=None if shutil.get_terminal_size((0, 0)).columns else 120, markup=False,
                   emoji=False)


def _print_wrapped(con, text: str, indent: int, hang: int, bold: str = "") -> None:
    """`text` wrapped to the console's width with a hanging indent (rich would continue a long line at column 0,
    where the next item's name is looked for); `bold`: a prefix of `text` printed in bold. Words are never split
    (a path or a value stays whole)."""
    import textwrap

    lines = textwrap.fill(text, width=max(con.width, 60), initial_indent=" " * indent,
                          subsequent_indent=" " * (indent + hang), break_long_words=False, break_on_hyphens=False)
    head = " " * indent + bold
    bolded = bold and lines.startswith(head)  # (a head that itself wraps stays plain rather than garbled)
    con.print(_bold(head, lines[len(head):]) if bolded else lines, soft_wrap=True)


def _bold(head: str, rest: str = ""):
    """`head` in bold, then `rest`, both as plain text (no markup is read from either)."""
    from rich.text import Text

    return Text.assemble((head, "bold"), rest)


def _table(title: str, columns: list[str], rows: list[list], caption: str | None = None):
    from rich.table import Table

    t = Table(title=title, caption=caption)
    for c in columns:  # fold, never cut: a narrow terminal showed task names as "agreem…" and intervals as "[-0.5…"
        t.add_column(c, justify="right" if c != columns[0] else "left", overflow="fold")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    return t


def _group_by_reason(skipped: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, reason in skipped.items():
        out.setdefault(reason, []).append(name)
    return out


def stored_dense_line(stored: dict[str, str]) -> str | None:
    """What a compressed-tensors export stored dense ({module: why}), grouped by the reason; None when nothing."""
    if not stored:
        return None
    parts = [f"{len(names)} layer{'s' if len(names) != 1 else ''} ({why}): {', '.join(names)}"
             for why, names in _group_by_reason(stored).items()]
    return "stored dense in compressed-tensors, " + "; ".join(parts)


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def _fmt(x) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def _quality_rows(ev: dict, ppl_baseline, ppl, kl_name: str) -> list[list]:
    """Perplexity, its change, KL and top-1 agreement; the change and the KL with their 95% intervals over windows
    where the evaluation has them."""
    rows = [["perplexity", _fmt(ppl_baseline), _fmt(ppl)]]
    if "kl" not in ev:
        return rows
    from .intervals import format_interval

    ci = "ppl_delta_pct_ci95" in ev
    if ci:
        rows.append(["perplexity change (95% CI)", "-",
                     f"{ev['ppl_delta_pct']:+.2f}% " + format_interval(ev["ppl_delta_pct_ci95"], "+.2f")])
    rows.append([kl_name, "0", _fmt(ev["kl"])])
    if ci:
        rows.append(["KL 95% CI", "-", format_interval(ev["kl_ci95"], ".4f")])
    return rows + [["top-1 agreement", "1", _fmt(ev["top1_agreement"])]]


def _print_eval(con, ev: dict) -> None:
    rows = _quality_rows(ev, ev.get("baseline_perplexity", "-"), ev["perplexity"], "KL(baseline || model)")
    caption = ev["protocol"] + (f"; baseline {ev['baseline']}" if ev.get("baseline") else "")
    con.print(_table("held-out evaluation", ["metric", "baseline", "model"], rows, caption=caption))
    kv = ev.get("kv_cache")
    if kv:
        rows = _quality_rows(kv, kv["ppl_reference"], kv["ppl"], "KL(uncompressed || compressed)")
        con.print(_table("with the compressed KV cache", ["metric", "uncompressed cache", "compressed cache"], rows,
                         caption=kv["protocol"]))


def _print_passes(con, result: dict, stored: str, export_format: str) -> None:
    """`compress apply`'s table of passes, then what each skipped, noted or made larger."""
    con.print(_table("passes", ["pass", "modules", "model before", "model after", "seconds"],
                     [[p["name"], p["num_modules"], _mb(p.get("stored_bytes_before")),
                       _mb(p.get("stored_bytes_after")), p["seconds"]] for p in result["passes"]],
                     caption=(f"model = the tensors the checkpoint stores, at its dtype ({stored})"
                              if export_format == "native" else f"model = the tensors a native checkpoint would "
                              f"store, at its dtype ({stored}); the {export_format} checkpoint's size is below")))
    for p in result["passes"]:
        found = _found(p)
        if found:
            con.print(f"{p['name']}: {found}")
        for reason, names in _group_by_reason(p.get("skipped") or {}).items():
            con.print(f"{p['name']} skipped {len(names)} module(s), {reason}: {', '.join(names[:3])}"
                      + (", ..." if len(names) > 3 else ""))
        for note in p.get("notes") or ():
            con.print(f"note: {p['name']}: {note}")
        before, after = p.get("stored_bytes_before"), p.get("stored_bytes_after")
        if before and after and after > 1.005 * before:  # e.g. int8 codes + scales replacing a packed sparse layer
            con.print(f"note: {p['name']} made the stored model larger ({_mb(before)} -> {_mb(after)})")


def _found(p: dict) -> str | None:
    """A pass's own result figures, said under the table (they were in --json / report.json only)."""
    d = p.get("details") or {}
    if p["name"] == "activation_sparsity" and "sparsity" in d and "ppl_increase" in d:
        return (f"{100 * d['sparsity']:.1f}% of the MLPs' neuron activations inactive on the calibration text, its "
                f"perplexity {100 * d['ppl_increase']:+.2f}% (budget +{100 * d.get('target_ppl_increase', 0):.2g}%)")
    kls = [(k.removeprefix("calibration_kl_").replace("_", "/"), d[k]) for k in
           ("calibration_kl_copy", "calibration_kl_scale_bias", "calibration_kl_distill") if k in d]
    if p["name"] == "vq_logits" and kls:
        kept = d.get("kept_stage")
        return ("calibration KL to the dense head: " + " -> ".join(f"{v:.4g} ({k})" for k, v in kls)
                + (f"; kept the {kept.replace('_', '/')} head, which fits the calibration text best" if kept else ""))
    return None


class ArgumentError(click.ClickException):
    """A command line the CLI refuses before parsing it: `error: ...`, exit 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def check_utf8_arguments(args) -> None:
    """Refuse (exit 2, one line) a command line with an argument that is not UTF-8 text."""
    bad = non_utf8_argument(args)
    if bad is not None:
        raise ArgumentError(f"the argument '{bad}' is not UTF-8 text; give paths and text in UTF-8")


def non_utf8_argument(args) -> str | None:
    """The first command-line argument that is not UTF-8 text (Python keeps such bytes as lone surrogates, which
    tokenizers, JSON and the printed summary cannot take), shown with its bytes escaped; None when all are."""
    for arg in args or ():
        if not isinstance(arg, str):
            continue
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            try:
                raw = arg.encode("utf-8", "surrogateescape")  # the bytes as given
            except UnicodeEncodeError:
                raw = arg.encode("utf-8", "backslashreplace")
            shown = raw.decode("utf-8", "backslashreplace")
            return shown if len(shown) <= 120 else shown[:60] + "..." + shown[-40:]
    return None


def _finite(param, value: float) -> float:
    import math

    if not math.isfinite(value):  # click's ranges let NaN through
        raise click.BadParameter(f"{value} is not a number in the allowed range", param=param)
    return value


def _non_empty(prompt: str) -> str:
    if not prompt:  # whitespace is a prompt ("\n": start a paragraph); nothing at all is not
        raise click.BadParameter("the prompt is empty; give some text to continue")
    return prompt
