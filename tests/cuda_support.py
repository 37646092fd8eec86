"""Shared by the tests marked `cuda`: they run only where the build has the CUDA backend and a
GPU is present (the device machine); elsewhere they are skipped, and CI still compiles the kernels."""
import pytest

from glmoe import _core

HAVE_GPU = _core.built_with_cuda() and _core.cuda_device_count() > 0

# Use as `pytestmark = cuda_only` in a test module.
cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not HAVE_GPU, reason="needs the CUDA backend and a GPU")]


def rel_err(out, ref):
    """||out - ref|| / ||ref||, NaN-propagating (a NaN anywhere fails every tolerance)."""
    import numpy as np

    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
