"""Every C kernel source builds where a C compiler exists. The callers fall back to their torch reference when a
library is missing (machines without a compiler), so a source that stopped compiling would otherwise pass every
test silently on the slow path."""
import pytest

from compress.kernels import cpu_build

SOURCES = sorted(p.stem for p in cpu_build.SOURCES.glob("*.c"))


def test_the_sources_are_found():
    assert {"gather", "qmatvec", "kv_decode", "linear_decode"} <= set(SOURCES)


@pytest.mark.parametrize("name", SOURCES)
def test_c_source_builds(monkeypatch, name):
    if not cpu_build._compilers():
        pytest.skip("no C compiler here: the torch references run instead")
    monkeypatch.delenv("COMPRESS_CPU_KERNELS", raising=False)
    assert cpu_build.load_c_library(name) is not None, f"csrc/{name}.c does not compile"
