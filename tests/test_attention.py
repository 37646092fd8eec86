"""The CPU attention kernel (src/attention.cpp) against float64 numpy, its batch and thread-count
invariance (a row must be bitwise the same whatever else is in the batch), and its vectorized exp."""
from __future__ import annotations

import numpy as np
import pytest

from glmoe import _core


def reference(q, k, v, cell_pos, cell_seq, pos, seq, n_head, n_head_kv):
    n_tokens, D, G = q.shape[0], q.shape[1] // n_head, n_head // n_head_kv
    q64 = q.astype(np.float64).reshape(n_tokens, n_head, D)
    k64 = k.astype(np.float64).reshape(-1, n_head_kv, D)
    v64 = v.astype(np.float64).reshape(-1, n_head_kv, D)
    out = np.zeros((n_tokens, n_head, D))
    for t in range(n_tokens):
        visible = (cell_seq == seq[t]) & (cell_pos <= pos[t])
        if not visible.any():
            continue
        for h in range(n_head):
            s = k64[visible, h // G] @ q64[t, h] / np.sqrt(D)
            p = np.exp(s - s.max())
            out[t, h] = p @ v64[visible, h // G] / p.sum()
    return out.reshape(n_tokens, -1)


def make_case(rng, head_dim, n_head_kv, group, seq_lengths, queries):
    """Cells of every sequence shuffled together (so cell order is not position order, and
    sequences interleave); queries: (seq, positions) pairs."""
    cell_seq = np.concatenate([np.full(n, s, np.int32) for s, n in enumerate(seq_lengths)])
    cell_pos = np.concatenate([rng.permutation(n).astype(np.int32) for n in seq_lengths])
    order = rng.permutation(len(cell_seq))
    cell_seq, cell_pos = cell_seq[order], cell_pos[order]
    n_cells, n_head = len(cell_seq), n_head_kv * group
    k = rng.standard_normal((n_cells, n_head_kv * head_dim)).astype(np.float32)
    v = rng.standard_normal((n_cells, n_head_kv * head_dim)).astype(np.float32)
    seq = np.concatenate([np.full(len(p), s, np.int32) for s, p in queries])
    pos = np.concatenate([np.asarray(p, np.int32) for _, p in queries])
    # Scores of standard deviation 2: softmaxes from flat to peaked.
    q = (2 * rng.standard_normal((len(seq), n_head * head_dim))).astype(np.float32)
    return q, k, v, cell_pos, cell_seq, pos, seq, n_head, n_head_kv


def cases():
    rng = np.random.default_rng(1234)
    yield "1 cell, decode", make_case(rng, 32, 2, 4, [1], [(0, [0])])
    yield "7 cells, prefill", make_case(rng, 16, 1, 3, [7], [(0, range(7))])
    yield "300 cells, 2 seqs, mixed", make_case(rng, 64, 2, 12, [300, 41], [(0, range(250, 300)), (1, [40])])
    yield "1100 cells, MHA, decode + prefill", make_case(rng, 128, 3, 1, [1100, 200], [(1, [199]), (0, range(1030, 1100))])
    yield "GLM-4.5-Air shape", make_case(rng, 128, 8, 12, [300], [(0, [299, 150, 7])])
    yield "3 seqs, scattered positions", make_case(
        rng, 32, 2, 3, [129, 64, 65], [(2, [64, 3]), (0, rng.choice(129, 20, replace=False)), (1, range(60, 64))])
    yield "no visible cell", make_case(rng, 16, 1, 1, [5, 5], [(0, [-1, 4]), (1, [2])])


CASES = list(cases())


# A score q.k/sqrt(D) (|score| ~ 2 here) carries an f32 rounding error of about sqrt(D) ulp, which
# becomes the relative error of its softmax weight; the output, a convex combination of v rows, then
# errs by ~1e-6 * max|v| at worst (measured: <= 5e-7). 1e-5 * max|v| leaves a margin without
# admitting a real bug (a lost or extra cell moves rows by ~1e-2).
@pytest.mark.parametrize("name,case", CASES, ids=[n for n, _ in CASES])
def test_matches_float64_reference(name, case):
    out = _core.attention(*case)
    ref = reference(*case)
    v = case[2]
    err = np.abs(out - ref).max()
    assert err <= 1e-5 * np.abs(v).max(), f"{name}: max abs err {err:.3g}"


@pytest.mark.parametrize("name,case", CASES, ids=[n for n, _ in CASES])
def test_rows_do_not_depend_on_the_batch_or_threads(name, case):
    q, k, v, cell_pos, cell_seq, pos, seq, n_head, n_head_kv = case
    full = _core.attention(*case)
    for threads in (2, 3):
        assert np.array_equal(_core.attention(*case, n_threads=threads), full)
    for t in range(len(pos)):
        alone = _core.attention(q[t:t + 1], k, v, cell_pos, cell_seq, pos[t:t + 1], seq[t:t + 1], n_head, n_head_kv)
        assert np.array_equal(alone[0], full[t]), f"{name}: row {t}"
    # A reversed half of the batch: other block boundaries, other neighbours.
    rows = np.arange(len(pos))[::-2].copy()
    part = _core.attention(np.ascontiguousarray(q[rows]), k, v, cell_pos, cell_seq, pos[rows], seq[rows], n_head, n_head_kv)
    assert np.array_equal(part, full[rows])


def test_vec_exp_within_one_ulp():
    x = np.concatenate([np.linspace(-104, 88.7, 2_000_003, dtype=np.float32),
                        np.float32(-1) * np.random.default_rng(5).random(100_000, np.float32)])
    y = _core.vec_exp(x)
    ref = np.exp(x.astype(np.float64))
    ulp = np.spacing(ref.astype(np.float32)).astype(np.float64)
    ulp_err = np.abs(y - ref) / ulp
    assert ulp_err.max() <= 1.0, f"max error {ulp_err.max():.2f} ulp at x = {x[ulp_err.argmax()]}"
    special = _core.vec_exp(np.array([-np.inf, -200, 0, 100, np.inf, np.nan], np.float32))
    assert np.array_equal(special[:5], [0, 0, 1, np.inf, np.inf]) and np.isnan(special[5])
