"""`compress apply` under a launcher (torchrun here; `accelerate launch` starts the same processes on GPUs): every
process runs the passes and recover trains data-parallel, the main process alone writes the checkpoint and prints.
Two processes wrote one output folder before (the second stopped with "already exists", and torchrun then killed
the first during its evaluation), and a wall-clock stop could leave one process waiting for the other's gradients."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

import compress

CALIBRATION = "calibration: {source: builtin:calibration, num_samples: 8, seq_len: 32}"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def launch(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    # its own process group: a hang is killed with torchrun's workers (a timeout killed torchrun alone)
    with subprocess.Popen([*TORCHRUN, *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"torchrun hung; its stderr ends: {err[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_two_processes_train_together_and_write_one_checkpoint(tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text("\n".join(["model: builtin:tiny", CALIBRATION, "passes:",
                              "  - prune: {method: magnitude, sparsity: 0.5}",
                              "  - recover: {max_tokens: 1024, batch_size: 2, seq_len: 32, max_minutes: 5}", ""]))
    plan = launch("-m", "compress.cli", "apply", rec, "-o", "out", "--dry-run", "--json", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert [p["pass"] for p in json.loads(plan.stdout)["passes"]] == ["prune", "recover"]  # printed once

    run = launch("-m", "compress.cli", "apply", rec, "-o", "out", "--no-eval", "--json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)  # one object: the other process printed nothing
    recover = next(p for p in result["passes"] if p["name"] == "recover")
    # the token budget is split over both processes: 1024 / (2 sequences x 32 tokens x 2 processes) steps
    assert recover["details"]["steps"] == 8 and recover["details"]["tokens"] == 1024, recover["details"]
    assert recover["details"]["stopped_by"] == "token_budget"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yaml"]  # no half-written sibling
    # the checkpoint holds the trained model: not the pruned one, and as sparse as it
    trained = compress.load(tmp_path / "out")
    pruned, _ = compress.apply(compress.load("builtin:tiny"), compress.passes.Prune(method="magnitude", sparsity=0.5),
                               progress=False)
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        assert (trained(ids).logits - pruned(ids).logits).abs().max() > 1e-3
    q_trained, q_pruned = (m.model.layers[0].self_attn.q_proj for m in (trained, pruned))
    assert torch.equal(dense(q_trained) == 0, dense(q_pruned) == 0)


def dense(layer) -> torch.Tensor:
    return layer.dense_weight() if hasattr(layer, "dense_weight") else layer.weight.detach()


WALL_CLOCK = """
import json, sys
from types import SimpleNamespace
import torch, torch.distributed as dist
from transformers import TrainerControl
from compress.recover.training import WallClockBudget, mean_over_processes

dist.init_process_group("gloo")
rank = dist.get_rank()
budget = WallClockBudget(seconds=0.0 if rank == 1 else 1e9)  # only the second process's clock is past its budget
budget.on_train_begin(None, None, None)
args = SimpleNamespace(world_size=2, device=torch.device("cpu"), save_strategy="no")
control = budget.on_step_end(args, SimpleNamespace(global_step=3, max_steps=10), TrainerControl())
with open(sys.argv[1] + f".{rank}", "w") as f:
    json.dump({"stop": control.should_training_stop, "hit": budget.hit,
               "mean": mean_over_processes({"nll": [1.0 + 2 * rank], "kl": [0.5 * rank], "aux": [4.0] * rank},
                                           torch.device("cpu"))}, f)
dist.destroy_process_group()
"""


def test_a_wall_clock_stop_on_one_process_stops_every_process(tmp_path):
    """Each process read its own clock: one stopped at step 3 while the other went on into step 4's all-reduce and
    waited there for good. The logged loss terms are means over the processes, as the Trainer's loss is."""
    script = tmp_path / "wall_clock.py"
    script.write_text(WALL_CLOCK)
    run = launch(script, tmp_path / "decided", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    decided = [json.loads((tmp_path / f"decided.{rank}").read_text()) for rank in (0, 1)]
    assert decided == [{"stop": True, "hit": True, "mean": {"aux": 4.0, "kl": 0.25, "nll": 2.0}}] * 2


def test_without_a_process_group_each_process_keeps_its_own_values():
    from compress.recover.training import any_process, mean_over_processes

    assert any_process(True, torch.device("cpu")) is True
    assert any_process(False, torch.device("cpu")) is False
    assert mean_over_processes({"nll": [3.0, 5.0], "aux": []}, torch.device("cpu")) == {"nll": 4.0}
