"""Train the reference model `builtin:small`: a Llama-family model that can copy and retrieve in context.

Same family as `builtin:tiny` (Llama, GQA, RoPE, SwiGLU, untied head) and the same 8192-token byte-level BPE
tokenizer, so both models share the held-out and calibration slices and every protocol compares like with like.

    apt-get install python3.11-doc manpages manpages-dev
    python scripts/train_small.py --threads 1          # ~100 min on one AVX2 core; prints the curve as it goes

Data recipe (all from Debian packages in main, licences in their copyright files):
- python3.11-doc's reST sources (PSF-2.0), split exactly as for builtin:tiny: a document is held out when
  sha1(relative path) mod 10 == 0; `heldout.txt` / `calibration.txt` are tiny's slices, copied.
- the English man pages of `manpages` and `manpages-dev` 6.03 (roff sources, GPL-2+ and per-page permissive
  licences), same hold-out rule on their path; `.so` redirect stubs skipped.
- a share (`--synthetic`, default 0.3) of sequences built to teach in-context copying and retrieval, so induction
  heads form: (1) a random-token span repeated later in natural text (the copy probe's shape), (2) a natural-text
  span repeated, (3) a pass key sentence buried at a random depth in natural text and asked for at the end
  (`compress.eval.probes.passkey_prompt`'s wording), (4) key-value lists queried at the end. The loss covers every
  token (spans are unpredictable on first sight, predictable on the repeat: that gap is what trains copying).

Schedule: `--steps` at `--seq-len` then `--long-steps` at `--long-seq-len` (2048, the model's context), AdamW with a
warmup and one cosine over both phases, fp32 (bf16 autocast is 13x slower on CPUs without AVX512-BF16), seed fixed. Checkpoints are written at every evaluation so
an interrupted run still leaves the latest model; `training.json` records where it stopped and what it measured.
"""
from __future__ import annotations

import argparse
import fnmatch
import gzip
import hashlib
import json
import math
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from train_tiny import heldout_perplexity, optimizer_step, train_step  # the same step and measure as builtin:tiny's, in fp32

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "compress" / "builtin" / "tiny"
DOCS = Path("/usr/share/doc/python3.11/html/_sources")
MAN_PACKAGES = ("manpages", "manpages-dev")


def held_out(rel: str) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 10 == 0


def python_docs() -> tuple[list[str], list[str]]:
    train, held = [], []
    for path in sorted(DOCS.rglob("*.rst.txt")):
        rel = path.relative_to(DOCS).as_posix()
        (held if held_out(rel) else train).append(path.read_text(encoding="utf-8", errors="replace"))
    return train, held


def man_pages() -> tuple[list[str], list[str]]:
    files = subprocess.run(["dpkg", "-L", *MAN_PACKAGES], capture_output=True, text=True, check=True).stdout.split()
    train, held = [], []
    for f in sorted(set(files)):
        p = Path(f)
        if not (f.startswith("/usr/share/man/man") and f.endswith(".gz") and p.is_file() and not p.is_symlink()):
            continue
        text = gzip.decompress(p.read_bytes()).decode("utf-8", errors="replace")
        if text.startswith(".so ") or len(text) < 300:
            continue
        (held if held_out(p.relative_to("/usr/share/man").as_posix()) else train).append(text)
    return train, held


def model_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=8192, hidden_size=384, intermediate_size=1152, num_hidden_layers=8,
        num_attention_heads=6, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )


def copy_positions(n: int, positions) -> list[bool]:
    """Per input position: whether its next token can be copied from earlier in the sequence (the positions where
    supervised_step supervises the heads); positions cut off by the sequence end are dropped."""
    out = [False] * n
    for pos in positions:
        if pos < n:
            out[pos] = True
    return out


class Mixture:
    """Draws training sequences: natural windows, and with probability `synthetic` one of four copy/retrieval
    shapes embedded in natural text."""

    def __init__(self, ids: torch.Tensor, tokenizer, synthetic: float, seed: int, kinds: list[str] | None = None,
                 mask_first: bool = False):
        self.ids, self.tok, self.synthetic, self.mask_first = ids, tokenizer, synthetic, mask_first
        self.kinds = [getattr(self, k) for k in (kinds or ["copy_random", "copy_natural", "passkey", "kv_recall"])]
        self.rng = random.Random(seed)
        self.vocab = tokenizer.vocab_size

    def natural(self, n: int) -> list[int]:
        o = self.rng.randrange(0, self.ids.numel() - n - 1)
        return self.ids[o:o + n].tolist()

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def fill(self, parts: list[list[int]], n: int, unscored: tuple[int, ...] = ()) -> tuple[list[int], list[bool]]:
        """Natural text between and around `parts` (kept in order) to exactly n tokens, and a flag per token:
        False for the tokens of parts[i], i in `unscored` (a random span's first sight: unpredictable, so its loss
        only teaches the head a uniform distribution over ids and drags natural-text perplexity)."""
        used = sum(len(p) for p in parts)
        free = max(0, n - used)
        self.offsets = []  # where each part starts, for the copy positions of the natural-text kinds
        cuts = sorted(self.rng.randint(0, free) for _ in range(len(parts)))
        gaps = [b - a for a, b in zip([0] + cuts, cuts + [free])]
        out: list[int] = []
        scored: list[bool] = []
        for i, (gap, part) in enumerate(zip(gaps, parts + [[]])):
            out += self.natural(gap) if gap else []
            scored += [True] * gap
            if i < len(parts):
                self.offsets.append(len(out))
            out += part
            scored += [i not in unscored] * len(part)
        return out[:n], scored[:n]

    def copy_random(self, n: int) -> list[int]:
        span = [self.random_token() for _ in range(self.rng.randint(8, min(256, n // 3)))]
        return self.fill([span, span], n, unscored=(0,) if self.mask_first else ())

    def random_token(self) -> int:
        return self.rng.randrange(100, self.vocab)

    def repeat_random(self, n: int) -> tuple[list[int], list[bool], list[bool]]:
        """A short random span repeated to fill the sequence: every token after the first copy is predictable by
        copying, the densest signal for forming induction heads (the first copy is unscored)."""
        length = self.rng.randint(4, max(4, n // 2))  # up to half the sequence: copies over every distance
        span = [self.random_token() for _ in range(length)]
        out = (span * (n // length + 1))[:n]
        return out, [i >= length for i in range(n)], [t >= length for t in range(n)]

    def copy_natural(self, n: int) -> tuple[list[int], list[bool], list[bool]]:
        """A natural-text span repeated; inside the repeat each next token is the one after the same position of
        the first copy (a natural span's tokens recur elsewhere, so matching needs the prefix: the skill that
        pass-key retrieval uses and random spans do not teach)."""
        return self.repeat_span(self.natural(self.rng.randint(16, min(256, n // 3))), n)

    def copy_numbers(self, n: int) -> tuple[list[int], list[bool], list[bool]]:
        """A list of random numbers repeated: copying the digit tokens (ids 16-25 and their merges) that a pass key
        is made of, which random spans (ids >= 100) never contain."""
        numbers = " ".join(str(self.rng.randrange(10, 100_000)) for _ in range(self.rng.randint(4, 40)))
        return self.repeat_span(self.encode(" " + numbers), n)

    def repeat_span(self, span: list[int], n: int) -> tuple[list[int], list[bool], list[bool]]:
        out, scored = self.fill([span, span], n)
        second = self.offsets[1]
        return out, scored, copy_positions(n, range(second, second + len(span) - 1))

    def passkey(self, n: int) -> tuple[list[int], list[bool], list[bool]]:
        """A pass-key needle in natural text and the question with its answer at the end; the question's last
        token and each answer token are copy positions (their next token is a key token of the needle)."""
        from compress.eval.probes import passkey_parts

        key = self.rng.randrange(10_000, 100_000)
        needle, question, answer = (self.encode(p) for p in passkey_parts(key))
        out, scored = self.fill([needle, question + answer], n)
        digits = answer[:-1]  # the key's tokens, without the closing period
        if not any(needle[i:i + len(digits)] == digits for i in range(len(needle))):
            return out, scored, [False] * n  # the key tokenizes differently inside the sentence: nothing to copy
        asked = self.offsets[1] + len(question) - 1
        return out, scored, copy_positions(n, range(asked, asked + len(digits)))

    def kv_recall(self, n: int) -> list[int]:
        pairs = [(f"{self.rng.randrange(1000, 10000)}", f"{self.rng.randrange(1000, 10000)}")
                 for _ in range(self.rng.randint(4, 24))]
        listing = self.encode("".join(f"key {k} -> value {v}\n" for k, v in pairs))
        k, v = self.rng.choice(pairs)
        return self.fill([listing, self.encode(f"\nThe value of key {k} is {v}.")], n)

    def sequence(self, n: int) -> tuple[list[int], list[bool], list[bool]]:
        """(ids, scored per token, copy position per token: whether the next token can be copied from earlier in
        the sequence, where supervised_step supervises the heads)."""
        if self.rng.random() >= self.synthetic:
            return self.natural(n), [True] * n, [False] * n
        out = self.rng.choice(self.kinds)(n)
        if not isinstance(out, tuple):
            return out, [True] * n, [False] * n
        return out if len(out) == 3 else (*out, [False] * n)

    def batch(self, b: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids [b, n+1], targets [b, n]: ids shifted by one, -100 where a token is not scored, copy positions
        [b, n] of the input positions)."""
        rows = [self.sequence(n + 1) for _ in range(b)]
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
        scored = torch.tensor([r[1] for r in rows], dtype=torch.bool)[:, 1:]
        copies = torch.tensor([r[2] for r in rows], dtype=torch.bool)[:, :-1]
        return ids, ids[:, 1:].masked_fill(~scored, -100), copies


def supervised_step(model, batch, targets, valid, heads, weight, opt, sched) -> torch.Tensor:
    """A next-token step plus supervision of the chosen (layer, head) pairs at copy positions (`valid`: inside a
    repeated random or natural span, a pass key's answer): their attention is pulled towards the positions that
    hold the next token after an occurrence of the current one (-log of the attention probability there), and their
    own output, read through the final norm and the head (its direct path to the logits), is trained to predict
    the next token. Copying needs a query-key match and a value-output copy that are each useless without the
    other, which is why it forms late (a long loss plateau); a direct gradient on each lets both form at once."""
    captured = {}
    hooks = [model.model.layers[layer].self_attn.o_proj.register_forward_hook(
        lambda mod, args, out, layer=layer: captured.__setitem__(layer, args[0])) for layer in {l for l, _ in heads}]
    try:
        out = model(batch[:, :-1], output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    loss = torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, out.logits.size(-1)), targets.reshape(-1))
    if valid.any():
        aux = []
        inputs, next_token = batch[:, :-1], batch[:, 1:][valid]
        # every position j that copies the right token counts, not only the marked one (a pass key is stated twice,
        # a repeated span recurs): the token at j is the next token and the token before j is the current one
        before = torch.nn.functional.pad(inputs[:, :-1], (1, 0), value=-1)
        copies = ((before[:, None, :] == inputs[:, :, None]) & (inputs[:, None, :] == batch[:, 1:, None])).tril()
        for layer, head in heads:
            attn = out.attentions[layer][:, head]  # [B, T, T]
            p = (attn * copies).sum(-1)
            aux.append(-(p[valid] + 1e-6).log().mean())
            o_proj = model.model.layers[layer].self_attn.o_proj
            d = o_proj.in_features // model.config.num_attention_heads
            contribution = captured[layer][..., head * d:(head + 1) * d] @ o_proj.weight[:, head * d:(head + 1) * d].T
            direct = model.lm_head(model.model.norm(contribution[valid]))
            aux.append(torch.nn.functional.cross_entropy(direct.float(), next_token))
        loss = loss + weight * torch.stack(aux).mean()
    return optimizer_step(model, loss, opt, sched)


def probes(model, tokenizer, heldout: str) -> dict:
    from compress.eval.probes import copy_probe, passkey_probe

    model.eval()
    out = {"copy_128": copy_probe(model, span_len=128, num=8, vocab_size=tokenizer.vocab_size),
           "passkey_1k": passkey_probe(model, tokenizer, heldout, context_len=1024, num=8)}
    model.train()
    return out


# what `save` writes: the only names it may replace in --out and in `<out>.partial`
WRITTEN = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
           "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
           "chat_template.jinja", "training.json")


def output_problem(out: Path) -> str | None:
    """Why `save` must not replace `out` (or its `<out>.partial`), or None: save deletes both, so each must be
    missing, empty, or hold only what this script writes (--out also its training.json)."""
    for folder, record in ((out, True), (out.with_name(out.name + ".partial"), False)):
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            return f"{folder} is {'a symbolic link' if folder.is_symlink() else 'a file'}; choose another --out"
        entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        if not entries:
            continue
        if record and "training.json" not in entries:
            return f"{folder} is not empty and was not written by this script (no training.json); choose another --out"
        foreign = [e for e in entries if not any(fnmatch.fnmatchcase(e, w) for w in WRITTEN)]
        if foreign:
            return (f"{folder} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, which this script "
                    "did not write and the save would delete; move them or choose another --out")
    return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "compress" / "builtin" / "small")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--long-steps", type=int, default=120)
    ap.add_argument("--long-seq-len", type=int, default=2048)
    ap.add_argument("--long-batch", type=int, default=1)
    ap.add_argument("--synthetic", type=float, default=0.3)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kinds", default="copy_random,copy_natural,passkey,kv_recall",
                    help="synthetic sequence kinds to draw from (comma-separated; repeat a kind to weight it): "
                         "copy_random, repeat_random, copy_natural, copy_numbers, passkey, kv_recall")
    ap.add_argument("--mask-first-copy", action="store_true",
                    help="do not score a random span's first occurrence (only its repeat, which is predictable)")
    ap.add_argument("--supervise-heads", default="",
                    help="layer:head pairs (e.g. 5:0,6:3) whose attention is pulled to the copy target on "
                         "repeat_random, copy_natural, copy_numbers and passkey sequences (attention supervision; see "
                         "supervised_step)")
    ap.add_argument("--supervise-weight", type=float, default=1.0)
    ap.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 4%% of all steps)")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="continue from a saved model (a second phase, e.g. more synthetic copy sequences); "
                         "its training.json is kept as the first phase's record")
    args = ap.parse_args(argv)
    problem = output_problem(args.out)  # before the data and the training: save replaces --out wholesale
    if problem:
        ap.error(problem)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(args.seed)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(TINY)
    py_train, py_held = python_docs()
    man_train, man_held = man_pages()
    print(f"documents: python {len(py_train)} train / {len(py_held)} held out; "
          f"man {len(man_train)} train / {len(man_held)} held out", flush=True)
    eos = tokenizer.eos_token_id
    train = []
    for doc in py_train + man_train:
        train.extend(tokenizer(doc)["input_ids"] + [eos])
    train_ids = torch.tensor(train, dtype=torch.long)
    heldout = (TINY / "heldout.txt").read_text(encoding="utf-8")
    held_ids = torch.tensor(tokenizer(heldout)["input_ids"], dtype=torch.long)
    print(f"tokens: {train_ids.numel()} train, {held_ids.numel()} held-out eval", flush=True)

    previous = None
    if args.init_from:
        previous = json.loads((args.init_from / "training.json").read_text())
        model = LlamaForCausalLM.from_pretrained(args.init_from, dtype=torch.float32,
                                                 attn_implementation="eager" if args.supervise_heads else None)
    else:
        model = LlamaForCausalLM(model_config())
    print(f"parameters: {sum(p.numel() for p in model.parameters())}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    total = args.steps + args.long_steps
    warmup = args.warmup or max(1, total // 25)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    mix = Mixture(train_ids, tokenizer, args.synthetic, args.seed, args.kinds.split(","), args.mask_first_copy)
    heads = [tuple(int(x) for x in pair.split(":")) for pair in args.supervise_heads.split(",") if pair]
    start, seen = time.time(), 0
    for step in range(1, total + 1):
        long = step > args.steps
        batch, targets, copies = (mix.batch(args.long_batch, args.long_seq_len) if long
                                     else mix.batch(args.batch, args.seq_len))
        seen += targets.numel()
        if heads:
            loss = supervised_step(model, batch, targets, copies, heads, args.supervise_weight, opt, sched)
        else:
            loss = train_step(model, batch, opt, sched, bf16=False, targets=targets)
        if step % 10 == 0:
            print(f"step {step} seq {batch.shape[1] - 1} loss {loss.item():.3f} lr {sched.get_last_lr()[0]:.2e} "
                  f"tokens {seen} {time.time() - start:.0f}s", flush=True)
        if step % args.eval_every == 0 or step == total:
            ppl = heldout_perplexity(model, held_ids[:20_000], 1024, bf16=False)
            found = probes(model, tokenizer, heldout)
            print(f"step {step} heldout_ppl {ppl:.2f} {json.dumps(found)} {time.time() - start:.0f}s", flush=True)
            save(model, tokenizer, args, step, total, seen, ppl, found, time.time() - start, previous)


def save(model, tokenizer, args, step, total, seen, ppl, found, seconds, previous=None) -> None:
    out = args.out
    tmp = out.with_name(out.name + ".partial")
    problem = output_problem(out)  # checked at the start too; files may have been put there since
    if problem:
        print(f"checkpoint at step {step} not saved: {problem}", file=sys.stderr, flush=True)
        return
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.to(torch.bfloat16).save_pretrained(tmp, max_shard_size="16MB")
    model.to(torch.float32)
    tokenizer.save_pretrained(tmp)
    # (no copies of tiny's heldout.txt / calibration.txt: builtin:heldout and builtin:calibration read tiny's, and
    # the copies took 0.4 MB of the 64 MiB a device call sends)
    (tmp / "training.json").write_text(json.dumps({
        **({"previous_phase": previous} if previous else {}),
        "init_from": str(args.init_from) if args.init_from else None,
        "steps": step, "planned_steps": total, "short_steps": args.steps, "seq_len": args.seq_len,
        "batch": args.batch, "long_seq_len": args.long_seq_len, "long_batch": args.long_batch,
        "synthetic": args.synthetic, "kinds": args.kinds, "mask_first_copy": args.mask_first_copy,
        "supervise_heads": args.supervise_heads, "supervise_weight": args.supervise_weight, "lr": args.lr, "seed": args.seed, "tokens_seen": seen,
        "heldout_ppl_20k_tokens_1024": round(ppl, 3), "probes": found, "train_seconds": round(seconds),
        "threads": torch.get_num_threads(),
    }, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


if __name__ == "__main__":
    main()
