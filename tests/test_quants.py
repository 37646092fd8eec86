"""Weight-type kernels: dequantization must match gguf-py's numpy reference bit for bit, and
matmul must match a float64 product of the gguf-py-dequantized weights within the error that
8-bit activation quantization explains."""
import os
import zlib

import numpy as np
import pytest
import gguf
from gguf import GGMLQuantizationType as QT

from glmoe import _core

QUANT_TYPES = [QT.Q8_0, QT.Q4_0, QT.Q5_0, QT.Q4_K, QT.Q5_K, QT.Q6_K]
FLOAT_TYPES = [QT.F32, QT.F16, QT.BF16]
ALL_TYPES = FLOAT_TYPES + QUANT_TYPES

# Byte offsets of the f16 scale fields inside one block, and whether the field must be >= 0
# (dmin multiplies the subtracted minimum).
SCALE_FIELDS = {
    QT.Q8_0: [(0, False)],
    QT.Q4_0: [(0, False)],
    QT.Q5_0: [(0, False)],
    QT.Q4_K: [(0, False), (2, True)],
    QT.Q5_K: [(0, False), (2, True)],
    QT.Q6_K: [(208, False)],
}

SEED = int(os.environ.get("GLMOE_TEST_SEED", np.random.SeedSequence().entropy % 2**32))


@pytest.fixture
def rng(request):
    # The seed is in the test's name on failure; rerun with GLMOE_TEST_SEED=<seed>.
    request.node.user_properties.append(("seed", SEED))
    return np.random.default_rng([SEED, zlib.crc32(request.node.name.encode())])


def block_size(qtype):
    return gguf.GGML_QUANT_SIZES[qtype][0]


def random_rows(rng, qtype, n_rows, k, finite_floats=True):
    """Raw bytes of n_rows rows of k elements: random payload bits, sane random scales."""
    if qtype == QT.F32:
        return rng.standard_normal((n_rows, k)).astype(np.float32).view(np.uint8)
    if qtype == QT.F16:
        if finite_floats:
            return rng.standard_normal((n_rows, k)).astype(np.float16).view(np.uint8)
        return rng.integers(0, 256, (n_rows, 2 * k), dtype=np.uint8)
    if qtype == QT.BF16:
        if finite_floats:
            f = rng.standard_normal((n_rows, k)).astype(np.float32)
            return (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return rng.integers(0, 256, (n_rows, 2 * k), dtype=np.uint8)
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = n_rows * k // bs
    raw = rng.integers(0, 256, (n_blocks, ts), dtype=np.uint8)
    for offset, positive in SCALE_FIELDS[qtype]:
        lo = 0.0 if positive else -0.1
        raw[:, offset:offset + 2] = rng.uniform(lo, 0.1, (n_blocks, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(n_rows, -1)


def reference_dequant(qtype, raw, k):
    return gguf.quants.dequantize(raw, qtype).reshape(raw.shape[0], k)


def row_lengths(qtype):
    if qtype in FLOAT_TYPES:
        return [1, 7, 64]
    bs = block_size(qtype)
    return [bs, 2 * bs, 6 * bs] if bs == 256 else [bs, 2 * bs, 3 * bs]


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_rows", [1, 5, 33])
def test_dequantize_bit_exact(rng, qtype, n_rows):
    for k in row_lengths(qtype):
        raw = random_rows(rng, qtype, n_rows, k, finite_floats=False)
        ours = _core.dequantize(int(qtype), raw, k)
        ref = reference_dequant(qtype, raw, k)
        assert ours.shape == ref.shape and ours.dtype == np.float32
        nan = np.isnan(ref)
        # NaN payloads may differ in the quiet bit; everything else must be the same bits.
        assert np.array_equal(nan, np.isnan(ours)), f"seed {SEED}, k {k}"
        same = ours.view(np.uint32)[~nan] == ref.view(np.uint32)[~nan]
        assert same.all(), f"seed {SEED}, k {k}: first mismatch at {np.argwhere(~same)[0]}"


def f16_special_values():
    """Subnormals, signed zeros and infinities convert exactly."""
    bits = np.array([0x0000, 0x8000, 0x0001, 0x03FF, 0x8001, 0x0400, 0x7BFF, 0x7C00, 0xFC00, 0x3C00],
                    dtype=np.uint16)
    return np.tile(bits, 4).view(np.uint8).reshape(1, -1)


def test_f16_special_values():
    raw = f16_special_values()
    ours = _core.dequantize(int(QT.F16), raw, raw.shape[1] // 2)
    assert np.array_equal(ours.view(np.uint32), reference_dequant(QT.F16, raw, raw.shape[1] // 2).view(np.uint32))


def activation_error_sigma(qtype, w, x):
    """Standard deviation of the error 8-bit activation quantization adds to each x @ w.T entry.

    Each activation is rounded to a step of amax(its block) / 127, an error uniform within half
    a step (variance step^2 / 12), independent across elements."""
    if qtype in FLOAT_TYPES:
        return np.zeros((x.shape[0], w.shape[0]))
    group = 32 if block_size(qtype) == 32 else 256
    step = np.abs(x).reshape(x.shape[0], -1, group).max(axis=-1) / 127.0
    step = np.repeat(step, group, axis=1)
    return np.sqrt((step ** 2 / 12.0) @ (w.astype(np.float64) ** 2).T)


def check_matmul(rng, qtype, n_rows, n_tok, k):
    raw = random_rows(rng, qtype, n_rows, k)
    w = reference_dequant(qtype, raw, k).astype(np.float64)
    x = rng.standard_normal((n_tok, k)).astype(np.float32)
    ref = x.astype(np.float64) @ w.T
    # f32 accumulation: a few ulps of the sum of magnitudes. Quantized activations: the rounding
    # error above, which is ~1/300 of the result's scale; seven sigma is never reached by chance,
    # while a wrong nibble or scale is off by the result's whole scale.
    magnitude = np.abs(x.astype(np.float64)) @ np.abs(w).T
    tol = 7.0 * activation_error_sigma(qtype, w, x) + 1e-5 * magnitude + 1e-30
    results = {}
    for n_threads in (1, 2, 3):
        y = _core.matmul(int(qtype), raw, k, x, n_threads)
        assert y.shape == (n_tok, n_rows) and y.dtype == np.float32
        err = np.abs(y - ref)
        worst = np.unravel_index(np.argmax(err / tol), err.shape)
        assert (err <= tol).all(), (f"seed {SEED} threads {n_threads}: err {err[worst]:.3g} > tol {tol[worst]:.3g} "
                                    f"at {worst}")
        results[n_threads] = y
    # Every output element is computed the same way however the work is split.
    assert np.array_equal(results[1].view(np.uint32), results[2].view(np.uint32))
    assert np.array_equal(results[1].view(np.uint32), results[3].view(np.uint32))


SHAPES = [(1, 1), (7, 3), (33, 17), (130, 64), (1, 64), (5, 9)]


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_rows,n_tok", SHAPES, ids=lambda s: str(s))
def test_matmul_matches_float64(rng, qtype, n_rows, n_tok):
    for k in row_lengths(qtype)[::-1][:2]:
        check_matmul(rng, qtype, n_rows, n_tok, k)


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_matmul_tolerance_catches_wrong_weights(rng, qtype):
    """The tolerance is tight: swapping two weight nibbles/elements' order must fail it."""
    k = row_lengths(qtype)[1]
    raw = random_rows(rng, qtype, 16, k)
    w = reference_dequant(qtype, raw, k).astype(np.float64)
    x = rng.standard_normal((4, k)).astype(np.float32)
    wrong = w.reshape(16, -1, 2)[:, :, ::-1].reshape(16, k)  # neighbours swapped
    y = _core.matmul(int(qtype), raw, k, x, 1)
    tol = 7.0 * activation_error_sigma(qtype, w, x) + 1e-5 * (np.abs(x) @ np.abs(w).T)
    assert (np.abs(y - x.astype(np.float64) @ w.T) <= tol).all()
    assert not (np.abs(y - x.astype(np.float64) @ wrong.T) <= tol).all()


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matmul_zero_activations(rng, qtype):
    k = row_lengths(qtype)[0] if qtype not in FLOAT_TYPES else 16
    raw = random_rows(rng, qtype, 3, k)
    y = _core.matmul(int(qtype), raw, k, np.zeros((2, k), np.float32), 2)
    assert np.array_equal(y, np.zeros((2, 3), np.float32))


def test_bad_arguments(rng):
    raw = random_rows(rng, QT.Q4_K, 2, 256)
    x = np.zeros((1, 256), np.float32)
    with pytest.raises(ValueError):
        _core.matmul(3, raw, 256, x, 1)  # Q4_1: not supported
    with pytest.raises(ValueError):
        _core.matmul(9999, raw, 256, x, 1)
    with pytest.raises(ValueError):
        _core.matmul(int(QT.Q4_K), raw, 128, x[:, :128].copy(), 1)  # not a whole block
    with pytest.raises(ValueError):
        _core.matmul(int(QT.Q4_K), raw[:, :100].copy(), 256, x, 1)  # not whole rows
    with pytest.raises(ValueError):
        _core.matmul(int(QT.Q4_K), raw, 256, np.zeros((1, 512), np.float32), 1)  # x row length
    with pytest.raises(ValueError):
        _core.dequantize(int(QT.Q8_0), raw, 48)
    with pytest.raises(ValueError):
        _core.dequantize(int(QT.Q8_0), raw.reshape(-1)[:35].copy(), 32)
    with pytest.raises(ValueError):
        _core.dequantize(2000, raw, 32)


def invariance_row_lengths(qtype):
    """A short k, and one long enough to be cut into several L1-sized slices."""
    if qtype in FLOAT_TYPES:
        return [37, 6997]
    bs = block_size(qtype)
    return [3 * bs, 83 * bs] if bs == 256 else [5 * bs, 701 * bs]


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matmul_batch_invariant(rng, qtype):
    """A token's outputs are bitwise the same whatever else is in the call: batching (continuous
    batching, speculative verification) must not change a sequence's logits or MoE routing."""
    n_rows, n_tok = 37, 19
    for k in invariance_row_lengths(qtype):
        raw = random_rows(rng, qtype, n_rows, k)
        x = rng.standard_normal((n_tok, k)).astype(np.float32)
        full = _core.matmul(int(qtype), raw, k, x, 1).view(np.uint32)
        for n_threads in (1, 2, 3):
            assert np.array_equal(_core.matmul(int(qtype), raw, k, x, n_threads).view(np.uint32), full), \
                f"k {k} threads {n_threads}: full batch"
            for size in range(1, 10):
                for start in sorted({0, 1, 3, (n_tok - size) // 2, n_tok - size}):
                    part = _core.matmul(int(qtype), raw, k, np.ascontiguousarray(x[start:start + size]), n_threads)
                    assert np.array_equal(part.view(np.uint32), full[start:start + size]), \
                        f"k {k} threads {n_threads}: tokens [{start}, {start + size})"
