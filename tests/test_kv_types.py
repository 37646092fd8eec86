"""KV cache element types on the CPU (llama.cpp's -ctk/-ctv, llama-cpp-python's type_k/type_v):
the stored rows, the logits and perplexity they give, invariance, save/load and the refusals."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys

import httpx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

import glmoe
from glmoe import _core
from glmoe.__main__ import default_model_path
from glmoe.tokenizer import GGUFTokenizer
from glmoe.tools.make_model import ModelSpec, write_model
import server_harness as harness
from reference_glm4moe import ReferenceModel
from test_trained_model import HELD_OUT, perplexity

KV_TYPES = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0]

# Float weights, so that the KV cache's rounding is the engine's only departure from float64 besides
# f32 arithmetic (f32_activations). head_dim 16 with 2 kv heads: a 32-value q8_0/q4_0 block spans
# both heads of a row, the case llama.cpp's per-head views cannot store.
FLOAT_MODEL = dict(
    vocab=200, hidden=96, n_layers=2, n_dense_leading=1, n_head=6, n_head_kv=2, head_dim=16, n_rot=8,
    ffn=160, expert_ffn=64, n_experts=4, n_used=2, n_shared=1, n_groups=2, n_group_used=1,
    qk_norm=True, tied_output=False, weights_norm=True, weights_scale=1.5,
    default_type="f32", attn_type="f32", expert_type="f32", embd_type="f32", output_type="f32")

# Median over positions of the relative L2 logit error against the float64 reference. The KV
# rounding alone sets it: per value about 2^-11 (f16), 2^-8 (bf16), 1/254 of the block's largest
# magnitude (q8_0) and 1/16 of it (q4_0); through two layers that measured 2e-7 (f32, f32 rounding
# only), 1.1e-4, 8e-4, 2.7e-3 and 3.9e-2. The bounds leave 3-10x margin; a type stored or read
# wrongly (wrong block layout, scale or head offset) gives errors of order 1. The max is not bounded:
# a rounded key can flip an expert choice at a single position (measured: q8_0's max 0.5).
MEDIAN_BOUND = {QT.F32: 1e-5, QT.F16: 1e-3, QT.BF16: 5e-3, QT.Q8_0: 2e-2, QT.Q4_0: 0.15}
# Against the reference whose K/V go through gguf-py's own quantize + dequantize of the type, only
# f32 arithmetic is left (measured 3e-7; f16 1e-5 where a value's rounding flips between f32 and
# float64 inputs): the engine stores exactly llama.cpp's blocks and reads them back exactly.
STORED_BOUND = 1e-4


def rel_errors(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)


class StoredKVReference(ReferenceModel):
    """The float64 reference with K and V rounded to their cache types as gguf-py rounds them."""

    def __init__(self, path: str, type_k: QT, type_v: QT):
        super().__init__(path)
        self.types = type_k, type_v

    def _kv_as_stored(self, k, v):
        def stored(x, t):
            rows = x.reshape(x.shape[0], -1).astype(np.float32)  # one cell's row: every kv head
            return dequantize(quantize(rows, t), t).astype(np.float64).reshape(x.shape)

        return stored(k, self.types[0]), stored(v, self.types[1])


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("kv") / "float.gguf")
    write_model(path, ModelSpec(**FLOAT_MODEL), seed=7)
    return path


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(1).integers(0, FLOAT_MODEL["vocab"], 128).tolist()


def decode_all(ctx, tokens, start=0, seq=0):
    n = len(tokens)
    return ctx.decode(np.asarray(tokens, np.int32), np.arange(start, start + n, dtype=np.int32),
                      np.full(n, seq, np.int32), np.ones(n, np.uint8))


def context(path, type_k, type_v, n_ctx=256, n_threads=2, **kw):
    return _core.Context(_core.Model(path), n_ctx, n_threads, f32_activations=True, type_k=int(type_k),
                         type_v=int(type_v), **kw)


@pytest.mark.parametrize("qtype", KV_TYPES, ids=lambda t: t.name)
def test_rows_are_llama_cpp_blocks(qtype):
    """What the cache stores for a row is bit-for-bit gguf-py's (llama.cpp's reference) quantization."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((40, 96)) * rng.uniform(1e-3, 1e3, (40, 1))).astype(np.float32)
    x[0, :32] = 0.0                           # an all-zero block: scale 0
    x[1, :32] = -x[1, :32].max() - 1.0        # the largest magnitude negative (q4_0's sign rule)
    x[2, 7] = x[2, 8] = -np.abs(x[2]).max()   # a tie for the largest magnitude
    x[3] = rng.uniform(-1e-6, 1e-6, 96)       # f16 subnormals
    x[4, 3] = 65519.0                         # rounds to f16's largest
    ours = np.frombuffer(_core.quantize(int(qtype), x), np.uint8).reshape(40, -1)
    assert np.array_equal(ours, quantize(x, qtype).view(np.uint8).reshape(40, -1))
    assert np.array_equal(_core.dequantize(int(qtype), ours, 96), dequantize(ours, qtype))


@pytest.mark.parametrize("qtype", KV_TYPES, ids=lambda t: t.name)
def test_logits_against_float64_reference(float_model, tokens, qtype):
    got = decode_all(context(float_model, qtype, qtype), tokens).astype(np.float64)
    err = rel_errors(got, ReferenceModel(float_model).logits(tokens))
    assert np.median(err) < MEDIAN_BOUND[qtype], np.median(err)
    stored = rel_errors(got, StoredKVReference(float_model, qtype, qtype).logits(tokens))
    assert stored.max() < STORED_BOUND, stored.max()
    if qtype != QT.F32:  # the rounding is really there: the exact reference is farther away
        assert np.median(err) > 10 * np.median(stored)


@pytest.mark.parametrize("type_k,type_v", [(QT.Q8_0, QT.F32), (QT.F32, QT.Q4_0), (QT.F16, QT.Q8_0),
                                           (QT.Q4_0, QT.BF16)], ids=lambda t: t.name)
def test_k_and_v_types_are_independent(float_model, tokens, type_k, type_v):
    ctx = context(float_model, type_k, type_v)
    assert (ctx.kv_type_k, ctx.kv_type_v) == (type_k.name.lower(), type_v.name.lower())
    got = decode_all(ctx, tokens).astype(np.float64)
    assert rel_errors(got, StoredKVReference(float_model, type_k, type_v).logits(tokens)).max() < STORED_BOUND
    # Rounding K alone or V alone is not what this context did.
    for wrong in ((type_k, type_k), (type_v, type_v)):
        if wrong != (type_k, type_v):
            assert rel_errors(got, StoredKVReference(float_model, *wrong).logits(tokens)).max() > STORED_BOUND


def test_kv_bytes_per_type(float_model):
    """The cache holds each type's real row size: 2 layers x 256 cells x a row of 32 values."""
    row = {QT.F32: 128, QT.F16: 64, QT.BF16: 64, QT.Q8_0: 34, QT.Q4_0: 18}
    for t in KV_TYPES:
        assert context(float_model, t, QT.F32).kv_bytes == 2 * 256 * (row[t] + 128)
        assert context(float_model, QT.F16, t).kv_bytes == 2 * 256 * (64 + row[t])
    summary = context(float_model, QT.Q8_0, QT.Q4_0).placement_summary()
    assert "K (q8_0): 0.02 MiB, V (q4_0): 0.01 MiB" in summary, summary


def test_q8_0_is_batch_and_thread_invariant(float_model, tokens):
    """A token's logits with a q8_0 cache are bitwise the same alone and in a batch with another
    sequence's prompt, and with 1 or 2 threads."""
    ctx = context(float_model, QT.Q8_0, QT.Q8_0, n_threads=1)
    decode_all(ctx, tokens[:40])
    alone = decode_all(ctx, tokens[40:41], start=40)
    ctx.kv_seq_rm(0, 40, -1)
    other = tokens[60:100]
    n = len(other) + 1
    batch = ctx.decode(np.asarray(other + tokens[40:41], np.int32),
                       np.asarray(list(range(len(other))) + [40], np.int32),
                       np.asarray([1] * len(other) + [0], np.int32), np.ones(n, np.uint8))
    assert np.array_equal(batch[-1], alone[0])
    ctx2 = context(float_model, QT.Q8_0, QT.Q8_0, n_threads=2)
    assert np.array_equal(decode_all(ctx2, tokens[:41])[-1], alone[0])


@pytest.mark.parametrize("qtype", KV_TYPES, ids=lambda t: t.name)
def test_state_round_trip(float_model, tokens, qtype):
    """A saved cache loaded into a fresh context of the same types continues exactly as the original."""
    a = context(float_model, qtype, QT.Q8_0 if qtype == QT.F32 else qtype)
    decode_all(a, tokens[:50])
    state = a.kv_state()
    expected = decode_all(a, tokens[50:60], start=50)
    b = context(float_model, qtype, QT.Q8_0 if qtype == QT.F32 else qtype)
    b.kv_load_state(state)
    assert b.kv_used == 50
    assert np.array_equal(decode_all(b, tokens[50:60], start=50), expected)


def test_state_of_other_types_is_refused_and_changes_nothing(float_model, tokens):
    saved = context(float_model, QT.Q8_0, QT.F16)
    decode_all(saved, tokens[:30])
    target = context(float_model, QT.Q8_0, QT.Q8_0)
    decode_all(target, tokens[:10])
    before = target.kv_state()
    with pytest.raises(ValueError, match=r"saved with KV types K q8_0, V f16, but this context stores K q8_0, "
                                         r"V q8_0 \(-ctk/-ctv, type_k/type_v\)"):
        target.kv_load_state(saved.kv_state())
    assert target.kv_used == 10 and target.kv_state() == before


def test_llama_save_load_state_with_quantized_cache(float_model):
    llm = glmoe.Llama(float_model, n_ctx=128, n_threads=2, type_k=8, type_v=2, verbose=False)
    llm.eval([5, 6, 7, 8])
    state = llm.save_state()
    other = glmoe.Llama(float_model, n_ctx=128, n_threads=2, type_k=8, type_v=2, verbose=False)
    other.load_state(state)
    assert other.n_tokens == 4
    nxt = [9, 10]
    llm.eval(nxt)
    other.eval(nxt)
    assert np.array_equal(llm.scores[5], other.scores[5])
    with pytest.raises(ValueError, match="saved with KV types K q8_0, V q4_0"):
        glmoe.Llama(float_model, n_ctx=128, n_threads=2, verbose=False).load_state(state)


def test_block_that_does_not_divide_the_row_is_refused(tmp_path):
    path = str(tmp_path / "narrow.gguf")
    write_model(path, ModelSpec(**dict(FLOAT_MODEL, n_head_kv=1, n_head=3)), seed=1)  # rows of 16 values
    with pytest.raises(ValueError, match=r"-ctv q4_0: its blocks of 32 values do not divide the K/V rows of layer "
                                         r"0 \(16 values: n_head_kv x head_dim\)"):
        context(path, QT.F16, QT.Q4_0)
    assert context(path, QT.BF16, QT.F16).kv_type_v == "f16"


def test_gpu_layers_take_what_the_gpu_stores(float_model):
    """Layers with attention on the GPU store f16, bf16, q8_0 or q4_0; f32 is an error naming the
    flag (cpu_as_gpu stands in for the GPU, with the same rule)."""
    on_gpu = dict(n_gpu_layers=2, cpu_as_gpu=True)
    message = ("-ctk f32 (type_k=0) is not implemented for layers on the GPU yet (1 layer's attention is there, and "
               "the GPU's KV cache stores f16, bf16, q8_0 or q4_0): give -ctk one of those")
    with pytest.raises(ValueError, match=re.escape(message)):
        context(float_model, QT.F32, QT.F16, **on_gpu)
    with pytest.raises(ValueError, match=r"-ctv f32 \(type_v=0\) is not implemented for layers on the GPU yet"):
        context(float_model, QT.F16, QT.F32, **on_gpu)
    for k, v in ((QT.F16, QT.F16), (QT.Q8_0, QT.Q4_0), (QT.BF16, QT.BF16)):
        ctx = context(float_model, k, v, **on_gpu)
        assert (ctx.kv_type_k, ctx.kv_type_v) == (k.name.lower(), v.name.lower())
    # Given nothing, each device keeps its own type (the stand-in keeps the CPU's f32).
    plain = _core.Context(_core.Model(float_model), 256, 2, **on_gpu)
    assert plain.kv_type_k == "f32"


@pytest.mark.parametrize("bad", [7, 3, 100, -2])
def test_unknown_type_ids_are_refused(float_model, bad):
    with pytest.raises(ValueError, match=rf"type_k={bad} is not a KV cache type glmoe has: GGML type ids 0 \(f32\), "
                                         r"1 \(f16\), 30 \(bf16\), 8 \(q8_0\), 2 \(q4_0\)"):
        glmoe.Llama(float_model, n_ctx=64, type_k=bad, verbose=False)


@pytest.mark.parametrize("bad", [True, "q8_0", 8.0])
def test_type_v_must_be_an_int_id(float_model, bad):
    with pytest.raises(ValueError, match="type_v must be a GGML type id"):
        glmoe.Llama(float_model, n_ctx=64, type_v=bad, verbose=False)


# Perplexity of the trained tiny model on held-out text, per KV type (f32 31.63, f16 31.63, bf16
# 31.61, q8_0 31.62, q4_0 32.13 measured; docs/PERFORMANCE.md). f16, bf16 and q8_0 change it by under
# 0.1%: bounded at 0.5% of f32's. q4_0's coarser keys cost 1.6%: bounded at 3%; a cache read at the
# wrong offsets or scales gives several times f32's (the unigram baseline is 107).
PPL_BOUND = {QT.F32: 0.0, QT.F16: 0.005, QT.BF16: 0.005, QT.Q8_0: 0.005, QT.Q4_0: 0.03}


@pytest.fixture(scope="module")
def heldout():
    model = default_model_path()
    if not os.path.exists(model):
        pytest.skip("packaged model missing")
    with open(HELD_OUT, "rb") as f:
        tokens = GGUFTokenizer.from_gguf(model).tokenize(f.read(), add_bos=False)
    ref = ReferenceModel(model).logits(tokens)
    return model, tokens, ref


def test_trained_model_perplexity_per_type(heldout):
    """Prints the accuracy table of docs/PERFORMANCE.md (pytest -s) and bounds each type's perplexity."""
    model, tokens, ref = heldout
    f32_ppl = None
    print("\n| K | V | max logit error | mean logit error | perplexity |\n|---|---|---|---|---|")
    print(f"| float64 reference | | 0 | 0 | {perplexity(ref, tokens):.3f} |")
    for type_k, type_v in [(t, t) for t in KV_TYPES] + [(QT.Q8_0, QT.Q4_0), (QT.F16, QT.Q8_0)]:
        got = decode_all(context(model, type_k, type_v, n_ctx=512), tokens).astype(np.float64)
        err = np.abs(got - ref)
        ppl = perplexity(got, tokens)
        print(f"| {type_k.name.lower()} | {type_v.name.lower()} | {err.max():.2e} | {err.mean():.2e} | {ppl:.3f} |")
        if type_k == QT.F32:
            f32_ppl = ppl
            assert ppl == pytest.approx(perplexity(ref, tokens), rel=1e-4)
        elif type_k == type_v:
            assert abs(ppl - f32_ppl) <= PPL_BOUND[type_k] * f32_ppl, (type_k.name, ppl, f32_ppl)


# --- front ends ---

BENCH = os.path.join(os.path.dirname(glmoe.__file__), "bin", "llama-bench")
SWEEP = os.path.join(os.path.dirname(glmoe.__file__), "bin", "llama-sweep-bench")


def bench(*args):
    return subprocess.run([BENCH, *map(str, args)], capture_output=True, text=True, timeout=60)


def test_llama_bench_sweeps_cache_types(float_model):
    p = bench("-m", float_model, "-p", 8, "-n", 2, "-r", 1, "--no-warmup", "-t", 1, "-ctk", "f16,q8_0",
              "--cache-type-v", "q4_0", "-o", "jsonl")
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert [(r["type_k"], r["type_v"], r["n_prompt"]) for r in rows] == [
        ("f16", "q4_0", 8), ("f16", "q4_0", 0), ("q8_0", "q4_0", 8), ("q8_0", "q4_0", 0)]
    md = bench("-m", float_model, "-p", 8, "-n", 0, "-r", 1, "--no-warmup", "-t", 1, "-ctv", "bf16")
    header = md.stdout.splitlines()[0]
    assert "type_v" in header and "type_k" not in header and "|       bf16 |" in md.stdout, md.stdout


def test_llama_bench_reports_the_default_type(float_model):
    p = bench("-m", float_model, "-p", 8, "-n", 0, "-r", 1, "--no-warmup", "-t", 1, "-o", "csv")
    row = next(csv.DictReader(io.StringIO(p.stdout)))
    assert (row["type_k"], row["type_v"]) == ("f32", "f32")


@pytest.mark.parametrize("flag", ["-ctk", "--cache-type-v"])
def test_llama_bench_unknown_cache_type(float_model, flag):
    p = bench("-m", float_model, flag, "q8_0,q5_1")
    assert p.returncode == 2
    assert (f"error: invalid value for {flag} 'q8_0,q5_1': glmoe's KV cache types are f32, f16, bf16, q8_0, q4_0"
            in p.stderr), p.stderr


def test_llama_bench_refusal_is_an_error(tmp_path):
    """A type the model's rows cannot hold fails the run with the reason, not a crash."""
    path = str(tmp_path / "narrow.gguf")
    write_model(path, ModelSpec(**dict(FLOAT_MODEL, n_head_kv=1, n_head=3)), seed=1)
    p = bench("-m", path, "-p", 8, "-n", 0, "-r", 1, "-ctk", "q8_0")
    assert p.returncode == 1 and "-ctk q8_0: its blocks of 32 values do not divide" in p.stderr, p.stderr


def test_llama_sweep_bench_takes_cache_types(float_model):
    p = subprocess.run([SWEEP, "-m", float_model, "-c", "64", "-ub", "32", "-n", "2", "-t", "1", "-ctk", "q8_0",
                        "-ctv", "f16", "-o", "jsonl", "-v"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "K (q8_0): 0.00 MiB, V (f16): 0.01 MiB" in p.stderr, p.stderr
    bad = subprocess.run([SWEEP, "-m", float_model, "-ctk", "f16,q8_0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "-ctk takes a single value" in bad.stderr, bad.stderr


def test_python_m_glmoe_cache_type_flags():
    ok = subprocess.run([sys.executable, "-m", "glmoe", "-ctk", "q8_0", "--cache-type-v", "q4_0", "-n", "4", "-t", "1"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "K (q8_0): 0.20 MiB, V (q4_0): 0.11 MiB" in ok.stderr, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "glmoe", "-ctv", "q4_1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert ("argument -ctv/--cache-type-v: unsupported KV cache type 'q4_1' (glmoe has f32, f16, bf16, q8_0, q4_0)"
            in bad.stderr), bad.stderr


def test_server_cache_type_flags_and_env():
    from glmoe.server.cli import parser, settings_from_args
    from glmoe.server.cli_env import env_arguments

    def settings(argv, env):
        ap = parser()
        return settings_from_args(ap.parse_args(env_arguments(ap, argv, env) + argv))

    s = settings(["-ctk", "q8_0", "--cache-type-v", "bf16"], {})
    assert (s.type_k, s.type_v) == (8, 30)
    s = settings([], {"LLAMA_ARG_CACHE_TYPE_K": "q4_0", "LLAMA_ARG_CACHE_TYPE_V": "f16"})
    assert (s.type_k, s.type_v) == (2, 1)
    assert settings(["-ctk", "f32"], {"LLAMA_ARG_CACHE_TYPE_K": "q4_0"}).type_k == 0  # the command line wins
    assert (settings([], {}).type_k, settings([], {}).type_v) == (-1, -1)
    bad = subprocess.run([sys.executable, "-m", "glmoe.server", "--cache-type-k", "iq4_nl"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "unsupported KV cache type 'iq4_nl' (glmoe has f32, f16" in bad.stderr, bad.stderr


def test_server_reports_the_cache_in_props(float_model):
    srv = harness.ServerProcess(float_model, "-ctk", "q8_0", "-ctv", "f16")
    try:
        props = httpx.get(srv.url + "/props", headers=srv.headers(), timeout=10).json()
        # -c 4096 cells x 2 layers x (34 + 64) bytes per row of 32 values.
        assert props["kv_cache"] == {"type_k": "q8_0", "type_v": "f16", "bytes": 4096 * 2 * (34 + 64)}
        r = httpx.post(srv.url + "/completion", headers=srv.headers(), timeout=30,
                       json={"prompt": "hello", "n_predict": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["tokens_predicted"] == 4
    finally:
        srv.stop()


def test_server_exits_when_the_cache_type_cannot_be_stored(tmp_path):
    path = str(tmp_path / "narrow.gguf")
    write_model(path, ModelSpec(**dict(FLOAT_MODEL, n_head_kv=1, n_head=3)), seed=1)
    p = subprocess.run([sys.executable, "-m", "glmoe.server", "-m", path, "--port", str(harness.free_port()),
                        "-ctv", "q8_0"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "-ctv q8_0: its blocks of 32 values do not divide" in p.stderr, p.stderr
