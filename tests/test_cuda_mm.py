"""Tensor-core prefill matmuls (ggml-cuda/mm.cu): dense `mm` and grouped-by-expert `mm_experts`
against a float64 product of the gguf-py-dequantized weights, for every weight type, odd token and
row counts, odd block counts, accumulate on/off, and expert groups of 0, 1, ~30 and all tokens with
a shared expert of its own type."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from glmoe import _core
from cuda_support import cuda_only, rel_err
from test_quants import ALL_TYPES, FLOAT_TYPES, SEED, block_size, random_rows, reference_dequant, rng  # noqa: F401

pytestmark = cuda_only

# Both operands are rounded to bf16 (unit roundoff 2^-9 ~ 2e-3; the weight scales of the 4-6 bit
# types are rounded to bf16 too) with f32 accumulation: independent roundings partly cancel, and
# the measured relative error of a product is 1e-3..4e-3. 1e-2 leaves margin, while a wrong nibble,
# scale, tile or token row is off by the result's whole scale (rel_err ~ 1).
TOL = 1e-2


def cols_for(qtype, big=False):
    """Row lengths with an odd number of blocks (the last 64-wide K step is then half empty)."""
    if qtype in FLOAT_TYPES:
        return 1001 if big else 37
    bs = block_size(qtype)
    return bs * (3 if bs == 256 else 45) if big else bs * (1 if bs == 256 else 3)


def weights(rng, qtype, rows, cols):
    raw = random_rows(rng, qtype, rows, cols)
    return raw, reference_dequant(qtype, raw, cols).astype(np.float64)


def cuda_mm(qtype, raw, cols, x, acc=None):
    return _core.cuda_ops.mm(int(qtype), raw, cols, x, acc)


SHAPES = [(9, 33), (17, 1), (40, 129), (100, 257), (513, 1000)]  # up to 64 tokens: staged weights


def check_against_float64(rng, qtype, n_tok, n_rows, cols, accumulate, tol, **mm_args):
    """_core.cuda_ops.mm(..., **mm_args) of random weights and activations (plus a random term in
    the accumulate mode) against the float64 product, within tol relative."""
    raw, w = weights(rng, qtype, n_rows, cols)
    x = rng.standard_normal((n_tok, cols)).astype(np.float32)
    prod = x.astype(np.float64) @ w.T
    acc = (rng.standard_normal((n_tok, n_rows)) * prod.std()).astype(np.float32) if accumulate else None
    y = _core.cuda_ops.mm(int(qtype), raw, cols, x, acc, **mm_args)
    assert y.shape == (n_tok, n_rows) and y.dtype == np.float32
    assert not np.isnan(y).any(), f"seed {SEED} cols {cols}: unwritten outputs"
    assert rel_err(y, prod if acc is None else prod + acc) < tol, f"seed {SEED} cols {cols}"
    if acc is not None:  # the product part on its own, not hidden by the added term
        assert rel_err(y.astype(np.float64) - acc, prod) < tol, f"seed {SEED} cols {cols}"


def check_batch_invariant(rng, qtype, rows, cols, n_tok, parts, **mm_args):
    """Each token range of `parts`, multiplied on its own by _core.cuda_ops.mm(..., **mm_args),
    gives bitwise the rows of one call over all n_tok tokens."""
    raw, _ = weights(rng, qtype, rows, cols)
    x = rng.standard_normal((n_tok, cols)).astype(np.float32)
    full = _core.cuda_ops.mm(int(qtype), raw, cols, x, **mm_args).view(np.uint32)
    for start, size in parts:
        part = _core.cuda_ops.mm(int(qtype), raw, cols, np.ascontiguousarray(x[start:start + size]), **mm_args)
        assert np.array_equal(part.view(np.uint32), full[start:start + size]), f"seed {SEED}: [{start}, {start + size})"


BATCH_PARTS = [(0, 1), (5, 9), (37, 33), (60, 40), (99, 1)]  # of 100 tokens


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_tok,n_rows", SHAPES, ids=lambda s: str(s))
@pytest.mark.parametrize("accumulate", [False, True], ids=["set", "accumulate"])
def test_mm_matches_float64(rng, qtype, n_tok, n_rows, accumulate):
    for big in ([True] if n_tok * n_rows > 100000 else [False, True]):
        check_against_float64(rng, qtype, n_tok, n_rows, cols_for(qtype, big), accumulate, TOL)


# mm_float (the MoE router at prefill) is plain f32 FMA: error ~ 2^-24 * sqrt(cols) relative to
# the result's scale, under 1e-6 at these widths; 2e-5 leaves margin and is 500x below what a bf16
# rounding of the inputs (the tensor-core path) would give.
EXACT_TOL = 2e-5


@pytest.mark.parametrize("qtype", FLOAT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_tok,n_rows,cols", [(9, 33, 37), (100, 128, 4096), (513, 130, 1001), (2, 7, 5)], ids=str)
@pytest.mark.parametrize("accumulate", [False, True], ids=["set", "accumulate"])
def test_mm_float_is_exact_f32(rng, qtype, n_tok, n_rows, cols, accumulate):
    check_against_float64(rng, qtype, n_tok, n_rows, cols, accumulate, EXACT_TOL, exact=True)


@pytest.mark.parametrize("qtype", FLOAT_TYPES, ids=lambda t: t.name)
def test_mm_float_batch_invariant(rng, qtype):
    """The router's f32 scores of a token are bitwise the same whatever else is in the call."""
    check_batch_invariant(rng, qtype, 130, 1001, 100, BATCH_PARTS, exact=True)


def test_mm_float_refuses_quantized_weights(rng):
    raw, _ = weights(rng, QT.Q8_0, 4, 64)
    with pytest.raises(ValueError, match="not a float type"):
        _core.cuda_ops.mm(int(QT.Q8_0), raw, 64, np.zeros((2, 64), np.float32), exact=True)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_K, QT.Q6_K], ids=lambda t: t.name)
def test_mm_catches_swapped_weights(rng, qtype):
    """The tolerance is tight enough: neighbouring weights swapped must fail it."""
    cols = cols_for(qtype, True)
    raw, w = weights(rng, qtype, 64, cols)
    x = rng.standard_normal((40, cols)).astype(np.float32)
    y = cuda_mm(qtype, raw, cols, x)
    wrong = w.reshape(64, -1, 2)[:, :, ::-1].reshape(64, cols)
    assert rel_err(y, x.astype(np.float64) @ w.T) < TOL
    assert rel_err(y, x.astype(np.float64) @ wrong.T) > 10 * TOL


@pytest.mark.parametrize("qtype", [QT.F16, QT.Q8_0, QT.Q5_0, QT.Q4_K], ids=lambda t: t.name)
def test_mm_batch_invariant(rng, qtype):
    """A token's outputs are bitwise the same whatever else is in the call (32- and 64-token tiles,
    weights staged in shared memory up to 64 tokens and loaded into registers above, included):
    batching must not change a sequence's logits or routing."""
    check_batch_invariant(rng, qtype, 150, cols_for(qtype, True), 100, BATCH_PARTS)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_tok,n_rows,slices", [(9, 33, 4), (40, 129, 8), (64, 200, 64)], ids=str)
@pytest.mark.parametrize("accumulate", [False, True], ids=["set", "accumulate"])
def test_mm_split_matches_float64(rng, qtype, n_tok, n_rows, slices, accumulate):
    """mm over column slices (several slices at these widths, more slices asked than K steps in
    the last case) adds the slices' partial sums into y."""
    check_against_float64(rng, qtype, n_tok, n_rows, cols_for(qtype, True), accumulate, TOL, slices=slices)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q5_0, QT.Q4_K, QT.Q6_K, QT.BF16, QT.F32], ids=lambda t: t.name)
@pytest.mark.parametrize("n_tok", [9, 40, 64])
def test_mm_split_is_mm_regrouped(rng, qtype, n_tok):
    """mm_split multiplies the same bf16-rounded weights and activations as mm; only the f32 sums
    are grouped by slice. So the two agree to the rounding of the tensor cores' f32 accumulation
    (up to 1.2e-5 relative measured on an H100 at these 12288 columns; bound 1e-4), far tighter
    than either's distance from float64 (~1e-3, TOL): a slice that skipped or repeated one step of
    64 columns would move the result by ~sqrt(64 / 12288) = 7% and shows here even where TOL
    cannot see it."""
    cols = 256 * 48 if block_size(qtype) == 256 else 32 * 384  # 12288: GLM's attention output width
    raw, _ = weights(rng, qtype, 64, cols)
    x = rng.standard_normal((n_tok, cols)).astype(np.float32)
    plain = cuda_mm(qtype, raw, cols, x)
    for slices in (3, 8):
        split = _core.cuda_ops.mm(int(qtype), raw, cols, x, slices=slices)
        assert rel_err(split, plain) < 1e-4, f"seed {SEED}: {slices} slices"


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_K, QT.BF16], ids=lambda t: t.name)
def test_mm_split_batch_invariant(rng, qtype):
    """A token's outputs from mm_split are bitwise the same whatever else is in the call."""
    check_batch_invariant(rng, qtype, 150, cols_for(qtype, True), 64, [(0, 1), (5, 9), (20, 33), (63, 1)], slices=8)


def test_mm_bad_arguments(rng):
    mm = _core.cuda_ops.mm
    raw = random_rows(rng, QT.Q4_K, 2, 256)
    x = np.zeros((3, 256), np.float32)
    with pytest.raises(ValueError):
        mm(3, raw, 256, x)  # Q4_1: not supported
    with pytest.raises(ValueError):
        mm(9999, raw, 256, x)
    with pytest.raises(ValueError):
        mm(int(QT.Q4_K), raw[:, :144].copy(), 128, x[:, :128].copy())  # not a whole block
    with pytest.raises(ValueError):
        mm(int(QT.Q4_K), raw[:, :100].copy(), 256, x)  # row_bytes does not match
    with pytest.raises(ValueError):
        mm(int(QT.Q4_K), raw, 256, np.zeros((0, 256), np.float32))  # no tokens
    with pytest.raises(ValueError, match="slices"):
        mm(int(QT.Q4_K), raw, 256, x, slices=65)


def route(rng, n_tok, n_routed, n_used, with_shared):
    """Expert ids [n_tok, n_slots]: expert 0 gets no token, expert 1 exactly one, expert 2 every
    token (so its count is the bound n), the rest random; the shared expert (n_routed) takes the
    last slot of every token."""
    ids = np.empty((n_tok, n_used + (1 if with_shared else 0)), np.int32)
    lone = int(rng.integers(n_tok))
    for t in range(n_tok):
        pool = np.arange(3, n_routed)
        rest = rng.choice(pool, n_used - 1, replace=False)
        if t == lone:
            rest[-1] = 1
        ids[t, :n_used] = np.concatenate([[2], rest])
        rng.shuffle(ids[t, :n_used])
        if with_shared:
            ids[t, n_used] = n_routed
    return ids


def group(ids, n_experts):
    """Pairs grouped by expert, as moe_group writes them: offsets, src_row (token), dst_row."""
    n_tok, n_slots = ids.shape
    flat = ids.reshape(-1)
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=n_experts)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    src = (order // n_slots).astype(np.int32)
    dst = order.astype(np.int32)
    return offsets, src, dst


EXPERT_TYPES = [
    (QT.Q4_K, QT.Q8_0),   # GLM-4.5-Air gate/up: one fused launch
    (QT.Q5_0, QT.Q8_0),   # GLM-4.5-Air down
    (QT.Q8_0, QT.Q8_0),   # same type
    (QT.Q6_K, QT.Q4_0),   # a mix run as two launches
    (QT.Q5_K, None),      # no shared expert
    (QT.F16, QT.BF16),
]


@pytest.mark.parametrize("routed_type,shared_type", EXPERT_TYPES, ids=lambda t: "none" if t is None else t.name)
@pytest.mark.parametrize("n_tok,n_rows", [(9, 33), (100, 257), (513, 130)], ids=lambda s: str(s))
def test_mm_experts(rng, routed_type, shared_type, n_tok, n_rows):
    n_routed, n_used = 16, 4
    types = [routed_type] + ([shared_type] if shared_type is not None else [])
    if any(t in FLOAT_TYPES for t in types):
        cols = 96
    elif any(block_size(t) == 256 for t in types):
        cols = 256 * 3
    else:
        cols = 32 * 45
    raw = random_rows(rng, routed_type, n_routed * n_rows, cols)
    w = reference_dequant(routed_type, raw, cols).astype(np.float64).reshape(n_routed, n_rows, cols)
    raw = raw.reshape(n_routed, n_rows, -1)
    shared_raw = None
    if shared_type is not None:
        shared_raw, ws = weights(rng, shared_type, n_rows, cols)
        w = np.concatenate([w, ws[None]])
    n_experts = w.shape[0]
    x = rng.standard_normal((n_tok, cols)).astype(np.float32)
    ids = route(rng, n_tok, n_routed, n_used, shared_type is not None)
    offsets, src, dst = group(ids, n_experts)
    counts = np.diff(offsets)
    assert counts[0] == 0 and counts[1] == 1 and counts[2] == n_tok
    n_dst = ids.size + 3  # three rows no pair names: must stay untouched (NaN poison)

    y = _core.cuda_ops.mm_experts(int(routed_type), raw, int(shared_type or 0), shared_raw, cols, x, offsets, src,
                                  dst, n_dst, n_tok)
    assert y.shape == (n_dst, n_rows)
    assert np.isnan(y[ids.size:]).all(), f"seed {SEED}: rows no pair names were written"
    assert not np.isnan(y[:ids.size]).any(), f"seed {SEED}: unwritten rows"
    xd = x.astype(np.float64)
    for e in range(n_experts):
        p = slice(offsets[e], offsets[e + 1])
        if counts[e] == 0:
            continue
        ref = xd[src[p]] @ w[e].T
        assert rel_err(y[dst[p]], ref) < TOL, f"seed {SEED}: expert {e} ({counts[e]} tokens)"
        # Same bits as the dense kernel on the gathered tokens.
        raw_e = raw[e] if e < n_routed else shared_raw
        type_e = routed_type if e < n_routed else shared_type
        dense = _core.cuda_ops.mm(int(type_e), raw_e, cols, np.ascontiguousarray(x[src[p]]), None)
        assert np.array_equal(dense.view(np.uint32), y[dst[p]].view(np.uint32)), f"seed {SEED}: expert {e}"


def test_mm_experts_bad_arguments(rng):
    raw = random_rows(rng, QT.Q4_K, 2 * 4, 256).reshape(2, 4, -1)
    x = np.zeros((3, 256), np.float32)
    offsets = np.array([0, 1, 2], np.int32)
    src = np.array([0, 1], np.int32)
    with pytest.raises(ValueError):  # Q4_1: not supported
        _core.cuda_ops.mm_experts(3, raw, 0, None, 256, x, offsets, src, src, 3)
    with pytest.raises(ValueError):  # max_pairs_per_expert must be >= 1
        _core.cuda_ops.mm_experts(int(QT.Q4_K), raw, 0, None, 256, x, offsets, src, src, 3, 0)
