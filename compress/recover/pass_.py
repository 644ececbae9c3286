"""The `recover` pass: LoRA (through PEFT) trained with the Hugging Face Trainer on the recipe's calibration text,
after any other pass, to win back what compression lost. Next-token loss, plus KL(original || model) when
`kl_weight` > 0, the original being the model as it was before the recipe's first pass. A token budget and a
wall-clock budget stop training; Trainer checkpoints make it resumable. The adapter is merged into the weights
(`merge: true`; a pruned layer keeps its zeros and its packing) or kept as a PEFT adapter folder beside the
checkpoint (`merge: false`), which `compress.load` attaches again. Modules a pass added (MoM's router and beta
map) can be trained in full beside LoRA (`train_modules`), and auxiliary losses that modules expose (`aux_loss`, MoM's
load balance) join the loss with weight `aux_weight`."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn

from ..environment import check_launcher, one_process_of_accelerate, world_size
from ..errors import CalibrationError, CheckpointError, CompressError, ConfigError, TargetError
from ..pass_api import (Pass, PassConfig, PassContext, PassReport, head_shares_embedding, left_by_earlier,
                        tensor_bytes, timed)
from ..prune.sparse_linear import SparseLinear
from ..registry import register_pass
from ..targets import match_modules, within
from .master_weights import float32_originals
from .resume import (check_adapter_shapes, check_checkpoint_dir, check_not_in_use, check_resume_from, check_same_run,
                     resume_point, training_into, write_record)

# PEFT, the Trainer and bitsandbytes (which PEFT imports) load when a recover pass runs or is read back, not when the
# registry lists the passes: on AVX512-BF16 CPUs bitsandbytes logs a warning at import that every CLI call would show.

ADAPTER_FOLDER = "adapter"


MAX_WINDOWS = 1 << 24  # training windows drawn up front (an int64 offset each: 128 MiB)


@register_pass("recover")
class Recover(Pass):
    """Train LoRA adapters on calibration text to recover quality after compression; merge them or keep them."""

    class Config(PassConfig):
        targets: list[str] = Field(default_factory=lambda: ["re:.*(q_proj|k_proj|v_proj)$"])
        r: int = Field(8, ge=1, description="LoRA rank")
        alpha: int = Field(16, ge=1, description="LoRA alpha (the update is scaled by alpha / r)")
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input")
        lr: float = Field(1e-3, gt=0.0, description="peak learning rate (cosine decay, 5% warm-up)")
        max_tokens: int = Field(262_144, ge=1, description="token budget: training stops after this many tokens")
        max_minutes: float = Field(20.0, gt=0.0, description="wall-clock budget of the training loop")
        seq_len: int | None = Field(None, ge=8, description="training window length (default: the calibration's)")
        batch_size: int = Field(8, ge=1, description="windows per step and device")
        micro_batch_size: int | None = Field(None, ge=1, description=(
            "windows per forward and backward (divides batch_size): the step accumulates batch_size / "
            "micro_batch_size of them, the same update with that much less activation memory"))
        gradient_checkpointing: bool = Field(False, description=(
            "recompute each decoder layer's activations in backward: activation memory of about one layer "
            "instead of every layer's, for about a third more compute"))
        kl_weight: float = Field(0.0, ge=0.0, description="0: next-token loss only; > 0 adds this x KL(original || model)")
        train_modules: list[str] = Field(default_factory=list, description=(
            "modules trained in full beside LoRA (e.g. MoM's new router and beta map); pattern syntax of targets"))
        aux_weight: float = Field(0.01, ge=0.0, description=(
            "weight of the auxiliary losses modules expose (MoM's router load balance); 0 leaves them out"))
        merge: bool = Field(True, description="true: merge LoRA into the weights; false: keep a PEFT adapter folder")
        checkpoint_dir: str | None = Field(None, description="Trainer checkpoints go here; training resumes from "
                                                             "the newest one found, if a run of the same settings "
                                                             "wrote it (none: no checkpoints)")
        save_steps: int = Field(100, ge=1, description="steps between Trainer checkpoints (with checkpoint_dir)")
        resume_from: str | None = Field(None, description="a Trainer checkpoint folder to resume from")
        seed: int = Field(0, ge=0, le=2**32 - 1,  # numpy's seeds are 32-bit
                          description="seed of the LoRA init and the data order")

    needs_calibration = True

    def validate_config(self) -> None:
        c = self.config
        if c.micro_batch_size is not None and c.batch_size % c.micro_batch_size:
            raise ConfigError(f"recover: micro_batch_size {c.micro_batch_size} does not divide batch_size "
                              f"{c.batch_size}: each step accumulates whole micro-batches")

    def work_folders(self) -> list[Path]:
        return [Path(self.config.checkpoint_dir)] if self.config.checkpoint_dir else []

    def needs_original_model_for(self) -> bool:
        return self.config.kl_weight > 0

    def _checked_targets(self, model: nn.Module) -> dict[str, nn.Module]:
        from ..linearize.mom import NEW_MODULES
        from .lora import unmerged_adapter_layers
        try:
            matched = self.target_modules(model)
        except TargetError as exc:  # a LoRA target on MoM's router / beta map (they train in full, and before the
            # linearize pass runs they do not exist: "matches no module" alone sent users looking for a typo)
            named = [m for m in NEW_MODULES if any(t.rstrip("$").endswith(m) for t in self.config.targets)]
            if not named:
                raise
            raise ConfigError(f"recover: {exc}; {' and '.join(named)} {'is one of' if len(named) == 1 else 'are'} "
                              "Mixture-of-Memories' new modules (a linearize pass with variant mom makes them), "
                              "which train in full, not with LoRA: name them in train_modules instead") from None
        if unmerged_adapter_layers(model):
            raise ConfigError("recover: this model already carries a LoRA adapter kept unmerged (merge: false); "
                              "only one unmerged adapter is supported: use merge: true on the earlier recover pass")
        targets = {n: m for n, m in matched.items() if isinstance(m, (nn.Linear, SparseLinear))}
        if not targets:
            try:  # matched only what `ignore` leaves out (by default lm_head and embed_tokens): say so
                ignored = [n for n, m in match_modules(model, self.config.targets, []).items()
                           if isinstance(m, (nn.Linear, SparseLinear))]
            except CompressError:
                ignored = []
            if ignored:
                raise ConfigError(f"recover: targets {self.config.targets} match only layers that ignore "
                                  f"{self.config.ignore} leaves out ({ignored[0]}); set ignore (e.g. ignore: []) to "
                                  "train them")
            raise ConfigError(f"recover: targets {self.config.targets} match no Linear (or packed sparse) layer")
        head = model.get_output_embeddings()
        if self.config.merge and head_shares_embedding(model) and any(m is head for m in targets.values()):
            raise ConfigError("recover: the output head shares its weight with the input embedding "
                              "(tie_word_embeddings), so merging LoRA into it would change the embedding too: leave "
                              "lm_head out of the targets, or use merge: false")
        return targets

    def describe(self, model: nn.Module) -> list[str]:
        return list(self._checked_targets(model))

    def touches(self, model: nn.Module) -> list[str]:
        """The LoRA targets and the modules trained in full (those an earlier linearize creates are not there yet)."""
        try:
            full = list(self._train_modules(model)) if self.config.train_modules else []
        except ConfigError:
            full = []
        return self.describe(model) + full

    def check(self, model: nn.Module) -> None:
        """Targets, and what the arguments say of this model and this machine, before any pass runs."""
        from ..models import context_length

        super().check(model)
        c = self.config
        context = context_length(model.config)
        if c.seq_len is not None and context is not None and c.seq_len > context:
            raise ConfigError(f"recover: seq_len {c.seq_len} is longer than the model's context ({context} tokens); "
                              "lower it")
        world_size()  # WORLD_SIZE=0 or abc: one line here, not a ZeroDivisionError in apply
        check_launcher()  # WORLD_SIZE=2 without torchrun / accelerate launch: here, not accelerate's traceback
        if c.checkpoint_dir is not None:
            check_checkpoint_dir(c.checkpoint_dir)
            check_not_in_use(c.checkpoint_dir)
        if c.resume_from is not None:
            check_resume_from(c.resume_from)

    def _planned(self, model: nn.Module, modules=None, ctx: PassContext | None = None) -> dict[str, Any]:
        """What makes this run's Trainer checkpoints resumable by another (resume.py's RECORD): besides the LoRA
        settings, what the adapter was trained on (the passes before it, the training text and its windows, the
        loss and the seed): a rerun with another earlier pass resumed the old adapter, its budget spent, silently.
        Also the LoRA dropout and aux_weight: a rerun with another resumed the adapter trained under the old one."""
        c = self.config
        planned = {"model": getattr(model, "compress_source", None), "r": c.r, "alpha": c.alpha,
                   "dropout": c.dropout, "targets": list(c.targets), "ignore": list(c.ignore),
                   "train_modules": list(c.train_modules), "before": getattr(self, "_before", None),
                   "kl_weight": c.kl_weight, "aux_weight": c.aux_weight, "seed": c.seed}
        if ctx is not None and ctx.calibration is not None:
            data = {**ctx.calibration.model_dump(mode="json"), "seq_len": self._seq_len(ctx)}
            if not getattr(self, "_calibrated_before", True):
                data.pop("num_samples", None)
            planned["data"] = data
        if modules is not None:
            planned["modules"] = sorted(modules)
        return planned

    def _check_resumable(self, model: nn.Module, earlier) -> None:
        """The checkpoint this run would resume from is one of the same run: refused before any pass runs. The LoRA
        targets' names are known here only when no earlier pass may replace them (else apply checks them)."""
        c = self.config
        if c.checkpoint_dir:  # the second would resume from the first's checkpoints, its budget already spent
            mine = Path(c.checkpoint_dir).absolute()
            if any(p.name == self.name and getattr(p.config, "checkpoint_dir", None)
                   and Path(p.config.checkpoint_dir).absolute() == mine for p in earlier):
                raise ConfigError(f"recover: checkpoint_dir {c.checkpoint_dir} is also an earlier recover pass's "
                                  "checkpoint_dir; give each recover pass its own folder")
        # as the checkpoint records them (`entry()`: a pass leaves out the options its method does not use), so a
        # run in one recipe and one on the checkpoint of its first passes record the same
        previous = (getattr(model.config, "compression", None) or {}).get("passes", [])
        self._before = [{"pass": e.get("pass"), "args": e.get("args")} for e in previous if isinstance(e, dict)] + \
                       [{"pass": p.name, "args": p.entry()["args"]} for p in earlier]
        # the calibration batches' count matters where an earlier pass of the recipe reads them (wanda, GPTQ, ...);
        # recover's own windows take their count from max_tokens
        self._calibrated_before = any(p.needs_calibration_for() for p in earlier)
        modules = None if earlier else list(self._checked_targets(model))
        check_same_run(self._planned(model, modules), c.checkpoint_dir, c.resume_from)

    def check_later(self, model: nn.Module, later: Pass) -> None:
        """An adapter kept unmerged stays on its layers: a later pass may not replace them (quantize or prune put
        their layer under the LoRA wrapper, and the save failed with a traceback after all the work), nor add a
        second unmerged adapter (it failed after training the first)."""
        if self.config.merge:
            return
        if later.name == self.name:
            raise ConfigError("recover: an earlier recover pass keeps its LoRA adapter unmerged (merge: false), and "
                              "only one unmerged adapter is supported: use merge: true on the earlier one")
        mine = list(self._checked_targets(model))
        hit = next((n for n in later.touches(model) if any(within(n, t) for t in mine)), None)
        if hit is not None:
            raise ConfigError(f"{later.name}: {hit} gets a LoRA adapter kept unmerged from an earlier recover pass "
                              f"(merge: false), and a pass cannot change the layer under it: use merge: true there, "
                              f"or run {later.name} before recover")

    def check_with_calibration(self, model: nn.Module, ctx: PassContext) -> None:
        """The token budget holds at least one step (it trained a whole step past a smaller one); the checkpoint it
        would resume from was trained on the same text; the text holds a window of seq_len; a micro-batch's
        activations fit in memory (it was killed by the kernel)."""
        from .memory import check_step_memory

        c, world = self.config, world_size()
        check_same_run(self._planned(model, ctx=ctx), c.checkpoint_dir, c.resume_from)
        seq_len = self._seq_len(ctx)
        self._check_text_holds(ctx, seq_len)
        check_step_memory(model, ctx.device, c.batch_size, c.micro_batch_size, seq_len, c.kl_weight > 0,
                          c.gradient_checkpointing)
        step = c.batch_size * seq_len * world
        if step > c.max_tokens:
            where = "seq_len" if c.seq_len else "seq_len from the calibration"
            devices = f" x {world} devices" if world > 1 else ""
            raise ConfigError(f"recover: max_tokens {c.max_tokens} is less than one step (batch_size {c.batch_size} "
                              f"x {where} {seq_len}{devices} = {step} tokens); raise max_tokens or lower batch_size "
                              "/ seq_len")
        if c.max_tokens // seq_len > MAX_WINDOWS:  # (it allocated an offset per window: a traceback past memory)
            raise ConfigError(f"recover: max_tokens {c.max_tokens} is {c.max_tokens // seq_len:,} windows of {seq_len} "
                              f"tokens, more than the {MAX_WINDOWS:,} it draws; the learning-rate schedule spans "
                              "max_tokens too (a budget max_minutes cannot reach keeps the rate near its warm-up's "
                              "0), so give about what fits in max_minutes")

    def _check_text_holds(self, ctx: PassContext, seq_len: int) -> None:
        """The training text holds one window of recover's own seq_len (the calibration's was read already): a
        longer one failed after the earlier passes ran, naming calibration.seq_len."""
        from ..calibration import window_offsets

        spec = ctx.calibration
        if spec is None or ctx.tokenizer is None or seq_len <= spec.seq_len:
            return
        # windows of the calibration's length (known to fit) enough to read seq_len + 1 tokens, if the text has them
        probe = spec.model_copy(update={"num_samples": -(-(seq_len + 1) // (4 * spec.seq_len))})
        ids, _ = window_offsets(probe, ctx.tokenizer, ctx.base_dir)
        if ids.numel() < seq_len + 1:
            raise ConfigError(f"recover: seq_len {seq_len} needs {seq_len + 1} tokens of training text (a window and "
                              f"its next token), and calibration source {spec.source} has {ids.numel()}; lower "
                              "recover's seq_len or give more text")

    def _seq_len(self, ctx: PassContext) -> int:
        """Training windows' length: the argument, else the calibration's."""
        return self.config.seq_len or (ctx.calibration.seq_len if ctx.calibration is not None else 256)

    def taken_by(self, earlier: Pass, model: nn.Module) -> str | None:
        return "quantized by an earlier pass (LoRA attaches to Linear or packed sparse layers)" \
            if earlier.name == "quantize" else None

    def check_after(self, model: nn.Module, earlier) -> None:
        """LoRA attaches to Linear (or packed sparse) layers: layers an earlier quantize pass replaces are left out,
        and when that leaves none the run would stop only after those passes ran. train_modules must name modules
        of the model unless an earlier MoM linearize pass makes new ones (its routers)."""
        self._check_resumable(model, earlier)
        if not left_by_earlier(model, self._checked_targets(model), earlier, lambda p: self.taken_by(p, model)):
            raise ConfigError("recover: every layer the targets match is quantized by an earlier pass, and LoRA "
                              "attaches to Linear or packed sparse layers only: recover before quantize, or target "
                              "layers quantize leaves alone")
        # MoM's linearize makes new modules (routers, beta maps) that train_modules may name
        if self.config.train_modules and not any(p.name == "linearize" and getattr(p.config, "variant", None) == "mom"
                                                 for p in earlier):
            _refuse_overlap(self._train_modules(model), self._checked_targets(model))

    def _train_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        try:
            modules = match_modules(model, self.config.train_modules, include_exempt=True)
        except CompressError as exc:
            raise ConfigError(f"recover: train_modules: {exc}") from None
        if not any(next(m.parameters(), None) is not None for m in modules.values()):
            # it trained nothing in full, silently (fully_trained_parameters: 0)
            raise ConfigError(f"recover: train_modules match only modules without parameters ({list(modules)[:3]}, "
                              "e.g. a rotary embedding): nothing would train in full; name modules with parameters")
        return modules

    # ---------------------------------------------------------------------------------------------- apply
    def apply(self, model: nn.Module, ctx: PassContext) -> PassReport:
        with training_into(self.config.checkpoint_dir):  # (from finding the checkpoint to resume to the last save)
            return self._apply(model, ctx)

    def _apply(self, model: nn.Module, ctx: PassContext) -> PassReport:
        from .lora import quiet_rewrap, wrap_for_lora
        from .training import TrainingPlan, checkpoint_progress, steps_for_budget, train
        from peft import LoraConfig, get_peft_model

        c = self.config
        targets = self._checked_targets(model)
        teacher = None
        if c.kl_weight > 0:
            teacher = ctx.original_model
            if teacher is None:
                raise CompressError("recover: kl_weight > 0 needs the original model; run it through compress.apply, "
                                    "which keeps a frozen copy of the model as it was before the first pass")
        trained_in_full = self._train_modules(model) if c.train_modules else {}
        fully_trained = self._fully_trained(trained_in_full, targets)
        after_step = [sub.after_training_step for top in trained_in_full.values() for sub in top.modules()
                      if hasattr(sub, "after_training_step")]
        report = PassReport(name=self.name, modules=list(targets))
        report.skipped = {n: f"{type(m).__name__}: LoRA attaches to Linear or packed sparse layers"
                          for n, m in self.target_modules(model).items() if n not in targets}
        report.bytes_before = sum(tensor_bytes(m) for m in targets.values())
        world = world_size()
        # the checkpoint it resumes from, of this very run: LoRA on the same modules, of the same shapes (checked
        # before any pass ran where the targets were known; what earlier passes left, here, before training)
        resume = resume_point(c.checkpoint_dir, c.resume_from)
        shapes = {n: (m.out_features, m.in_features) for n, m in targets.items()}
        self.located(lambda: (check_same_run(self._planned(model, targets, ctx), c.checkpoint_dir, c.resume_from),
                              resume and check_adapter_shapes(resume, shapes, c.r, c.checkpoint_dir, c.resume_from)))
        seq_len = self._seq_len(ctx)  # the budget holds a step: check_with_calibration, before any work
        done = checkpoint_progress(resume, c.batch_size * seq_len * world) if resume is not None else (0, 0)
        max_steps = steps_for_budget(c.max_tokens, c.batch_size, seq_len, world, done)
        windows = self._training_windows(ctx, max_steps * c.batch_size * world, seq_len)
        over_text = windows.offsets.numel() * seq_len / windows.ids.numel()
        device = next(model.parameters()).device
        trainable_before = {n: p.requires_grad for n, p in model.named_parameters()}
        lora_config = LoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout, target_modules=list(targets),
                                 bias="none")
        output_dir = Path(c.checkpoint_dir) if c.checkpoint_dir else Path(tempfile.mkdtemp(prefix="recover-"))
        with timed(report):
            torch.manual_seed(c.seed)  # the adapters' initialization
            wrap_for_lora(model, list(targets), lora_config)
            with quiet_rewrap():
                peft_model = get_peft_model(model, lora_config)
            plan = TrainingPlan(windows=windows, max_steps=max_steps, tokens_per_step=c.batch_size * seq_len,
                                batch_size=c.batch_size, micro_batch_size=c.micro_batch_size or c.batch_size,
                                gradient_checkpointing=c.gradient_checkpointing, lr=c.lr,
                                max_seconds=c.max_minutes * 60,
                                output_dir=output_dir, save_steps=c.save_steps if c.checkpoint_dir else None,
                                resume_from=str(resume) if resume is not None else None, seed=c.seed,
                                device=ctx.device, progress=ctx.progress, aux_weight=c.aux_weight,
                                fully_trained=fully_trained, done=done, after_step=after_step)
            if c.checkpoint_dir:  # what the next run that finds these checkpoints compares (resume.py)
                write_record(c.checkpoint_dir, self._planned(model, targets, ctx))
            runtimes = _decoded_for_training(model) if ctx.device == "cpu" else {}
            # transformers' Trainer sets config.use_cache to its own argument (False) and leaves it there: a saved
            # checkpoint then generated with no cache at all (no linearized state, no gear_kv cache)
            use_cache = getattr(model.config, "use_cache", None)
            try:
                with float32_originals(model, fully_trained, report.notes) as plan.fully_trained:  # (half ones)
                    for p in plan.fully_trained.values():
                        p.requires_grad_(True)
                    stats = train(peft_model, plan, teacher, c.kl_weight)
            finally:
                if use_cache is not None:
                    model.config.use_cache = use_cache
                for layer, runtime in runtimes.items():
                    layer.set_runtime(runtime)
                if not c.checkpoint_dir:
                    shutil.rmtree(output_dir, ignore_errors=True)
            model.to(device).eval()
            if c.merge:  # compress.apply then rounds the merged weights to the checkpoint's dtype (round_to_storage)
                peft_model.merge_and_unload()
                if hasattr(model, "peft_config"):
                    del model.peft_config
            model.requires_grad_(False)
            for name, p in model.named_parameters():
                p.requires_grad_(trainable_before.get(name, False))
        if one_process_of_accelerate():
            report.notes.append("accelerate launch ran this as one process whatever --num_processes said (its "
                                "launcher for --cpu, or a machine without GPUs, sets no WORLD_SIZE): for several CPU "
                                "processes use torchrun --nproc_per_node N -m compress.cli apply ...")
        if over_text > 1:  # (it draws its own windows, max_tokens of them: calibration.num_samples is not its count)
            report.notes.append(
                f"max_tokens {c.max_tokens} drew {windows.offsets.numel()} windows of {seq_len} tokens from a "
                f"calibration text of {windows.ids.numel()} tokens: each token is trained on ~{over_text:.1f} times "
                "(windows overlap); give more text (calibration.source) or lower max_tokens")
        if resume is not None and stats["steps_this_run"] == 0:
            report.notes.append(
                f"the checkpoint resumed ({Path(resume).name}, {done[1]} tokens) had used max_tokens {c.max_tokens} "
                "already: nothing was trained in this run (its adapter is the result); raise max_tokens to train on")
        if stats["stopped_by"] == "wall_clock":  # the schedule never reached its decay: say so, with the fix
            report.notes.append(
                f"max_minutes stopped training after {stats['steps']} of {stats['max_steps']} steps, with the "
                f"learning rate at {100 * stats['lr_at_stop']:.2g}% of lr: its schedule (5% warm-up, then cosine "
                f"decay) is sized by max_tokens; set max_tokens to about what fits in max_minutes "
                f"({stats['tokens_this_run']} tokens here) for the whole schedule")
        report.bytes_after = sum(tensor_bytes(model.get_submodule(n)) for n in targets)
        report.details = {**stats, "seq_len": seq_len, "batch_size": c.batch_size, "merged": c.merge,
                          "kl_weight": c.kl_weight, "aux_weight": c.aux_weight,
                          "fully_trained_parameters": sum(p.numel() for p in fully_trained.values())}
        if not c.merge:
            report.details["restore"] = {"adapter": ADAPTER_FOLDER, "modules": list(targets)}
        return report

    @staticmethod
    def _fully_trained(modules: dict[str, nn.Module], targets: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
        """Parameters of the `train_modules` (trained in full, not through LoRA); none may be a LoRA target's."""
        _refuse_overlap(modules, targets)
        # a module's own frozen parameters (a VQ head's exact shortlist rows) stay frozen; a parameter shared by
        # two submodules counts once, as named_parameters() has it
        frozen = {id(p) for m in modules.values() for owner in m.modules()
                  for n, p in owner.named_parameters(recurse=False) if n in getattr(owner, "frozen_parameters", ())}
        return {f"{name}.{n}": p for name, m in modules.items() for n, p in m.named_parameters()
                if id(p) not in frozen}

    def _training_windows(self, ctx: PassContext, count: int, seq_len: int):
        """`count` windows of `seq_len` tokens from the recipe's calibration source (its own draw, not the
        calibration batches other passes share: the token budget sets how many), cut as training asks for them."""
        from ..calibration import window_coverage, window_offsets
        from .training import WindowDataset

        if ctx.calibration is None:
            raise CalibrationError("recover trains on calibration text: add `calibration: {source: builtin:calibration}`")
        if ctx.tokenizer is None:
            raise CompressError("recover needs a tokenizer to encode the calibration text; save it with the model")
        spec = ctx.calibration.model_copy(update={"num_samples": count, "seq_len": seq_len})
        ids, offsets = window_offsets(spec, ctx.tokenizer, ctx.base_dir)
        # the spans the windows cover (the text read is up to 4x what they use): the checkpoint's sketch of what
        # was trained on, for an evaluation on that text to say so
        ctx.saw_text(ids, covered=window_coverage(ids.numel(), offsets, seq_len))
        return WindowDataset(ids, offsets, seq_len)

    # ---------------------------------------------------------------------------------------------- checkpoint
    def lora_config(self, modules: list[str]):
        from peft import LoraConfig

        c = self.config
        return LoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout, target_modules=modules, bias="none")

    def write_files(self, model: nn.Module, entry: dict[str, Any], state: dict, folder: Path) -> dict:
        """An unmerged adapter goes to its own PEFT folder; the main weights keep the base layers' usual names."""
        from .adapter import save_adapter
        restore = entry.get("restore") or {}
        if not restore.get("adapter"):
            return state
        return save_adapter(model, state, restore["modules"], self.lora_config(restore["modules"]),
                            folder / restore["adapter"])

    extra_folder_files = ("adapter_config.json", "adapter_model.safetensors")  # PEFT's names (adapter.py)

    def extra_folders(self, entry: dict[str, Any]) -> list[str]:
        adapter = (entry.get("restore") or {}).get("adapter")
        if not adapter:
            return []
        if not isinstance(adapter, str) or Path(adapter).name != adapter or adapter in (".", ".."):
            raise CheckpointError(f"compression: recover's restore.adapter must name a folder inside the checkpoint "
                                  f"(got {adapter!r})")
        return [adapter]

    def read_files(self, model: nn.Module, entry: dict[str, Any], folder: Path) -> None:
        from .adapter import load_adapter
        restore = entry.get("restore") or {}
        names = self.extra_folders(entry)  # the adapter's folder, checked
        if not names:
            return
        path = folder / names[0]
        if not (path / "adapter_config.json").exists():
            raise CheckpointError(f"{folder} records an unmerged LoRA adapter in {names[0]}/, which is "
                                  "missing; copy the whole checkpoint folder")
        load_adapter(model, restore["modules"], self.lora_config(restore["modules"]), path)


def _within(name: str, others) -> bool:
    """`name` is one of `others`, inside one, or holds one (module paths)."""
    return any(within(name, o) or within(o, name) for o in others)


def _refuse_overlap(modules, targets) -> None:
    overlap = [n for n in modules if _within(n, targets)]
    if overlap:
        raise ConfigError(f"recover: train_modules {overlap[:3]} overlap the LoRA targets; a module is trained "
                          "either through LoRA (targets) or in full (train_modules), not both")


def _decoded_for_training(model: nn.Module) -> dict[SparseLinear, str]:
    """On the CPU a packed layer decodes its weight on every call: decode once for the training loop instead.
    Returns each switched layer's previous runtime, to put back afterwards."""
    switched = {}
    for module in model.modules():
        if isinstance(module, SparseLinear) and hasattr(module, "set_runtime") and module.runtime != "dense":
            switched[module] = module.runtime
            module.set_runtime("dense")
    return switched


__all__ = ["Recover"]
