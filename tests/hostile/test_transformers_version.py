"""An older transformers 5.x ignores `cache=` and decodes without the cache (wrong tokens, no error): importing
compress refuses it with one line, and the CLI exits 2 without a traceback."""
import subprocess
import sys
import textwrap

# Runs before compress is imported: the installed transformers reports an older version.
PRETEND = textwrap.dedent("""
    import importlib.metadata as md
    _real = md.version
    md.version = lambda name: "5.20.2" if name == "transformers" else _real(name)
""")


def run(*code_or_module):
    return subprocess.run([sys.executable, *code_or_module], capture_output=True, text=True, timeout=300)


def test_library_import_refuses_an_older_transformers():
    proc = run("-c", PRETEND + "import compress")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "ImportError: compress needs transformers >= 5.24 (models take `cache=`), found 5.20.2: "
        "pip install -U 'transformers>=5.24,<6'")


def test_cli_says_it_in_one_line_and_exits_2():
    proc = run("-c", PRETEND + "import sys, runpy; sys.argv = ['compress', '--help']; "
                               "runpy.run_module('compress.cli', run_name='__main__')")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: compress needs transformers >= 5.24 (models take `cache=`), found 5.20.2: "
        "pip install -U 'transformers>=5.24,<6'"]
    assert "Traceback" not in proc.stderr


def test_the_installed_transformers_passes():
    assert run("-c", "import compress").returncode == 0
