"""Where a model stands on in-context copying: on random token spans repeated once, the loss of the first and the
second copy (a copier's second copy costs far less), greedy accuracy on the second copy, and for chosen heads the
attention they put on the copy target and the top-1 of their direct path (the head's output read through the final
norm and the LM head). This is what `scripts/train_small.py --supervise-heads` trains; the numbers in README.md's
builtin:small section are this script's output.

    python scripts/copy_diagnostics.py [MODEL] [--heads 5:0,6:4] [--spans 8]
"""
from __future__ import annotations

import argparse

import torch

from compress.bench_args import head_pairs, heads_problem, positive_int, run_cli


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="builtin:small")
    ap.add_argument("--heads", type=head_pairs, default=head_pairs("5:0,6:4"), help="layer:head pairs, e.g. 5:0,6:4")
    ap.add_argument("--spans", type=positive_int, default=8)
    args = ap.parse_args(argv)
    import compress

    config = compress.load(args.model, meta=True).config  # the heads are checked before the weights load
    problem = heads_problem(args.heads, config)
    if problem:
        ap.error(f"--heads {problem}")
    model = compress.load(args.model, dtype="float32")
    model.set_attn_implementation("eager")  # attention probabilities are read below
    heads = args.heads
    captured = {}
    for layer in {l for l, _ in heads}:
        model.model.layers[layer].self_attn.o_proj.register_forward_hook(
            lambda mod, a, out, layer=layer: captured.__setitem__(layer, a[0]))
    d = model.config.head_dim
    for length in (32, 128):
        span = torch.randint(100, model.config.vocab_size, (args.spans, length), generator=torch.Generator().manual_seed(0))
        ids = torch.cat([span, span], 1)
        out = model(ids, output_attentions=True)
        nll = -out.logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        acc = (out.logits[:, length:-1].argmax(-1) == ids[:, length + 1:]).float().mean()
        line = (f"span {length}: nll first copy {nll[:, :length - 1].mean():.2f}, second copy "
                f"{nll[:, length:].mean():.2f}, greedy accuracy {acc:.3f}")
        for layer, head in heads:
            attn = out.attentions[layer][:, head]
            on_target = torch.stack([attn[:, t, t - length + 1] for t in range(length, 2 * length)]).mean()
            o_proj = model.model.layers[layer].self_attn.o_proj
            part = captured[layer][..., head * d:(head + 1) * d] @ o_proj.weight[:, head * d:(head + 1) * d].T
            direct = model.lm_head(model.model.norm(part))[:, length:-1].argmax(-1)
            line += (f" | head {layer}:{head} attention on target {on_target:.2f}, direct top-1 "
                     f"{(direct == ids[:, length + 1:]).float().mean():.3f}")
        print(line)


if __name__ == "__main__":
    run_cli(main)
