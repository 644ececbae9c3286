"""What a recover run resumes from, checked before any work: `checkpoint_dir` must be a folder (or not exist yet), and
the Trainer checkpoint a run would resume from (`resume_from`, else the newest checkpoint-N in `checkpoint_dir`)
must be a complete recover checkpoint of the same run. A rerun after changing the recipe (another LoRA rank,
other targets, another model) used to resume from it and end in a "size mismatch ... lora_A" traceback.

When training starts, the run writes what makes its checkpoints resumable (LoRA rank, alpha and dropout, targets,
the modules trained in full, the model, the passes before it, the training text, the loss's kl_weight and
aux_weight, the seed) to RECORD in `checkpoint_dir`; a later run compares its own settings with that record, and
with the adapter_config.json PEFT writes into each checkpoint (checkpoints of an older run have no record). Settings
that a resumed run may change (the token budget, the learning rate, the batch size) are not compared: training.py
puts a changed learning rate into the restored schedule."""
from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..paths import with_usual_mode

RECORD = "compress-recover.json"
TRAINER_STATE = "trainer_state.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")  # transformers.trainer_utils.get_last_checkpoint's pattern

# record key -> how a difference reads ("LoRA r 8, not 4"), in the order they are reported
_LABELS = {"model": "model", "r": "LoRA r", "alpha": "LoRA alpha", "dropout": "LoRA dropout", "targets": "targets",
           "ignore": "ignore", "train_modules": "train_modules", "kl_weight": "kl_weight", "aux_weight": "aux_weight",
           "seed": "seed"}
# PEFT's adapter_config.json key -> the record's (checkpoints of an older run have no record)
_ADAPTER_KEYS = {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout"}
# compared where both runs say them: "before" (the passes before recover, with their arguments) is known once the
# recipe is read, "data" (the training text and its windows) once the calibration is; the model is unknown for a
# model built in memory
_IF_KNOWN = ("model", "before", "data")


def check_checkpoint_dir(folder: str) -> None:
    """`checkpoint_dir` is a folder, or can become one (no file in the way, itself or above)."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"recover: checkpoint_dir {folder} is a file, not a folder; name a folder for the Trainer "
                          "checkpoints (a new one, or one that holds this recipe's checkpoints)")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"recover: checkpoint_dir {folder} is inside {parent}, which is a file, not a "
                                  "folder; choose another folder")
            break


def check_resume_from(folder: str) -> None:
    """`resume_from` is a Trainer checkpoint of a recover run: trainer_state.json and a LoRA adapter."""
    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(f"recover: resume_from {folder} is not a folder; give a Trainer checkpoint folder "
                          "(checkpoint-N) or drop resume_from")
    _check_complete(path, f"resume_from {folder} is not a Trainer checkpoint",
                    "give a checkpoint-N folder of a recover checkpoint_dir, or drop resume_from")


def _check_complete(path: Path, what: str, fix: str) -> None:
    if not (path / TRAINER_STATE).is_file():
        raise ConfigError(f"recover: {what} (no {TRAINER_STATE}); {fix}")
    try:  # written last, not atomically: a run killed while saving leaves it cut short (a traceback at resume)
        json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"recover: {what} ({TRAINER_STATE} does not read: {type(exc).__name__}, e.g. a save cut "
                          f"short); {fix}") from None
    if not any((path / name).is_file() for name in ADAPTER_WEIGHTS):
        raise ConfigError(f"recover: {what} of a recover run (no LoRA adapter, {ADAPTER_WEIGHTS[0]}); {fix}")
    # the Trainer resumes without the optimizer's state when its file is missing, restarting Adam's moments in
    # silence (a folder copied in part); its names vary with the launcher (optimizer.pt, rank0-of-2-optimizer.pt, ...)
    if not any(child.is_file() and "optimizer" in child.name for child in path.iterdir()):
        raise ConfigError(f"recover: {what} of a recover run in full (no optimizer state, optimizer.pt: "
                          f"copied in part?); {fix}")
    # each rank writes its own files (rng_state_1.pth, ...), trainer_state.json rank 0: a rank killed while saving
    # left a checkpoint that looked whole, and the resume ended in a zip-reader traceback on one rank and a
    # connection error on the others
    cut = next((child.name for child in sorted(path.iterdir()) if child.is_file() and not _whole(child)), None)
    if cut:
        raise ConfigError(f"recover: {what} whose {cut} is cut short (a save interrupted?); {fix}")


def _whole(file: Path) -> bool:
    """Whether a file torch.save (.pt, .pth, .bin: zip archives) or safetensors wrote reads to its end."""
    import zipfile

    if file.suffix in (".pt", ".pth", ".bin"):
        return zipfile.is_zipfile(file)
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(file), "pt") as f:
                f.keys()
        except Exception:  # (safetensors' own errors: a header or a buffer cut short)
            return False
    return True


def latest_checkpoint(folder: str | None) -> Path | None:
    """The checkpoint-N with the largest N in `folder` (what the Trainer would resume from), or None."""
    if not folder or not Path(folder).is_dir():
        return None
    found = [(int(m.group(1)), entry.path) for entry in os.scandir(folder)
             if (m := _CHECKPOINT.match(entry.name)) and entry.is_dir()]
    return Path(max(found)[1]) if found else None


def resume_point(checkpoint_dir: str | None, resume_from: str | None) -> Path | None:
    """The checkpoint a run resumes from (None: it starts afresh): resume_from, else checkpoint_dir's newest."""
    return Path(resume_from) if resume_from else latest_checkpoint(checkpoint_dir)


def _role(checkpoint_dir: str | None, resume_from: str | None) -> tuple[str, str]:
    """How messages name the checkpoint compared (`resume_from` given, else `checkpoint_dir`), and what to do."""
    if resume_from:
        return (f"resume_from {resume_from} is a checkpoint of",
                "resume from a checkpoint of this recipe, or drop resume_from")
    return f"checkpoint_dir {checkpoint_dir} holds checkpoints of", "empty it or choose another folder"


def _read_json(path: Path, where: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"recover: {path} does not read ({type(exc).__name__}); {where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recover: {path} is not a JSON object; {where}")
    return data


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def _module_difference(stored: list[str], planned: list[str]) -> str | None:
    old, new = set(stored), set(planned)
    if old == new:
        return None
    if new - old:
        name = min(new - old)
        return f"LoRA on {len(old)} modules, not {len(new)}: {name} is a target now, not there"
    name = min(old - new)
    return f"LoRA on {len(old)} modules, not {len(new)}: {name} was a target there, not now"


def _changed_args(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k} {_shown(old.get(k))}, not {_shown(new.get(k))}" for k in keys[:2])


def _before_difference(old: list, new: list) -> str:
    """How the passes before recover differ, e.g. "before it: prune with method wanda, not magnitude"."""
    for i, (a, b) in enumerate(zip(old, new)):
        if a.get("pass") != b.get("pass"):
            return f"pass {i + 1} before it {a.get('pass')}, not {b.get('pass')}"
        if a.get("args") != b.get("args"):
            return f"before it: {a.get('pass')} with {_changed_args(a.get('args') or {}, b.get('args') or {})}"
    return f"{len(old)} passes before it, not {len(new)}"


def _data_difference(old: dict, new: dict) -> str:
    return f"training text: {_changed_args(old, new)}"


def differences(planned: dict[str, Any], record: dict[str, Any] | None,
                adapter_config: dict[str, Any] | None) -> list[str]:
    """How the checkpoint's run (its RECORD, its PEFT adapter_config.json) differs from the planned one. `planned`
    has the RECORD keys; "modules" (the LoRA targets' names) only where they are known."""
    out = []
    if record is not None:
        for key, label in _LABELS.items():
            old, new = record.get(key), planned.get(key)
            if key in _IF_KNOWN and (old is None or new is None):
                continue
            if key in record and old != new:
                out.append(f"{label} {_shown(old)}, not {_shown(new)}")
        for key in ("before", "data"):
            old, new = record.get(key), planned.get(key)
            if old is not None and new is not None and old != new:
                out.append(_before_difference(old, new) if key == "before" else _data_difference(old, new))
    if adapter_config is not None:
        for key, mine in _ADAPTER_KEYS.items():
            label = _LABELS[mine]
            old, new = adapter_config.get(key), planned.get(mine)
            if old is not None and old != new and not any(o.startswith(label + " ") for o in out):
                out.append(f"{label} {old}, not {new}")
    stored = (record or {}).get("modules")
    if stored is None and adapter_config is not None and isinstance(adapter_config.get("target_modules"), list):
        stored = adapter_config["target_modules"]
    if stored is not None and planned.get("modules") is not None and not out:
        diff = _module_difference(list(stored), list(planned["modules"]))
        if diff:
            out.append(diff)
    return out


def check_same_run(planned: dict[str, Any], checkpoint_dir: str | None, resume_from: str | None) -> None:
    """Refuse to resume from a checkpoint of a different run, and to write into a checkpoint_dir that holds one
    (also with resume_from elsewhere: the Trainer would keep only the newest two checkpoints of the folder, deleting
    the other run's)."""
    if checkpoint_dir and (newest := latest_checkpoint(checkpoint_dir)) is not None:
        if not resume_from:  # the one it resumes from: a save cut short leaves it incomplete
            _check_complete(newest, f"checkpoint_dir {checkpoint_dir}: its newest checkpoint {newest.name} is "
                                    "incomplete or not a Trainer checkpoint",
                            f"delete {newest} to resume from the one before, or empty the folder")
        _compare(planned, newest, *_role(checkpoint_dir, None))
    if resume_from:
        _compare(planned, Path(resume_from), *_role(None, resume_from))


def _compare(planned: dict[str, Any], point: Path, what: str, fix: str) -> None:
    record = _read_json(point.parent / RECORD, fix)
    adapter_config = _read_json(point / ADAPTER_CONFIG, fix)
    found = differences(planned, record, adapter_config)
    if found:
        raise ConfigError(f"recover: {what} a different run ({'; '.join(found[:2])}): {fix}")


def check_adapter_shapes(point: Path, expected: dict[str, tuple[int, int]], r: int, checkpoint_dir: str | None,
                         resume_from: str | None) -> None:
    """The LoRA tensors in checkpoint `point` have the shapes this run trains: lora_A [r, in], lora_B [out, r] for
    each target `name -> (out, in)` (read from the safetensors header, no tensor loaded)."""
    weights = point / ADAPTER_WEIGHTS[0]
    if not weights.is_file():
        return  # a .bin adapter: the Trainer reads it (pickle), not checked here
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    for name, (out_features, in_features) in sorted(expected.items()):
        for kind, want in (("lora_A", (r, in_features)), ("lora_B", (out_features, r))):
            have = shapes.get(f"base_model.model.{name}.{kind}.weight")
            if have is not None and have != want:
                what, fix = _role(checkpoint_dir, resume_from)
                raise ConfigError(f"recover: {what} a different run ({name}.{kind} is "
                                  f"{'x'.join(map(str, have))} there, {'x'.join(map(str, want))} here): {fix}")


def write_record(folder: str, planned: dict[str, Any]) -> None:
    """RECORD in `folder` (made if missing), replaced whole: a crash leaves the old one or the new one."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{RECORD}.", dir=path)
    try:
        with_usual_mode(tmp)  # (mkstemp's 0600: readable by its owner alone, unlike the Trainer's files beside it)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"format": 1, **planned}, f, indent=2)
            f.write("\n")
        os.replace(tmp, path / RECORD)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def training_into(folder: str | None):
    """`folder` (a checkpoint_dir) held by this run while it trains: a second run into it at the same time resumed
    from the first's checkpoints as they were being written. An exclusive flock on the folder itself (no lock file
    to leave behind), which the kernel drops when the process ends however it ends; the main process holds it
    (under a launcher every process of the one run writes there)."""
    from ..environment import is_main_process

    if not folder or not is_main_process():
        yield
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    fd = _locked(Path(folder))
    try:
        yield
    finally:
        os.close(fd)


def check_not_in_use(folder: str | None) -> None:
    """The same, found before any pass runs (the lock taken and let go at once)."""
    from ..environment import is_main_process

    if folder and Path(folder).is_dir() and is_main_process():
        os.close(_locked(Path(folder)))


def _locked(folder: Path) -> int:
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConfigError(f"recover: checkpoint_dir {folder} is in use: another run is training into it now; wait "
                          "for it to end, or give this run another checkpoint_dir") from None
    return fd
