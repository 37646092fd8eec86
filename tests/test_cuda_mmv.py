"""Decode matrix-vector kernels (ggml-cuda/mmv.cu) against float64 numpy references built from
gguf-py's dequantization.

Quantized weight types take 8-bit activations (quantize_q8 on the device), so each output is
checked twice: against the exact product with the *same* quantized activations at f32-rounding
tolerance (this pins the weight decoding down), and against the product with the original f32
activations within what 8-bit rounding allows. The bounds are per output element, scaled by the
terms of its own sum, so that a single output that happens to be near zero (1 row x 1 token) does
not make a relative error meaningless."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from cuda_support import cuda_only, rel_err
from test_quants import FLOAT_TYPES, QUANT_TYPES, block_size, random_rows, reference_dequant, rng  # noqa: F401

pytestmark = cuda_only

ALL_TYPES = FLOAT_TYPES + QUANT_TYPES
ROWS = [1, 7, 33, 257, 1000]
# f32 accumulation of a few thousand products (and f32 products of the scales): a few hundred
# ulps of the sum of |terms| at most; a wrong nibble, bit or scale is off by the result's whole
# scale, i.e. ~sqrt(cols) ulp-free orders more.
TIGHT = 1e-5
# 8-bit activations: each value moves by up to half a step of amax(its 32-block) / 127, an error
# uniform within the step (variance step^2 / 12) and independent across values; seven standard
# deviations of the resulting output error are never reached by chance. (That is about 0.5 % of
# a product of normal data, up to ~1 % for K-quant rows with a few dominant weights (seen: 1.04 %
# for Q5_K on the H100); over a few hundred outputs the test also asserts rel_err < 2e-2.)
SIGMAS = 7.0
LOOSE = 2e-2


def ops():
    from glmoe import _core

    return _core.cuda_ops


def col_choices(qtype):
    """Odd numbers of blocks: one, a partial 1024-column chunk, and several chunks (several
    activation slabs at n_tok = 8)."""
    if qtype in FLOAT_TYPES:
        return [100, 1184, 4128]  # 100: not a multiple of 8 (scalar path)
    if block_size(qtype) == 256:
        return [256, 256 * 5, 256 * 17]
    return [32 * 3, 32 * 37, 32 * 129]


def quantized_x(x):
    """The activations the kernel actually multiplies: d * q per 32-block."""
    d, s, q = ops().quantize_q8(np.ascontiguousarray(x, np.float32))
    n, cols = x.shape
    return (d.astype(np.float64)[:, :, None] * q.reshape(n, cols // 32, 32)).reshape(n, cols)


def dot(w, x):
    """Per output: w [rows, cols] (dense) or [P, rows, cols] (one matrix per input row) times x [P, cols]."""
    return x @ w.T if w.ndim == 2 else np.einsum("prc,pc->pr", w, x)


def products(w, x, is_q):
    """(exact product with the kernel's activations, its rounding bound, product with the f32
    activations, its bound). x [P, cols] f32; is_q [P]: whether row p met a quantized weight."""
    x64 = np.asarray(x, np.float64)
    xk = np.where(is_q[:, None], quantized_x(x), x64) if is_q.any() else x64
    magnitude = dot(np.abs(w), np.abs(x64))
    sigma = 0.0
    if is_q.any():
        n, cols = x64.shape
        step = np.abs(x64).reshape(n, cols // 32, 32).max(axis=2) / 127.0
        var = np.where(is_q[:, None], np.repeat(step ** 2 / 12.0, 32, axis=1), 0.0)
        sigma = np.sqrt(dot(w * w, var))
    return dot(w, xk), TIGHT * magnitude + 1e-30, dot(w, x64), SIGMAS * sigma + TIGHT * magnitude + 1e-30


def assert_within(out, ref, tol, what):
    err = np.abs(np.asarray(out, np.float64) - ref)
    ok = err <= tol  # False for NaN
    assert ok.all(), (f"{what}: {np.count_nonzero(~ok)} of {ok.size} outputs out of bounds, first at "
                      f"{np.argwhere(~ok)[0]}, worst err/tol {np.nanmax(err / tol):.3g}, rel_err {rel_err(out, ref):.3g}")


def check(out, w, x, is_q, what):
    ref_k, tol_k, ref_f, tol_f = products(w, x, is_q)
    assert_within(out, ref_k, tol_k, what + " (kernel's activations)")
    if is_q.any():
        assert_within(out, ref_f, tol_f, what + " (f32 activations)")
        if out.size >= 256:  # a norm over few outputs fluctuates too much to bound
            assert rel_err(out, ref_f) < LOOSE, what


def silu(g):
    with np.errstate(over="ignore"):  # exp(-g) = inf for g << 0 gives the right limit, -0
        return g / (1.0 + np.exp(-g))


def check_swiglu(out, wg, wu, x, is_q, what):
    """out = silu(G x) * (U x); the bounds of g and u carried through silu(g) * u (|silu'| <= 1.1),
    plus a few ulps for the kernel's expf and division."""
    gk, tgk, gf, tgf = products(wg, x, is_q)
    uk, tuk, uf, tuf = products(wu, x, is_q)
    for g, tg, u, tu, kind in ((gk, tgk, uk, tuk, "kernel's activations"), (gf, tgf, uf, tuf, "f32 activations")):
        ref = silu(g) * u
        tol = 1.1 * (np.abs(u) + tu) * tg + np.abs(silu(g)) * tu + 1e-6 * np.abs(ref) + 1e-30
        assert_within(out, ref, tol, f"{what} ({kind})")
        if not is_q.any():
            break


# ---- quantize_q8 ---------------------------------------------------------------------------------

def test_quantize_q8(rng):
    x = rng.standard_normal((5, 32 * 7)).astype(np.float32) * rng.uniform(0.01, 10, (5, 1)).astype(np.float32)
    x[1, 32:64] = 0.0  # an all-zero block: d = 0, q = 0
    d, s, q = ops().quantize_q8(x)
    blocks = x.reshape(5, 7, 32)
    amax = np.abs(blocks).max(axis=2)
    np.testing.assert_array_equal(d, (amax / np.float32(127)).astype(np.float32))
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q_ref = np.rint(blocks * inv[:, :, None]).astype(np.int8)
    np.testing.assert_array_equal(q.reshape(5, 7, 32), q_ref)
    np.testing.assert_array_equal(s, (d * q_ref.sum(axis=2, dtype=np.int32).astype(np.float32)).astype(np.float32))


# ---- mmv -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_mmv(rng, qtype):
    quant = qtype not in FLOAT_TYPES
    for cols in col_choices(qtype):
        for n_rows in ROWS:
            raw = random_rows(rng, qtype, n_rows, cols)
            w64 = reference_dequant(qtype, raw, cols).astype(np.float64)
            for n_tok in range(1, 9):
                x = rng.standard_normal((n_tok, cols)).astype(np.float32)
                y = ops().mmv(int(qtype), raw, cols, x)
                assert y.shape == (n_tok, n_rows)
                check(y, w64, x, np.full(n_tok, quant), f"{qtype.name} rows {n_rows} cols {cols} n_tok {n_tok}")


@pytest.mark.parametrize("qtype", [QT.F32, QT.BF16, QT.Q8_0, QT.Q4_K, QT.Q6_K], ids=lambda t: t.name)
def test_mmv_accumulate_and_stride(rng, qtype):
    quant = qtype not in FLOAT_TYPES
    cols = col_choices(qtype)[1]
    n_rows, y_stride = 33, 40
    raw = random_rows(rng, qtype, n_rows, cols)
    w64 = reference_dequant(qtype, raw, cols).astype(np.float64)
    for n_tok in (1, 3, 8):
        x = rng.standard_normal((n_tok, cols)).astype(np.float32)
        # Overwrite: the gaps between output rows stay poisoned.
        y = ops().mmv(int(qtype), raw, cols, x, y_stride=y_stride)
        assert np.isnan(y[:, n_rows:]).all()
        check(y[:, :n_rows], w64, x, np.full(n_tok, quant), f"{qtype.name} y_stride, n_tok {n_tok}")
        # Accumulate: y0 + W x (one more f32 rounding, of |y0 + W x|), gaps untouched.
        y0 = rng.standard_normal((n_tok, y_stride)).astype(np.float32)
        y = ops().mmv(int(qtype), raw, cols, x, accumulate_into=y0, y_stride=y_stride)
        np.testing.assert_array_equal(y[:, n_rows:], y0[:, n_rows:])
        ref_k, tol_k, _, _ = products(w64, x, np.full(n_tok, quant))
        ref = ref_k + y0[:, :n_rows]
        assert_within(y[:, :n_rows], ref, tol_k + 1e-6 * np.abs(ref), f"{qtype.name} accumulate, n_tok {n_tok}")


def test_mmv_bad_arguments(rng):
    raw = random_rows(rng, QT.Q8_0, 4, 64)
    x = np.zeros((9, 64), np.float32)
    with pytest.raises(ValueError):
        ops().mmv(int(QT.Q8_0), raw, 64, x)  # 9 tokens > kMaxMmvTokens
    with pytest.raises(ValueError):
        ops().mmv(int(QT.Q4_K), random_rows(rng, QT.Q8_0, 4, 64), 64, x[:1])  # not a K-quant row length
    with pytest.raises(ValueError):
        ops().mmv(3, raw, 64, x[:1])  # not a supported type


# ---- experts -------------------------------------------------------------------------------------

# (routed, shared or None): the shared expert of another type, as in GLM-4.5-Air's mixes, and of
# another family (quantized / float: two launches, each kernel skipping the other's pairs).
EXPERT_TYPES = [(QT.Q4_K, QT.Q8_0), (QT.Q5_0, QT.Q6_K), (QT.Q8_0, None), (QT.Q5_K, QT.Q4_0), (QT.Q6_K, QT.Q5_K),
                (QT.F16, QT.F32), (QT.BF16, None), (QT.Q4_K, QT.BF16), (QT.F16, QT.Q8_0)]


def expert_cols(routed, shared):
    types = [t for t in (routed, shared) if t is not None]
    if any(t not in FLOAT_TYPES and block_size(t) == 256 for t in types):
        return 256 * 5
    return 32 * 37


def make_experts(rng, routed, shared, n_exp, n_rows, cols):
    raws = np.stack([random_rows(rng, routed, n_rows, cols) for _ in range(n_exp)])
    w64 = [reference_dequant(routed, r, cols).astype(np.float64) for r in raws]
    sraw = None
    if shared is not None:
        sraw = random_rows(rng, shared, n_rows, cols)
        w64.append(reference_dequant(shared, sraw, cols).astype(np.float64))
    return raws, sraw, np.stack(w64)


def type_name(routed, shared):
    return f"{routed.name}+{shared.name if shared is not None else 'none'}"


def expert_is_q(routed, shared, n_exp, e):
    """Per (token, slot) pair: whether its expert is quantized (met 8-bit activations)."""
    return np.array([(routed if i < n_exp else shared) not in FLOAT_TYPES for i in e])


@pytest.mark.parametrize("routed,shared", EXPERT_TYPES, ids=[type_name(*p) for p in EXPERT_TYPES])
@pytest.mark.parametrize("x_per_slot", [False, True])
def test_mmv_experts(rng, routed, shared, x_per_slot):
    n_exp, n_slots = 5, 3
    cols = expert_cols(routed, shared)
    n_ids = n_exp + (shared is not None)
    for n_rows in (7, 130):
        raws, sraw, w64 = make_experts(rng, routed, shared, n_exp, n_rows, cols)
        for n_tok in range(1, 9):
            ids = rng.integers(0, n_ids, (n_tok, n_slots)).astype(np.int32)
            ids[0, :] = ids[0, 0]  # repeats within a token
            n_in = n_tok * n_slots if x_per_slot else n_tok
            x = rng.standard_normal((n_in, cols)).astype(np.float32)
            kw = {} if shared is None else dict(shared_type=int(shared), shared=sraw)
            y = ops().mmv_experts(int(routed), raws, cols, x, ids, x_per_slot, **kw)
            assert y.shape == (n_tok * n_slots, n_rows)
            pairs = np.arange(n_tok * n_slots)
            x_rows = pairs if x_per_slot else pairs // n_slots
            e = ids.reshape(-1)
            check(y, w64[e], x[x_rows], expert_is_q(routed, shared, n_exp, e),
                  f"{type_name(routed, shared)} rows {n_rows} n_tok {n_tok}")


def test_mmv_experts_bad_id_is_nan(rng):
    raws = np.stack([random_rows(rng, QT.Q8_0, 4, 64)] * 2)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    ids = np.array([[0, 2]], np.int32)  # 2 == n_routed but there is no shared expert
    y = ops().mmv_experts(int(QT.Q8_0), raws, 64, x, ids, False)
    assert np.isfinite(y[0]).all() and np.isnan(y[1]).all()


# ---- SwiGLU --------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_mmv_swiglu_dense(rng, qtype):
    quant = qtype not in FLOAT_TYPES
    cols = col_choices(qtype)[1]
    for n_rows in (1, 33, 257):
        graw = random_rows(rng, qtype, n_rows, cols)[None]
        uraw = random_rows(rng, qtype, n_rows, cols)[None]
        g64 = reference_dequant(qtype, graw[0], cols).astype(np.float64)
        u64 = reference_dequant(qtype, uraw[0], cols).astype(np.float64)
        for n_tok in range(1, 9):
            x = rng.standard_normal((n_tok, cols)).astype(np.float32)
            out = ops().mmv_swiglu(int(qtype), graw, uraw, cols, x)
            assert out.shape == (n_tok, n_rows)
            check_swiglu(out, g64, u64, x, np.full(n_tok, quant), f"{qtype.name} rows {n_rows} n_tok {n_tok}")


@pytest.mark.parametrize("routed,shared", EXPERT_TYPES, ids=[type_name(*p) for p in EXPERT_TYPES])
def test_mmv_swiglu_experts(rng, routed, shared):
    n_exp, n_slots = 4, 3
    cols = expert_cols(routed, shared)
    n_ids = n_exp + (shared is not None)
    for n_rows in (7, 130):
        graws, gsraw, g64 = make_experts(rng, routed, shared, n_exp, n_rows, cols)
        uraws, usraw, u64 = make_experts(rng, routed, shared, n_exp, n_rows, cols)
        for n_tok in range(1, 9):
            ids = rng.integers(0, n_ids, (n_tok, n_slots)).astype(np.int32)
            if shared is not None:
                ids[:, -1] = n_exp  # the fused shared expert in the last slot, as the engine routes it
            x = rng.standard_normal((n_tok, cols)).astype(np.float32)
            kw = {} if shared is None else dict(shared_type=int(shared), shared_gate=gsraw, shared_up=usraw)
            out = ops().mmv_swiglu(int(routed), graws, uraws, cols, x, ids, **kw)
            assert out.shape == (n_tok * n_slots, n_rows)
            e = ids.reshape(-1)
            tok = np.arange(n_tok * n_slots) // n_slots
            check_swiglu(out, g64[e], u64[e], x[tok], expert_is_q(routed, shared, n_exp, e),
                         f"{type_name(routed, shared)} rows {n_rows} n_tok {n_tok}")
