"""Quantized and bf16 KV cache on the GPU (issue 17): qkv_prepare stores q8_0 / q4_0 / bf16 rows
bit for bit as gguf-py (llama.cpp's reference) converts them; the decode and prefill attention
kernels read them against a float64 reference over the same values; the whole model with
-ctk/-ctv q8_0 / q4_0 / bf16 on the GPU against the CPU engine with the same types; and states
saved on one device load on the other, in the same bytes."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from glmoe import _core
from glmoe.tools.make_model import ModelSpec, write_model
from cuda_support import cuda_only, rel_err
from test_cuda_attention import make_q, reference, rng  # noqa: F401 (rng: the seeded fixture)
from test_cuda_model import CONFIGS, assert_close, run_positions
from test_engine import relative_errors

pytestmark = cuda_only

PAIRS = [(QT.Q8_0, QT.Q8_0), (QT.Q4_0, QT.Q4_0), (QT.Q8_0, QT.F16), (QT.F16, QT.Q4_0), (QT.BF16, QT.BF16),
         (QT.BF16, QT.Q8_0)]
# Against float64 attention over the very values the blocks hold, the kernels' only departures are
# those of the f16 kernels (q * scale and p rounded to f16: ~1e-3, test_cuda_attention) plus one
# f16 rounding of each dequantized value q * d (relative 2^-12, as f16 storage itself): the f16
# bound, 5e-3, holds for every type; reading a block with the wrong scale, nibble order or head
# offset moves the output by far more (a q4_0 step is 1/8 of the block's largest value).
TOL = 5e-3
# Depths: one cell, odd ones around a 64-cell tile, and long ones the decode kernel splits over
# the SMs (more than 128 cells per token: several splits and their merge).
VISIBLE = [1, 7, 63, 65, 1000, 5001]


def stored(values: np.ndarray, qtype: QT) -> tuple[np.ndarray, np.ndarray]:
    """(raw rows as the kernels take them, the values they hold) for f32 rows of a cache."""
    if qtype == QT.F16:
        h = values.astype(np.float16)
        return h.view(np.uint16), h.astype(np.float64)
    raw = quantize(values.astype(np.float32), qtype)
    return raw, dequantize(raw, qtype).astype(np.float64)


def make_case(rng, n_head, n_head_kv, head_dim, visible, type_k, type_v):
    n_cells = max(visible) + 40
    k = rng.standard_normal((n_cells, n_head_kv * head_dim)).astype(np.float32)
    v = rng.standard_normal((n_cells, n_head_kv * head_dim)).astype(np.float32)
    k_raw, k_val = stored(k, type_k)
    v_raw, v_val = stored(v, type_v)
    cells = rng.permutation(n_cells).astype(np.int32)  # non-contiguous, as a real cache's
    return k_raw, k_val, v_raw, v_val, cells


@pytest.mark.parametrize("type_k,type_v", PAIRS, ids=lambda t: t.name)
@pytest.mark.parametrize("head_dim,n_head,n_head_kv", [(128, 12, 1), (64, 12, 2), (256, 4, 2)])
def test_decode_reads_quantized_rows(rng, type_k, type_v, head_dim, n_head, n_head_kv):
    k_raw, k_val, v_raw, v_val, cells = make_case(rng, n_head, n_head_kv, head_dim, VISIBLE, type_k, type_v)
    n_tok = len(VISIBLE)
    q = make_q(rng, n_tok, n_head, head_dim)
    start = np.zeros(n_tok, np.int32)
    nvis = np.asarray(VISIBLE, np.int32)
    scale = 1.0 / np.sqrt(head_dim)
    out = _core.cuda_ops.attention_decode(q, k_raw, v_raw, cells, start, nvis, n_head, n_head_kv, scale,
                                          type_k=int(type_k), type_v=int(type_v))
    ref = reference(q, k_val, v_val, cells, start, nvis, n_head, n_head_kv, scale)
    for t in range(n_tok):
        assert rel_err(out[t], ref[t]) < TOL, (VISIBLE[t], rel_err(out[t], ref[t]))


@pytest.mark.parametrize("type_k,type_v", PAIRS, ids=lambda t: t.name)
@pytest.mark.parametrize("head_dim,n_head,n_head_kv", [(128, 12, 1), (64, 12, 2), (256, 4, 2)])
def test_decode_is_the_same_alone_and_in_a_batch(rng, type_k, type_v, head_dim, n_head, n_head_kv):
    k_raw, _, v_raw, _, cells = make_case(rng, n_head, n_head_kv, head_dim, VISIBLE, type_k, type_v)
    q = make_q(rng, len(VISIBLE), n_head, head_dim)
    start = np.zeros(len(VISIBLE), np.int32)
    nvis = np.asarray(VISIBLE, np.int32)
    scale = 1.0 / np.sqrt(head_dim)
    kw = dict(type_k=int(type_k), type_v=int(type_v))
    batch = _core.cuda_ops.attention_decode(q, k_raw, v_raw, cells, start, nvis, n_head, n_head_kv, scale, **kw)
    for t in (0, 4, 5):
        alone = _core.cuda_ops.attention_decode(q[t:t + 1], k_raw, v_raw, cells, start[:1], nvis[t:t + 1], n_head,
                                                n_head_kv, scale, **kw)
        assert np.array_equal(alone[0], batch[t])


# Prompt-chunk paths: "tiles" (each block converts the tiles it reads; not for bf16, below) and
# "rows_first" (the visible rows converted to f16 once by kv_rows_to_f16, then the f16 kernel, as
# the model runs a prompt chunk).
PREFILL_CASES = [(False, p) for p in PAIRS if QT.BF16 not in p] + [(True, p) for p in PAIRS]


@pytest.mark.parametrize("f16_rows,types", PREFILL_CASES,
                         ids=[f"{'rows_first' if f else 'tiles'}-{k.name}-{v.name}" for f, (k, v) in PREFILL_CASES])
@pytest.mark.parametrize("head_dim,n_head,n_head_kv", [(128, 12, 1), (64, 6, 2), (256, 4, 2)])
@pytest.mark.parametrize("n_tok,depth", [(17, 0), (100, 333), (9, 1000)])
def test_prefill_reads_quantized_rows(rng, f16_rows, types, head_dim, n_head, n_head_kv, n_tok, depth):
    """A prompt chunk of n_tok tokens after `depth` cached cells: token t sees depth + t + 1 cells."""
    type_k, type_v = types
    n_vis = depth + n_tok
    k_raw, k_val, v_raw, v_val, cells = make_case(rng, n_head, n_head_kv, head_dim, [n_vis], type_k, type_v)
    q = make_q(rng, n_tok, n_head, head_dim)
    start = np.zeros(n_tok, np.int32)
    nvis = (depth + 1 + np.arange(n_tok)).astype(np.int32)
    scale = 1.0 / np.sqrt(head_dim)
    out = _core.cuda_ops.attention_prefill(q, k_raw, v_raw, cells, start, nvis, n_head, n_head_kv, scale,
                                           type_k=int(type_k), type_v=int(type_v), f16_rows=f16_rows)
    ref = reference(q, k_val, v_val, cells, start, nvis, n_head, n_head_kv, scale)
    errs = [rel_err(out[t], ref[t]) for t in range(n_tok)]
    assert max(errs) < TOL, errs


@pytest.mark.parametrize("type_k,type_v", [(QT.BF16, QT.BF16), (QT.F16, QT.BF16)], ids=lambda t: t.name)
@pytest.mark.parametrize("head_dim", [64, 256])
def test_prefill_tiles_refuse_bf16(type_k, type_v, head_dim):
    """The tiles path has no room for raw bf16 rows at head_dim 256: it refuses a bf16 cache,
    naming the conversion that reads one (the model always converts first)."""
    row = np.zeros((1, 2 * head_dim), np.float32)
    one = np.zeros(1, np.int32)
    with pytest.raises(ValueError, match="convert them with kv_rows_to_f16 first"):
        _core.cuda_ops.attention_prefill(np.zeros((1, 4 * head_dim), np.float32), stored(row, type_k)[0],
                                         stored(row, type_v)[0], one, one, one + 1, 4, 2, 1.0,
                                         type_k=int(type_k), type_v=int(type_v))


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.BF16, QT.F16], ids=lambda t: t.name)
@pytest.mark.parametrize("width", [32, 96, 1024])
def test_kv_rows_to_f16_is_the_dequantized_rows(rng, qtype, width):
    """Row i of the output is cache row cells[start + i] dequantized by gguf-py and rounded to f16,
    bit for bit, for i < max(n_visible); the rows after those are not written."""
    n_cells, start = 300, 7
    values = (rng.standard_normal((n_cells, width)) * rng.uniform(1e-2, 1e2, (n_cells, 1))).astype(np.float32)
    raw, _ = stored(values, qtype)
    cells = rng.permutation(n_cells).astype(np.int32)
    nvis = np.asarray([50, 213, 3, 180], np.int32)  # the largest need not be the last
    out = _core.cuda_ops.kv_rows_to_f16(raw, int(qtype), cells, np.full(4, start, np.int32), nvis)
    most = int(nvis.max())
    rows = raw[cells[start:start + most]]
    want = rows.view(np.float16) if qtype == QT.F16 else dequantize(rows, qtype).astype(np.float16)
    assert np.array_equal(out[:most], want.reshape(most, width).view(np.uint16))
    assert (out[most:] == 0xFFFF).all()


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.BF16], ids=lambda t: t.name)
@pytest.mark.parametrize("head_dim,n_head_kv", [(64, 2), (128, 1), (256, 2)])
def test_qkv_prepare_stores_gguf_blocks(qtype, head_dim, n_head_kv):
    """Without bias, norm or rope the K/V rows stored are the qkv values themselves: their blocks
    must be gguf-py's quantization bit for bit (zero blocks, sign of q4_0's largest value, a tie of
    magnitudes; bf16: rounding to nearest even)."""
    n_head, n, n_cells = 2 * n_head_kv, 6, 9
    rng = np.random.default_rng(int(qtype) * 1000 + head_dim)
    width = (n_head + 2 * n_head_kv) * head_dim
    qkv = (rng.standard_normal((n, width)) * rng.uniform(1e-3, 1e3, (n, 1))).astype(np.float32)
    kv0 = n_head * head_dim
    qkv[0, kv0:kv0 + 32] = 0.0                                   # an all-zero K block
    qkv[1, kv0:kv0 + 32] = -np.abs(qkv[1, kv0:kv0 + 32]).max() - 1  # largest magnitude negative
    qkv[2, kv0:kv0 + 32] = np.tile([2.0, -2.0], 16)               # a tie for the largest magnitude
    pos = np.arange(n, dtype=np.int32)
    cells = np.asarray([4, 0, 8, 2, 7, 1], np.int32)
    _, k_cache, v_cache = _core.cuda_ops.qkv_prepare(qkv, None, None, None, pos, cells, n_cells, n_head, n_head_kv,
                                                    head_dim, 0, 1e-5, 10000.0, type_k=int(qtype), type_v=int(qtype))
    kvw = n_head_kv * head_dim
    for t, c in enumerate(cells):
        assert np.array_equal(k_cache[c], quantize(qkv[t:t + 1, kv0:kv0 + kvw], qtype)[0])
        assert np.array_equal(v_cache[c], quantize(qkv[t:t + 1, kv0 + kvw:], qtype)[0])
    untouched = sorted(set(range(n_cells)) - set(cells.tolist()))
    assert (k_cache[untouched] == 0xFF).all() and (v_cache[untouched] == 0xFF).all()


def test_qkv_prepare_f16_rows_are_unchanged_by_the_types():
    """F16 stays what it was (the default path): K f16 with V q8_0 stores the same K bits."""
    rng = np.random.default_rng(2)
    n_head, n_kv, D = 4, 2, 64
    qkv = rng.standard_normal((3, (n_head + 2 * n_kv) * D)).astype(np.float32)
    args = (qkv, None, None, None, np.arange(3, dtype=np.int32), np.asarray([2, 0, 1], np.int32), 3, n_head, n_kv,
            D, 32, 1e-5, 10000.0)
    q_plain, k_plain, _ = _core.cuda_ops.qkv_prepare(*args)
    q_mixed, k_mixed, v_mixed = _core.cuda_ops.qkv_prepare(*args, type_k=1, type_v=8)
    assert np.array_equal(q_plain, q_mixed) and np.array_equal(k_plain, k_mixed)
    assert k_mixed.dtype == np.uint16 and v_mixed.dtype == np.uint8


# ---- the whole model ------------------------------------------------------------------------------

MODEL_CONFIGS = ["gqa12-q8", "legacy-quants-perlayer"]  # head_dim 128 (GLM's 12:1) and 64 (4:1)


@pytest.fixture(scope="module", params=MODEL_CONFIGS)
def model_case(request, tmp_path_factory):
    name = request.param
    path = str(tmp_path_factory.mktemp("cuda_kv") / f"{name}.gguf")
    write_model(path, ModelSpec(**CONFIGS[name]), seed=4321)
    return name, _core.Model(path)


def kv(type_k, type_v):
    return dict(type_k=int(type_k), type_v=int(type_v))


@pytest.mark.parametrize("type_k,type_v", [(QT.Q8_0, QT.Q8_0), (QT.Q4_0, QT.Q8_0), (QT.BF16, QT.BF16)],
                         ids=lambda t: t.name)
def test_gpu_logits_match_cpu_with_the_same_kv_types(model_case, type_k, type_v):
    """Prompt batches, single graph-replayed steps and a chunk at depth, against the CPU engine's
    accurate mode storing the same KV types: the bounds of test_cuda_model (its f16 cache rounds
    K/V too; here both sides round them to the same blocks)."""
    name, model = model_case
    chunks = [24, 1, 1, 1, 1, 5, 40]
    tokens = np.random.default_rng().integers(0, model.n_vocab, sum(chunks)).tolist()
    ref = run_positions(_core.Context(model, 256, 2, f32_activations=True, **kv(type_k, type_v)), tokens, chunks)
    ctx = _core.Context(model, 256, 2, n_gpu_layers=-1, **kv(type_k, type_v))
    assert (ctx.kv_type_k, ctx.kv_type_v) == (type_k.name.lower(), type_v.name.lower())
    gpu = run_positions(ctx, tokens, chunks)
    assert np.isfinite(gpu).all()
    assert_close(name, relative_errors(gpu, ref))


def test_gpu_kv_bytes_are_the_stored_types(model_case):
    _, model = model_case
    f16 = _core.Context(model, 256, 2, n_gpu_layers=-1, **kv(QT.F16, QT.F16)).kv_bytes
    q8 = _core.Context(model, 256, 2, n_gpu_layers=-1, **kv(QT.Q8_0, QT.Q8_0)).kv_bytes
    q4 = _core.Context(model, 256, 2, n_gpu_layers=-1, **kv(QT.Q4_0, QT.Q4_0)).kv_bytes
    bf16 = _core.Context(model, 256, 2, n_gpu_layers=-1, **kv(QT.BF16, QT.BF16)).kv_bytes
    # Per 32 values: 64 bytes (f16, bf16), 34 (q8_0), 18 (q4_0); arena padding is at most 255 bytes a row set.
    assert abs(q8 - f16 * 34 / 64) < 4096 and abs(q4 - f16 * 18 / 64) < 4096 and bf16 == f16
    summary = _core.Context(model, 256, 2, n_gpu_layers=-1, **kv(QT.Q8_0, QT.Q4_0)).placement_summary()
    assert "K (q8_0)" in summary and "V (q4_0)" in summary


def test_f32_stays_refused_on_the_gpu(model_case):
    _, model = model_case
    with pytest.raises(ValueError, match=r"-ctv f32 \(type_v=0\) is not implemented for layers on the GPU yet"):
        _core.Context(model, 256, 2, n_gpu_layers=-1, **kv(QT.BF16, QT.F32))


def greedy(ctx, first, start, n):
    """n greedy tokens after `first` at position `start` (one sequence, one token a step)."""
    out, tok = [], first
    for i in range(n):
        logits = ctx.decode(np.asarray([tok], np.int32), np.asarray([start + i], np.int32), np.zeros(1, np.int32),
                            np.ones(1, np.uint8))
        tok = int(np.argmax(logits[0]))
        out.append(tok)
    return out


@pytest.mark.parametrize("src", ["gpu", "cpu"])
def test_state_moves_between_gpu_and_cpu(model_case, src):
    """A state saved with the layers on one device loads with them on the other: the rows arrive
    unchanged (saved again, the same bytes) and decoding goes on with the same greedy tokens."""
    _, model = model_case
    types = kv(QT.Q8_0, QT.Q4_0)
    on = {"gpu": dict(n_gpu_layers=-1), "cpu": dict(f32_activations=True)}
    dst = "cpu" if src == "gpu" else "gpu"
    tokens = np.random.default_rng(9).integers(0, model.n_vocab, 30).tolist()
    a = _core.Context(model, 128, 2, **on[src], **types)
    run_positions(a, tokens[:-1], [20, 1, 8])
    state = a.kv_state()
    b = _core.Context(model, 128, 2, **on[dst], **types)
    b.kv_load_state(state)
    assert b.kv_used == 29 and b.kv_state() == state
    assert greedy(b, tokens[-1], 29, 6) == greedy(a, tokens[-1], 29, 6)


def test_mixed_placement_state(model_case):
    """Some layers on the GPU, the rest on the CPU: each layer's rows from its own backend, so the
    state equals the all-GPU one's format and loads there; with the default types (f32 on the CPU,
    f16 on the GPU) one header cannot name both, and saving says which flag to give."""
    _, model = model_case
    tokens = np.random.default_rng(4).integers(0, model.n_vocab, 20).tolist()
    types = kv(QT.Q8_0, QT.Q8_0)
    mixed = _core.Context(model, 128, 2, n_gpu_layers=2, **types)
    assert 0 < mixed.n_gpu_layers < model.n_layer
    run_positions(mixed, tokens, [20])
    state = mixed.kv_state()
    full = _core.Context(model, 128, 2, n_gpu_layers=-1, **types)
    full.kv_load_state(state)
    assert full.kv_state() == state
    default = _core.Context(model, 128, 2, n_gpu_layers=2)
    run_positions(default, tokens[:4], [4])
    for save in (default.kv_state, lambda: default.kv_seq_state(0)):
        with pytest.raises(ValueError, match=r"the CPU's layers store f32 and the GPU's f16: give -ctk \(type_k\)"):
            save()


def test_engine_slot_saves_and_restores_on_the_gpu(model_case):
    """A server slot's save and restore with every layer on the GPU (its rows copied through the
    host): restored into the other slot, the two slots hold the same cache, so two requests that
    continue it reuse it (n_cached) and, in one batch of two, give the same tokens."""
    _, model = model_case
    prompt = np.random.default_rng(12).integers(0, model.n_vocab, 5).tolist()
    engine = _core.BatchEngine(model, 256, n_parallel=2, n_threads=2, n_gpu_layers=-1, keep_slot_cache=True,
                               **kv(QT.Q8_0, QT.Q8_0))

    def finish(rid):
        out = []
        while not (ev := engine.poll(rid, 10.0))["finished"]:
            out += ev["tokens"]
        return out + ev["tokens"], ev

    first, _ = finish(engine.submit(prompt, 6, [], temperature=0.0))
    slot = next(s["id"] for s in engine.slots() if s["n_past"] > 0)
    tokens, data = engine.save_slot(slot)
    assert tokens == (prompt + first)[:len(tokens)] and len(tokens) >= len(prompt)
    assert engine.restore_slot(1 - slot, data) == len(tokens)
    assert engine.save_slot(1 - slot) == (tokens, data)
    follow = prompt + first + [int(first[-1])]
    rids = [engine.submit(follow, 4, [], temperature=0.0) for _ in range(2)]
    (a, ev_a), (b, ev_b) = finish(rids[0]), finish(rids[1])
    assert a == b and len(a) == 4
    assert ev_a["n_cached"] == ev_b["n_cached"] == len(tokens)
    engine.shutdown()
