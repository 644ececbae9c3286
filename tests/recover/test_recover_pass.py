"""The `recover` pass on the reference model: recovery lowers held-out loss, the KL term trains against a frozen
teacher, budgets stop training, Trainer checkpoints resume, and checkpoints round-trip with and without merging
(after 2:4 pruning: still exactly 2:4 and packed)."""
import copy
import json
import math

import pytest
import torch

import compress
from compress.errors import CheckpointError
from compress.evaluate import evaluate, heldout_windows
from compress.pass_api import PassContext
from compress.prune import SparseLinear
from compress.prune.masks import is_nm
from compress.recover import Recover, SparsityKeepingLoraLinear

CALIBRATION = compress.CalibrationSpec(source="builtin:calibration", num_samples=4, seq_len=32)
SMALL = dict(seq_len=32, batch_size=4)  # 128 tokens per step
ALL_LINEAR = ["re:.*(q|k|v|o|gate|up|down)_proj$"]


@pytest.fixture(scope="module")
def pruned_2of4(reference_model):
    model, _ = compress.apply(copy.deepcopy(reference_model), [compress.passes.Prune(structure="2:4")], progress=False)
    return model


def recover(model, tokenizer, **args):
    model, report = compress.apply(model, [Recover(**{**SMALL, **args})], calibration=CALIBRATION,
                                   tokenizer=tokenizer, progress=False)
    return model, report.passes[0].details


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 8192, (2, 24), generator=torch.Generator().manual_seed(0))


def test_recovery_lowers_heldout_loss_of_a_damaged_model(reference_model, reference_tokenizer):
    damaged, _ = compress.apply(copy.deepcopy(reference_model),
                                [compress.passes.Prune(sparsity=0.6, storage="dense")], progress=False)
    windows = heldout_windows(reference_tokenizer, seq_len=64, max_windows=6)
    dense = evaluate(reference_model, windows, progress=False)["perplexity"]
    before = evaluate(damaged, windows, progress=False)["perplexity"]
    assert before > 1.02 * dense  # this model loses little to pruning: the gap to close is a few percent
    model, details = recover(damaged, reference_tokenizer, targets=ALL_LINEAR, max_tokens=20 * 128, lr=3e-3)
    after = evaluate(model, windows, progress=False)["perplexity"]
    assert details["steps"] == 20 and details["stopped_by"] == "token_budget"
    assert after < before - 0.5 * (before - dense), (dense, before, after)  # at least half the gap closed
    zeros = [(m.weight == 0).float().mean().item() for n, m in model.named_modules() if n.endswith("_proj")]
    assert min(zeros) == pytest.approx(0.6, abs=1e-3)  # merged, and the dense-stored zeros stayed zero


def test_kl_term_trains_against_a_frozen_teacher(reference_model, reference_tokenizer):
    teacher = copy.deepcopy(reference_model)
    snapshot = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, _ = compress.apply(copy.deepcopy(reference_model),
                                [compress.passes.Prune(sparsity=0.6, storage="dense")], progress=False)
    windows = heldout_windows(reference_tokenizer, seq_len=64, max_windows=6)
    before = evaluate(student, windows, teacher, progress=False)["kl"]
    ctx = PassContext(calibration=CALIBRATION, tokenizer=reference_tokenizer, progress=False, original_model=teacher)
    details = Recover(**SMALL, targets=ALL_LINEAR, max_tokens=20 * 128, lr=3e-3, kl_weight=1.0).apply(student,
                                                                                                     ctx).details
    after = evaluate(student, windows, teacher, progress=False)["kl"]
    assert after < 0.8 * before and details["last_kl"] < details["first_kl"], (before, after, details)
    assert all(torch.equal(v, snapshot[k]) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(compress.CompressError, match="needs the original model"):
        Recover(kl_weight=1.0).apply(student, PassContext(calibration=CALIBRATION, tokenizer=reference_tokenizer))


def test_apply_keeps_the_model_before_the_first_pass_as_teacher(reference_model, reference_tokenizer):
    passes = [compress.passes.Prune(structure="2:4"), Recover(**SMALL, max_tokens=2 * 128, kl_weight=0.5)]
    model, report = compress.apply(copy.deepcopy(reference_model), passes, calibration=CALIBRATION,
                                   tokenizer=reference_tokenizer, progress=False)
    # KL to the dense original, not to the pruned model: clearly above zero from the first step
    assert report.passes[1].details["first_kl"] > 0.02


def test_merge_after_2of4_stays_2of4_packed_and_reloads_exactly(tmp_path, pruned_2of4, reference_tokenizer):
    model = copy.deepcopy(pruned_2of4)
    before = {n: m.dense_weight() for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    model, details = recover(model, reference_tokenizer, max_tokens=3 * 128, lr=1e-2, merge=True)
    packed = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert set(packed) == set(before) and len(packed) == 42
    changed = [n for n, m in packed.items() if not torch.equal(m.dense_weight(), before[n])]
    assert changed and all(n.endswith(("q_proj", "k_proj", "v_proj")) for n in changed)
    for m in packed.values():
        assert m.format == "nm" and is_nm(m.dense_weight() != 0, 2, 4)
    expected = logits(model, IDS)
    assert model.config.use_cache  # the Trainer sets it False when training ends: a checkpoint then had no cache
    out = compress.save(model, tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    section = compress.models.compression_section(out)
    assert [p["pass"] for p in section["passes"]] == ["prune", "recover"] and not (out / "adapter").exists()
    reloaded = compress.load(out)
    assert sum(isinstance(m, SparseLinear) for m in reloaded.modules()) == 42
    assert not any(isinstance(m, SparsityKeepingLoraLinear) for m in reloaded.modules())
    torch.testing.assert_close(logits(reloaded, IDS), expected, rtol=0, atol=1e-5)


def test_unmerged_adapter_is_a_peft_folder_that_reloads(tmp_path, pruned_2of4, reference_tokenizer):
    model, details = recover(copy.deepcopy(pruned_2of4), reference_tokenizer, max_tokens=3 * 128, lr=1e-2,
                             merge=False)
    assert details["merged"] is False
    assert len([m for m in model.modules() if isinstance(m, SparsityKeepingLoraLinear)]) == 18
    expected = logits(model, IDS)
    assert not torch.allclose(expected, logits(pruned_2of4, IDS), atol=1e-3)  # the adapter is active
    out = compress.save(model, tmp_path / "adapter")
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "adapter" / "adapter_model.safetensors").exists()
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert not any("lora_" in k or "base_layer" in k for k in keys)
    assert "model.layers.0.self_attn.q_proj.values" in keys
    reloaded = compress.load(out)
    wrappers = [m for m in reloaded.modules() if isinstance(m, SparsityKeepingLoraLinear)]
    assert len(wrappers) == 18 and all(isinstance(w.get_base_layer(), SparseLinear) for w in wrappers)
    torch.testing.assert_close(logits(reloaded, IDS), expected, rtol=0, atol=1e-5)
    compress.save(reloaded, tmp_path / "again")  # a reloaded adapter saves again the same way
    torch.testing.assert_close(logits(compress.load(tmp_path / "again"), IDS), expected, rtol=0, atol=1e-5)
    # max_memory loading cannot attach the adapter: refused, not silently dropped
    with pytest.raises(CheckpointError, match="keeps adapter/ beside its weights"):
        compress.load(out, max_memory="1GB")
    from compress.cli import folder_bytes  # the checkpoint's bytes include the adapter's

    assert folder_bytes(out) == sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    assert folder_bytes(out) > (out / "model.safetensors").stat().st_size
    # one size everywhere: the model's stored bytes (the pass table), inspect's total and the tensors on disk
    # (the adapter at its own float32, not the checkpoint's bf16)
    import json

    from click.testing import CliRunner
    from safetensors.torch import load_file

    from compress.cli import main
    from compress.inspection import stored_bytes

    tensors = sum(t.numel() * t.element_size() for f in out.rglob("*.safetensors") for t in load_file(f).values())
    shown = json.loads(CliRunner().invoke(main, ["inspect", str(out), "--json"], catch_exceptions=False).stdout)
    assert shown["budget"]["weights_total"]["stored"] == tensors
    assert stored_bytes(model, reloaded.compress_storage_dtype) == tensors


def test_unmerged_adapter_over_dense_stored_pruned_layers_refuses_plain_transformers(tmp_path, reference_model,
                                                                                     reference_tokenizer):
    """Over a pruned layer the update is masked (M * BA), which plain PEFT would not apply: marked, not loadable."""
    from transformers import AutoModelForCausalLM

    pruned, _ = compress.apply(copy.deepcopy(reference_model), [compress.passes.Prune(sparsity=0.5, storage="dense")],
                               progress=False)
    model, _ = recover(pruned, reference_tokenizer, max_tokens=128, merge=False)
    out = compress.save(model, tmp_path / "out")
    with pytest.raises(ValueError, match="compress-native"):
        AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(compress.load(out), IDS), logits(model, IDS), rtol=0, atol=1e-5)


def test_unmerged_adapter_on_a_dense_model_loads_with_plain_peft(tmp_path, reference_model, reference_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, _ = recover(copy.deepcopy(reference_model), reference_tokenizer, max_tokens=2 * 128, lr=1e-2, merge=False)
    out = compress.save(model, tmp_path / "dense")
    base = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    torch.testing.assert_close(logits(peft_model, IDS), logits(compress.load(out), IDS), rtol=0, atol=1e-5)


def test_budgets_stop_training(pruned_2of4, reference_tokenizer):
    _, details = recover(copy.deepcopy(pruned_2of4), reference_tokenizer, max_tokens=3 * 128 + 5)
    assert (details["steps"], details["tokens"], details["stopped_by"]) == (3, 3 * 128, "token_budget")
    _, report = compress.apply(copy.deepcopy(pruned_2of4), [Recover(**{**SMALL, "max_tokens": 1000 * 128,
                                                                       "max_minutes": 1e-4})],
                               calibration=CALIBRATION, tokenizer=reference_tokenizer, progress=False)
    details, notes = report.passes[0].details, report.passes[0].notes
    assert details["steps"] == 1 and details["max_steps"] == 1000 and details["stopped_by"] == "wall_clock"
    # still in the warm-up its schedule (sized by max_tokens) began with: said, with the fix
    assert details["lr_at_stop"] < 0.05 and any("max_minutes stopped training after 1 of 1000 steps" in n
                                                  and "set max_tokens to about" in n for n in notes), notes


def test_training_resumes_from_trainer_checkpoints(tmp_path, pruned_2of4, reference_tokenizer):
    folder = tmp_path / "trainer"
    _, first = recover(copy.deepcopy(pruned_2of4), reference_tokenizer, max_tokens=2 * 128, checkpoint_dir=str(folder),
                       save_steps=2)
    assert first["steps"] == 2 and (folder / "checkpoint-2").is_dir()
    # a longer budget with the same folder picks up the newest checkpoint: the global step continues from 2
    _, resumed = recover(copy.deepcopy(pruned_2of4), reference_tokenizer, max_tokens=4 * 128,
                         checkpoint_dir=str(folder), save_steps=2)
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["steps"] == 4
    # steps and tokens count both runs (the schedule's position); the *_this_run ones what `seconds` timed
    assert (resumed["steps_this_run"], resumed["tokens_this_run"], resumed["tokens"]) == (2, 2 * 128, 4 * 128)
    assert (folder / "checkpoint-4").is_dir()
    _, explicit = recover(copy.deepcopy(pruned_2of4), reference_tokenizer, max_tokens=5 * 128,
                          resume_from=str(folder / "checkpoint-4"))
    assert explicit["resumed_from"].endswith("checkpoint-4") and explicit["steps"] == 5
    assert explicit["steps_this_run"] == 1
    # a budget the checkpoint had used already trains nothing: said (it returned the old adapter, no note)
    _, report = compress.apply(copy.deepcopy(pruned_2of4), [Recover(**{**SMALL, "max_tokens": 2 * 128,
                                                                       "checkpoint_dir": str(folder)})],
                               calibration=CALIBRATION, tokenizer=reference_tokenizer, progress=False)
    assert report.passes[0].details["steps_this_run"] == 0
    assert any("had used max_tokens 256 already: nothing was trained in this run" in n
               for n in report.passes[0].notes), report.passes[0].notes
    with pytest.raises(compress.ConfigError, match="resume_from"):
        recover(copy.deepcopy(pruned_2of4), reference_tokenizer, resume_from=str(tmp_path / "nope"))


def test_a_budget_that_reads_the_text_many_times_over_is_said(tmp_path, pruned_2of4, reference_tokenizer):
    """recover draws max_tokens / seq_len windows of its own (not calibration.num_samples): a budget far above a short
    text trained on each token several times, in overlapping windows, with nothing said (a tester's find)."""
    text = tmp_path / "short.txt"
    text.write_text(" ".join(f"Line {i} of a short calibration text about nothing in particular." for i in range(12)))
    tokens = len(reference_tokenizer(text.read_text())["input_ids"])
    _, report = compress.apply(copy.deepcopy(pruned_2of4), [Recover(**{**SMALL, "max_tokens": 2 * 128})],
                               calibration=compress.CalibrationSpec(source=str(text), num_samples=4, seq_len=32),
                               tokenizer=reference_tokenizer, progress=False)
    notes = report.passes[0].notes
    assert tokens < 2 * 128 and any(f"drew 8 windows of 32 tokens from a calibration text of {tokens + 1} tokens" in n
                                    and "give more text" in n for n in notes), (tokens, notes)
    _, report = compress.apply(copy.deepcopy(pruned_2of4), [Recover(**{**SMALL, "max_tokens": 2 * 128})],
                               calibration=CALIBRATION, tokenizer=reference_tokenizer, progress=False)
    assert not any("drew" in n for n in report.passes[0].notes)


def test_a_resumed_run_at_another_batch_size_trains_the_tokens_left(tmp_path, pruned_2of4, reference_tokenizer,
                                                                   monkeypatch):
    """The budget was counted in the resumed run's own steps: at twice the batch it stopped at half the tokens asked
    for and reported them all (steps x this run's batch). transformers' warning that the batch differs from the
    checkpoint's (an allowed change) is not printed."""
    import logging

    from transformers.trainer_utils import logger as trainer_utils_logger

    said = []
    monkeypatch.setattr(trainer_utils_logger, "warning_once", lambda msg, *a, **k: trainer_utils_logger.warning(msg))
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    monkeypatch.setattr(trainer_utils_logger, "handlers", [*trainer_utils_logger.handlers, handler])
    folder = tmp_path / "trainer"
    batch = SMALL["batch_size"]
    _, first = recover(copy.deepcopy(pruned_2of4), reference_tokenizer, max_tokens=4 * 128, checkpoint_dir=str(folder),
                       save_steps=2)
    assert (first["steps"], first["tokens"]) == (4, 4 * 128)
    _, resumed = recover(copy.deepcopy(pruned_2of4), reference_tokenizer, max_tokens=12 * 128, batch_size=2 * batch,
                         checkpoint_dir=str(folder), save_steps=2)
    # 8 x 128 tokens left, 256 a step now: 4 more steps
    assert resumed["resumed_from"].endswith("checkpoint-4") and resumed["steps"] == 8
    assert (resumed["tokens_this_run"], resumed["tokens"]) == (8 * 128, 12 * 128)
    assert not any("do not match" in m for m in said), said
    state = json.loads((folder / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["num_input_tokens_seen"] == 12 * 128  # what the next resume reads
    # a budget already spent trains nothing more
    _, spent = recover(copy.deepcopy(pruned_2of4), reference_tokenizer, max_tokens=10 * 128,
                       checkpoint_dir=str(folder), save_steps=2)
    assert (spent["steps_this_run"], spent["tokens_this_run"], spent["tokens"]) == (0, 0, 12 * 128)
    assert spent["train_loss"] is None  # (the Trainer's 0.0 for no step: a helper's find)


def logged_rates(monkeypatch) -> dict[int, float]:
    """step -> the learning rate the Trainer logs for it (the rate that step's optimizer update used), as it trains."""
    from compress.recover import training

    rates, real_log = {}, training.RecoveryTrainer.log

    def log(self, logs, *args, **kwargs):
        if "learning_rate" in logs:
            rates[self.state.global_step] = logs["learning_rate"]
        return real_log(self, logs, *args, **kwargs)

    monkeypatch.setattr(training.RecoveryTrainer, "log", log)
    return rates


def test_a_resumed_run_trains_at_its_own_lr_on_its_own_schedule(tmp_path, monkeypatch, pruned_2of4,
                                                                  reference_tokenizer):
    """The Trainer restores the checkpoint's scheduler (its peak: the old lr) and the optimizer's rates (the old
    schedule's last): a changed lr was ignored, and the first resumed step ran at the old schedule's rate. Resumed at
    the same lr and budget, the run is bit for bit the uninterrupted one."""
    rates = logged_rates(monkeypatch)
    folder = tmp_path / "trainer"
    whole, first = recover(copy.deepcopy(pruned_2of4), reference_tokenizer, max_tokens=4 * 128, lr=1e-3,
                           checkpoint_dir=str(folder), save_steps=2)
    uninterrupted = dict(rates)
    # 4 steps, no warm-up: the cosine at steps 0..3 of 4 (step s + 1 runs at the rate after s)
    assert sorted(uninterrupted) == [1, 2, 3, 4] and first["steps"] == 4
    for step, rate in uninterrupted.items():
        assert rate == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * (step - 1) / 4)))

    rates.clear()
    same, _ = recover(copy.deepcopy(pruned_2of4), reference_tokenizer, max_tokens=4 * 128, lr=1e-3,
                      resume_from=str(folder / "checkpoint-2"))
    assert rates == {3: uninterrupted[3], 4: uninterrupted[4]}
    assert all(torch.equal(v, whole.state_dict()[k]) for k, v in same.state_dict().items())

    rates.clear()
    recover(copy.deepcopy(pruned_2of4), reference_tokenizer, max_tokens=4 * 128, lr=1e-2,
            resume_from=str(folder / "checkpoint-2"))
    assert rates == pytest.approx({3: 10 * uninterrupted[3], 4: 10 * uninterrupted[4]})

    rates.clear()  # a longer budget: its own schedule (8 steps) from step 3 on, not the 4-step one's rates
    _, longer = recover(copy.deepcopy(pruned_2of4), reference_tokenizer, max_tokens=8 * 128, lr=1e-3,
                        resume_from=str(folder / "checkpoint-2"))
    assert longer["steps"] == 8 and sorted(rates) == [3, 4, 5, 6, 7, 8]
    for step, rate in rates.items():
        assert rate == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * (step - 1) / 8))), step


def test_checkpoint_progress_of_a_checkpoint_that_counted_no_tokens(tmp_path):
    """Checkpoints written before the count: taken at this run's tokens per step."""
    from compress.recover.training import checkpoint_progress, steps_for_budget

    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 6}))
    assert checkpoint_progress(tmp_path, 100) == (6, 600)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 6, "num_input_tokens_seen": 300}))
    assert checkpoint_progress(tmp_path, 100) == (6, 300)
    assert steps_for_budget(1000, 2, 25, 2, done=(6, 300)) == 6 + 7
    assert steps_for_budget(1000, 2, 25, 2) == 10 and steps_for_budget(10, 2, 25) == 1


def test_recipe_without_calibration_is_refused():
    with pytest.raises(compress.RecipeError, match="needs calibration data"):
        compress.Recipe.from_text("model: builtin:tiny\npasses:\n  - recover: {max_tokens: 1000}\n")


def test_recovery_after_a_codebook_head(reference_model, reference_tokenizer):
    """recover follows any pass: after vq_logits the head is a codebook with no weight (it crashed there)."""
    model, _ = compress.apply(copy.deepcopy(reference_model), [compress.passes.VQLogits(num_codes=64,
                              kmeans_iterations=2)], calibration=CALIBRATION, tokenizer=reference_tokenizer,
                              progress=False)
    before = logits(model, IDS)
    model, details = recover(model, reference_tokenizer, max_tokens=2 * 128, lr=1e-2)
    assert details["steps"] == 2
    assert type(model.get_output_embeddings()).__name__ == "VQLogitsHead"
    assert not torch.equal(logits(model, IDS), before)  # the merged adapter changed q/k/v


def test_merge_into_a_tied_head_is_refused(tiny_model, reference_tokenizer):
    """LoRA merged into an lm_head that shares its weight with the embedding would change the embedding too."""
    from compress.errors import ConfigError

    model = tiny_model("llama", tie_word_embeddings=True, vocab_size=8192)
    with pytest.raises(ConfigError, match="shares its weight with the input embedding"):
        recover(model, reference_tokenizer, targets=["lm_head"], ignore=[], max_tokens=128, merge=True)


def test_unmerged_adapter_reloads_exactly_in_bf16(tmp_path, reference_tokenizer):
    """A bf16 model keeps its trained adapter in fp32 in memory; the reload must too (it was cast to bf16)."""
    model, _ = recover(compress.load("builtin:tiny", dtype="bfloat16"), reference_tokenizer, max_tokens=2 * 128,
                       lr=1e-2, merge=False)
    reloaded = compress.load(compress.save(model, tmp_path / "bf16"), dtype="bfloat16")
    torch.testing.assert_close(logits(reloaded, IDS), logits(model, IDS), rtol=0, atol=0)


def test_wall_clock_budget_names_what_stopped_the_run():
    """A last step that reached the token budget as the wall clock ran out reported stopped_by: wall_clock."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from compress.recover.training import WallClockBudget

    args = SimpleNamespace(save_strategy="no", world_size=1, device=torch.device("cpu"))
    for step, max_steps, hit in ((5, 5, False), (3, 5, True)):
        budget, control = WallClockBudget(seconds=0.0), TrainerControl()
        budget.on_train_begin(args, TrainerState(), control)
        budget.on_step_end(args, TrainerState(global_step=step, max_steps=max_steps), control)
        assert budget.hit is hit and control.should_training_stop is hit


def test_micro_batches_and_gradient_checkpointing_train_the_same_adapter(reference_tokenizer):
    # the memory options must not change the optimization: the same windows in each step, the same mean loss
    # (float32: in bf16 the sums' order alone moves logits by an ulp)
    base, _ = compress.apply(compress.load("builtin:tiny", dtype="float32"), [compress.passes.Prune(structure="2:4")],
                             progress=False)
    runs = {}
    for name, options in {"plain": {}, "micro 2": {"micro_batch_size": 2}, "micro 1": {"micro_batch_size": 1},
                          "checkpointed": {"gradient_checkpointing": True}}.items():
        model, details = recover(copy.deepcopy(base), reference_tokenizer, targets=ALL_LINEAR, max_tokens=4 * 128,
                                 lr=3e-3, **options)
        assert details["steps"] == 4
        assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # off again
        runs[name] = logits(model, IDS)
    assert (runs["plain"] - logits(base, IDS)).abs().max() > 0.5  # training moved the logits this much
    for name in ("micro 2", "micro 1", "checkpointed"):  # a step of 4 windows in 1 or 2 or 4 parts: ~1e-4 apart
        assert (runs[name] - runs["plain"]).abs().max() < 2e-3, name
    with pytest.raises(compress.ConfigError, match="micro_batch_size 3 does not divide batch_size 4"):
        Recover(batch_size=4, micro_batch_size=3)


def test_a_full_disk_under_the_trainer_checkpoints_is_one_line(tmp_path, monkeypatch):
    """torch.save reports a full disk as "[enforce fail at inline_container.cc] unexpected pos": recover ended in
    that traceback, exit 1, where every other write says "no space left" in one line (exit 2)."""
    import shutil
    from collections import namedtuple

    import transformers
    from click.testing import CliRunner

    from compress.cli import main

    def cut(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 103936 vs 103828")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", cut)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 20, 1 << 20, 0))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(
        "model: builtin:tiny\ncalibration: {source: builtin:calibration, num_samples: 4, seq_len: 32}\npasses:\n"
        "  - recover: {max_tokens: 256, batch_size: 2, checkpoint_dir: ckd, save_steps: 1}\n")
    result = CliRunner().invoke(main, ["apply", "r.yaml", "-o", "out", "--no-eval"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1] == ("error: no space left on the device while writing ckd; free "
                                                     "some space or write elsewhere")
    assert not (tmp_path / "out").exists()
    # with room left on the disk the same error is not a full disk: its traceback stays (a bug to report)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 0, 1 << 40))
    result = CliRunner().invoke(main, ["apply", "r.yaml", "-o", "out", "--no-eval"])
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)
