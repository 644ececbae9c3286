"""Where a checkpoint may be written, and the atomic swap that writes it.

Checked before any work (`check_output`): the target is not a plain file, not the current folder, not the source
model's folder nor inside or around it, not around the recipe; its nearest existing parent is a writable folder;
an existing target is replaced only with `overwrite` and only when it is a checkpoint this tool wrote (a
config.json with a `compression` section, and nothing but the files its manifest `compress-files.json` lists).

Writing (`temporary_folder` + `swap_into_place`): files go to `.NAME.tmp-PID-XXXX` beside the target, then
renames put them in place. What is at the target is checked again just before the swap (a folder made there while the
checkpoint was written is the user's). Replacing a checkpoint moves the old one to `.NAME.old-PID-XXXX` first; a
crash between the two renames leaves that copy, which `recover` (run by the next save and by `compress.load`) moves
back, unless the process that moved it aside is still running (it is between its renames: a reader waits for it).
Stale temporaries of the same target whose process is gone are swept at the next save."""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import uuid
from pathlib import Path

from .errors import OutputError
from .paths import user_path

# files a checkpoint written by `compress.save` may hold (tokenizer files vary by tokenizer class)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
CHECKPOINT_FILES = ("config.json", "generation_config.json", "recipe.yaml", "report.json", *TOKENIZER_FILES,
                    "model.safetensors.index.json")
WEIGHT_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")  # write_weights' shard names
# the names of the files `compress.save` wrote into a checkpoint: what `--overwrite` may replace (by name alone, a
# user's vocab.json or model-00007-of-00009.safetensors put there counted as ours and went with the old checkpoint)
MANIFEST = "compress-files.json"


def written_files(folder: Path) -> set[str] | None:
    """The file names the manifest of a checkpoint folder lists (itself included); None without a readable one
    (a checkpoint written before the manifest, or not by `compress.save`)."""
    try:
        names = json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) and "/" not in n for n in names):
        return None
    return {*names, MANIFEST}


def write_manifest(folder: Path) -> None:
    """Called last by the writer: every file now in `folder` is the checkpoint's."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    (folder / MANIFEST).write_text(json.dumps({"files": names}, indent=1))


def _legacy_files(folder: Path) -> set[str]:
    """A checkpoint without a manifest: its fixed names, and the weights its index lists (or model.safetensors)."""
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return {*CHECKPOINT_FILES, "model.safetensors"}
    try:
        shards = list(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set(CHECKPOINT_FILES)  # a damaged index: the shards count as the user's (nothing deleted on a guess)
    return {*CHECKPOINT_FILES, *(n for n in shards if isinstance(n, str) and WEIGHT_SHARD.fullmatch(n))}


def _written_by_us(folder: Path) -> tuple[set[str], set[str], list[str]]:
    """(files, folders, foreign) of a compress checkpoint folder: the files compress wrote (its fixed files,
    model.safetensors or its shards), the subfolders its passes record (an unmerged adapter) while they hold only
    the files their pass writes there, and what a user added inside such a subfolder (`adapter/NOTES.md`, which
    keeps that subfolder from being ours). Any other entry, a *.safetensors of the user's included, is not ours to
    delete."""
    files = written_files(folder) or _legacy_files(folder)
    folders: set[str] = set()
    foreign: list[str] = []
    try:
        from .checkpoint import extra_folder_files

        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        for path, names in extra_folder_files(folder, config.get("compression")).items():
            if path.is_dir() and not path.is_symlink():
                added = [f"{path.name}/{p.name}" for p in path.iterdir()
                         if not (p.is_file() and not p.is_symlink() and p.name in names)]
                foreign += added
                if not added:
                    folders.add(path.name)
    except Exception:  # a damaged record: its folders count as the user's (nothing is deleted on a guess)
        pass
    return files, folders, sorted(foreign)


def written_by_compress(folder: Path) -> bool:
    """A folder this tool wrote: config.json with a `compression` mapping."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("compression"), dict)


def _contains(outer: Path, inner: Path) -> bool:
    """Whether `inner` is `outer` or inside it: by path, or by identity (device and inode) of `inner` or a parent
    that exists (a bind mount, an NFS alias: another path to the same folder, which resolve() cannot see)."""
    if inner == outer or outer in inner.parents:
        return True
    try:
        target = outer.stat()
    except OSError:
        return False
    for p in (inner, *inner.parents):
        with contextlib.suppress(OSError):
            if os.path.samestat(p.stat(), target):
                return True
    return False


def check_output(output: str | Path, *, overwrite: bool, source: Path | None = None, made_from: Path | None = None,
                 protected: tuple[Path, ...] = (), work: tuple[Path, ...] = ()) -> Path:
    """Raise OutputError unless a checkpoint can be written at `output` (see the module docstring).
    `source` is the model read; `made_from` the model a checkpoint read was made from (an export: apply refused an
    output inside the original model's folder, export wrote there); `protected` are other files the run reads (the
    recipe, the evaluation text); `work` folders a pass writes while it runs (Trainer checkpoints), which the
    checkpoint's swap would replace."""
    out = user_path(output)
    if out.is_symlink():  # a dangling link too: writing through it would land wherever it points
        raise OutputError(f"output {output} is a symbolic link; give the real folder or a new name")
    dangling = next((p for p in out.absolute().parents if p.is_symlink() and not p.exists()), None)
    if dangling is not None:  # the save would make the folders it points to, wherever that is (mkdir -p refuses)
        raise OutputError(f"output {output}: {dangling} is a symbolic link to {os.readlink(dangling)}, which does "
                          "not exist; make that folder or give another output path")
    try:
        resolved = out.resolve()
    except (OSError, RuntimeError) as exc:
        raise OutputError(f"output {output}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
    if resolved == Path.cwd().resolve() or resolved == Path(resolved.anchor):
        raise OutputError(f"--output {output} is the current folder (or the root); name a new folder, e.g. out/NAME")
    longest = len(os.fsencode(temporary_name(resolved)))  # what the save writes beside it, found after all the work
    if longest > NAME_MAX:
        raise OutputError(f"output {output}: its name is too long ({len(os.fsencode(resolved.name))} bytes; at most "
                          f"{NAME_MAX - longest + len(os.fsencode(resolved.name))} leaves room for the temporary "
                          "name the save writes beside it)")
    for model, what, folder in ((source, "the source model", "the source model's folder"),
                                (made_from, "the model it was made from", "the folder of the model it was made from")):
        if model is None:
            continue
        src = Path(model).resolve()
        if _contains(resolved, src):
            same = resolved == src or (resolved.exists() and os.path.samefile(resolved, src))
            raise OutputError(f"output {output} {'is' if same else 'contains'} {what} "
                              f"({model}); write the checkpoint somewhere else")
        if _contains(src, resolved):
            raise OutputError(f"output {output} is inside {folder} ({model}); write it elsewhere")
    for p in protected:
        if _contains(resolved, Path(p).resolve()):
            raise OutputError(f"output {output} contains {p}, which this run reads; choose another output folder")
    for p in work:
        if _contains(resolved, user_path(p).resolve()):
            raise OutputError(f"output {output} contains {p}, where this run writes while it works (a pass's "
                              "checkpoint_dir or --offload-folder); put it outside the output folder")
    recover(resolved)
    if os.path.ismount(resolved):
        raise OutputError(f"output {output} is a mount point, which the checkpoint cannot be renamed onto; give a "
                          "folder inside it")
    if resolved.exists() or resolved.is_symlink():
        _check_replaceable(out, resolved, overwrite)
    parent = resolved.parent
    while not parent.exists():
        if parent.is_symlink() or parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"output {output}: {parent} is a file, not a folder; choose another output path")
    if not _writable(parent):
        raise OutputError(f"output {output}: no permission to write in {parent}; choose a writable folder")
    return out


def file_target_problem(path: Path) -> str | None:
    """Why a single file (a plot, a JSON of results) cannot be written at `path`, or None: a folder there, its
    folder missing or a file, or no permission. Checked before the work whose result it holds; no folder is made."""
    folder = path.parent  # `x.json`: the current folder
    if path.is_dir():
        return f"{path} is a folder; give a file name"
    if not folder.is_dir():
        return f"{path}: {folder} is {'a file, not a folder' if folder.exists() else 'not there (no such folder)'}"
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return f"{path}: no permission to write there"
    return None


def _check_replaceable(out: Path, resolved: Path, overwrite: bool) -> None:
    if out.is_symlink():
        raise OutputError(f"output {out} is a symbolic link; give the real folder or a new name")
    if not resolved.is_dir():
        raise OutputError(f"output {out} is a file, not a folder; choose another output path")
    if not overwrite:
        raise OutputError(f"{out} already exists; choose another output folder, or pass --overwrite "
                          "(overwrite=True in Python)")
    entries = list(resolved.iterdir())
    if not entries:
        return  # an empty folder: replacing it loses nothing
    if not written_by_compress(resolved):
        raise OutputError(f"--overwrite replaces only a checkpoint written by compress; {out} is not one "
                          "(no `compression` section in its config.json): choose another output folder")
    files, folders, foreign = _written_by_us(resolved)
    holders = {f.partition("/")[0] for f in foreign}  # named by what the user added inside, not as a whole
    others = foreign + sorted(p.name for p in entries if p.name not in holders and not (
        (p.is_file() and p.name in files) or (p.is_dir() and not p.is_symlink() and p.name in folders)))
    if others:
        # (model.save_pretrained then tokenizer.save_pretrained: the manifest lists the model's files only)
        tokenizer = [n for n in others if n in TOKENIZER_FILES]
        hint = (f" ({', '.join(tokenizer[:2])}: tokenizer files saved beside the checkpoint after it was written, "
                "e.g. by tokenizer.save_pretrained, count as yours)" if tokenizer else "")
        raise OutputError(f"--overwrite would delete {', '.join(others[:3])}{' ...' if len(others) > 3 else ''} "
                          f"in {out}, which compress did not write{hint}; move them or choose another output folder")


def _writable(folder: Path) -> bool:
    """Permission bits, then a folder actually made and removed: bits say yes where the file system says no (/sys,
    a read-only mount for root), and the refusal used to come after all the work, at the final write."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".compress-probe-", dir=folder))
    except OSError:
        return False
    return True


def _rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# what temporary_folder / swap_into_place put after `.NAME.tmp` / `.NAME.old` (the first version wrote no pid)
_SUFFIX = re.compile(r"(?:-(\d+))?-[0-9a-f]{8}")


def _writer_pid(path: Path, kind: str) -> int | None:
    """The process id in `.NAME.tmp-PID-XXXXXXXX` / `.NAME.old-PID-XXXXXXXX` (a name `_leftovers` matched; None
    for the first version's `.NAME.old-XXXXXXXX`)."""
    pid = _SUFFIX.fullmatch(path.name.rsplit(f".{kind}", 1)[1]).group(1)
    return int(pid) if pid else None


_SWAPPING: set[Path] = set()  # moved-aside copies of this process's swaps now between their two renames
SWAP_SECONDS = 10.0  # a swap's two renames take microseconds: an older moved-aside copy is a leftover


def _swapping(old: Path) -> bool:
    """`old` was moved aside by a save still between its two renames: one of this process's (another thread), or
    another process's that is running and moved it seconds ago (a pid alone may have been reused, or be another
    container's)."""
    pid = _writer_pid(old, "old")
    if pid is None:
        return False
    if pid == os.getpid():
        return old.resolve() in _SWAPPING  # a reader may name it through a symlinked parent
    try:
        recent = time.time() - old.stat().st_ctime < SWAP_SECONDS  # a rename sets ctime
    except OSError:
        return False
    return recent and pid_alive(pid)


def _leftovers(target: Path, kind: str) -> list[Path]:
    """This tool's temporaries (`tmp`) or moved-aside copies (`old`) of `target`: only names it writes itself, with a
    process id and 8 hex digits (a user's `.ck.old-backup` beside `ck` was restored over or deleted)."""
    prefix = f".{target.name}.{kind}"
    return [p for p in target.parent.glob(f"{glob.escape(prefix)}-*")  # `ck[1]` is no pattern
            if _SUFFIX.fullmatch(p.name[len(prefix):]) and p.is_dir() and not p.is_symlink()]


def wait_for_swap(target: Path, seconds: float = 5.0) -> None:
    """Where another save is between its two renames (its `.NAME.old-PID-*` beside a missing target), wait until the
    target is back: the gap is a rename long, so a reader does not fail on it."""
    deadline = time.monotonic() + seconds
    while not target.exists() and time.monotonic() < deadline and any(
            _swapping(o) for o in _leftovers(target, "old")):
        time.sleep(0.01)


def recover(target: Path) -> Path | None:
    """Finish an interrupted save of `target`: put back a replaced copy if the target is missing, drop leftovers of
    a completed swap, sweep temporaries whose process is gone. Returns the restored folder, if any."""
    parent = target.parent
    if not parent.is_dir():
        return None
    restored = None
    try:
        olds = [o for o in _leftovers(target, "old") if not _swapping(o)]  # a live save finishes its own swap
        olds.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        if olds and not target.exists():
            os.replace(olds[0], target)
            restored, olds = target, olds[1:]
        for old in olds:
            shutil.rmtree(old, ignore_errors=True)
        for tmp in _leftovers(target, "tmp"):
            pid = _writer_pid(tmp, "tmp")
            if pid is None or not pid_alive(pid):
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        return restored  # a read-only parent: nothing to clean, check_output reports it
    return restored


NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems


def temporary_name(target: Path, kind: str = "tmp") -> str:
    """`.NAME.tmp-PID-XXXXXXXX` (or `.old`): where a save writes beside `target` (the two are as long)."""
    return f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def temporary_folder(target: Path) -> Path:
    tmp = target.parent / temporary_name(target)
    tmp.mkdir()
    return tmp


COMPLETED: list[Path] = []  # targets this process's swaps finished (the CLI says so when interrupted after one)


# what the CLI unwinds on besides Ctrl-C: `kill` / `timeout` / a scheduler, and a closed terminal (no SIGHUP on Windows)
UNWINDING_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextlib.contextmanager
def _signals_held():
    """Ctrl-C / SIGTERM / SIGHUP wait until the block ends (the two renames of a swap: between them the old
    checkpoint sat hidden until a later command put it back). Python runs signal handlers in the main thread
    whichever thread the kernel handed the signal to (a signal mask would hold it for one thread only: torch's and
    the tokenizers' pools would take it), so the handlers are swapped for ones that note the signal, which the
    previous handlers get after the block. Only from the main thread, where handlers can be set. Yields the list of
    signals noted so far."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    caught: list[int] = []
    previous: dict[int, object] = {}
    try:
        for s in (signal.SIGINT, *UNWINDING_SIGNALS):
            previous[s] = signal.signal(s, lambda signum, frame: caught.append(signum))
        yield caught
    finally:
        raised = []
        for s, handler in previous.items():
            while True:  # setting a handler first runs those of signals pending: a restored one may raise
                try:
                    signal.signal(s, handler if handler is not None else signal.SIG_DFL)  # (None: set outside
                    break                                                                 # Python; not restorable)
                except BaseException as exc:  # noqa: BLE001 - handed on below, after every handler is back
                    raised.append(exc)
        # each as it would have been handled, now (SIGTERM first: its exit code is the one a scheduler reads)
        for s in sorted(dict.fromkeys(caught), key=lambda s: s != signal.SIGTERM):
            handler = previous[s]
            if callable(handler):
                handler(s, None)  # Python's default for SIGINT raises KeyboardInterrupt; the CLI's SIGTERM too
            elif handler != signal.SIG_IGN:
                os.kill(os.getpid(), s)  # the default action (or a handler set outside Python)
        if raised:
            raise raised[0]


def _umask() -> int:
    """The process's umask, read from /proc without changing it (setting it to read it would, for an instant, let
    another thread create world-writable files); only where /proc is missing, by setting it and back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _plain_file_modes(folder: Path) -> None:
    """safetensors writes its files 0600 (a private temporary file renamed into place): give every file the mode a
    plain write gives (0666 less the umask), so a checkpoint is readable by whoever may read its folder (a serving
    account loading an export)."""
    mask = _umask()
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink():
            f.chmod(0o666 & ~mask)


def swap_into_place(tmp: Path, target: Path, *, overwrite: bool) -> None:
    """Rename the finished `tmp` to `target`; an existing target is moved aside first and removed after. What is at
    the target is checked again here, not only before the work: a folder made there meanwhile is not ours."""
    _plain_file_modes(tmp)
    if target.exists() or target.is_symlink():
        _check_replaceable(target, target.resolve(), overwrite)
    try:
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        if target.exists():
            old = target.parent / temporary_name(target, "old")
            _SWAPPING.add(old.resolve())
            try:
                with _signals_held():
                    _rename(target, old)
                    try:
                        _rename(tmp, target)  # a crash before this line leaves `old`, which recover() puts back
                    except OSError:
                        try:
                            os.replace(old, target)  # the new one could not go in: the old one goes back now
                        except OSError:  # (already back, or something took its place): the first error is said
                            pass
                        raise
                    COMPLETED.append(target)
                    shutil.rmtree(old, ignore_errors=True)  # (an interrupt waits for it too: no copy left aside)
            finally:
                _SWAPPING.discard(old.resolve())
        else:
            with _signals_held():
                _rename(tmp, target)  # onto a folder made since the check above: refused (not empty), never merged
                COMPLETED.append(target)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EBUSY, errno.EXDEV):
            raise OutputError(f"{target} changed while the checkpoint was written, or cannot be renamed onto "
                              f"({exc.strerror}); nothing was replaced: write it again") from None
        raise
