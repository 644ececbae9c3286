"""Train the built-in reference model `builtin:tiny` on the Python documentation's reST sources.

Reproducible: the data recipe (which documents are held out), the tokenizer, the model config, the seed and the
number of steps are all fixed here; the loss curve is printed as it trains.

    apt-get install python3.11-doc
    python scripts/train_tiny.py --steps 450 --batch 8 --seq-len 1024 --eval-every 75 --threads 1

Data recipe: every `*.rst.txt` under the docs' `_sources`, sorted by path. A document is held out when
sha1(relative path) mod 10 == 0; held-out documents never reach the tokenizer or the model. From the held-out
documents (sorted), the first ~200 KB become `heldout.txt` (evaluation) and the next ~200 KB `calibration.txt`.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import time
from pathlib import Path

import torch

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
VOCAB_SIZE = 8192
EOS = "<|endoftext|>"
SLICE_BYTES = 200_000


def split_documents(root: Path) -> tuple[list[str], list[str]]:
    train, held = [], []
    for path in sorted(root.rglob("*.rst.txt")):
        rel = path.relative_to(root).as_posix()
        text = path.read_text(encoding="utf-8", errors="replace")
        (held if int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 10 == 0 else train).append(text)
    return train, held


def cut_slices(held: list[str]) -> tuple[str, str]:
    """The first ~200 KB of held-out documents for evaluation, the next ~200 KB for calibration."""
    joined = "\n\n".join(held)
    heldout = joined[:SLICE_BYTES]
    calibration = joined[SLICE_BYTES : 2 * SLICE_BYTES]
    if len(calibration) < SLICE_BYTES // 2:
        raise SystemExit("not enough held-out text for the calibration slice")
    return heldout, calibration


def train_tokenizer(train_docs: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_docs, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
        model_max_length=1024,
    )


def model_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=704, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )


def _compute(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


@torch.no_grad()
def heldout_perplexity(model, ids: torch.Tensor, seq_len: int, bf16: bool = True) -> float:
    model.eval()
    n = (ids.numel() - 1) // seq_len
    nll, count = 0.0, 0
    for i in range(n):
        window = ids[i * seq_len : (i + 1) * seq_len + 1].unsqueeze(0)
        with _compute(bf16):
            logits = model(window[:, :-1]).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
        count += seq_len
    model.train()
    return math.exp(nll / count)


def train_step(model, batch: torch.Tensor, opt, sched, bf16: bool = True,
               targets: torch.Tensor | None = None) -> torch.Tensor:
    """One next-token step on `batch` [B, T+1]: loss, clipped backward, optimizer and schedule step.
    `targets` [B, T] overrides `batch[:, 1:]` (-100 where a token is not scored)."""
    with _compute(bf16):
        logits = model(batch[:, :-1]).logits
    targets = batch[:, 1:] if targets is None else targets
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
    return optimizer_step(model, loss, opt, sched)


def optimizer_step(model, loss: torch.Tensor, opt, sched) -> torch.Tensor:
    """Backward of `loss`, gradients clipped to norm 1, one optimizer and schedule step."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("compress/builtin/tiny"))
    ap.add_argument("--steps", type=int, default=450)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=75)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    train_docs, held_docs = split_documents(DOCS)
    heldout, calibration = cut_slices(held_docs)
    print(f"documents: {len(train_docs)} train, {len(held_docs)} held out", flush=True)

    tokenizer = train_tokenizer(train_docs)
    eos = tokenizer.eos_token_id
    train_ids = []
    for doc in train_docs:
        train_ids.extend(tokenizer(doc)["input_ids"] + [eos])
    train_ids = torch.tensor(train_ids, dtype=torch.long)
    held_ids = torch.tensor(tokenizer(heldout)["input_ids"], dtype=torch.long)
    print(f"tokens: {train_ids.numel()} train, {held_ids.numel()} held-out eval", flush=True)

    model = LlamaForCausalLM(model_config())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    gen = torch.Generator().manual_seed(args.seed)
    n_windows = train_ids.numel() - args.seq_len - 1
    start = time.time()
    for step in range(1, args.steps + 1):
        offsets = torch.randint(0, n_windows, (args.batch,), generator=gen)
        batch = torch.stack([train_ids[o : o + args.seq_len + 1] for o in offsets.tolist()])
        loss = train_step(model, batch, opt, sched)
        if step % 25 == 0:
            print(f"step {step} loss {loss.item():.3f} lr {sched.get_last_lr()[0]:.2e} {time.time() - start:.0f}s", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            ppl = heldout_perplexity(model, held_ids[:40_000], args.seq_len)
            print(f"step {step} heldout_ppl {ppl:.2f} {time.time() - start:.0f}s", flush=True)
            save(model, tokenizer, heldout, calibration, args, step, ppl, time.time() - start)


def save(model, tokenizer, heldout: str, calibration: str, args, step: int, ppl: float, seconds: float) -> None:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    model.to(torch.float32)
    tokenizer.save_pretrained(out)
    (out / "heldout.txt").write_text(heldout, encoding="utf-8")
    (out / "calibration.txt").write_text(calibration, encoding="utf-8")
    (out / "training.json").write_text(json.dumps({
        "steps": step, "planned_steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
        "seed": args.seed, "heldout_ppl_40k_tokens": round(ppl, 3), "train_seconds": round(seconds),
        "threads": torch.get_num_threads(),
    }, indent=2))


if __name__ == "__main__":
    main()
