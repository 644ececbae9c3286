"""compress.kernels: Triton and C kernels beside their torch references (installed under `compress`, setup.py)."""
if __name__ == "kernels":
    # Imported as a top-level `kernels` from a checkout of this repository (`python -m ...` in its root puts the
    # root on sys.path): that name belongs to Hugging Face's `kernels` distribution, which transformers >= 5.25
    # requires and imports on `import transformers`. Hand the import over to it (or fail as a missing module would).
    import importlib.machinery
    import importlib.util
    import os
    import sys

    # every sys.path entry holding a checkout of this repository left out (two worktrees on the path would
    # otherwise hand the import to each other forever)
    _path = [p for p in sys.path if not os.path.isfile(os.path.join(p or os.getcwd(), "kernels", "kv_pages.py"))]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # what `import kernels` returns once this file has run
    _spec.loader.exec_module(_module)
