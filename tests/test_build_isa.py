"""The core sources compile for every x86 level the CPU kernels have a path for. A build (pip
install, CI) compiles only its own machine's (-march=native), so a path for another level can
break unseen: until 2026-12-08 an AVX2-only machine could not build glmoe at all."""
import os
import pathlib
import platform
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CXX = shutil.which(os.environ.get("CXX", "g++"))

# Each level selects other #if branches of src/matmul_*.cpp, simd_x86.h and quantize_act.cpp.
LEVELS = {
    "scalar": ["-march=x86-64"],
    "avx2": ["-march=x86-64-v3"],
    "avx2-avxvnni": ["-march=x86-64-v3", "-mavxvnni"],
    "avx512": ["-march=x86-64-v4"],
    "avx512-vnni": ["-march=x86-64-v4", "-mavx512vnni"],
}

pytestmark = pytest.mark.skipif(CXX is None or platform.machine() not in ("x86_64", "AMD64"),
                                reason="needs g++ on an x86-64 host")


def compile_errors(source, flags):
    cmd = [CXX, "-std=gnu++17", "-fsyntax-only", *flags, f"-I{ROOT / 'src'}", str(source)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    return "" if done.returncode == 0 else f"{source.name}:\n{done.stderr[-2000:]}"


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_core_sources_compile_at_every_x86_level(level):
    sources = sorted((ROOT / "src").glob("*.cpp"))
    assert len(sources) > 20
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        errors = [e for e in pool.map(lambda s: compile_errors(s, LEVELS[level]), sources) if e]
    assert not errors, "\n".join(errors)
