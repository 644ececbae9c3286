"""Where `compress apply` / `compress.save` may write: --overwrite replaces only a checkpoint compress wrote, never
the source, the recipe, the current folder or a plain file; output problems are found before any work; stale
temporaries are swept and an overwrite interrupted between its two renames is recovered."""
from __future__ import annotations

import json
import os

import pytest

import compress
import compress.output_folder as output_folder
from compress.errors import OutputError

RECIPE = "passes:\n  - prune: {sparsity: 0.5}\n"


@pytest.fixture
def source(tmp_path, small_model, tokenizer):
    folder = tmp_path / "work" / "src"
    small_model().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


@pytest.fixture
def no_work(monkeypatch):
    """Fail loudly if a command gets as far as loading the model: output checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output location was checked")
    monkeypatch.setattr(compress.models, "load", refuse)


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("where,message", [
    ("parent_of_source", "contains the source model"),
    ("source", "is the source model"),
    ("inside_source", "is inside the source model's folder"),
    ("around_recipe", "recipe.yaml, which this run reads"),
])
def test_overwrite_never_touches_the_source_or_the_recipe(where, message, source, tmp_path, cli, user_error, no_work):
    recipe = source.parent / "recipe.yaml" if where == "around_recipe" else tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    model = source if where != "around_recipe" else "builtin:tiny"
    output = {"parent_of_source": source.parent, "source": source, "inside_source": source / "out",
              "around_recipe": source.parent}[where]
    before = _files(tmp_path)
    user_error(cli("apply", recipe, "--model", model, "--output", output, "--overwrite", "--no-eval"), message)
    assert _files(tmp_path) == before


def test_overwrite_refuses_folders_compress_did_not_write(tmp_path, recipe, cli, user_error, no_work):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "cat.jpg").write_bytes(b"\xff\xd8")
    user_error(cli("apply", recipe, "--model", "builtin:tiny", "--output", mine, "--overwrite"),
               "replaces only a checkpoint written by compress")
    assert (mine / "cat.jpg").exists()


def test_overwrite_refuses_a_checkpoint_holding_other_files(tmp_path, small_model, recipe, cli, user_error, no_work):
    out = compress.save(small_model(), tmp_path / "ckpt")
    (out / "notes.txt").write_text("mine")
    user_error(cli("apply", recipe, "--model", "builtin:tiny", "--output", out, "--overwrite"),
               "would delete notes.txt")
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("name", ["my_lora.safetensors", "model-00001-of-00002.safetensors.bak", "adapter"])
def test_overwrite_refuses_user_files_that_look_like_weights(tmp_path, small_model, recipe, cli, user_error, no_work,
                                                             name):
    """Only model.safetensors, its shards and the folders the checkpoint's passes record are ours: a user's
    *.safetensors (or an `adapter` folder the record does not name) is refused, not deleted."""
    out = compress.save(small_model(), tmp_path / "ckpt")
    target = out / name
    if name == "adapter":
        target.mkdir()
        (target / "adapter_config.json").write_text("{}")
    else:
        target.write_bytes(b"mine")
    user_error(cli("apply", recipe, "--model", "builtin:tiny", "--output", out, "--overwrite"),
               f"would delete {name}")
    assert target.exists()


@pytest.mark.parametrize("manifest", [True, False])
def test_overwrite_refuses_user_files_named_like_checkpoint_files(tmp_path, small_model, manifest):
    """A vocab.json or a shard the checkpoint did not write (it wrote one model.safetensors and no vocab.json) is
    the user's: --overwrite deleted both silently (an audit's find). The manifest lists what save wrote; a checkpoint
    from before it is judged by its index (shards) and the fixed names (vocab.json then still counts as ours)."""
    from compress.output_folder import MANIFEST, check_output

    out = compress.save(small_model(), tmp_path / "ckpt")
    assert "model.safetensors" in json.loads((out / MANIFEST).read_text())["files"]
    if not manifest:
        (out / MANIFEST).unlink()
    (out / "model-00007-of-00009.safetensors").write_bytes(b"mine")
    (out / "vocab.json").write_text("{}")
    expected = "model-00007-of-00009.safetensors, vocab.json" if manifest else "model-00007-of-00009.safetensors"
    with pytest.raises(compress.errors.OutputError, match=f"would delete {expected} in"):
        check_output(out, overwrite=True)
    (out / "model-00007-of-00009.safetensors").unlink()
    (out / "vocab.json").unlink()
    assert check_output(out, overwrite=True) == out


def test_a_compressed_tensors_export_lists_its_files_too(tmp_path):
    pytest.importorskip("compressed_tensors")
    from compress.export.compressed_tensors import export
    from compress.output_folder import MANIFEST, check_output

    model, _ = compress.apply(compress.load("builtin:tiny"), [compress.passes.Quantize(method="rtn", group_size=64)],
                              progress=False)
    export(model, out := tmp_path / "ct")
    assert "config.json" in json.loads((out / MANIFEST).read_text())["files"]
    (out / "vocab.json").write_text("{}")
    with pytest.raises(compress.errors.OutputError, match="would delete vocab.json"):
        check_output(out, overwrite=True)


def test_overwrite_accepts_what_the_checkpoint_records_writing(tmp_path, small_model):
    """Shards named by the index, and a pass's recorded folder (recover with merge: false writes `adapter/`)."""
    from compress.output_folder import check_output

    model = small_model()
    out = compress.save(model, tmp_path / "ckpt", max_shard_bytes=1 << 16)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    config = json.loads((out / "config.json").read_text())
    config["compression"]["passes"] = [{"pass": "recover", "args": {}, "restore": {"adapter": "adapter"}}]
    (out / "config.json").write_text(json.dumps(config))
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    assert check_output(out, overwrite=True) == out  # nothing refused
    # a file the user added to that folder is theirs: refused and named, nothing deleted
    (out / "adapter" / "NOTES.md").write_text("mine")
    with pytest.raises(compress.errors.OutputError, match="would delete adapter/NOTES.md"):
        check_output(out, overwrite=True)
    assert (out / "adapter" / "NOTES.md").read_text() == "mine"


@pytest.mark.parametrize("overwrite", [False, True])
def test_plain_file_output(tmp_path, recipe, cli, user_error, no_work, overwrite):
    target = tmp_path / "model.bin"
    target.write_bytes(b"data")
    user_error(cli("apply", recipe, "--model", "builtin:tiny", "--output", target, *(["--overwrite"] * overwrite)),
               "is a file, not a folder")
    assert target.read_bytes() == b"data"


def test_output_dot_is_refused(tmp_path, recipe, cli, user_error, no_work, monkeypatch):
    monkeypatch.chdir(tmp_path)
    user_error(cli("apply", recipe, "--model", "builtin:tiny", "--output", ".", "--overwrite"), "the current folder")
    assert recipe.exists()


def test_parent_is_a_file(tmp_path, recipe, cli, user_error, no_work):
    (tmp_path / "file.txt").write_text("x")
    user_error(cli("apply", recipe, "--model", "builtin:tiny", "--output", tmp_path / "file.txt" / "out"),
               "is a file, not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent(tmp_path, recipe, cli, user_error, no_work):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        user_error(cli("apply", recipe, "--model", "builtin:tiny", "--output", locked / "out"), "no permission")
    finally:
        locked.chmod(0o700)


def test_read_only_parent_found_before_work(tmp_path, recipe, cli, user_error, no_work, monkeypatch):
    """The same check as above, where the tests run as root: the permission test is os.access."""
    monkeypatch.setattr(output_folder, "_writable", lambda folder: False)
    user_error(cli("apply", recipe, "--model", "builtin:tiny", "--output", tmp_path / "out"), "no permission to write")


def test_a_file_system_that_refuses_writes_is_found_before_work(tmp_path, recipe, cli, user_error, no_work,
                                                                monkeypatch):
    """/sys, or a read-only mount, as root: the permission bits say writable, the file system refuses; this used to
    surface after all the work, at the checkpoint's write ("operation not permitted: /sys/.x.tmp-...")."""
    def refuse(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(output_folder.tempfile, "mkdtemp", refuse)
    assert output_folder._writable(tmp_path) is False
    user_error(cli("apply", recipe, "--model", "builtin:tiny", "--output", tmp_path / "out"), "no permission to write")
    assert not (tmp_path / "out").exists()


def test_the_write_probe_leaves_nothing_behind(tmp_path):
    before = sorted(tmp_path.iterdir())
    assert output_folder._writable(tmp_path) is True
    assert sorted(tmp_path.iterdir()) == before


def test_overwrite_replaces_a_compress_checkpoint(tmp_path, small_model):
    out = compress.save(small_model(seed=1), tmp_path / "ckpt")
    compress.save(small_model(seed=2), out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_checkpoint_files_get_the_modes_a_plain_write_gives(tmp_path, small_model):
    """safetensors wrote model.safetensors 0600 while the other files were 0644: a serving account that may read the
    folder could not read the weights. Every file now gets 0666 less the umask, as the umask says."""
    import os

    mask = os.umask(0o027)
    try:
        out = compress.save(small_model(), tmp_path / "ckpt")
    finally:
        os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o640}, modes


def test_api_save_refuses_foreign_folders(tmp_path, small_model):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "table.csv").write_text("a,b")
    with pytest.raises(OutputError, match="not one"):
        compress.save(small_model(), tmp_path / "data", overwrite=True)
    with pytest.raises(OutputError, match="is the source model"):
        src = compress.save(small_model(), tmp_path / "src")
        compress.save(compress.load(src), src, overwrite=True)


def test_stale_temporaries_of_the_target_are_swept(tmp_path, small_model):
    dead = tmp_path / ".ckpt.tmp-999999999-abcd0123"  # no such process
    alive = tmp_path / f".ckpt.tmp-{os.getpid()}-abcd0123"  # a save in progress in this process
    other = tmp_path / ".other.tmp-999999999-abcd0123"  # another target's
    for d in (dead, alive, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 1000)
    compress.save(small_model(), tmp_path / "ckpt")
    assert not dead.exists() and alive.exists() and other.exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_user_folders_named_like_leftovers_are_never_touched(tmp_path, small_model, overwrite):
    """Only names this tool writes (`.NAME.tmp-PID-8hex`, `.NAME.old-PID-8hex`) are its leftovers: a user's
    `.ckpt.old-backup` was restored over a missing target, or deleted beside an existing one, by a refused save
    (an audit's find)."""
    import torch

    user = {name: tmp_path / name for name in (".ckpt.old-mybackup", ".ckpt.tmp-scratch", ".ckpt.old-12-notours",
                                               ".new.old-mine", ".ckpt.old-1234567")}
    for folder in user.values():
        folder.mkdir()
        (folder / "notes.txt").write_text("precious")
    out = compress.save(small_model(seed=1), tmp_path / "ckpt")
    if overwrite:
        compress.save(small_model(seed=2), out, overwrite=True)
    else:
        with pytest.raises(OutputError, match="already exists"):
            compress.save(small_model(seed=2), out)
    new = compress.save(small_model(seed=3), tmp_path / "new")  # a missing target: nothing put in its place first
    assert torch.equal(compress.load(new).lm_head.weight, small_model(seed=3).lm_head.weight)
    assert all((folder / "notes.txt").read_text() == "precious" for folder in user.values())


def _crash_between_renames(monkeypatch):
    real, calls = output_folder._rename, []

    def rename(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the old checkpoint is moved aside, the new one not yet in place
            raise KeyboardInterrupt
        real(src, dst)
    monkeypatch.setattr(output_folder, "_rename", rename)


def test_interrupted_swap_is_restored_by_load(tmp_path, small_model, monkeypatch):
    import torch

    old_model = small_model(seed=1)
    out = compress.save(old_model, tmp_path / "ckpt")
    _crash_between_renames(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        compress.save(small_model(seed=2), out, overwrite=True)
    monkeypatch.undo()
    assert not out.exists() and list(tmp_path.glob(".ckpt.old-*"))
    restored = compress.load(out)  # finds the moved-aside copy and puts it back
    assert torch.equal(restored.lm_head.weight, old_model.lm_head.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_the_first_versions_moved_aside_copy_is_restored_too(tmp_path, small_model):
    """The first version named its moved-aside copy `.NAME.old-XXXXXXXX` (no pid): a crash between its two renames
    is still finished by the next load."""
    import torch

    model = small_model(seed=1)
    out = compress.save(model, tmp_path / "ckpt")
    out.rename(tmp_path / ".ckpt.old-0a1b2c3d")
    assert torch.equal(compress.load(out).lm_head.weight, model.lm_head.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_interrupted_swap_is_restored_by_the_next_save(tmp_path, small_model, monkeypatch):
    out = compress.save(small_model(seed=1), tmp_path / "ckpt")
    _crash_between_renames(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        compress.save(small_model(seed=2), out, overwrite=True)
    monkeypatch.undo()
    with pytest.raises(OutputError, match="already exists"):  # the old copy is back, so overwrite is needed again
        compress.save(small_model(seed=3), out)
    assert out.exists() and not list(tmp_path.glob(".ckpt.*"))


@pytest.mark.parametrize("raised", [
    # what safetensors' Rust writer and the tokenizers library raise when the disk fills (not OSErrors)
    "SafetensorError:Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on "
    "device\" })",
    "Exception:No space left on device (os error 28)",
])
def test_a_full_disk_while_writing_is_one_line_and_keeps_the_old_checkpoint(tmp_path, recipe, cli, user_error,
                                                                           monkeypatch, raised):
    from safetensors import SafetensorError

    import compress.checkpoint as ckpt

    out = tmp_path / "out"
    assert cli("apply", recipe, "--model", "builtin:tiny", "--output", out, "--no-eval").exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    kind, _, text = raised.partition(":")
    error = SafetensorError(text) if kind == "SafetensorError" else Exception(text)
    monkeypatch.setattr(ckpt, "save_file", lambda *a, **k: (_ for _ in ()).throw(error))
    user_error(cli("apply", recipe, "--model", "builtin:tiny", "--output", out, "--overwrite", "--no-eval"),
               "no space left on the device")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.yaml"]


def test_an_output_that_is_the_source_by_another_path_is_refused(source, tmp_path, recipe, cli, user_error, no_work):
    """`--overwrite` replaced the source model when the output named its folder through a bind mount (an audit's
    find: paths differ, resolve() cannot see it). Compared by device and inode too."""
    import subprocess

    alias = tmp_path / "alias"
    alias.mkdir()
    if subprocess.run(["mount", "--bind", str(source.parent), str(alias)], capture_output=True).returncode:
        pytest.skip("no bind mounts here (needs root)")
    try:
        before = _files(source)
        for output, message in ((alias / "src", "is the source model"), (alias / "src" / "o", "is inside the source"),
                                (alias, "contains the source model")):
            user_error(cli("apply", recipe, "--model", source, "--output", output, "--overwrite", "--no-eval"),
                       message)
        assert _files(source) == before
    finally:
        subprocess.run(["umount", str(alias)], check=True)


def test_an_output_name_too_long_for_the_save_s_temporary_is_refused_before_work(tmp_path, recipe, cli, user_error,
                                                                                  no_work):
    """A 250-byte name passed every check, ran every pass and failed at the save: the temporary beside it
    (`.NAME.tmp-PID-XXXXXXXX`) is longer than a file name may be."""
    user_error(cli("apply", recipe, "--model", "builtin:tiny", "--output", tmp_path / ("n" * 250), "--no-eval"),
               "its name is too long (250 bytes; at most")


def test_an_output_under_a_dangling_symlink_is_refused(tmp_path, recipe, cli, user_error, no_work):
    """It made the folders the link points to (here /nonexistent-...), wherever they were (an audit's find)."""
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "deeper")
    user_error(cli("apply", recipe, "--model", "builtin:tiny", "--output", tmp_path / "dangling" / "ck", "--no-eval"),
               "dangling is a symbolic link to", "which does not exist")
    assert not (tmp_path / "nowhere").exists()
