"""Recovery training with the Hugging Face Trainer: next-token loss on calibration windows, plus optionally
KL(teacher || student) to the original model, plus `aux_weight` x the auxiliary losses that modules expose (a module
with an `aux_loss` tensor set by its training forward, e.g. MoM's router load balance), under a token budget
(max_steps) and a wall-clock budget (a callback). Because it is the stock Trainer, `accelerate launch` spreads it
over devices with no code here."""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .chunked_loss import blocked_losses


class WindowDataset(torch.utils.data.Dataset):
    """Windows of `seq_len` tokens starting at `offsets` in the token stream `ids`, as causal-LM examples (labels =
    inputs; the model shifts them), cut when asked for: a token budget of hundreds of millions stacked every window
    before training began (4.4 GB and half a minute for 300M tokens, in a run `max_minutes` stopped after a step)."""

    def __init__(self, ids: torch.Tensor, offsets: torch.Tensor, seq_len: int):
        self.ids, self.offsets, self.seq_len = ids, offsets, seq_len

    def __len__(self) -> int:
        return self.offsets.numel()

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = int(self.offsets[i])
        window = self.ids[start:start + self.seq_len]
        return {"input_ids": window, "labels": window}


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) of the next-token distributions."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="none").sum(-1).mean()


def take_aux_losses(model: nn.Module) -> torch.Tensor | None:
    """Sum of the `aux_loss` tensors the last forward left on `model`'s modules (None: none), each cleared so that
    its graph is not kept past this step."""
    total = None
    for module in model.modules():
        aux = getattr(module, "aux_loss", None)
        if isinstance(aux, torch.Tensor):
            total = aux if total is None else total + aux.to(total.device)
            module.aux_loss = None
    return total


class RecoveryTrainer(Trainer):
    """The Trainer with loss = next-token NLL + kl_weight * KL(teacher || student) + aux_weight * the modules'
    auxiliary losses; the teacher is frozen."""

    def __init__(self, *args, teacher: nn.Module | None = None, kl_weight: float = 0.0, aux_weight: float = 0.0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        # compute_loss returns each micro-batch's mean: the Trainer divides by the accumulation steps (with the
        # model's loss kwargs it took the loss to be normalized already, and the accumulated step summed them)
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.kl_weight = kl_weight
        self.aux_weight = aux_weight
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False).eval().to(self.args.device)
        self._parts: dict[str, list[float]] = {"nll": [], "kl": [], "aux": []}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher = self.teacher if self.kl_weight > 0 else None
        # the head a block of positions at a time (chunked_loss.py); whole logits where outputs are asked for
        blocked = None if return_outputs else blocked_losses(model, self.accelerator.unwrap_model(model),
                                                             inputs["input_ids"], inputs["labels"], teacher)
        outputs = None
        if blocked is not None:
            loss, kl = blocked
        else:
            outputs = model(input_ids=inputs["input_ids"], labels=inputs["labels"], use_cache=False)
            loss, kl = outputs.loss, None
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=inputs["input_ids"], use_cache=False).logits
                kl = kl_to_teacher(outputs.logits, teacher_logits)
        self._parts["nll"].append(float(loss.detach()))
        if kl is not None:
            self._parts["kl"].append(float(kl.detach()))
            loss = loss + self.kl_weight * kl
        aux = take_aux_losses(model)
        if aux is not None:
            self._parts["aux"].append(float(aux.detach()))
            if self.aux_weight > 0:
                loss = loss + self.aux_weight * aux.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # the loss terms, averaged since the last log line and over the processes, as the Trainer's total is (one
        # process's terms beside all processes' total did not add up)
        if "loss" in logs:
            for key, value in mean_over_processes(self._parts, self.args.device).items():
                logs[key] = round(value, 4)
            for values in self._parts.values():
                values.clear()
        super().log(logs, *args, **kwargs)


class WallClockBudget(TrainerCallback):
    """Stop training (and save a checkpoint, if checkpointing) once `seconds` of training have passed."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = None
        self.hit = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        over = time.monotonic() - self.start >= self.seconds
        if args.world_size > 1:  # every process stops at the same step, or the others wait in the next all-reduce
            over = any_process(over, args.device)
        if over and state.global_step < state.max_steps:  # (the last step reached the token budget too: that
            # stopped it)
            self.hit = True
            control.should_training_stop = True
            control.should_save = args.save_strategy != "no"
            control.should_log = True  # the loss at the stop (else last_loss was the last logged step's)
        return control


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process of a data-parallel run when `flag` is True on any of them (its own clock can cross a
    time budget a step before another's)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean_over_processes(parts: dict[str, list[float]], device: torch.device) -> dict[str, float]:
    """Each key's mean over its values on every process of a data-parallel run (one process: its own), leaving out
    keys with none anywhere. Every process passes the same keys (one all-reduce of a fixed size), whichever of them
    got values (an auxiliary loss may come on some steps only)."""
    import torch.distributed as dist

    keys = sorted(parts)
    totals = torch.tensor([[sum(parts[k]), len(parts[k])] for k in keys], dtype=torch.float64, device=device)
    if keys and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
    return {k: total / count for k, (total, count) in zip(keys, totals.tolist()) if count}


class TrainingProgress(TrainerCallback):
    """Training steps as the rest of a run shows its progress (compress.progress: a bar on a terminal, lines when
    stderr is a file), with each log line (loss, its terms, the learning rate) on stderr, on the main process."""

    def __init__(self, enabled: bool):
        self.enabled, self.ticker = enabled, None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.enabled and state.is_world_process_zero:
            from ..progress import Ticker

            self.ticker = Ticker("recover: training steps", total=state.max_steps, done=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.ticker is not None:
            self.ticker.advance()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.ticker is not None and logs and "loss" in logs:
            shown = ", ".join(f"{key} {_short(logs[key])}" for key in ("loss", "nll", "kl", "aux", "learning_rate")
                              if key in logs)
            self.ticker.note(f"recover: step {state.global_step}/{state.max_steps}: {shown}")

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:  # (also when training raises: a terminal's bar is stopped)
        if self.ticker is not None:
            self.ticker.close()
            self.ticker = None


def _short(value) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


FULLY_TRAINED_FILE = "compress-fully-trained.safetensors"


class FullyTrainedParameters(TrainerCallback):
    """The parameters trained in full beside LoRA (`train_modules`, e.g. MoM's routers) saved into each Trainer
    checkpoint and read back on resume: PEFT's checkpoints hold only the adapter, so a resumed run restarted them
    from their initial values, silently."""

    def __init__(self, params: dict[str, nn.Parameter], after_step: list | None = None):
        self.params = params
        self.after_step = after_step or []

    def on_step_end(self, args, state, control, **kwargs):
        for restore in self.after_step:  # e.g. a VQ head's shortlist tokens back to scale 1, bias 0
            restore()
        return control

    def on_save(self, args, state, control, **kwargs):
        from safetensors.torch import save_file

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.params and state.is_world_process_zero and folder.is_dir():  # (one writer of the file)
            save_file({n: p.detach().cpu().contiguous() for n, p in self.params.items()}, folder / FULLY_TRAINED_FILE)
        return control

    def restore(self, checkpoint: str | Path) -> None:
        """Copy the checkpoint's values into the parameters (before the Trainer resumes from it)."""
        from safetensors.torch import load_file

        from ..errors import CheckpointError

        if not self.params:
            return
        path = Path(checkpoint) / FULLY_TRAINED_FILE
        if not path.is_file():
            raise CheckpointError(f"{checkpoint} has no {FULLY_TRAINED_FILE}: its run kept no copy of the parameters "
                                  "trained in full (train_modules), so resuming would restart them; empty the "
                                  "checkpoint_dir (or drop resume_from) to train from the start")
        saved = load_file(str(path))
        missing = sorted(set(self.params) - set(saved))
        if missing:
            raise CheckpointError(f"{path} lacks {missing[:3]}: it was written by a run with other train_modules")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(saved[name].to(p.dtype))


def checkpoint_disk_full(exc: BaseException, folder: Path) -> OSError | None:
    """The ENOSPC error for `folder` where writing a Trainer checkpoint into it failed for want of space, else None.
    torch.save says so without an errno ("[enforce fail at inline_container.cc] unexpected pos ..."): such an error
    with almost nothing left free on the folder's disk is taken for a full disk."""
    import errno
    import os
    import shutil

    from ..errors import disk_full_error

    full = disk_full_error(exc, folder)
    if full is not None or not isinstance(exc, RuntimeError):
        return full
    if not any(mark in str(exc) for mark in ("inline_container", "unexpected pos", "iostream")):
        return None
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder)) if free < FULL_DISK_BYTES else None


FULL_DISK_BYTES = 64 << 20  # free space below which a failed checkpoint write counts as a full disk


@dataclass
class TrainingPlan:
    windows: WindowDataset          # the training windows
    max_steps: int
    tokens_per_step: int
    batch_size: int
    micro_batch_size: int            # windows per forward/backward: batch_size / this accumulate into one step
    gradient_checkpointing: bool
    lr: float
    max_seconds: float
    output_dir: Path
    save_steps: int | None          # None: no Trainer checkpoints
    resume_from: str | None
    seed: int
    device: str
    progress: bool
    aux_weight: float = 0.0         # weight of the modules' auxiliary losses (MoM load balance)
    fully_trained: dict[str, nn.Parameter] | None = None  # trained in full beside LoRA: kept in each checkpoint
    done: tuple[int, int] = (0, 0)  # (steps, tokens) the checkpoint it resumes from had trained
    after_step: list = field(default_factory=list)  # modules' invariants restored after each optimizer step


def _allowed_changes_on_resume(record: logging.LogRecord) -> bool:
    """batch_size and save_steps may change between runs (a resumed run trains the tokens left in steps of its own
    size): transformers' warning that they differ from the checkpoint's, printed on every such resume, is noise."""
    return "do not match the ones in the `trainer_state.json`" not in record.getMessage()


def steps_for_budget(max_tokens: int, batch_size: int, seq_len: int, world_size: int = 1,
                     done: tuple[int, int] = (0, 0)) -> int:
    """The Trainer's max_steps: the steps a resumed checkpoint took (`done` = its steps, tokens) plus the steps of
    this run's size that fit the tokens left. A resumed run at another batch_size or number of processes counted its
    budget in its own steps: twice the batch stopped at half the tokens while reporting them all."""
    steps_done, tokens_done = done
    left = max(0, max_tokens - tokens_done) // (batch_size * seq_len * world_size)
    return steps_done + left if steps_done else max(1, left)


def checkpoint_progress(checkpoint: str | Path, tokens_per_step: int) -> tuple[int, int]:
    """(steps, tokens) a Trainer checkpoint of a recover run had trained. Tokens are counted into the Trainer's
    state (TokenCount); a checkpoint written before that has none and is taken to have run at this run's
    `tokens_per_step` (all processes together)."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    steps = int(state.get("global_step", 0))
    return steps, int(state.get("num_input_tokens_seen") or steps * tokens_per_step)


class TokenCount(TrainerCallback):
    """The tokens trained, in the Trainer's state (saved with each checkpoint, read back on resume): every step
    takes `tokens_per_step` (all processes together; the windows have one length)."""

    def __init__(self, tokens_per_step: int, tokens_before: int):
        self.tokens_per_step, self.tokens_before = tokens_per_step, tokens_before

    def on_train_begin(self, args, state, control, **kwargs):
        state.num_input_tokens_seen = self.tokens_before  # (also for a checkpoint that did not count them)

    def on_step_end(self, args, state, control, **kwargs):
        state.num_input_tokens_seen += self.tokens_per_step


class ScheduleOfThisRun(TrainerCallback):
    """On resume, this run's learning-rate schedule (peak `lr`, warm-up and cosine decay over its max_steps) at the
    step reached. The Trainer loads the checkpoint's scheduler (its base_lrs: the old lr) and the optimizer's param
    groups (their lr: the old schedule's last rate) before on_train_begin: a changed lr was ignored, and the first
    resumed step ran at the old schedule's rate (0 where it had ended). Unchanged, the rates are the same floats."""

    def __init__(self, lr: float, resumed: bool):
        self.lr, self.resumed = lr, resumed

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # (accelerate's wrapper, if any)
        if not self.resumed or optimizer is None or not hasattr(scheduler, "lr_lambdas"):
            return
        scheduler.base_lrs = [self.lr] * len(optimizer.param_groups)
        for group, rate in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
            group["initial_lr"] = self.lr
            group["lr"] = self.lr * rate(scheduler.last_epoch)  # as LambdaLR.get_lr computes it
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what the Trainer logs


def _checkpointing_arguments(enabled: bool) -> dict:
    """TrainingArguments' activation checkpointing, under the name this transformers knows (5.x renamed
    gradient_checkpointing); not the reentrant form, which needs the layers' inputs to require grads."""
    fields = TrainingArguments.__dataclass_fields__
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False}} if enabled else {}


def train(peft_model: nn.Module, plan: TrainingPlan, teacher: nn.Module | None, kl_weight: float) -> dict:
    """Train the adapter of `peft_model` in place; returns what happened (steps, tokens, seconds, losses)."""
    args = TrainingArguments(
        output_dir=str(plan.output_dir),
        per_device_train_batch_size=plan.micro_batch_size,
        gradient_accumulation_steps=plan.batch_size // plan.micro_batch_size,
        **_checkpointing_arguments(plan.gradient_checkpointing),
        learning_rate=plan.lr,
        max_steps=plan.max_steps,
        lr_scheduler_type="cosine",
        warmup_steps=plan.max_steps // 20,  # none under 20 steps: a first step at learning rate 0 is a step lost
        weight_decay=0.0,
        logging_steps=max(1, plan.max_steps // 20),
        logging_first_step=True,
        save_strategy="steps" if plan.save_steps else "no",
        save_steps=plan.save_steps or 500,
        save_total_limit=2,
        report_to="none",
        disable_tqdm=True,  # TrainingProgress reports on stderr (the Trainer's bar and log dicts went to stdout)
        seed=plan.seed,
        data_seed=plan.seed,
        use_cpu=plan.device == "cpu",
        dataloader_pin_memory=plan.device != "cpu",
        remove_unused_columns=False,
        label_names=["labels"],
    )
    budget = WallClockBudget(plan.max_seconds)
    full = FullyTrainedParameters(plan.fully_trained or {}, plan.after_step)
    per_step = plan.tokens_per_step * args.world_size
    shown = TrainingProgress(plan.progress)
    trainer = RecoveryTrainer(model=peft_model, args=args, train_dataset=plan.windows,
                              callbacks=[budget, full, TokenCount(per_step, plan.done[1]),
                                         ScheduleOfThisRun(plan.lr, plan.resume_from is not None), shown],
                              teacher=teacher, kl_weight=kl_weight, aux_weight=plan.aux_weight)
    trainer.remove_callback(PrinterCallback)  # print()s each log dict to stdout, which --json owns
    trainer.remove_callback(ProgressCallback)
    resume = plan.resume_from
    if resume is not None:
        full.restore(resume)
    resumed_at = plan.done[0]
    start = time.perf_counter()
    resume_warning = logging.getLogger("transformers.trainer_utils")
    resume_warning.addFilter(_allowed_changes_on_resume)
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except (OSError, RuntimeError) as exc:  # a Trainer checkpoint that did not fit: one line, not a traceback
        disk_full = checkpoint_disk_full(exc, plan.output_dir)
        if disk_full is None:
            raise
        raise disk_full from None
    finally:
        resume_warning.removeFilter(_allowed_changes_on_resume)
        shown.close()
        if plan.gradient_checkpointing:  # the model goes on to inference and to later passes as it came
            disable = getattr(peft_model, "activation_checkpointing_disable", None)
            (disable or peft_model.gradient_checkpointing_disable)()
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    lr_now = trainer.lr_scheduler.get_last_lr()[0] if trainer.lr_scheduler is not None else plan.lr
    kls = [h["kl"] for h in history if "kl" in h]
    auxes = [h["aux"] for h in history if "aux" in h]
    return {
        "steps": trainer.state.global_step,
        "max_steps": plan.max_steps,
        "tokens": trainer.state.num_input_tokens_seen,  # both runs when resumed (TokenCount)
        # what this run trained, in the time `seconds` measures (the same as steps/tokens unless it resumed)
        "steps_this_run": trainer.state.global_step - resumed_at,
        "tokens_this_run": trainer.state.num_input_tokens_seen - plan.done[1],
        "seconds": round(time.perf_counter() - start, 2),
        "stopped_by": "wall_clock" if budget.hit else "token_budget",
        # where the schedule (sized by max_tokens: warm-up, then cosine decay) stood at the end, as a share of lr
        "lr_at_stop": round(lr_now / plan.lr, 4) if plan.lr else None,
        "resumed_from": resume,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        **({"first_kl": kls[0], "last_kl": kls[-1]} if kls else {}),
        **({"first_aux": auxes[0], "last_aux": auxes[-1]} if auxes else {}),
        # this run's steps only (first_loss is the whole training's first, a resumed checkpoint's included); a resumed
        # run that had nothing left to train: the Trainer's 0.0 is no loss
        "train_loss": round(float(result.training_loss), 4)
        if trainer.state.global_step > resumed_at and not math.isnan(result.training_loss) else None,
    }
