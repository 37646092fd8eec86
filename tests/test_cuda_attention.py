"""CUDA attention over the f16 KV cache (ggml-cuda/attention_decode.cu, attention_prefill.cu)
against float64 numpy softmax attention on the same f16 K/V values: split-K decode with its
merge, and the tensor-core prefill, on GQA ratios 12 (GLM-4.5-Air's 96/8, scaled down), 6, 1,
head dims 64/128/256, shuffled non-contiguous cells and odd visible counts."""
import os
import zlib

import numpy as np
import pytest

from glmoe import _core
from cuda_support import cuda_only, rel_err

pytestmark = cuda_only

SEED = int(os.environ.get("GLMOE_TEST_SEED", np.random.SeedSequence().entropy % 2**32))

# Decode, like prefill, rounds q*scale and p to f16 (unit roundoff 2^-11 ~ 4.9e-4) against the exact
# f16 K/V with f32 accumulation: ~1e-3 relative expected (a numpy emulation of that rounding gives
# <= 1e-3 per head row, ~4e-4 typical); 5e-3 bounds it while a masking bug moves it ~1e-2+.
DECODE_TOL = 5e-3
# Prefill rounds q*scale and p to f16 (unit roundoff 2^-11 ~ 4.9e-4): a score of |q||k| ~ 3
# (base-2 units) errs by ~1e-3, so weights err by ~1e-3 and the output, a weighted mean, by about
# as much; 5e-3 bounds that while a masking bug (a row seeing one cell too many) moves it ~1e-2+.
PREFILL_TOL = 5e-3

VISIBLE = [1, 7, 63, 64, 65, 1000, 5000]


@pytest.fixture
def rng(request):
    # The seed is in the test's name on failure; rerun with GLMOE_TEST_SEED=<seed>.
    request.node.user_properties.append(("seed", SEED))
    return np.random.default_rng([SEED, zlib.crc32(request.node.name.encode())])


def make_cache(rng, n_cells, n_head_kv, head_dim):
    k = rng.standard_normal((n_cells, n_head_kv * head_dim)).astype(np.float16)
    v = rng.standard_normal((n_cells, n_head_kv * head_dim)).astype(np.float16)
    return k, v


def make_q(rng, n_tok, n_head, head_dim):
    # Scores of standard deviation 2: softmaxes from flat to peaked.
    return (2 * rng.standard_normal((n_tok, n_head * head_dim))).astype(np.float32)


def reference(q, k, v, cells, cell_start, n_visible, n_head, n_head_kv, scale):
    n_tok, D = q.shape[0], q.shape[1] // n_head
    G = n_head // n_head_kv
    k64 = k.astype(np.float64).reshape(-1, n_head_kv, D)
    v64 = v.astype(np.float64).reshape(-1, n_head_kv, D)
    out = np.empty((n_tok, n_head_kv, G, D))
    for t in range(n_tok):
        idx = cells[cell_start[t]:cell_start[t] + n_visible[t]]
        qt = q[t].astype(np.float64).reshape(n_head_kv, G, D)
        s = np.einsum("kgd,nkd->kgn", qt, k64[idx]) * scale
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        out[t] = np.einsum("kgn,nkd->kgd", p, v64[idx]) / p.sum(axis=-1, keepdims=True)
    return out.reshape(n_tok, -1)


def decode(q, k, v, cells, cell_start, n_visible, n_head, n_head_kv, scale, max_visible=0, q_stride=0):
    return _core.cuda_ops.attention_decode(q, k.view(np.uint16), v.view(np.uint16), cells, cell_start, n_visible,
                                           n_head, n_head_kv, scale, max_visible, q_stride)


def prefill(q, k, v, cells, cell_start, n_visible, n_head, n_head_kv, scale, q_stride=0):
    return _core.cuda_ops.attention_prefill(q, k.view(np.uint16), v.view(np.uint16), cells, cell_start, n_visible,
                                            n_head, n_head_kv, scale, q_stride)


def in_qkv_rows(q, n_head_kv, head_dim, extra=None):
    """q as the first columns of fused qkv-like rows [n_tok, q cols + 2 * n_head_kv * head_dim]
    (or + `extra` columns), the rest NaN: the kernels must not read past a row's q part."""
    extra = 2 * n_head_kv * head_dim if extra is None else extra
    wide = np.full((q.shape[0], q.shape[1] + extra), np.nan, np.float32)
    wide[:, :q.shape[1]] = q
    return wide


def decode_case(rng, head_dim, n_head, n_head_kv, visible, n_cells=None):
    """One query token per entry of `visible`, each over its own shuffled, non-contiguous cell list
    (lists laid end to end in `cells`), except that every third token reuses the previous token's
    list with another count (drafts of one sequence)."""
    n_cells = n_cells or max(visible) + 500
    k, v = make_cache(rng, n_cells, n_head_kv, head_dim)
    cells, cell_start = [], []
    n_visible = np.asarray(visible, np.int32)
    offset = 0
    for t, n in enumerate(visible):
        if t % 3 == 2 and n <= visible[t - 1]:
            cell_start.append(cell_start[-1])
            continue
        lst = rng.choice(n_cells, n + int(rng.integers(0, 5)), replace=False).astype(np.int32)
        cells.append(lst)
        cell_start.append(offset)
        offset += len(lst)
    cells = np.concatenate(cells)
    q = make_q(rng, len(visible), n_head, head_dim)
    return q, k, v, cells, np.asarray(cell_start, np.int32), n_visible, n_head, n_head_kv, 1 / np.sqrt(head_dim)


# (head_dim, n_head, n_head_kv): GQA 12 (Air's ratio), 6, 1, 2, 16, and 20 (more heads than one
# 16-row tile: two head groups).
DECODE_SHAPES = [(128, 24, 2), (128, 12, 2), (128, 4, 4), (64, 24, 2), (64, 4, 2), (256, 12, 1), (128, 32, 2),
                 (128, 40, 2)]


@pytest.mark.parametrize("n_visible", VISIBLE)
@pytest.mark.parametrize("shape", [(128, 24, 2), (64, 6, 1), (256, 4, 4)], ids=str)
def test_decode_one_token(rng, shape, n_visible):
    case = decode_case(rng, *shape, [n_visible])
    assert rel_err(decode(*case), reference(*case)) <= DECODE_TOL


@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=str)
@pytest.mark.parametrize("n_tok", [2, 5, 8])
def test_decode_mixed_sequences(rng, shape, n_tok):
    visible = [int(x) for x in rng.choice(VISIBLE + [int(rng.integers(1, 3000))], n_tok)]
    case = decode_case(rng, *shape, visible)
    out, ref = decode(*case), reference(*case)
    for t in range(n_tok):  # per row, so that a short row's error is not hidden by a long one's
        assert rel_err(out[t], ref[t]) <= DECODE_TOL, f"token {t}, n_visible {visible[t]}"


@pytest.mark.parametrize("shape", [(128, 24, 2), (64, 4, 2), (128, 40, 2)], ids=str)
@pytest.mark.parametrize("first", [7, 200, 3001], ids=str)
def test_decode_is_batch_invariant(rng, shape, first):
    """Drafts of one sequence (visible counts first..first+k) give bitwise the rows each token gets
    decoded alone, in launches of up to 8 tokens, and whatever the bucket: greedy
    output must not change when drafting batches a sequence's tokens."""
    visible = [first + i for i in range(8)]
    q, k, v, cells, _, n_visible, n_head, n_head_kv, scale = decode_case(rng, *shape, [visible[-1]])
    q = make_q(rng, len(visible), n_head, shape[0])
    starts = np.zeros(len(visible), np.int32)
    n_visible = np.asarray(visible, np.int32)
    bucket = 1 << int(np.ceil(np.log2(visible[-1] + 1)))
    together = decode(q, k, v, cells, starts, n_visible, n_head, n_head_kv, scale, max_visible=bucket)
    for t in range(len(visible)):
        alone = decode(q[t:t + 1], k, v, cells, starts[:1], n_visible[t:t + 1], n_head, n_head_kv, scale,
                       max_visible=bucket)
        np.testing.assert_array_equal(alone[0], together[t], err_msg=f"token {t}")
    for bigger in (4 * bucket, 16384):  # more (empty) splits, or a merge where one split did
        np.testing.assert_array_equal(decode(q, k, v, cells, starts, n_visible, n_head, n_head_kv, scale,
                                             max_visible=bigger), together, err_msg=f"bucket {bigger}")


@pytest.mark.parametrize("visible", [[65], [1000, 7], [5000, 1, 64, 4000]], ids=str)
def test_decode_split_bucket_does_not_change_results(rng, visible):
    """A graph captured for a large max_visible bucket replays with small n_visible: more (mostly
    empty) splits must give the same rows to rounding, and the tight bucket (one split for short
    rows: the direct path without merge) the same as the large one."""
    case = decode_case(rng, 128, 24, 2, visible)
    ref = reference(*case)
    tight = decode(*case)
    for bucket in (max(visible) + 1, 8192, 131072):
        big = decode(*case, max_visible=bucket)
        assert rel_err(big, ref) <= DECODE_TOL, f"bucket {bucket}"
        assert rel_err(big, tight) <= DECODE_TOL, f"bucket {bucket}"


def prefill_case(rng, head_dim, n_head, n_head_kv, n_tok, prefix, shuffle_visible=False):
    """A prompt chunk of n_tok tokens after `prefix` cached ones: token i sees prefix + i + 1
    cells of one shuffled, non-contiguous list that starts a few entries into `cells`."""
    n_total = prefix + n_tok
    n_cells = n_total + 300
    k, v = make_cache(rng, n_cells, n_head_kv, head_dim)
    lead = int(rng.integers(0, 9))
    cells = rng.choice(n_cells, lead + n_total, replace=False).astype(np.int32)
    cell_start = np.full(n_tok, lead, np.int32)
    n_visible = (prefix + 1 + np.arange(n_tok)).astype(np.int32)
    if shuffle_visible:
        n_visible = rng.permutation(n_visible)
    q = make_q(rng, n_tok, n_head, head_dim)
    return q, k, v, cells, cell_start, n_visible, n_head, n_head_kv, 1 / np.sqrt(head_dim)


@pytest.mark.parametrize("n_tok", [1, 17, 64, 100, 300])
@pytest.mark.parametrize("shape", [(128, 24, 2), (128, 4, 4), (128, 12, 2), (64, 24, 2), (256, 12, 2)], ids=str)
@pytest.mark.parametrize("prefix", [0, 700])
def test_prefill_causal(rng, shape, n_tok, prefix):
    case = prefill_case(rng, *shape, n_tok, prefix)
    out, ref = prefill(*case), reference(*case)
    assert rel_err(out, ref) <= PREFILL_TOL
    # Per row too: a short row (one visible cell for a fresh prompt) must not hide behind long ones.
    worst = max(rel_err(out[t], ref[t]) for t in range(n_tok))
    assert worst <= 2 * PREFILL_TOL


@pytest.mark.parametrize("shape", [(128, 24, 2), (64, 6, 1)], ids=str)
def test_prefill_unordered_visible_counts(rng, shape):
    """Rows' n_visible in no particular order: every row is masked by its own count."""
    case = prefill_case(rng, *shape, 150, 90, shuffle_visible=True)
    out, ref = prefill(*case), reference(*case)
    for t in range(150):
        assert rel_err(out[t], ref[t]) <= 2 * PREFILL_TOL, f"token {t}"


def test_prefill_long_prefix(rng):
    """5000 cached cells ahead of the chunk: many full tiles, then the causal edge."""
    case = prefill_case(rng, 128, 24, 2, 65, 5000)
    assert rel_err(prefill(*case), reference(*case)) <= PREFILL_TOL


def test_prefill_agrees_with_decode(rng):
    """The two kernels on the same causal rows (decode reads each token's prefix like a draft)."""
    case = prefill_case(rng, 128, 24, 2, 40, 300)
    p, d = prefill(*case), decode(*case)
    assert rel_err(d, reference(*case)) <= DECODE_TOL
    assert rel_err(p, d) <= PREFILL_TOL


@pytest.mark.parametrize("shape", [(128, 24, 2), (64, 6, 1), (256, 4, 4)], ids=str)
def test_q_stride(rng, shape):
    """q read in place from wider rows (the model's fused qkv buffer, q_stride = its row width):
    the same results, bit for bit, as from packed q, and the NaN columns past q never read."""
    D, n_head, n_head_kv = shape
    case = decode_case(rng, *shape, [5000, 7, 1000, 64])
    wide = in_qkv_rows(case[0], n_head_kv, D)
    out = decode(wide, *case[1:], q_stride=wide.shape[1])
    assert rel_err(out, reference(*case)) <= DECODE_TOL
    assert np.array_equal(out, decode(*case))

    case = prefill_case(rng, *shape, 70, 100)
    wide = in_qkv_rows(case[0], n_head_kv, D)
    out = prefill(wide, *case[1:], q_stride=wide.shape[1])
    assert rel_err(out, reference(*case)) <= PREFILL_TOL
    assert np.array_equal(out, prefill(*case))


def test_q_stride_must_keep_float4_alignment(rng):
    case = decode_case(rng, 128, 24, 2, [100])
    wide = in_qkv_rows(case[0], 2, 128, extra=2)  # rows 2 floats wider: not a multiple of 16 bytes
    with pytest.raises(ValueError):
        decode(wide, *case[1:], q_stride=wide.shape[1])
    with pytest.raises(ValueError):
        prefill(wide, *case[1:], q_stride=wide.shape[1])
