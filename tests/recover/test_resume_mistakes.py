"""User mistakes around recover's Trainer checkpoints and WORLD_SIZE, through `compress apply`: each is one line on
stderr and exit 2, found before training (before any pass runs where it can be), with nothing written or deleted.
A rerun with the same recipe still resumes from the checkpoints it finds."""
from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import compress
from compress.cli import main
from compress.environment import world_size
from compress.recover import training
from compress.recover.resume import RECORD

CALIBRATION = "calibration: {source: builtin:calibration, num_samples: 4, seq_len: 32}"


def recipe(path: Path, args: str, before: str = "") -> Path:
    path.write_text("\n".join(["model: builtin:tiny", CALIBRATION, "passes:", *([before] if before else []),
                               f"  - recover: {{{args}}}", ""]))
    return path


def apply(*args, env=None):
    return CliRunner().invoke(main, ["apply", *map(str, args)], env=env)


PROGRESS = re.compile(r"[^:]+: \d+/\d+( \(.*\))?")  # progress.status_line, off a terminal


def refused(result, *expected: str) -> None:
    """Exit 2, one or two lines on stderr naming what to fix (after the progress lines of the passes that ran
    before the mistake was found), no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.strip().splitlines() if not PROGRESS.fullmatch(line)]
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: ") and "Traceback" not in result.output, lines
    for text in expected:
        assert text in result.stderr, (text, result.stderr)


@pytest.fixture
def no_training(monkeypatch):
    """Training (the expensive work) must not start: the mistake is found before it."""
    def fail(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(training, "train", fail)


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- WORLD_SIZE
@pytest.mark.parametrize("value", ["abc", "0", "-2", "", "1.5"])
def test_world_size_must_be_a_positive_integer(tmp_path, value):
    rec = recipe(tmp_path / "rec.yaml", "max_tokens: 128, batch_size: 2, max_minutes: 0.2")
    result = apply(rec, "-o", tmp_path / "x", "--dry-run", env={"WORLD_SIZE": value})
    refused(result, f"WORLD_SIZE={value!r} must be a positive integer")


def test_world_size_above_one_without_a_launcher_is_refused_before_any_work(tmp_path):
    """It ended in accelerate's ValueError (MASTER_ADDR) traceback after the earlier passes ran."""
    rec = recipe(tmp_path / "w.yaml", "max_tokens: 128, batch_size: 2",
                 before="  - prune: {method: magnitude, sparsity: 0.5}")
    for extra in (["--dry-run"], ["--no-eval"]):
        refused(apply(rec, "-o", tmp_path / "x", *extra, env={"WORLD_SIZE": "2", "RANK": "", "MASTER_ADDR": ""}),
                "error: WORLD_SIZE=2 but RANK and MASTER_ADDR unset", "accelerate launch")
    assert not (tmp_path / "x").exists()


def test_a_malformed_world_size_does_not_stop_a_recipe_that_does_not_train(tmp_path):
    """Only recover reads WORLD_SIZE; the check for the main process made every apply refuse it."""
    rec = tmp_path / "p.yaml"
    rec.write_text("model: builtin:tiny\npasses:\n  - prune: {method: magnitude, sparsity: 0.5}\n")
    result = apply(rec, "-o", tmp_path / "x", "--no-eval", env={"WORLD_SIZE": "abc"})
    assert result.exit_code == 0, result.output
    assert (tmp_path / "x" / "config.json").is_file()


def test_world_size_reads_unset_as_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", " 4 ")
    assert world_size() == 4


# ---------------------------------------------------------------------------------------------- checkpoint_dir
@pytest.mark.parametrize("inside", [False, True])
def test_checkpoint_dir_that_is_a_file_is_refused_before_any_work(tmp_path, monkeypatch, no_training, inside):
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("mine\n")
    folder = "afile/sub" if inside else "afile"
    rec = recipe(tmp_path / "c.yaml", f"max_tokens: 128, batch_size: 2, max_minutes: 0.2, checkpoint_dir: {folder}")
    refused(apply(rec, "-o", "o_c", "--no-eval"), f"checkpoint_dir {folder}", "is a file, not a folder")
    assert Path("afile").read_text() == "mine\n" and not Path("o_c").exists()


def test_a_changed_recipe_does_not_resume_another_runs_checkpoints(tmp_path, monkeypatch):
    """Checkpoints of r 8 LoRA, then a recipe with r 4 in the same checkpoint_dir: refused before training (it
    resumed and crashed on a size mismatch of lora_A); the same recipe with a longer budget resumes."""
    monkeypatch.chdir(tmp_path)
    common = "batch_size: 2, max_minutes: 1, checkpoint_dir: ckd, save_steps: 1"
    first = apply(recipe(tmp_path / "a.yaml", f"max_tokens: 128, {common}"), "-o", "o_a", "--no-eval", "--json")
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["passes"][0]["details"]["steps"] == 2
    assert (tmp_path / "ckd" / "checkpoint-2").is_dir() and (tmp_path / "ckd" / RECORD).is_file()
    before = listing(tmp_path / "ckd")

    trained = []
    real_train = training.train
    monkeypatch.setattr(training, "train", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    other = recipe(tmp_path / "b.yaml", f"r: 4, max_tokens: 128, {common}")
    for extra in (["--no-eval"], ["--dry-run"]):
        refused(apply(other, "-o", "o_b", *extra),
                "checkpoint_dir ckd holds checkpoints of a different run (LoRA r 8, not 4): empty it or choose another "
                "folder")
    targets = recipe(tmp_path / "t.yaml", f"targets: ['re:.*q_proj$'], max_tokens: 128, {common}")
    refused(apply(targets, "-o", "o_b", "--no-eval"), "different run (targets [")
    # checkpoints an older version wrote (no record): their adapter_config.json says the same
    (tmp_path / "ckd" / RECORD).rename(tmp_path / "record.json")
    refused(apply(other, "-o", "o_b", "--no-eval"), "different run (LoRA r 8, not 4)")
    refused(apply(targets, "-o", "o_b", "--no-eval"), "different run (LoRA on 18 modules, not 6")
    (tmp_path / "record.json").rename(tmp_path / "ckd" / RECORD)
    assert trained == [] and not (tmp_path / "o_b").exists() and listing(tmp_path / "ckd") == before

    again = apply(recipe(tmp_path / "a2.yaml", f"max_tokens: 192, {common}"), "-o", "o_a2", "--no-eval", "--json")
    assert again.exit_code == 0, again.output
    details = json.loads(again.stdout)["passes"][0]["details"]
    assert details["resumed_from"].endswith("checkpoint-2") and details["steps"] == 3 and trained == [1]


def _pruned_and_recovered(tmp_path, monkeypatch) -> tuple[str, str, dict[str, bytes]]:
    """A first run (magnitude prune, then recover with Trainer checkpoints in ckd/) in `tmp_path`: (recover's
    arguments, the prune pass's recipe line, the checkpoints' listing)."""
    monkeypatch.chdir(tmp_path)
    common = "max_tokens: 64, batch_size: 2, max_minutes: 1, checkpoint_dir: ckd, save_steps: 1"
    prune = "  - prune: {method: magnitude, sparsity: 0.5}"
    first = apply(recipe(tmp_path / "a.yaml", common, before=prune), "-o", "o_a", "--no-eval")
    assert first.exit_code == 0, first.output
    return common, prune, listing(tmp_path / "ckd")


def test_another_dropout_or_aux_weight_does_not_resume_the_old_adapter(tmp_path, monkeypatch):
    """Neither was compared: a rerun with another LoRA dropout or aux_weight resumed the adapter trained under the
    old one, silently. Refused before any pass runs, as another r is, also from PEFT's adapter_config.json where an
    older run left no record."""
    common, prune, before = _pruned_and_recovered(tmp_path, monkeypatch)
    monkeypatch.setattr(compress.passes.Prune, "apply", lambda *a, **k: pytest.fail("a pass ran"))
    dropout = recipe(tmp_path / "d.yaml", f"dropout: 0.1, {common}", before=prune)
    aux = recipe(tmp_path / "x.yaml", f"aux_weight: 0.5, {common}", before=prune)
    for extra in (["--no-eval"], ["--dry-run"]):
        refused(apply(dropout, "-o", "o_d", *extra), "d.yaml:5:5: recover: checkpoint_dir ckd holds checkpoints of a "
                "different run (LoRA dropout 0.0, not 0.1): empty it or choose another folder")
        refused(apply(aux, "-o", "o_x", *extra), "different run (aux_weight 0.01, not 0.5)")
    (tmp_path / "ckd" / RECORD).unlink()  # an older run's checkpoints: PEFT's lora_dropout says it
    refused(apply(dropout, "-o", "o_d", "--no-eval"), "different run (LoRA dropout 0.0, not 0.1)")
    assert listing(tmp_path / "ckd") == {k: v for k, v in before.items() if k != RECORD}
    assert not (tmp_path / "o_d").exists() and not (tmp_path / "o_x").exists()


def fake_checkpoint(folder: Path, shapes: dict[str, tuple[int, int]], r: int = 8, state: bool = True) -> Path:
    """A Trainer checkpoint of a recover run as PEFT writes it: adapter config and tensors, trainer_state.json."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": 16, "target_modules": list(shapes)}))
    tensors = {}
    for name, (out_features, in_features) in shapes.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.zeros(r, in_features)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.zeros(out_features, r)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    if state:
        (folder / "trainer_state.json").write_text("{}")
    zipfile.ZipFile(folder / "optimizer.pt", "w").close()  # a whole (empty) zip archive, as torch.save writes one
    return folder


def tiny_targets() -> dict[str, tuple[int, int]]:
    model = compress.load("builtin:tiny", meta=True)
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules()
            if n.endswith(("q_proj", "k_proj", "v_proj"))}


def test_checkpoints_of_another_models_shapes_are_refused_before_training(tmp_path, monkeypatch, no_training):
    """No record, same rank and modules, other shapes (another model): found from the safetensors header after the
    earlier passes ran, before training."""
    monkeypatch.chdir(tmp_path)
    shapes = {n: (out_features, in_features * 2) for n, (out_features, in_features) in tiny_targets().items()}
    fake_checkpoint(tmp_path / "ckd" / "checkpoint-3", shapes)
    rec = recipe(tmp_path / "s.yaml", "max_tokens: 128, batch_size: 2, checkpoint_dir: ckd",
                 before="  - prune: {method: magnitude, sparsity: 0.5}")
    refused(apply(rec, "-o", "o_s", "--no-eval"), "s.yaml:5:5: recover: checkpoint_dir ckd holds checkpoints of a "
            "different run (model.layers.0.self_attn.k_proj.lora_A is 8x512 there, 8x256 here)")
    assert not (tmp_path / "o_s").exists() and not (tmp_path / "ckd" / RECORD).exists()


def test_an_incomplete_newest_checkpoint_is_refused_up_front(tmp_path, monkeypatch, no_training):
    monkeypatch.chdir(tmp_path)
    fake_checkpoint(tmp_path / "ckd" / "checkpoint-2", tiny_targets())
    fake_checkpoint(tmp_path / "ckd" / "checkpoint-3", tiny_targets(), state=False)  # a save cut short
    rec = recipe(tmp_path / "i.yaml", "max_tokens: 128, batch_size: 2, checkpoint_dir: ckd")
    refused(apply(rec, "-o", "o_i", "--dry-run"), "its newest checkpoint checkpoint-3 is incomplete",
            "(no trainer_state.json)")


# ---------------------------------------------------------------------------------------------- resume_from
def test_resume_from_a_folder_that_is_not_a_trainer_checkpoint(tmp_path, monkeypatch, no_training):
    """A compress output folder given as resume_from: refused before any pass runs, not after the Trainer loaded it
    into the model (with pages of missing-key warnings)."""
    monkeypatch.chdir(tmp_path)
    compress.save(compress.load("builtin:tiny"), tmp_path / "ck1")
    rec = recipe(tmp_path / "d.yaml", "max_tokens: 128, batch_size: 2, max_minutes: 0.2, resume_from: ck1")
    refused(apply(rec, "-o", "o_d", "--no-eval"),
            "recover: resume_from ck1 is not a Trainer checkpoint (no trainer_state.json)")
    assert not (tmp_path / "o_d").exists()


def test_resume_from_a_checkpoint_of_another_run_is_refused(tmp_path, monkeypatch, no_training):
    monkeypatch.chdir(tmp_path)
    fake_checkpoint(tmp_path / "ckd" / "checkpoint-4", tiny_targets(), r=8)
    rec = recipe(tmp_path / "g.yaml", "r: 4, max_tokens: 128, batch_size: 2, resume_from: ckd/checkpoint-4")
    refused(apply(rec, "-o", "o_g", "--no-eval"), "resume_from ckd/checkpoint-4 is a checkpoint of a different run "
            "(LoRA r 8, not 4)")
    # resuming this run's checkpoint, but writing into a folder of another run's (the Trainer's rotation would
    # delete them)
    fake_checkpoint(tmp_path / "mine" / "checkpoint-1", tiny_targets(), r=4)
    rec = recipe(tmp_path / "h.yaml", "r: 4, max_tokens: 128, batch_size: 2, resume_from: mine/checkpoint-1, "
                 "checkpoint_dir: ckd")
    refused(apply(rec, "-o", "o_g", "--dry-run"), "checkpoint_dir ckd holds checkpoints of a different run "
            "(LoRA r 8, not 4): empty it or choose another folder")
    assert not (tmp_path / "o_g").exists() and len(listing(tmp_path / "ckd")) == 4


def test_two_recover_passes_with_one_checkpoint_dir_are_refused(tmp_path, monkeypatch, no_training):
    """The second would resume from the first's newest checkpoint (its step count already past its budget)."""
    monkeypatch.chdir(tmp_path)
    rec = recipe(tmp_path / "two.yaml", "r: 4, max_tokens: 128, batch_size: 2, checkpoint_dir: ./ckd",
                 before="  - recover: {max_tokens: 128, batch_size: 2, checkpoint_dir: ckd}")
    refused(apply(rec, "-o", "o_two", "--no-eval"), "two.yaml:5:5: recover: checkpoint_dir ./ckd is also an earlier "
            "recover pass's checkpoint_dir")
    assert not (tmp_path / "ckd").exists() and not (tmp_path / "o_two").exists()


# ---------------------------------------------------------------------------------------------- train_modules
def test_parameters_trained_in_full_are_checkpointed_and_restored_on_resume(tmp_path, monkeypatch):
    """MoM's routers trained in full (train_modules) are not in PEFT's adapter checkpoints: a resumed run restarted
    them from their initial values. A rerun of a finished run (its budget spent, no step left) must give back the
    same routers."""
    from safetensors import safe_open

    monkeypatch.chdir(tmp_path)
    args = ("max_tokens: 128, batch_size: 2, seq_len: 32, max_minutes: 1, checkpoint_dir: ckd, save_steps: 1, "
            "merge: true, train_modules: ['re:.*self_attn\\.router$']")
    rec = recipe(tmp_path / "r.yaml", args, before="  - linearize: {variant: mom}")
    first = apply(rec, "-o", "a", "--no-eval")
    assert first.exit_code == 0, first.output
    newest = sorted(Path("ckd").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    with safe_open(str(newest / training.FULLY_TRAINED_FILE), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert saved and all(k.endswith("router.weight") for k in saved)
    again = apply(rec, "-o", "b", "--no-eval")  # resumes from the newest checkpoint; nothing left to train
    assert again.exit_code == 0, again.output
    a, b = compress.load("a"), compress.load("b")
    for name, value in saved.items():
        torch.testing.assert_close(b.get_parameter(name), a.get_parameter(name), rtol=0, atol=0)
    initial = compress.load("builtin:tiny")
    compress.linearize.linearize_model(initial, compress.linearize.LinearizeSettings(variant="mom"))
    name = next(iter(saved))
    assert not torch.equal(a.get_parameter(name).float(), initial.get_parameter(name).float())  # it did train


# ---------------------------------------------------------------------------------------------- what came before
def test_a_rerun_after_another_earlier_pass_or_text_does_not_resume_the_old_adapter(tmp_path, monkeypatch):
    """The checkpoints of prune (magnitude) + recover, then the recipe with wanda, or with longer training windows:
    refused before any pass runs (the rerun resumed the other run's adapter, its budget spent: it trained 0 steps
    and merged it, silently); the same recipe still resumes."""
    common, prune, before = _pruned_and_recovered(tmp_path, monkeypatch)
    trained = []
    monkeypatch.setattr(training, "train", lambda *a, **k: trained.append(1))
    wanda = recipe(tmp_path / "w.yaml", common, before=prune.replace("magnitude", "wanda"))
    for extra in (["--no-eval"], ["--dry-run"]):
        refused(apply(wanda, "-o", "o_w", *extra), "w.yaml:5:5: recover: checkpoint_dir ckd holds checkpoints of a "
                "different run (before it: prune with method magnitude, not wanda)")
    longer = recipe(tmp_path / "t.yaml", common, before=prune)
    longer.write_text(longer.read_text().replace("seq_len: 32", "seq_len: 48"))
    refused(apply(longer, "-o", "o_t", "--no-eval"), "different run (training text: seq_len 32, not 48)")
    assert trained == [] and listing(tmp_path / "ckd") == before
    assert not (tmp_path / "o_w").exists() and not (tmp_path / "o_t").exists()
    # more calibration samples, no calibrated pass before recover (its windows' count comes from max_tokens): resumes
    more = recipe(tmp_path / "m.yaml", common, before=prune)
    more.write_text(more.read_text().replace("num_samples: 4", "num_samples: 6"))
    assert apply(more, "-o", "o_m", "--dry-run").exit_code == 0


def test_a_truncated_trainer_state_is_refused_up_front(tmp_path, monkeypatch, no_training):
    """transformers writes trainer_state.json last and not atomically: a run killed while saving leaves it cut
    short, which failed with a JSONDecodeError traceback after the earlier passes ran."""
    monkeypatch.chdir(tmp_path)
    fake_checkpoint(tmp_path / "ckd" / "checkpoint-3", tiny_targets())
    (tmp_path / "ckd" / "checkpoint-3" / "trainer_state.json").write_text("{")
    rec = recipe(tmp_path / "j.yaml", "max_tokens: 128, batch_size: 2, checkpoint_dir: ckd",
                 before="  - prune: {method: magnitude, sparsity: 0.5}")
    refused(apply(rec, "-o", "o_j", "--no-eval"), "its newest checkpoint checkpoint-3 is incomplete",
            "trainer_state.json does not read", "delete")


@pytest.mark.parametrize("damage, said", [("optimizer.pt", "no optimizer state, optimizer.pt"),
                                          ("rng_state_1.pth", "whose rng_state_1.pth is cut short"),
                                          ("adapter_model.safetensors", "whose adapter_model.safetensors is cut")])
def test_a_checkpoint_without_its_optimizer_state_is_refused_up_front(tmp_path, monkeypatch, no_training, damage,
                                                                       said):
    """The Trainer resumed from a checkpoint that lost optimizer.pt (copied in part) with Adam's moments restarted,
    saying nothing; one whose file a rank was writing when it was killed (each rank writes its own rng_state_N.pth,
    rank 0 trainer_state.json) ended in a zip-reader traceback on one rank and a connection error on the others."""
    monkeypatch.chdir(tmp_path)
    checkpoint = fake_checkpoint(tmp_path / "ckd" / "checkpoint-3", tiny_targets())
    zipfile.ZipFile(checkpoint / "rng_state_1.pth", "w").close()
    if damage == "optimizer.pt":
        (checkpoint / damage).unlink()
    else:
        os.truncate(checkpoint / damage, (checkpoint / damage).stat().st_size - 10)
    rec = recipe(tmp_path / "k.yaml", "max_tokens: 128, batch_size: 2, checkpoint_dir: ckd")
    refused(apply(rec, "-o", "o_k", "--no-eval"), "its newest checkpoint checkpoint-3 is incomplete", said)
    refused(apply(recipe(tmp_path / "l.yaml", "max_tokens: 128, batch_size: 2, resume_from: ckd/checkpoint-3"),
                  "-o", "o_l", "--no-eval"), "resume_from ckd/checkpoint-3 is not a Trainer checkpoint", said)
    assert not (tmp_path / "o_k").exists() and not (tmp_path / "o_l").exists()


# ---------------------------------------------------------------------------------------------- unmerged adapters
@pytest.mark.parametrize("later,expected", [
    ("  - quantize: {method: rtn, bits: 4}", "quantize: model.layers.0.self_attn."),
    ("  - prune: {method: magnitude, sparsity: 0.5}", "prune: model.layers.0.self_attn."),
    ("  - recover: {max_tokens: 128, batch_size: 2}", "recover: an earlier recover pass keeps its LoRA adapter"),
])
def test_a_pass_after_an_unmerged_adapter_on_its_layers_is_refused_before_any_work(tmp_path, monkeypatch,
                                                                                   no_training, later, expected):
    """It replaced the layer under the LoRA wrapper and the save failed with a traceback after all the work (a
    second recover: after training the first)."""
    rec = recipe(tmp_path / "u.yaml", "max_tokens: 128, batch_size: 2, merge: false")
    rec.write_text(rec.read_text() + later + "\n")
    for extra in (["--no-eval"], ["--dry-run"]):
        refused(apply(rec, "-o", tmp_path / "o_u", *extra), "u.yaml:5:5: " + expected,
                "only one unmerged adapter" if "recover" in later else "gets a LoRA adapter kept unmerged from an "
                                                                      "earlier recover pass (merge: false)")
    assert not (tmp_path / "o_u").exists()
    mlp_only = recipe(tmp_path / "m.yaml", "max_tokens: 128, batch_size: 2, merge: false")
    mlp_only.write_text(mlp_only.read_text() + "  - quantize: {method: rtn, bits: 4, targets: ['re:.*mlp.*']}\n")
    assert apply(mlp_only, "-o", tmp_path / "o_m", "--dry-run").exit_code == 0  # layers the adapter is not on


def test_train_modules_overlapping_the_targets_are_refused_before_any_pass(tmp_path, no_training):
    rec = recipe(tmp_path / "o.yaml", "max_tokens: 128, batch_size: 2, train_modules: ['re:.*q_proj$']",
                 before="  - prune: {method: magnitude, sparsity: 0.5}")
    refused(apply(rec, "-o", tmp_path / "o_o", "--dry-run"), "o.yaml:5:5: recover: train_modules [",
            "overlap the LoRA targets")


def test_a_pass_on_the_layers_of_a_saved_unmerged_adapter_is_refused_before_any_work(tmp_path):
    """A checkpoint saved with merge: false, then quantize over all its layers: one line (it failed at the save,
    after the pass, with a traceback); a pass on other layers runs."""
    first = apply(recipe(tmp_path / "r.yaml", "max_tokens: 64, batch_size: 2, merge: false"), "-o", tmp_path / "ck",
                  "--no-eval")
    assert first.exit_code == 0, first.output
    rtn = tmp_path / "q.yaml"
    rtn.write_text(f"model: {tmp_path / 'ck'}\npasses:\n  - quantize: {{method: rtn, bits: 4}}\n")
    for extra in (["--no-eval"], ["--dry-run"]):
        refused(apply(rtn, "-o", tmp_path / "q", *extra), "q.yaml:3:5: quantize: model.layers.0.self_attn.",
                "carries a LoRA adapter kept unmerged (recover with merge: false)")
    assert not (tmp_path / "q").exists()
    rtn.write_text(rtn.read_text().replace("bits: 4}", "bits: 4, targets: ['re:.*mlp.*']}"))
    assert apply(rtn, "-o", tmp_path / "q", "--no-eval").exit_code == 0


def test_passes_before_recover_read_the_same_in_one_recipe_and_from_a_checkpoint():
    """prune then recover in one call, or recover on the model prune left (its checkpoint record): the same record
    of what came before, so either run resumes the other's checkpoints (a review's find: the in-recipe form held
    every option, the checkpoint's only the method's)."""
    from compress.passes import Prune
    from compress.recover import Recover

    prune = Prune(method="magnitude", sparsity=0.5)
    in_recipe = Recover(max_tokens=128)
    in_recipe.check_after(compress.load("builtin:tiny"), [prune])
    pruned, _ = compress.apply(compress.load("builtin:tiny"), [prune], progress=False)
    afterwards = Recover(max_tokens=128)
    afterwards.check_after(pruned, [])
    assert in_recipe._before == afterwards._before and in_recipe._before[0]["pass"] == "prune"


@pytest.mark.parametrize("as_json", [False, True])
def test_training_progress_goes_to_stderr_and_stdout_stays_the_result(tmp_path, as_json):
    """The Trainer print()ed its log dicts to stdout ahead of the tables, and under --json the run was silent."""
    rec = recipe(tmp_path / "p.yaml", "max_tokens: 256, batch_size: 2, seq_len: 32")
    result = apply(rec, "-o", tmp_path / "x", "--no-eval", *(["--json"] if as_json else []))
    assert result.exit_code == 0, result.output
    assert "'loss'" not in result.stdout and "recover: step" not in result.stdout
    if as_json:
        assert json.loads(result.stdout)["passes"][0]["details"]["steps"] == 4
    else:
        assert "recover" in result.stdout  # the passes table
    assert "recover: training steps: 0/4" in result.stderr and "recover: step 1/4: loss " in result.stderr


# ---------------------------------------------------------------------------------------------- before any work
def test_a_seq_len_longer_than_the_training_text_is_refused_before_any_pass(tmp_path, monkeypatch):
    """Recover's own seq_len over a short text failed after the earlier passes ran, naming calibration.seq_len."""
    monkeypatch.chdir(tmp_path)
    text = (Path(compress.__file__).parent / "builtin" / "tiny" / "calibration.txt").read_text(encoding="utf-8")
    Path("short.txt").write_text(text[:1500], encoding="utf-8")  # 424 tokens
    rec = tmp_path / "t.yaml"
    rec.write_text("model: builtin:tiny\ncalibration: {source: short.txt, num_samples: 4, seq_len: 64}\npasses:\n"
                   "  - prune: {method: wanda, structure: '2:4'}\n  - recover: {max_tokens: 4096, seq_len: 512}\n")
    monkeypatch.setattr(compress.passes.Prune, "apply", lambda *a, **k: pytest.fail("a pass ran"))
    for extra in (["--no-eval"], ["--dry-run"]):
        refused(apply(rec, "-o", "o_t", *extra), "t.yaml:5:5: recover: seq_len 512 needs 513 tokens of training "
                "text (a window and its next token), and calibration source short.txt has 424; lower recover's "
                "seq_len or give more text")
    assert not (tmp_path / "o_t").exists()
    rec.write_text(rec.read_text().replace("seq_len: 512", "seq_len: 256"))  # the text holds it
    assert apply(rec, "-o", "o_t", "--dry-run").exit_code == 0


def test_a_batch_too_large_for_memory_is_refused_before_any_pass(tmp_path, monkeypatch):
    """batch_size 4096 was killed by the kernel (out of memory) with no word of what to lower: one line naming
    batch_size and a micro_batch_size that fits, as the calibration passes' check does (COMPRESS_MEMORY_CHECK)."""
    from compress import sequential
    from compress.recover.memory import step_activation_bytes

    model = compress.load("builtin:tiny", meta=True)
    per_window = step_activation_bytes(model, 1, 32, kl=False, checkpointing=False)
    # the logits over tiny's 8192 tokens as float32, three copies, and more
    assert per_window > 32 * 8192 * 4 * 3
    assert step_activation_bytes(model, 4, 32, kl=True, checkpointing=True) > 4 * 32 * 8192 * 4 * 7
    monkeypatch.setattr(sequential, "free_bytes", lambda device: 20 * per_window)
    monkeypatch.setattr(compress.passes.Prune, "apply", lambda *a, **k: pytest.fail("a pass ran"))
    rec = recipe(tmp_path / "m.yaml", "max_tokens: 8192, batch_size: 64, seq_len: 32",
                 before="  - prune: {method: magnitude, sparsity: 0.5}")
    for extra in (["--no-eval"], ["--dry-run"]):
        refused(apply(rec, "-o", tmp_path / "o_m", *extra), "m.yaml:5:5: recover: batch_size 64 (micro_batch_size "
                "unset) x seq_len 32 would hold at least", "set micro_batch_size to 8 or less",
                "COMPRESS_MEMORY_CHECK=off")
    micro = recipe(tmp_path / "n.yaml", "max_tokens: 8192, batch_size: 64, micro_batch_size: 32, seq_len: 32")
    refused(apply(micro, "-o", tmp_path / "o_m", "--dry-run"), "recover: micro_batch_size 32 x seq_len 32")
    fits = recipe(tmp_path / "f.yaml", "max_tokens: 8192, batch_size: 64, micro_batch_size: 16, seq_len: 32")
    assert apply(fits, "-o", tmp_path / "o_m", "--dry-run").exit_code == 0
    assert apply(rec, "-o", tmp_path / "o_m", "--dry-run", env={"COMPRESS_MEMORY_CHECK": "off"}).exit_code == 0
    monkeypatch.setattr(sequential, "free_bytes", lambda device: int(2.5 * per_window))  # room for one window
    refused(apply(rec, "-o", tmp_path / "o_m", "--dry-run"), "set micro_batch_size to 1 (")  # (not "1 or less")
    assert not (tmp_path / "o_m").exists()


def test_accelerate_launch_on_the_cpu_running_one_process_is_noted(tmp_path, monkeypatch):
    """`accelerate launch --num_processes 2` with its simple launcher (--cpu, or a machine without GPUs) starts one
    process and sets no WORLD_SIZE: the run trained alone, saying nothing (without --cpu, even after a first fix)."""
    from compress.environment import one_process_of_accelerate as one_process

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for use_cpu, master, noted in (("True", "127.0.0.1", True), ("False", "127.0.0.1", True), ("True", "", False)):
        monkeypatch.setenv("ACCELERATE_USE_CPU", use_cpu)
        monkeypatch.setenv("MASTER_ADDR", master)
        assert one_process() is noted
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    assert not one_process()  # (not accelerate's launcher)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")  # accelerate's mpirun launcher: MPI gives the size
    assert not one_process()
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun's one process: asked for
    assert not one_process()
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    result = apply(recipe(tmp_path / "c.yaml", "max_tokens: 64, batch_size: 2, seq_len: 32"), "-o", tmp_path / "x",
                   "--no-eval", "--json")
    assert result.exit_code == 0, result.output
    notes = json.loads(result.stdout)["passes"][0]["notes"]
    assert any("accelerate launch ran this as one process" in n and "torchrun" in n for n in notes), notes
