"""Stage 3 of builtin:small: fit the copy heads' value/output projections and the LM head on frozen features, so
the heads that already attend to the copy target (scripts/train_small.py --supervise-heads) also carry the token.

Why: after supervised training the heads 5:0 and 6:4 put 0.94-0.97 of their attention on the induction target, yet
their direct path (head output -> final norm -> lm_head) picks the right token only 4-5% of the time. With the LM
head frozen, even a full-rank linear map from the token embeddings to it reaches ~5% top-1: the untied embedding and
unembedding of an 8,192-token vocabulary were never aligned, and each unembedding row only moves when its token is
the label, so full-model steps (2.3k tokens each) align them very slowly. On frozen features one Adam step covers
1,024 random tokens per head at ~1.4 s (one core), so the alignment that full training would take hours for is fit in ~20
minutes:

    loss = mean over heads of CE(lm_head(norm(W_O,h W_V,h x_t)), token_t)       (x_t: the layer's input at a random
         + KL(lm_head_0(f) || lm_head(f))                                        token t; f: final hidden states
                                                                                 on natural text)
The KL term keeps the LM head's predictions on natural text (a cross-entropy on the 50k calibration tokens instead
overfits them: held-out CE 4.50 -> 6.80). The fitted output projections are then scaled by `--scale` (the head's
share of the residual stream has to dominate the final norm on copy positions) and the model is trained end to end
again (train_small.py --init-from OUT --supervise-heads ...), which re-balances that scale against natural text.

    python scripts/fit_copy_heads.py --init-from DIR --out DIR [--heads 5:0,6:4] [--steps 800] [--scale 12]
                                     [--numbers 0.5]    # phase 4: digits too (pass keys), scale 1

Prints the direct path's top-1 on held-out random tokens and the KL every 100 steps, then the full model's greedy
accuracy on the second copy of 8 random 128-token spans at the chosen scale.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from compress.bench_args import (head_pairs, heads_problem, nonnegative_float, nonnegative_int, positive_float,
                                 positive_int, run_cli)
from compress.calibration import builtin_text


def share(text: str) -> float:
    """An argparse type: a share in [0, 1]."""
    value = nonnegative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{value} must be at most 1")
    return value


def layer_inputs(model, layers: list[int], ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """The normalized input of each layer's v_proj at every position of `ids`, [N, hidden]."""
    cap: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    hooks = [model.model.layers[layer].self_attn.v_proj.register_forward_pre_hook(
        lambda m, a, layer=layer: cap[layer].append(a[0].detach())) for layer in layers]
    try:
        with torch.no_grad():
            for i in range(0, len(ids), 16):
                model(ids[i:i + 16])
    finally:
        for h in hooks:
            h.remove()
    return {layer: torch.cat(v).reshape(-1, model.config.hidden_size) for layer, v in cap.items()}


def arguments_problem(args) -> str | None:
    """What makes the run fail, found before ~20 minutes of fitting: --init-from must be a model folder with the
    training.json copied at the end; --out gets the model's files written over its own, so it must be new, empty,
    or a model folder this script or train_small.py wrote (its training.json)."""
    src = args.init_from
    if not (src / "config.json").is_file():
        return f"--init-from {src}: {'no such folder' if not src.exists() else 'not a model folder (no config.json)'}"
    if not (src / "training.json").is_file():
        return f"--init-from {src}: no training.json (a folder written by scripts/train_small.py)"
    out = args.out
    folder = next((f for f in (out, *out.parents) if f.exists()), None)
    if folder is not None and not folder.is_dir():
        return f"--out {out}: {folder} is a file, not a folder"
    if out.is_dir() and any(out.iterdir()) and not (out / "training.json").is_file():
        return f"--out {out}: a folder holding files this script did not write (no training.json); choose another"
    return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init-from", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--heads", type=head_pairs, default=head_pairs("5:0,6:4"), help="layer:head pairs, e.g. 5:0,6:4")
    ap.add_argument("--sequences", type=positive_int, default=512, help="random 256-token sequences of features")
    ap.add_argument("--steps", type=nonnegative_int, default=800)
    ap.add_argument("--lr", type=positive_float, default=3e-3)
    ap.add_argument("--scale", type=positive_float, default=12.0)
    ap.add_argument("--numbers", type=share, default=0.0,
                    help="share of the feature sequences that are lists of random numbers instead of random ids: "
                         "a pass key's digit tokens (ids 16-25 and their merges) are below the random ids' range")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=positive_int, default=1)
    args = ap.parse_args(argv)
    problem = arguments_problem(args)
    if problem:
        ap.error(problem)
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    problem = heads_problem(args.heads, AutoConfig.from_pretrained(args.init_from))
    if problem:
        ap.error(f"--heads {problem}")

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model = LlamaForCausalLM.from_pretrained(args.init_from, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.init_from)
    cfg = model.config
    heads = args.heads
    d, group = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    start = time.time()
    ids = torch.randint(100, cfg.vocab_size, (args.sequences, 256))
    for row in range(int(args.numbers * args.sequences)):
        numbers = " ".join(str(n) for n in torch.randint(10, 100_000, (200,)).tolist())
        ids[row] = torch.tensor(tok(" " + numbers, add_special_tokens=False)["input_ids"][:256])
    ids = ids[torch.randperm(len(ids))]  # the held-out tenth gets both kinds
    feats = layer_inputs(model, sorted({layer for layer, _ in heads}), ids)
    text = builtin_text("builtin:calibration")  # (tiny's file: builtin:small keeps no copy)
    nat = tok(text)["input_ids"]
    nat = torch.tensor(nat[:len(nat) // 256 * 256]).view(-1, 256)
    with torch.no_grad():
        final = torch.cat([model.model(nat[i:i + 16]).last_hidden_state for i in range(0, len(nat), 16)])
    final = final.reshape(-1, cfg.hidden_size)
    print(f"features: {len(ids.view(-1))} random tokens, {len(final)} natural ({time.time() - start:.0f}s)", flush=True)

    labels = ids.reshape(-1)
    train = int(0.9 * len(labels))
    lm0 = model.lm_head.weight.detach().clone()
    params = {"lm_head": lm0.clone().requires_grad_()}
    for layer, h in heads:
        attn = model.model.layers[layer].self_attn
        kv = h // group  # GQA: this value slice is shared by the group's query heads; later training re-balances
        params[f"{layer}.v"] = attn.v_proj.weight[kv * d:(kv + 1) * d].detach().clone().requires_grad_()
        params[f"{layer}.o"] = attn.o_proj.weight[:, h * d:(h + 1) * d].detach().clone().requires_grad_()
    opt = torch.optim.Adam(params.values(), lr=args.lr)

    def direct(layer: int, x: torch.Tensor) -> torch.Tensor:
        return model.model.norm(x @ params[f"{layer}.v"].T @ params[f"{layer}.o"].T) @ params["lm_head"].T

    for step in range(args.steps + 1):
        i = torch.randint(0, train, (1024,))
        j = torch.randint(0, len(final), (1024,))
        copy = sum(F.cross_entropy(direct(layer, feats[layer][i]), labels[i]) for layer, _ in heads) / len(heads)
        kl = F.kl_div((final[j] @ params["lm_head"].T).log_softmax(-1), (final[j] @ lm0.T).log_softmax(-1),
                      log_target=True, reduction="batchmean")
        opt.zero_grad()
        (copy + kl).backward()
        opt.step()
        if step % 100 == 0:
            with torch.no_grad():
                top1 = [(direct(layer, feats[layer][train:train + 2000]).argmax(-1) == labels[train:train + 2000])
                        .float().mean().item() for layer, _ in heads]
                digit = (labels[train:] >= 16) & (labels[train:] <= 25)  # single-digit tokens '0'-'9'
                digit_top1 = [(direct(layer, feats[layer][train:][digit]).argmax(-1) == labels[train:][digit])
                              .float().mean().item() for layer, _ in heads] if digit.any() else []
            print(f"step {step} copy CE {copy.item():.3f} held-out direct top-1 "
                  f"{' '.join(f'{t:.3f}' for t in top1)} (digits {' '.join(f'{t:.3f}' for t in digit_top1)}) "
                  f"KL {kl.item():.3f} {time.time() - start:.0f}s", flush=True)

    with torch.no_grad():
        model.lm_head.weight.copy_(params["lm_head"])
        for layer, h in heads:
            attn = model.model.layers[layer].self_attn
            kv = h // group
            attn.v_proj.weight[kv * d:(kv + 1) * d] = params[f"{layer}.v"]
            attn.o_proj.weight[:, h * d:(h + 1) * d] = params[f"{layer}.o"] * args.scale
        span = torch.randint(100, cfg.vocab_size, (8, 128), generator=torch.Generator().manual_seed(1))
        both = torch.cat([span, span], 1)
        acc = (model(both).logits[:, 128:-1].argmax(-1) == both[:, 129:]).float().mean().item()
    print(f"scale {args.scale}: greedy accuracy on the second copy {acc:.3f}", flush=True)
    model.to(torch.bfloat16).save_pretrained(args.out, max_shard_size="15MB")
    tok.save_pretrained(args.out)
    for name in ("generation_config.json",):
        if (args.init_from / name).exists():
            shutil.copy(args.init_from / name, args.out / name)
    record = {"phase": "scripts/fit_copy_heads.py",
              **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "heads": ",".join(f"{layer}:{head}" for layer, head in args.heads),  # as given, e.g. 5:0,6:4
              "copy_greedy_after": acc, "seconds": round(time.time() - start),
              "previous_phase": json.loads((args.init_from / "training.json").read_text())}
    (args.out / "training.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    run_cli(main)
