"""The environment variables compress reads, parsed in one place (`setting`) and checked once at start
(`check_environment`): a misspelt value used to be silently ignored, and COMPRESS_KERNELS=triton on a machine with
neither a GPU nor Triton's interpreter ended in a driver traceback."""
from __future__ import annotations

import os

from .errors import CompressError

# a switch: "on" and its spellings mean the default (auto), "off" and its spellings turn the feature off
_AUTO_OFF = {"auto": "auto", "on": "auto", "1": "auto", "true": "auto", "yes": "auto",
             "off": "off", "0": "off", "false": "off", "no": "off"}
# variable -> {accepted value: what it means}; unset or empty = "auto"
CHOICES = {
    # force the torch references or the Triton kernels (kernels/dispatch.py)
    "COMPRESS_KERNELS": {"auto": "auto", "torch": "torch", "triton": "triton"},
    # off: the C CPU kernels' torch references (kernels/cpu_build.py)
    "COMPRESS_CPU_KERNELS": _AUTO_OFF,
    # off: `dtype: auto` computes in float32 on every CPU (models.native_dtype)
    "COMPRESS_CPU_HALF_PRECISION": _AUTO_OFF,
    # off: no refusal of a calibration estimated larger than free memory (api.check_calibration_memory)
    "COMPRESS_MEMORY_CHECK": _AUTO_OFF,
}
KNOWN = (*CHOICES, "COMPRESS_SPARSE_PATH")
TRITON_MISSING = "COMPRESS_KERNELS=triton but triton is not installed: pip install 'compress[triton]'"


def setting(name: str) -> str:
    """The meaning of variable `name` ("auto" when unset), after stripping and lower-casing its value; a value it
    does not accept raises CompressError naming the accepted ones."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower() or "auto"
    allowed = CHOICES[name]
    if value not in allowed:
        raise CompressError(f"{name}={raw!r} is not understood; use one of: {', '.join(allowed)} (or leave it unset)")
    return allowed[value]


def check_environment() -> None:
    """Every variable readable, no misspelt name, and a forced Triton runnable here."""
    for name in CHOICES:
        setting(name)
    sparse_path()
    misspelt = misspelt_names()
    if misspelt:  # an error, not a warning: COMPRESS_KERNEL=torch silently running Triton is what this prevents
        name, meant = next(iter(misspelt.items()))
        raise CompressError(f"{name} is not a compress setting; did you mean {meant}? (rename it, or unset it)")
    if setting("COMPRESS_KERNELS") == "triton":
        import torch

        from .kernels.dispatch import interpreted, triton_available

        if not triton_available():
            raise CompressError(TRITON_MISSING)
        if not torch.cuda.is_available() and not interpreted():
            raise CompressError("COMPRESS_KERNELS=triton needs a CUDA GPU, or TRITON_INTERPRET=1 for Triton's (slow) "
                                "CPU interpreter; unset it to run the CPU kernels")


# where a launcher says how many processes there are and which one this is, in accelerate's order
# (utils.get_cpu_distributed_information): torchrun / accelerate launch, then MPI (MPICH / Intel MPI, Open MPI,
# MVAPICH), which accelerate's mpirun launcher (`--mpirun_hostfile`) leaves them to until its state is built
WORLD_SIZE_NAMES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_NAMES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
LOCAL_RANK_NAMES = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")


def _launcher_value(names: tuple[str, ...]) -> tuple[str, str] | None:
    """(name, raw value) of the first of `names` set, or None."""
    return next(((name, os.environ[name]) for name in names if name in os.environ), None)


def world_size() -> int:
    """How many training processes share a run: WORLD_SIZE (torchrun / accelerate launch) or MPI's size (accelerate's
    mpirun launcher); 1 when none is set. Read by the recover pass, which splits its token budget across them: a
    value that is not a positive integer raises CompressError (it used to end in a ValueError, a ZeroDivisionError or
    a RuntimeError deep in training). Under MPI every process acted as rank 0 before: all wrote the output."""
    found = _launcher_value(WORLD_SIZE_NAMES)
    if found is None:
        return 1
    name, raw = found
    value = raw.strip()
    if not value.isascii() or not value.isdigit() or int(value) < 1:
        raise CompressError(f"{name}={raw!r} must be a positive integer (the number of training processes, set by "
                            f"torchrun, accelerate launch or mpirun); unset it to train in one process")
    return int(value)


def process_rank() -> int:
    """This process's place among the launcher's processes: RANK, or MPI's (0 when unset, or not a number: the
    launcher sets it, and check_launcher refuses a world above 1 without it)."""
    raw = (_launcher_value(RANK_NAMES) or ("", ""))[1].strip()
    return int(raw) if raw.isascii() and raw.isdigit() else 0


def is_main_process() -> bool:
    """The process that writes the run's outputs (the checkpoint, the evaluation, the printed tables): the only one
    in a single-process run, global rank 0 under torchrun / accelerate launch, where every process runs the passes
    (data-parallel training needs the whole model in each) and two writing one folder collided."""
    return single_process() or process_rank() == 0


def single_process() -> bool:
    """No launcher's other processes (WORLD_SIZE unset, 1, or malformed: recover refuses the last)."""
    try:
        return world_size() == 1
    except CompressError:
        return True


def use_local_gpu(device: str) -> None:
    """Under a launcher, `cuda` means this process's GPU (LOCAL_RANK), as it does for the Trainer: every process
    calibrated on GPU 0 before."""
    raw = (_launcher_value(LOCAL_RANK_NAMES) or ("", ""))[1].strip()
    if device == "cuda" and not single_process() and raw.isdigit():
        import torch

        torch.cuda.set_device(int(raw))


def check_launcher() -> None:
    """WORLD_SIZE above 1 needs the launcher's rendezvous (RANK and MASTER_ADDR, which torchrun / accelerate launch
    set): without it accelerate stopped training with a ValueError traceback, after the earlier passes had run."""
    n = world_size()
    if n == 1:
        return
    name = _launcher_value(WORLD_SIZE_NAMES)[0]
    rank = RANK_NAMES[WORLD_SIZE_NAMES.index(name)]  # (WORLD_SIZE: RANK; PMI_SIZE: PMI_RANK; ...)
    rank_set = any(os.environ.get(each, "").strip() for each in RANK_NAMES)
    missing = ([] if rank_set else [rank]) + ([] if os.environ.get("MASTER_ADDR") else ["MASTER_ADDR"])
    if missing:
        raise CompressError(f"{name}={n} but {' and '.join(missing)} unset: start the run with `accelerate launch "
                            f"-m compress.cli apply ...` (or torchrun), or unset {name} to run in one process")


def one_process_of_accelerate() -> bool:
    """`accelerate launch --num_processes N` with its simple launcher (`--cpu`, or no GPU here) starts one process:
    it sets ACCELERATE_USE_CPU and (for N > 1) MASTER_ADDR, but no WORLD_SIZE, so the run trained alone, silently."""
    return ("ACCELERATE_USE_CPU" in os.environ and _launcher_value(WORLD_SIZE_NAMES) is None
            and bool(os.environ.get("MASTER_ADDR")))


def sparse_path() -> str | None:
    """COMPRESS_SPARSE_PATH: the GPU path every pruned layer takes (compress/prune/gpu_dispatch.py), or None."""
    value = os.environ.get("COMPRESS_SPARSE_PATH", "").strip().lower()
    if not value:
        return None
    from .prune.gpu_dispatch import RUN

    if value not in RUN:
        raise CompressError(f"COMPRESS_SPARSE_PATH={os.environ['COMPRESS_SPARSE_PATH']!r} is not a sparse path; use "
                            f"one of: {', '.join(RUN)} (or leave it unset)")
    return value


def misspelt_names() -> dict[str, str]:
    """COMPRESS_* variables set here that compress does not read but whose name is close to one it does ->
    that name. A distant name (COMPRESS_LEVEL) may belong to another program and is left alone."""
    import difflib

    suffixes = {name.removeprefix("COMPRESS_"): name for name in KNOWN}
    found = {}
    for name in os.environ:
        upper = name.upper()
        if upper.startswith("COMPRESS_") and name not in KNOWN:
            close = difflib.get_close_matches(upper.removeprefix("COMPRESS_"), suffixes, n=1, cutoff=0.75)
            if close:
                found[name] = suffixes[close[0]]
    return dict(sorted(found.items()))
