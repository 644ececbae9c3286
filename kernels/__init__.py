"""compress.kernels: Triton and C kernels beside their torch references (installed under `compress`, setup.py)."""
if __name__ == "kernels":
    # Imported as a top-level `kernels` from a checkout of this repository (`python -m ...` in its root puts the
    # root on sys.path): that name belongs to Hugging Face's `kernels` distribution, which transformers >= 5.25
    # requires and imports on `import transformers`. Hand the import over to it (or fail as a missing module would).
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _here = os.path.realpath(os.path.dirname(os.path.dirname(__file__)))
    _path = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != _here]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # what `import kernels` returns once this file has run
    _spec.loader.exec_module(_module)
