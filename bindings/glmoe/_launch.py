"""Console-script entry points that run the C++ tools installed inside the package."""
import os
import sys

_BIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bin")


def _exec(name: str):
    path = os.path.join(_BIN, name)
    if not os.path.exists(path):
        sys.exit(f"glmoe: {path} is missing: reinstall the package")
    os.execv(path, [path] + sys.argv[1:])


def llama_bench():
    _exec("llama-bench")


def llama_sweep_bench():
    _exec("llama-sweep-bench")
