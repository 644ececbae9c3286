"""Python started in the repository's root has the root on sys.path, where the `kernels/` folder would shadow Hugging
Face's `kernels` distribution (transformers >= 5.25 imports it on `import transformers`)."""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_top_level_kernels_is_the_distribution_not_this_folder():
    try:
        importlib.metadata.distribution("kernels")
        installed = True
    except importlib.metadata.PackageNotFoundError:
        installed = False
    probe = _run("import sys; sys.path.insert(0, ''); import kernels; print(kernels.__file__)")
    if installed:
        assert probe.returncode == 0, probe.stderr
        assert Path(probe.stdout.strip()).resolve().parent != ROOT / "kernels"
    else:
        assert probe.returncode != 0 and "No module named 'kernels'" in probe.stderr


def test_transformers_and_compress_kernels_import_from_the_root():
    probe = _run("import sys; sys.path.insert(0, ''); import transformers.models.llama.modeling_llama; "
                 "import compress.kernels.kv_attention_reference as k; print(k.__name__)")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "compress.kernels.kv_attention_reference"


def test_two_checkouts_on_the_path_do_not_hand_the_import_back_and_forth(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name / "kernels").mkdir(parents=True)
        (tmp_path / name / "kernels" / "__init__.py").write_text((ROOT / "kernels" / "__init__.py").read_text())
        (tmp_path / name / "kernels" / "kv_pages.py").write_text("")
    probe = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__file__)"], cwd=tmp_path,
                           env={**__import__("os").environ, "PYTHONPATH": f"{tmp_path / 'a'}:{tmp_path / 'b'}"},
                           capture_output=True, text=True, timeout=300)
    assert "RecursionError" not in probe.stderr
    assert probe.returncode == 0 or "No module named 'kernels'" in probe.stderr
    assert str(tmp_path) not in probe.stdout
