"""Which modules a pass touches. A pattern is a module class name (`Linear`), a regex over dotted module names
(`re:.*mlp.*`), or an exact dotted name (`model.layers.0.mlp.down_proj`). `ignore` wins over `targets`."""
from __future__ import annotations

import difflib
import re
from typing import Iterable

from torch import nn

from .errors import TargetError


def check_patterns(patterns: list[str]) -> list[str]:
    """Validate patterns without a model (recipe validation): a `re:` pattern must compile."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            pattern_matcher(pattern)
    return patterns


def is_class_pattern(pattern: str) -> bool:
    return not pattern.startswith("re:") and "." not in pattern and pattern[:1].isupper()


def pattern_matcher(pattern: str):
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as exc:
            raise TargetError(f"target {pattern!r} is not a valid regex ({exc}); write e.g. 're:.*mlp.*'") from None
        return lambda name, module: rx.fullmatch(name) is not None
    if not is_class_pattern(pattern):
        return lambda name, module: name == pattern
    return lambda name, module: any(cls.__name__ == pattern for cls in type(module).__mro__)


# what passes leave out unless told otherwise (a model without such modules is fine: not a typo of the user's)
DEFAULT_IGNORE = ("re:.*lm_head", "re:.*embed_tokens")
EXEMPT = "compress_exempt"  # attribute of a module no compression pass may take: its reason (a string)


def match_modules(
    model: nn.Module, targets: Iterable[str], ignore: Iterable[str] = (), *, require_all: bool = True,
    include_exempt: bool = False,
) -> dict[str, nn.Module]:
    """Modules matched by any of `targets` and none of `ignore`, by dotted name, in model order. Modules a pass
    added for its own math (MoM's router: `EXEMPT`) are never matched unless `include_exempt` (recover's
    train_modules): quantizing or pruning them would break the layer that reads their weight.

    With `require_all`, a target pattern that matches no module at all is an error naming the closest names."""
    every = [(n, m) for n, m in model.named_modules() if n]
    named = every if include_exempt else [(n, m) for n, m in every if not getattr(m, EXEMPT, None)]
    targets, ignore = list(targets), list(ignore)
    target_fns = [(p, pattern_matcher(p)) for p in targets]
    ignore_fns = [pattern_matcher(p) for p in ignore]
    if require_all:
        for pattern, fn in target_fns:
            hit = [(n, m) for n, m in named if fn(n, m)]
            if not hit:
                exempt = next((f"{n} ({getattr(m, EXEMPT)})" for n, m in every if fn(n, m)), None)
                raise TargetError(f"target {pattern!r} matches no module"
                                  + (f" passes may compress; it names {exempt}" if exempt else closest(pattern, model)))
            if is_class_pattern(pattern):  # ("Linear" once earlier passes replaced all but the ignored head)
                continue
            ignoring = next((p for p, ig in zip(ignore, ignore_fns) if all(ig(n, m) for n, m in hit)), None)
            if ignoring is not None:  # (said "matches no Linear layer" of an lm_head the default ignore left out)
                why = (" (the default ignore keeps the head and the embeddings as they are): set the pass's ignore "
                       "without it, e.g. ignore: []" if ignoring in DEFAULT_IGNORE else ": drop one of the two")
                raise TargetError(f"target {pattern!r} names only modules ignore {ignoring!r} leaves out{why}")
        for pattern, fn in zip(ignore, ignore_fns):  # a typo left out nothing, silently
            # (a class name may be one an earlier pass creates: SparseLinear, to quantize what prune left dense)
            if pattern not in DEFAULT_IGNORE and not is_class_pattern(pattern) and not any(fn(n, m) for n, m in every):
                raise TargetError(f"ignore {pattern!r} matches no module{closest(pattern, model)}")
    return {
        n: m
        for n, m in named
        if any(fn(n, m) for _, fn in target_fns) and not any(fn(n, m) for fn in ignore_fns)
    }


def within(name: str, module: str) -> bool:
    """Module path `name` is `module` or a module inside it."""
    return name == module or name.startswith(module + ".")


def closest(pattern: str, model: nn.Module) -> str:
    names = [n for n, _ in model.named_modules() if n]
    classes = sorted({type(m).__name__ for _, m in model.named_modules()})
    key = pattern
    if pattern.startswith("re:"):  # the regex's longest literal word against the modules' own names ("re:.*q_prj$"
        # was compared whole to full paths and suggested ModuleList)
        key = max(re.findall(r"[A-Za-z0-9_]+", pattern[3:]) or [""], key=len)
        names = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
    if pattern.startswith("re:") and not pattern.startswith("re:.*") and key in names and any(
            pattern_matcher("re:.*" + pattern[3:])(n, None) for n, _ in model.named_modules() if n):
        # a leaf name written as the regex: it is matched against the whole dotted name
        return f"; re: patterns match the whole dotted name: write 're:.*{pattern[3:]}'"
    close = difflib.get_close_matches(key, names + classes, n=3, cutoff=0.4)
    if close:
        return f"; closest module names: {', '.join(close)}"
    return f"; module classes here: {', '.join(classes[:12])}"
