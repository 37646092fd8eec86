"""The small CUDA ops (ggml-cuda/ops.cu) and GPU sampling (ggml-cuda/sample.cu) against float64
numpy references of the CPU semantics (src/context.cpp, src/sampling.cpp); get_rows against
gguf-py's dequantization, bit for bit."""
from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
import gguf
from gguf import GGMLQuantizationType as QT

from cuda_support import cuda_only, rel_err
from test_quants import random_rows
from test_sampling import reference

pytestmark = cuda_only

SEED = int(os.environ.get("GLMOE_TEST_SEED", np.random.SeedSequence().entropy % 2**32))


@pytest.fixture
def rng(request):
    # The seed is in the test's name on failure; rerun with GLMOE_TEST_SEED=<seed>.
    request.node.user_properties.append(("seed", SEED))
    return np.random.default_rng([SEED, zlib.crc32(request.node.name.encode())])


def ops():
    from glmoe import _core

    return _core.cuda_ops


# ---- get_rows -----------------------------------------------------------------------------------

ALL_TYPES = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q5_0, QT.Q4_K, QT.Q5_K, QT.Q6_K]


def assert_same_floats(ours, ref):
    """Bit-exact, except that any NaN matches any NaN (payload quieting is not ours to fix)."""
    ours = np.asarray(ours, np.float32)
    ref = np.asarray(ref, np.float32)
    assert ours.shape == ref.shape
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(ours), nan)
    np.testing.assert_array_equal(ours[~nan].view(np.uint32), ref[~nan].view(np.uint32))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("finite", [True, False])
def test_get_rows_matches_gguf(rng, qtype, finite):
    bs = gguf.GGML_QUANT_SIZES[qtype][0]
    lengths = [1, 7, 64] if bs == 1 else [bs, 2 * bs, 3 * bs]
    for cols in lengths:
        n_rows = 37
        raw = random_rows(rng, qtype, n_rows, cols, finite_floats=finite)
        ref_all = gguf.quants.dequantize(raw, qtype).reshape(n_rows, cols)
        ids = rng.integers(0, n_rows, 11).astype(np.int32)
        ids[0] = n_rows - 1
        ids[1] = ids[2]  # repeats are fine
        out = ops().get_rows(int(qtype), np.ascontiguousarray(raw), cols, ids)
        assert out.shape == (len(ids), cols) and out.dtype == np.float32
        assert_same_floats(out, ref_all[ids])


def test_get_rows_bad_ids_give_nan(rng):
    raw = random_rows(rng, QT.Q8_0, 4, 64)
    ids = np.array([0, -1, 4, 3], np.int32)
    out = ops().get_rows(int(QT.Q8_0), raw, 64, ids)
    ref = gguf.quants.dequantize(raw, QT.Q8_0).reshape(4, 64)
    assert_same_floats(out[[0, 3]], ref[[0, 3]])
    assert np.isnan(out[[1, 2]]).all()


def test_get_rows_rejects_bad_arguments(rng):
    raw = random_rows(rng, QT.Q4_K, 2, 256)
    with pytest.raises(ValueError):  # cols not a multiple of the block
        ops().get_rows(int(QT.Q4_K), raw, 100, np.zeros(1, np.int32))
    with pytest.raises(ValueError):  # unsupported type id
        ops().get_rows(3, raw, 256, np.zeros(1, np.int32))



# ---- dequantize_matrix (accuracy mode) ------------------------------------------------------------

# f16 bit patterns for the scale fields of quantized blocks: subnormals, signed zero, the largest
# finite, infinities and a NaN (the half -> float conversion must be exact for all of them).
SPECIAL_F16 = np.array([0x0001, 0x03FF, 0x8000, 0x0000, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00, 0x7E00, 0x0400],
                       np.uint16)


def special_scales(rng, qtype, raw):
    """raw with the f16 scale fields of about a third of its blocks set to SPECIAL_F16 values."""
    from test_quants import SCALE_FIELDS

    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, ts).copy()
    pick = rng.random(len(blocks)) < 0.35
    for offset, _ in SCALE_FIELDS[qtype]:
        vals = rng.choice(SPECIAL_F16, len(blocks))
        blocks[pick, offset:offset + 2] = vals[pick, None].view(np.uint8).reshape(-1, 2)
    return blocks.reshape(raw.shape)


def matrix_shapes(qtype):
    """(rows, cols): odd row counts; rows of one block, of a few, and long ones whose groups span
    several 128-group tiles; for the float types also lengths that end in a partial 32-group."""
    bs = gguf.GGML_QUANT_SIZES[qtype][0]
    if bs == 1:
        return [(3, 1), (77, 45), (9, 1000), (130, 96)]
    if bs == 256:
        return [(5, 256), (33, 768), (7, 256 * 11)]
    return [(5, 32), (77, 32 * 37), (3, 32 * 129)]


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("finite", [True, False])
def test_dequantize_matrix_matches_gguf(rng, qtype, finite):
    for rows, cols in matrix_shapes(qtype):
        raw = random_rows(rng, qtype, rows, cols, finite_floats=finite)
        if not finite and gguf.GGML_QUANT_SIZES[qtype][0] > 1:
            raw = special_scales(rng, qtype, raw)
        raw = np.ascontiguousarray(raw)
        with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 scales: NaN on both sides
            ref = gguf.quants.dequantize(raw, qtype).reshape(rows, cols)
        first = int(rng.integers(1, rows)) if rows > 1 else 0
        ranges = [(0, rows), (first, rows - first), (rows - 1, 1), (first // 2, (rows - first // 2) // 2 + 1), (0, 0)]
        for r0, n in ranges:
            out = ops().dequantize_matrix(int(qtype), raw, cols, r0, n)
            assert out.shape == (n, cols) and out.dtype == np.float32, (rows, cols, r0, n)
            assert_same_floats(out, ref[r0:r0 + n])


def test_dequantize_matrix_rejects_bad_arguments(rng):
    raw = np.ascontiguousarray(random_rows(rng, QT.Q4_K, 4, 256))
    for r0, n in ((0, 5), (4, 1), (-1, 1), (3, 2), (0, -1)):
        with pytest.raises(ValueError):
            ops().dequantize_matrix(int(QT.Q4_K), raw, 256, r0, n)
    with pytest.raises(ValueError):  # cols not a multiple of the block
        ops().dequantize_matrix(int(QT.Q4_K), raw, 100, 0, 1)
    with pytest.raises(ValueError):  # row_bytes does not match type and cols
        ops().dequantize_matrix(int(QT.Q4_K), raw, 512, 0, 1)
    with pytest.raises(ValueError):  # unsupported type id (Q4_1)
        ops().dequantize_matrix(3, raw, 256, 0, 1)
    # The valid call next to them works (the errors are the arguments', not the kernel's).
    assert_same_floats(ops().dequantize_matrix(int(QT.Q4_K), raw, 256, 1, 3),
                       gguf.quants.dequantize(raw, QT.Q4_K).reshape(4, 256)[1:4])

# ---- rms_norm, swiglu -------------------------------------------------------------------

def rms_ref(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w.astype(np.float64)


@pytest.mark.parametrize("shape", [(1, 4096), (3, 5120), (7, 33), (2, 1), (5, 127), (2, 9001)])
@pytest.mark.parametrize("in_place", [False, True])
def test_rms_norm(rng, shape, in_place):
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    w = rng.standard_normal(shape[1]).astype(np.float32)
    out = ops().rms_norm(x, w, 1e-5, in_place)
    ref = rms_ref(x, w, 1e-5)
    for r in range(shape[0]):
        assert rel_err(out[r], ref[r]) < 2e-6


@pytest.mark.parametrize("shape", [(1, 4096), (3, 256), (5, 1408), (2, 32), (2, 12288)])
def test_rms_norm_q8_is_rms_norm_then_quantize(rng, shape):
    """The fused kernel writes exactly what rms_norm followed by quantize_q8 write."""
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    w = rng.standard_normal(shape[1]).astype(np.float32)
    y, d, s, q = ops().rms_norm_q8(x, w, 1e-5)
    np.testing.assert_array_equal(y, ops().rms_norm(x, w, 1e-5, False))
    d2, s2, q2 = ops().quantize_q8(y)
    np.testing.assert_array_equal(d, d2)
    np.testing.assert_array_equal(s, s2)
    np.testing.assert_array_equal(q, q2)


def test_swiglu(rng):
    for n in (1, 1000, 100003):
        g = (rng.standard_normal(n) * 4).astype(np.float32)
        u = rng.standard_normal(n).astype(np.float32)
        g64 = g.astype(np.float64)
        ref = g64 / (1 + np.exp(-g64)) * u
        assert rel_err(ops().swiglu(g, u), ref) < 1e-6


def test_swiglu_extremes():
    g = np.array([-100.0, -30.0, 0.0, 30.0, 100.0], np.float32)
    out = ops().swiglu(g, np.ones(5, np.float32))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, [0.0, -30.0 * np.exp(-30.0), 0.0, 30.0, 100.0], rtol=1e-6, atol=1e-30)


# ---- qkv_prepare --------------------------------------------------------------------------------

def qkv_ref(qkv, bias, q_norm, k_norm, pos, n_head, n_kv, D, n_rot, eps, base):
    n = qkv.shape[0]
    x = qkv.astype(np.float64)
    if bias is not None:
        x = x + bias.astype(np.float64)
    x = x.reshape(n, n_head + 2 * n_kv, D).copy()
    for sl, w in ((slice(0, n_head), q_norm), (slice(n_head, n_head + n_kv), k_norm)):
        if w is not None:
            h = x[:, sl]
            x[:, sl] = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + eps) * w.astype(np.float64)
    half = n_rot // 2
    if half:
        inv = float(base) ** (-2.0 * np.arange(half) / n_rot)
        theta = pos.astype(np.float64)[:, None] * inv[None, :]
        c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
        h = x[:, : n_head + n_kv]
        a, b = h[..., :half].copy(), h[..., half:n_rot].copy()
        h[..., :half] = a * c - b * s
        h[..., half:n_rot] = a * s + b * c
        x[:, : n_head + n_kv] = h
    q = x[:, :n_head].reshape(n, -1)
    k = x[:, n_head:n_head + n_kv].reshape(n, -1)
    v = x[:, n_head + n_kv:].reshape(n, -1)
    return q, k, v


QKV_CASES = [
    # n, n_head, n_kv, D, n_rot, bias, qk_norm
    (1, 4, 2, 128, 64, True, False),    # GLM-4.5-Air-like: partial rope, bias
    (7, 6, 2, 128, 64, True, True),     # GLM-4.5-like: qk-norm
    (3, 2, 1, 64, 64, False, False),    # full rope
    (5, 3, 3, 256, 128, True, True),
    (2, 2, 1, 96, 32, False, True),
    (4, 1, 1, 32, 0, True, False),      # no rope
]


@pytest.mark.parametrize("case", QKV_CASES, ids=lambda c: "-".join(map(str, c)))
def test_qkv_prepare(rng, case):
    n, n_head, n_kv, D, n_rot, with_bias, qk_norm = case
    width = (n_head + 2 * n_kv) * D
    qkv = (rng.standard_normal((n, width)) * 2).astype(np.float32)
    bias = rng.standard_normal(width).astype(np.float32) if with_bias else None
    q_norm = rng.uniform(0.5, 1.5, D).astype(np.float32) if qk_norm else None
    k_norm = rng.uniform(0.5, 1.5, D).astype(np.float32) if qk_norm else None
    pos = rng.integers(0, 140000, n).astype(np.int32)
    pos[0] = 0
    if n > 1:
        pos[1] = 131071
    n_cells = n + 5
    cells = rng.permutation(n_cells)[:n].astype(np.int32)
    eps, base = 1e-5, 1000000.0
    q_out, k_cache, v_cache = ops().qkv_prepare(qkv, bias, q_norm, k_norm, pos, cells, n_cells, n_head, n_kv, D,
                                                n_rot, eps, base)
    q, k, v = qkv_ref(qkv, bias, q_norm, k_norm, pos, n_head, n_kv, D, n_rot, eps, base)
    q_part = q_out[:, : n_head * D]
    for t in range(n):
        assert rel_err(q_part[t], q[t]) < 2e-6, t
    # k and v parts of qkv are left as they were
    np.testing.assert_array_equal(q_out[:, n_head * D:], qkv[:, n_head * D:])
    k16 = k_cache.view(np.float16).astype(np.float64)
    v16 = v_cache.view(np.float16).astype(np.float64)
    for t in range(n):
        # One float16 rounding of a value that is itself off by rounding: within a half ulp plus
        # slack relative to the head's scale (rope rotates pairs, so a small element carries an
        # error of the order of its partner's size times the f32 angle error, ~1e-6 at 1e5 positions).
        for got, want in ((k16[cells[t]], k[t]), (v16[cells[t]], v[t])):
            head_scale = np.repeat(np.abs(want.reshape(-1, D)).max(axis=1), D)
            tol = np.spacing(np.abs(want).astype(np.float16)).astype(np.float64) * 0.5 + 1e-5 * head_scale + 1e-7
            assert np.all(np.abs(got - want) <= tol), t
    untouched = np.setdiff1d(np.arange(n_cells), cells)
    assert (k_cache[untouched] == 0xFFFF).all() and (v_cache[untouched] == 0xFFFF).all()


def test_qkv_prepare_skips_negative_cells(rng):
    n_head, n_kv, D = 2, 1, 64
    qkv = rng.standard_normal((2, (n_head + 2 * n_kv) * D)).astype(np.float32)
    pos = np.array([3, 4], np.int32)
    cells = np.array([-1, 1], np.int32)
    q_out, k_cache, v_cache = ops().qkv_prepare(qkv, None, None, None, pos, cells, 2, n_head, n_kv, D, 64, 1e-5,
                                                10000.0)
    assert (k_cache[0] == 0xFFFF).all() and (v_cache[0] == 0xFFFF).all()
    assert not (k_cache[1] == 0xFFFF).any()
    q, _, _ = qkv_ref(qkv, None, None, None, pos, n_head, n_kv, D, 64, 1e-5, 10000.0)
    assert rel_err(q_out[:, : n_head * D], q) < 2e-6


def test_qkv_prepare_rejects_bad_rope():
    qkv = np.zeros((1, 4 * 64), np.float32)
    one = np.zeros(1, np.int32)
    with pytest.raises(ValueError):
        ops().qkv_prepare(qkv, None, None, None, one, one, 1, 2, 1, 64, 65, 1e-5, 10000.0)
    with pytest.raises(ValueError):
        ops().qkv_prepare(qkv, None, None, None, one, one, 1, 2, 1, 64, 128, 1e-5, 10000.0)


# ---- moe_route ----------------------------------------------------------------------------------

def route_ref(logits, bias, n_used, n_groups, n_group_used, norm, scale, fuse_shared):
    """The CPU's routing (src/context.cpp ffn_moe), in float32 like it, weights in float64."""
    n, E = logits.shape
    prob = (np.float32(1) / (np.float32(1) + np.exp(-logits.astype(np.float32)))).astype(np.float32)
    choice = prob + (bias if bias is not None else np.zeros(E, np.float32))
    ids = np.zeros((n, n_used + fuse_shared), np.int32)
    weights = np.zeros((n, n_used + fuse_shared))
    for t in range(n):
        c = choice[t].copy()
        if n_groups > 1:
            per = E // n_groups
            g = c.reshape(n_groups, per)
            top = -np.sort(-g, axis=1)
            score = top[:, 0] + (top[:, 1] if per > 1 else np.float32(0))
            order = np.lexsort((np.arange(n_groups), -score))
            c.reshape(n_groups, per)[order[n_group_used:]] = -np.inf
        top = np.lexsort((np.arange(E), -c))[:n_used]
        w = prob[t, top].astype(np.float64)
        if norm:
            w = w / w.sum()
        ids[t, :n_used] = top
        weights[t, :n_used] = w * scale
        if fuse_shared:
            ids[t, n_used] = E
            weights[t, n_used] = 1.0
    return ids, weights


def separated_router_inputs(rng, n, E, n_groups, with_bias, min_gap=2e-5):
    """Random logits/bias whose selection scores (and group scores) have no near-ties, so that
    the GPU's expf cannot reorder them."""
    bias = (rng.standard_normal(E) * 0.3).astype(np.float32) if with_bias else None
    rows = []
    while len(rows) < n:
        x = (rng.standard_normal(E) * 2).astype(np.float32)
        p = 1 / (1 + np.exp(-x.astype(np.float64)))
        s = p + (bias if bias is not None else 0)
        if np.min(np.diff(np.sort(s))) < min_gap:
            continue
        if n_groups > 1:
            g = -np.sort(-s.reshape(n_groups, -1), axis=1)
            gs = g[:, 0] + (g[:, 1] if g.shape[1] > 1 else 0)
            if n_groups > 1 and np.min(np.diff(np.sort(gs))) < min_gap:
                continue
        rows.append(x)
    return np.stack(rows), bias


ROUTE_CASES = [
    # E, n_used, n_groups, n_group_used
    (128, 8, 1, 1),
    (160, 8, 1, 1),
    (160, 8, 8, 4),
    (128, 8, 4, 2),
    (20, 4, 4, 1),       # per_group 5
    (16, 3, 16, 5),      # per_group 1: group score = its one expert
    (512, 8, 32, 8),
    (37, 37, 1, 1),      # everything used
    (16, 4, 8, 1),       # fewer experts kept than used: -inf ones by index
]


@pytest.mark.parametrize("case", ROUTE_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("fuse_shared", [False, True])
def test_moe_route(rng, case, norm, fuse_shared):
    E, n_used, n_groups, n_group_used = case
    for n, with_bias in ((1, True), (7, False), (33, True)):
        logits, bias = separated_router_inputs(rng, n, E, n_groups, with_bias)
        scale = 2.5 if norm else 1.0
        ids, w = ops().moe_route(logits, bias, n_used, n_groups, n_group_used, norm, scale, fuse_shared)
        ref_ids, ref_w = route_ref(logits, bias, n_used, n_groups, n_group_used, norm, scale, fuse_shared)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(w, ref_w, rtol=2e-6, atol=0)
        if fuse_shared:
            assert (w[:, -1] == 1.0).all()


@pytest.mark.parametrize("n_groups,n_group_used", [(1, 1), (4, 2), (8, 3)])
def test_moe_route_exact_ties_go_to_the_lower_index(rng, n_groups, n_group_used):
    # Few distinct logits and no bias: many exactly equal scores (and group scores).
    E, n_used = 32, 6
    logits = (rng.integers(-2, 3, (20, E)) * 0.75).astype(np.float32)
    ids, w = ops().moe_route(logits, None, n_used, n_groups, n_group_used, True, 1.0, False)
    ref_ids, ref_w = route_ref(logits, None, n_used, n_groups, n_group_used, True, 1.0, False)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(w, ref_w, rtol=2e-6)


def test_moe_route_rejects_bad_groups():
    logits = np.zeros((1, 20), np.float32)
    with pytest.raises(ValueError):
        ops().moe_route(logits, None, 4, 3, 1)  # 3 does not divide 20
    with pytest.raises(ValueError):
        ops().moe_route(logits, None, 4, 4, 5)
    with pytest.raises(ValueError):
        ops().moe_route(logits, None, 21)


# ---- moe_group / moe_combine -----------------------------------------------------------------------

@pytest.mark.parametrize("n,n_slots,E", [(1, 9, 161), (7, 8, 128), (4096, 9, 161), (33, 1, 3), (0, 9, 161)])
def test_moe_group(rng, n, n_slots, E):
    ids = rng.integers(0, E, (n, n_slots)).astype(np.int32)
    if n:
        ids[:, -1] = E - 1  # a fused shared expert: every token
    counts, offsets, src, dst = ops().moe_group(ids, E)
    flat = ids.reshape(-1)
    np.testing.assert_array_equal(counts, np.bincount(flat, minlength=E))
    np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=E))]))
    for e in range(E):
        got = sorted(zip(src[offsets[e]:offsets[e + 1]].tolist(), dst[offsets[e]:offsets[e + 1]].tolist()))
        p = np.nonzero(flat == e)[0]
        assert got == sorted(zip((p // n_slots).tolist(), p.tolist())), e


@pytest.mark.parametrize("n,n_slots,cols", [(1, 9, 4096), (5, 8, 33), (17, 1, 7)])
def test_moe_combine(rng, n, n_slots, cols):
    y = rng.standard_normal((n * n_slots, cols)).astype(np.float32)
    w = rng.uniform(0, 1, (n, n_slots)).astype(np.float32)
    ref = np.einsum("tj,tjc->tc", w.astype(np.float64), y.astype(np.float64).reshape(n, n_slots, cols))
    out = ops().moe_combine(y, w)
    assert rel_err(out, ref) < 1e-6
    base = rng.standard_normal((n, cols)).astype(np.float32)
    out = ops().moe_combine(y, w, base)
    assert rel_err(out, ref + base) < 1e-6


# ---- sample_tokens ------------------------------------------------------------------------------

def sample_ref(logits, temperature, top_k, top_p, min_p):
    """The CPU Sampler's final distribution (no bias, penalties or typical_p), in float64."""
    return reference(logits, [], temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)


def probe_points(rng, prob, max_points):
    """u values inside the CDF interval of survivors (midpoints, plus random ones), keeping away
    from boundaries by 1e-5; returns (u, expected token)."""
    cdf = np.cumsum(prob)
    surv = np.nonzero(prob > 0)[0]
    if len(surv) > max_points // 2:
        surv = np.sort(rng.choice(surv, max_points // 2, replace=False))
    lo = cdf[surv] - prob[surv]
    u = np.concatenate([(lo + cdf[surv]) / 2, rng.uniform(0, 1, max_points - len(surv))])
    u = u[u < 1]
    u = u[dist_to_bounds(u, prob) >= 1e-5]
    expected = np.searchsorted(cdf, u, side="right")
    return u.astype(np.float64), expected


def dist_to_bounds(u, prob):
    """Distance of each u to the nearest CDF boundary (0 and the cumulative sums of survivors)."""
    bounds = np.concatenate([[0.0], np.cumsum(prob)[prob > 0]])
    i = np.clip(np.searchsorted(bounds, u), 1, len(bounds) - 1)
    return np.minimum(np.abs(u - bounds[i - 1]), np.abs(bounds[i] - u))


def check_sampling(rng, logits, temperature, top_k, top_p, min_p, max_points=96):
    prob = sample_ref(logits, temperature, top_k, top_p, min_p)
    u64, expected = probe_points(rng, prob, max_points)
    u = u64.astype(np.float32)
    # u is uploaded as float32: recompute the expectation for the rounded value, still away from bounds
    cdf = np.cumsum(prob)
    ok = dist_to_bounds(u.astype(np.float64), prob) >= 1e-5
    u, expected = u[ok], np.searchsorted(cdf, u[ok].astype(np.float64), side="right")
    rows = np.ascontiguousarray(np.broadcast_to(logits, (len(u), len(logits))))
    got = ops().sample_tokens(rows, temperature, top_k, top_p, min_p, u)
    bad = np.nonzero(got != expected)[0]
    assert len(bad) == 0, (f"{len(bad)}/{len(u)} draws differ; first: u={u[bad[0]]} got {got[bad[0]]} "
                           f"want {expected[bad[0]]} (p={prob[got[bad[0]]] if got[bad[0]] >= 0 else None})")
    return got, u


def random_logits(rng, n, scale, ties=False, banned=0):
    x = rng.standard_normal(n) * scale
    if ties:
        x = np.round(x * 2) / 2  # many exact ties, also at top_k's cut
    x = x.astype(np.float32)
    if banned and n > 1:
        x[rng.choice(n, min(banned, n - 1), replace=False)] = -np.inf
    return x


SAMPLE_SETTINGS = [
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
    dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),  # llama-cpp-python defaults
    dict(temperature=0.8, top_k=40, top_p=1.0, min_p=0.0),
    dict(temperature=1.0, top_k=0, top_p=0.9, min_p=0.0),
    dict(temperature=1.2, top_k=100, top_p=0.5, min_p=0.0),
    dict(temperature=1.5, top_k=0, top_p=1.0, min_p=0.1),
    dict(temperature=0.3, top_k=5000, top_p=0.99, min_p=0.0),
    dict(temperature=2.0, top_k=3, top_p=1.0, min_p=0.0),
    dict(temperature=1.0, top_k=1, top_p=1.0, min_p=0.0),
    dict(temperature=1.0, top_k=0, top_p=0.0, min_p=0.0),
    dict(temperature=0.7, top_k=0, top_p=0.7, min_p=0.02),
]


@pytest.mark.parametrize("n_vocab", [1, 5, 1000, 1001, 4099, 151552])
@pytest.mark.parametrize("settings", SAMPLE_SETTINGS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_sampling_matches_reference(rng, n_vocab, settings):
    for scale, ties, banned in ((1.0, False, 0), (3.0, True, 7)):
        logits = random_logits(rng, n_vocab, scale, ties, banned)
        check_sampling(rng, logits, **settings)


def test_sampling_is_deterministic(rng):
    logits = random_logits(rng, 151552, 2.0)
    settings = dict(temperature=0.9, top_k=0, top_p=0.95, min_p=0.0)
    a, u = check_sampling(rng, logits, **settings)
    rows = np.ascontiguousarray(np.broadcast_to(logits, (len(u), len(logits))))
    for _ in range(3):
        np.testing.assert_array_equal(ops().sample_tokens(rows, 0.9, 0, 0.95, 0.0, u), a)


def test_sampling_rows_are_independent(rng):
    n_vocab = 3000
    rows = np.stack([random_logits(rng, n_vocab, s) for s in (0.5, 2.0, 5.0, 1.0)])
    u = rng.uniform(0, 1, len(rows)).astype(np.float32)
    got = ops().sample_tokens(rows, 1.0, 50, 0.9, 0.01, u)
    for r in range(len(rows)):
        prob = sample_ref(rows[r], 1.0, 50, 0.9, 0.01)
        cdf = np.cumsum(prob)
        want = np.searchsorted(cdf, float(u[r]), side="right")
        near = dist_to_bounds(np.array([float(u[r])]), prob)[0] < 1e-5
        assert near or got[r] == want


@pytest.mark.parametrize("n_vocab", [1, 5, 1000, 1001, 151552])
def test_greedy_is_argmax_with_ties_to_lowest_id(rng, n_vocab):
    rows = np.stack([random_logits(rng, n_vocab, 2.0, ties=(i % 2 == 1), banned=3) for i in range(6)])
    if n_vocab > 10:
        rows[0, [n_vocab - 1, n_vocab // 2, 7]] = rows[0].max() + 1  # a three-way tie at the top
        rows[1, 3] = np.nan  # NaN never wins
    for t in (0.0, -1.0):
        got = ops().sample_tokens(rows, t)
        want = np.argmax(np.where(np.isnan(rows), -np.inf, rows), axis=1)
        np.testing.assert_array_equal(got, want)
    if n_vocab > 10:
        assert ops().sample_tokens(rows[:1], 0.0)[0] == 7


def test_nothing_drawable_gives_minus_one():
    rows = np.full((2, 17), -np.inf, np.float32)
    np.testing.assert_array_equal(ops().sample_tokens(rows, 0.0), [-1, -1])
    np.testing.assert_array_equal(ops().sample_tokens(rows, 1.0, 5, 0.9, 0.1, np.array([0.5, 0.1], np.float32)),
                                  [-1, -1])


def test_sampling_rejects_bad_parameters():
    rows = np.zeros((1, 10), np.float32)
    u = np.zeros(1, np.float32)
    for kw in (dict(top_p=1.5), dict(top_p=-0.1), dict(min_p=2.0), dict(top_p=float("nan"))):
        with pytest.raises(ValueError):
            ops().sample_tokens(rows, 1.0, u=u, **kw)
    with pytest.raises(ValueError):
        ops().sample_tokens(rows, float("inf"), u=u)
    with pytest.raises(ValueError):
        ops().sample_tokens(rows, 1.0)  # u missing
