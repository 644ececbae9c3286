"""Runs under a launcher: which process is which (torchrun / accelerate's WORLD_SIZE and RANK, or MPI's under
accelerate's mpirun launcher), and that only the main one writes and prints; a rank without its launcher is
refused before any work."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from compress.cli import main
from compress.environment import is_main_process, process_rank, world_size

LAUNCHERS = ("WORLD_SIZE", "RANK", "PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
             "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK", "MASTER_ADDR", "LOCAL_RANK")


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    for name in LAUNCHERS:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("size, rank", [("PMI_SIZE", "PMI_RANK"), ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
                                        ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK")])
def test_mpi_says_the_world_and_the_rank(size, rank, monkeypatch):
    monkeypatch.setenv(size, "2")
    monkeypatch.setenv(rank, "1")
    # before: every MPI process read WORLD_SIZE / RANK alone, found 1 / 0, and acted as the main process
    assert (world_size(), process_rank(), is_main_process()) == (2, 1, False)
    monkeypatch.setenv("WORLD_SIZE", "4")  # set by accelerate once its state is built: it wins, as there
    monkeypatch.setenv("RANK", "0")
    assert (world_size(), process_rank(), is_main_process()) == (4, 0, True)


def _apply(tmp_path: Path, env: dict, *extra):
    rec = tmp_path / "p.yaml"
    rec.write_text("model: builtin:tiny\npasses:\n  - prune: {method: magnitude, sparsity: 0.5}\n")
    return CliRunner().invoke(main, ["apply", str(rec), "-o", str(tmp_path / "out"), "--no-eval", *extra], env=env)


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1"},
                                 {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1",
                                  "MASTER_ADDR": "127.0.0.1"}], ids=["torchrun", "mpirun"])
def test_a_rank_other_than_the_main_one_writes_and_prints_nothing(tmp_path, env):
    result = _apply(tmp_path, env, "--max-memory", "5MB", "--offload-folder", tmp_path / "spill")
    assert result.exit_code == 0, result.output
    # before: the layers' loading bar and the --max-memory note on every rank (under MPI: a second writer)
    assert result.stderr == "" and result.stdout == ""
    assert not (tmp_path / "out").exists()


def test_rank_variables_without_their_launcher_are_refused_before_any_work(tmp_path):
    # RANK=1 WORLD_SIZE=2 left in a shell: the run did every pass as a second process, then exited 0 writing nothing
    result = _apply(tmp_path, {"WORLD_SIZE": "2", "RANK": "1"})
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: WORLD_SIZE=2 but MASTER_ADDR unset: start the run with `accelerate "
                                     "launch -m compress.cli apply ...` (or torchrun), or unset WORLD_SIZE to run in "
                                     "one process")
    result = _apply(tmp_path, {"PMI_SIZE": "2", "PMI_RANK": "1"})
    assert result.exit_code == 2 and "PMI_SIZE=2 but MASTER_ADDR unset" in result.stderr
    assert not (tmp_path / "out").exists()
    # rank 0 (or no rank) runs as the one process it is, as before: a recipe that trains nothing needs no launcher
    result = _apply(tmp_path, {"WORLD_SIZE": "4"})
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "config.json").is_file()


def test_the_launcher_check_names_the_rank_variable_of_its_world(monkeypatch):
    from compress.environment import check_launcher
    from compress.errors import CompressError

    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with pytest.raises(CompressError, match="OMPI_COMM_WORLD_SIZE=2 but OMPI_COMM_WORLD_RANK and MASTER_ADDR unset"):
        check_launcher()
