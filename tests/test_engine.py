"""The CPU engine against the independent float64 reference (tests/reference_glm4moe.py),
batching of mixed sequences, KV-cache operations, and errors for bad model files."""
from __future__ import annotations


import numpy as np
import pytest

import glmoe
from glmoe import _core
from glmoe.tools.make_model import ModelSpec, write_model
from gguf_edit import copy_gguf
from reference_glm4moe import ReferenceModel

# Configurations that together cover every item of the forward (partial rope, q/k/v biases,
# qk-norm, sigmoid routing with selection bias, group-limited routing, weight norm and scale,
# shared expert, dense lead layers, tied output, per-layer arrays) and every weight type.
# Hidden and expert widths are multiples of 256 so K-quants are possible without fallback.
CONFIGS = {
    "kquants-groups-qknorm-tied": dict(
        vocab=320, hidden=256, n_layers=3, n_dense_leading=1, n_head=4, n_head_kv=2, head_dim=64, n_rot=32,
        ffn=512, expert_ffn=256, n_experts=8, n_used=3, n_shared=1, n_groups=4, n_group_used=2,
        qk_norm=True, tied_output=True, weights_norm=True, weights_scale=2.5,
        default_type="q4_k", attn_type="q5_k", expert_type="q4_k", embd_type="q6_k",
    ),
    "legacy-quants-perlayer": dict(
        vocab=300, hidden=256, n_layers=3, n_dense_leading=1, n_head=8, n_head_kv=2, head_dim=32, n_rot=16,
        ffn=384, expert_ffn=256, n_experts=6, n_used=2, n_shared=1, n_groups=0, n_group_used=0,
        qk_norm=False, tied_output=False, weights_norm=False, weights_scale=1.0, per_layer_arrays=True,
        default_type="q8_0", attn_type="q4_0", expert_type="q5_0", embd_type="q8_0", output_type="q6_k",
    ),
    "float-types": dict(
        vocab=200, hidden=96, n_layers=2, n_dense_leading=1, n_head=6, n_head_kv=2, head_dim=16, n_rot=8,
        ffn=160, expert_ffn=64, n_experts=4, n_used=2, n_shared=1, n_groups=2, n_group_used=1,
        qk_norm=True, tied_output=False, weights_norm=True, weights_scale=1.5,
        default_type="f32", attn_type="bf16", expert_type="f16", embd_type="f32", output_type="f16",
    ),
}

# Relative L2 error per position, ||engine - ref|| / ||ref||: (median, 90th percentile) bounds.
# With f32 activations (the engine's accuracy-check mode) only f32 rounding separates engine and
# reference: ~2e-7 measured over a few layers; 1e-5 / 1e-4 leave margin while any wrong kernel,
# rope pair or routing rule gives errors of order 1.
# In the default mode quantized weights see activations rounded to 8 bits per block (llama.cpp's
# scheme, ~0.6% error per matmul, measured); compounded over the layers, and through the routing
# choices it flips, that gives ~1-4% per position: 0.1 on the median is a sanity bound only. The
# integer kernels themselves are checked exactly in test_quants.py.
TOLERANCE_F32_ACTIVATIONS = (1e-5, 1e-4)
TOLERANCE_DEFAULT = {"float-types": (1e-5, 1e-4), "kquants-groups-qknorm-tied": (0.1, None),
                     "legacy-quants-perlayer": (0.1, None)}
N_POSITIONS = 200
N_BATCH = 64


def make_spec(**kw) -> ModelSpec:
    return ModelSpec(**kw)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model_case(request, tmp_path_factory):
    name = request.param
    path = str(tmp_path_factory.mktemp("models") / f"{name}.gguf")
    write_model(path, make_spec(**CONFIGS[name]), seed=1234)
    return name, path


def relative_errors(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)


def engine_logits(path: str, tokens: list[int], f32_activations: bool) -> np.ndarray:
    """Every position's logits, evaluated in batches shorter than the sequence."""
    model = _core.Model(path)
    ctx = _core.Context(model, 256, 2, f32_activations=f32_activations)
    rows = []
    for start in range(0, len(tokens), N_BATCH):
        chunk = np.asarray(tokens[start:start + N_BATCH], dtype=np.int32)
        n = len(chunk)
        rows.append(ctx.decode(chunk, np.arange(start, start + n, dtype=np.int32), np.zeros(n, np.int32),
                               np.ones(n, np.uint8)))
    return np.concatenate(rows).astype(np.float64)


def test_logits_match_float64_reference(model_case):
    name, path = model_case
    tokens = np.random.default_rng().integers(0, _core.Model(path).n_vocab, N_POSITIONS).tolist()
    ref = ReferenceModel(path).logits(tokens)
    for f32_activations in (True, False):
        err = relative_errors(engine_logits(path, tokens, f32_activations), ref)
        median, p90 = np.median(err), np.percentile(err, 90)
        print(f"{name} ({'f32' if f32_activations else '8-bit'} activations): "
              f"relative error median {median:.2e}, p90 {p90:.2e}, max {err.max():.2e}")
        tol_median, tol_p90 = TOLERANCE_F32_ACTIVATIONS if f32_activations else TOLERANCE_DEFAULT[name]
        assert median < tol_median, median
        assert tol_p90 is None or p90 < tol_p90, p90


def test_llama_eval_gives_the_contexts_logits(model_case):
    """Llama.eval with logits_all, in n_batch chunks, stores exactly what the context computes."""
    _, path = model_case
    tokens = np.random.default_rng().integers(0, _core.Model(path).n_vocab, 100).tolist()
    llm = glmoe.Llama(path, n_ctx=256, n_batch=N_BATCH, logits_all=True, n_threads=2, verbose=False)
    llm.eval(tokens)
    assert np.array_equal(llm.scores[: len(tokens)], engine_logits(path, tokens, False).astype(np.float32))


def test_batch_of_mixed_sequences_matches_each_alone(model_case):
    """Prefill chunks and decode steps of several sequences in one batch give each sequence the
    logits it gets when run alone."""
    _, path = model_case
    rng = np.random.default_rng()
    model = _core.Model(path)
    lengths = [37, 5, 61, 12]
    seqs = [rng.integers(0, model.n_vocab, n).astype(np.int32) for n in lengths]

    alone = []
    for toks in seqs:
        ctx = _core.Context(model, 128, 2)
        alone.append(ctx.decode(toks, np.arange(len(toks), dtype=np.int32), np.zeros(len(toks), np.int32),
                                np.ones(len(toks), np.uint8)))

    # Interleave: every step takes a chunk of a random size from each unfinished sequence.
    ctx = _core.Context(model, 256, 2)
    done = [0] * len(seqs)
    got = [np.zeros_like(a) for a in alone]
    while any(d < n for d, n in zip(done, lengths)):
        toks, pos, seq = [], [], []
        for s, n in enumerate(lengths):
            take = min(n - done[s], int(rng.integers(1, 9)))
            for p in range(done[s], done[s] + take):
                toks.append(seqs[s][p]); pos.append(p); seq.append(s)
        order = rng.permutation(len(toks))
        toks, pos, seq = (np.array(a, np.int32)[order] for a in (toks, pos, seq))
        out = ctx.decode(toks, pos, seq, np.ones(len(toks), np.uint8))
        for i in range(len(toks)):
            got[seq[i]][pos[i]] = out[i]
        for s in set(seq.tolist()):
            done[s] = int(pos[seq == s].max()) + 1
    for a, g in zip(alone, got):
        # The kernels are batch-invariant: bit for bit the same logits.
        assert np.array_equal(g, a)


def test_fork_and_truncate_reuse_the_cache(model_case):
    _, path = model_case
    rng = np.random.default_rng()
    model = _core.Model(path)
    prefix = rng.integers(0, model.n_vocab, 20).astype(np.int32)
    tail_a = rng.integers(0, model.n_vocab, 6).astype(np.int32)
    tail_b = rng.integers(0, model.n_vocab, 9).astype(np.int32)

    def run(ctx, toks, start, seq):
        n = len(toks)
        return ctx.decode(toks, np.arange(start, start + n, dtype=np.int32), np.full(n, seq, np.int32),
                          np.ones(n, np.uint8))

    fresh = _core.Context(model, 64, 2)
    expect_b = run(fresh, np.concatenate([prefix, tail_b]), 0, 0)[len(prefix):]

    ctx = _core.Context(model, 64, 2)
    run(ctx, prefix, 0, 0)
    ctx.kv_seq_cp(0, 1, 0, -1)  # seq 1 shares the prefix cells
    assert ctx.kv_used == len(prefix)
    run(ctx, tail_a, len(prefix), 0)
    got_b = run(ctx, tail_b, len(prefix), 1)
    assert np.array_equal(got_b, expect_b)
    assert ctx.kv_seq_pos_max(0) == len(prefix) + len(tail_a) - 1

    # Truncate seq 0 back to the prefix and continue it with tail_b: same as seq 1.
    ctx.kv_seq_rm(0, len(prefix), -1)
    got_b0 = run(ctx, tail_b, len(prefix), 0)
    assert np.array_equal(got_b0, expect_b)
    ctx.kv_seq_keep(1)
    assert ctx.kv_used == len(prefix) + len(tail_b)
    ctx.kv_clear()
    assert ctx.kv_used == 0


def test_kv_cache_full_and_bad_batches_leave_cache_unchanged(model_case):
    _, path = model_case
    model = _core.Model(path)
    ctx = _core.Context(model, 16, 1)
    toks = np.arange(10, dtype=np.int32)
    ctx.decode(toks, np.arange(10, dtype=np.int32), np.zeros(10, np.int32), np.zeros(10, np.uint8))
    with pytest.raises(glmoe.KVCacheFullError, match="full"):
        ctx.decode(toks, np.arange(10, 20, dtype=np.int32), np.zeros(10, np.int32), np.zeros(10, np.uint8))
    assert ctx.kv_used == 10
    with pytest.raises(ValueError, match="already holds position 3"):
        ctx.decode(toks[:1], np.array([3], np.int32), np.zeros(1, np.int32), np.ones(1, np.uint8))
    with pytest.raises(ValueError, match="out of range"):
        ctx.decode(np.array([model.n_vocab], np.int32), np.array([10], np.int32), np.zeros(1, np.int32),
                   np.ones(1, np.uint8))
    with pytest.raises(ValueError, match="sequence id 64"):
        ctx.decode(toks[:1], np.array([10], np.int32), np.array([64], np.int32), np.ones(1, np.uint8))
    with pytest.raises(ValueError, match="twice"):
        ctx.decode(toks[:2], np.array([10, 10], np.int32), np.zeros(2, np.int32), np.ones(2, np.uint8))
    assert ctx.kv_used == 10


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("small") / "small.gguf")
    write_model(path, make_spec(**CONFIGS["float-types"]), seed=7)
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (dict(set_keys={"general.architecture": ("llama", None)}), "architecture 'llama' is not supported"),
        (dict(drop_tensors=("blk.1.ffn_up_exps.weight",)), "missing tensor 'blk.1.ffn_up_exps.weight'"),
        (dict(drop_keys=("glm4moe.expert_count",)), "missing metadata key glm4moe.expert_count"),
        (dict(replace_tensors={"blk.0.attn_norm.weight": np.ones(95)}), "'blk.0.attn_norm.weight' has shape [95]"),
    ],
)
def test_bad_model_files_get_clear_errors(small_model, tmp_path, edit, message):
    bad = str(tmp_path / "bad.gguf")
    copy_gguf(small_model, bad, **edit)
    with pytest.raises(glmoe.ModelError) as e:
        _core.Model(bad)
    assert message in str(e.value)


def test_unsupported_weight_type_is_named(small_model, tmp_path):
    from gguf import GGMLQuantizationType

    # Q4_1 is a valid ggml type that glmoe has no kernels for: 20 bytes per 32 elements.
    n_in, n_out = 96, 6 * 16
    bad = str(tmp_path / "q4_1.gguf")
    raw = np.zeros((n_out, n_in // 32 * 20), dtype=np.uint8)
    copy_gguf(small_model, bad, raw_tensors={"blk.0.attn_q.weight": (raw, GGMLQuantizationType.Q4_1)})
    with pytest.raises(glmoe.ModelError, match="type Q4_1, which glmoe does not support"):
        _core.Model(bad)


@pytest.mark.parametrize("nextn_tensors", [True, False])
def test_trunk_of_a_file_with_an_mtp_layer(tmp_path, nextn_tensors):
    """GLM-4.5 files count one MTP block in block_count; some carry its tensors, some not. The
    trunk loads either way and computes what the reference computes."""
    path = str(tmp_path / "mtp.gguf")
    spec = dict(CONFIGS["float-types"], nextn_layers=1, nextn_tensors=nextn_tensors)
    write_model(path, make_spec(**spec), seed=5)
    model = _core.Model(path)
    assert model.n_layer == CONFIGS["float-types"]["n_layers"]
    tokens = np.random.default_rng().integers(0, model.n_vocab, 40).tolist()
    err = relative_errors(engine_logits(path, tokens, False), ReferenceModel(path).logits(tokens))
    assert np.median(err) < TOLERANCE_DEFAULT["float-types"][0]
