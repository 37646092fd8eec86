"""Per-row GPU sampling (ggml-cuda/sample_rows.cu, Context.decode_sample_rows, the engine's GPU path)
against the CPU Sampler: with the same draw u the same token, the same logprobs, greedy identical,
penalties over a history that lives on the GPU, and the step's device-to-host traffic (issue 16).

Same u, same token: the GPU's sums run in another order than the CPU's, so where u falls within
rounding (1e-9, far above double's 1e-16 relative error of sums of at most 151552 terms) of a
boundary of the CPU's cumulative distribution, either neighbour is accepted; nowhere else."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import glmoe
from glmoe import _core
from glmoe.tools.make_model import ModelSpec, write_model

from cuda_support import cuda_only
from test_engine import CONFIGS as CPU_CONFIGS

pytestmark = cuda_only

# Sampler.probabilities gives float32 probabilities: their cumulative sums are good to ~1e-7.
BOUNDARY = 1e-6


def ops():
    return _core.cuda_ops


def sampler_keys(params):
    return {k: v for k, v in params.items() if k not in ("u", "history", "n_top", "seq")}


def cpu_cdf(params, logits, history):
    """The CPU Sampler's distribution in ascending id order: (ids, normalised cumulative sums)."""
    sampler = _core.Sampler(len(logits), **sampler_keys(params))
    ids, probs = sampler.probabilities(np.asarray(logits, np.float32), np.asarray(history, np.int32))
    order = np.argsort(ids)
    cdf = np.cumsum(probs[order].astype(np.float64))
    return ids[order], cdf / cdf[-1]


def cpu_draw(params, logits, history, seed):
    """(u, token): the CPU Sampler's own draw and token for a seed."""
    keys = sampler_keys(params)
    twin = _core.Sampler(len(logits), **keys, seed=seed)
    u = twin.uniform01() if keys.get("temperature", 0.8) > 0 else 0.0
    token = _core.Sampler(len(logits), **keys, seed=seed).sample(np.asarray(logits, np.float32),
                                                                  np.asarray(history, np.int32))
    return u, token


def assert_same_token(params, logits, history, u, got, want):
    if got == want:
        return
    # Only where u lies at a boundary of the CPU's cumulative distribution, within rounding, may
    # the neighbour be taken.
    ids, cdf = cpu_cdf(params, logits, history)
    assert got in ids and np.min(np.abs(cdf - u)) < BOUNDARY, (params, u, got, want)


def inverse_cdf(params, logits, history, u):
    ids, cdf = cpu_cdf(params, logits, history)
    if sampler_keys(params).get("temperature", 0.8) <= 0:
        return int(ids[0])
    return int(ids[min(int(np.searchsorted(cdf, u, side="right")), len(ids) - 1)])


def rows_of(rng, n_rows, n_vocab, kind):
    if kind == "normal":
        return (rng.standard_normal((n_rows, n_vocab)) * 3).astype(np.float32)
    if kind == "ties":  # few distinct values: every cut falls in a tie
        return rng.integers(-4, 4, (n_rows, n_vocab)).astype(np.float32)
    if kind == "peaked":
        x = (rng.standard_normal((n_rows, n_vocab)) * 2).astype(np.float32)
        x[:, rng.integers(0, n_vocab, n_rows)] += 12
        return x
    raise ValueError(kind)


PARAMS = [
    dict(temperature=0.0),
    dict(temperature=0.0, repeat_penalty=1.5, logit_bias={3: 5.0, 7: -math.inf}),
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
    dict(temperature=0.7, top_k=40, top_p=1.0, min_p=0.0),
    dict(temperature=1.3, top_k=0, top_p=0.9, min_p=0.0),
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.1),
    dict(temperature=1.0, top_k=50, top_p=1.0, min_p=0.0, typical_p=0.8),
    dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),  # llama-cpp-python's defaults
    dict(temperature=0.9, top_k=200, top_p=0.9, min_p=0.02, typical_p=0.7, repeat_penalty=1.3,
         presence_penalty=0.4, frequency_penalty=0.2, repeat_last_n=16, logit_bias={1: 2.0, 2: -1.5, 9: -math.inf}),
    dict(temperature=2.0, top_k=5, top_p=0.5, min_p=0.0, repeat_penalty=0.8, repeat_last_n=-1),
    dict(temperature=1.0, top_k=2048, top_p=0.99, min_p=0.0, typical_p=0.95, frequency_penalty=-0.5),
]


@pytest.mark.parametrize("kind", ["normal", "ties", "peaked"])
@pytest.mark.parametrize("n_vocab", [3000, 151552])
@pytest.mark.parametrize("pi", range(len(PARAMS)))
def test_same_u_same_token_as_the_cpu_sampler(pi, n_vocab, kind):
    rng = np.random.default_rng(1000 * pi + n_vocab % 97)
    base = PARAMS[pi]
    if n_vocab > 3000 and base.get("typical_p", 1.0) < 1 and not 0 < base.get("top_k", 40) <= 2048:
        pytest.skip("typical_p over the whole vocabulary is the host's (tested below)")
    n_rows = 6
    logits = rows_of(rng, n_rows, n_vocab, kind)
    rows, wants = [], []
    for r in range(n_rows):
        history = rng.integers(0, 20, rng.integers(0, 40)).tolist()  # small ids: repeats, and tokens near the bias
        u, want = cpu_draw(base, logits[r], history, seed=int(rng.integers(0, 2**31)))
        rows.append(dict(base, u=u, history=history))
        wants.append(want)
    ids, logprobs, _, histories = ops().sample_rows(logits, rows)
    for r in range(n_rows):
        assert_same_token(rows[r], logits[r], rows[r]["history"], rows[r]["u"], ids[r], wants[r])
        # The chosen token's logprob: log-softmax of the raw row, in double as the engine's.
        x = logits[r].astype(np.float64)
        ref = x[ids[r]] - (x.max() + np.log(np.exp(x - x.max()).sum()))
        assert abs(logprobs[r] - ref) < 1e-5 * max(1.0, abs(ref))
        assert histories[r] == rows[r]["history"] + [ids[r]]


def test_many_draws_follow_the_cpu_distribution():
    """A grid of u over one row: the GPU's tokens are the CPU's inverse CDF at each u (so their
    frequencies are the CPU's probabilities), for the chain with every filter on."""
    rng = np.random.default_rng(7)
    logits = rows_of(rng, 1, 5000, "normal")[0]
    params = PARAMS[8]
    history = rng.integers(0, 20, 30).tolist()
    us = (np.arange(512) + 0.5) / 512
    rows = [dict(params, u=float(u), history=history) for u in us]
    ids, _, _, _ = ops().sample_rows(np.repeat(logits[None], len(us), 0), rows)
    _, cdf = cpu_cdf(params, logits, history)
    for u, got in zip(us, ids):
        want = inverse_cdf(params, logits, history, float(u))
        assert got == want or np.min(np.abs(cdf - u)) < BOUNDARY, (u, got, want)
    assert len(set(ids)) > 3


def test_top_logprobs_are_the_raw_ranking():
    rng = np.random.default_rng(3)
    logits = rows_of(rng, 3, 151552, "ties")
    logits[2, :] = -np.inf
    logits[2, [4, 9]] = [1.0, 1.0]
    rows = [dict(temperature=0.8, u=0.5, n_top=k) for k in (20, 5, 4)]
    _, _, top, _ = ops().sample_rows(logits, rows)
    for r in range(3):
        x = logits[r].astype(np.float64)
        finite = x[~np.isnan(x)]
        norm = finite.max() + np.log(np.exp(finite - finite.max()).sum())
        order = sorted((i for i in range(x.size) if not np.isnan(x[i])), key=lambda i: (-x[i], i))[:rows[r]["n_top"]]
        assert [t for t, _ in top[r]] == order
        for t, lp in top[r]:
            assert lp == pytest.approx(x[t] - norm, abs=1e-5) or (math.isinf(lp) and math.isinf(x[t]))


def test_all_banned_gives_minus_one_and_wide_typical_is_refused():
    logits = np.zeros((3, 151552), np.float32)
    logits[0, :] = -np.inf
    rows = [dict(temperature=0.0, u=0.3), dict(temperature=1.0, top_k=0, typical_p=0.5, u=0.3),
            dict(temperature=1.0, top_k=0, top_p=0.5, u=0.3)]
    ids, _, _, histories = ops().sample_rows(logits, rows)
    assert ids[0] == -1 and ids[1] == -2 and 0 <= ids[2] < 151552
    assert histories[0] == [-1] and histories[1] == [-1]  # nothing appended when nothing was sampled


# ---- through the model ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu_sampling") / "m.gguf"
    write_model(str(path), ModelSpec(**CPU_CONFIGS["kquants-groups-qknorm-tied"]))
    return str(path)


@pytest.fixture(scope="module")
def model(model_path):
    return _core.Model(model_path)


def prefill(ctx, prompt, seq=0):
    n = len(prompt)
    return ctx.decode(np.asarray(prompt, np.int32), np.arange(n, dtype=np.int32), np.full(n, seq, np.int32),
                      np.asarray([0] * (n - 1) + [1], np.uint8))


SAMPLING = dict(temperature=0.9, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.3, presence_penalty=0.2,
                frequency_penalty=0.1, repeat_last_n=16, logit_bias={5: 1.5})


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_generation_matches_decode_and_the_cpu_sampler(model, temperature):
    """One seed, one stream: tokens sampled on the GPU (history kept there) equal the CPU Sampler's
    on the same GPU logits, for a whole generation with penalties."""
    params = dict(SAMPLING, temperature=temperature)
    rng = np.random.default_rng(11)
    prompt = rng.integers(0, model.n_vocab, 12).tolist()
    gpu = _core.Context(model, 256, 2, n_gpu_layers=-1)
    ref = _core.Context(model, 256, 2, n_gpu_layers=-1)
    assert gpu.samples_on_gpu
    draws = _core.Sampler(model.n_vocab, **params, seed=5)
    cpu = _core.Sampler(model.n_vocab, **params, seed=5)
    n = len(prompt)
    row = dict(params, u=draws.uniform01() if temperature > 0 else 0.0, history=prompt)
    got = _core.decode_sample_rows(gpu, np.asarray(prompt, np.int32), np.arange(n, dtype=np.int32),
                                   np.zeros(n, np.int32), np.asarray([0] * (n - 1) + [1], np.uint8), [row])
    logits = prefill(ref, prompt)
    history = list(prompt)
    for step in range(40):
        want = cpu.sample(logits[0], np.asarray(history, np.int32))
        token = got["ids"][0]
        assert token == want, step
        history.append(token)
        pos = np.asarray([len(history) - 1], np.int32)
        row = dict(params, u=draws.uniform01() if temperature > 0 else 0.0, history=history)
        got = _core.decode_sample_rows(gpu, np.asarray([token], np.int32), pos, np.zeros(1, np.int32),
                                       np.ones(1, np.uint8), [row])
        logits = ref.decode(np.asarray([token], np.int32), pos, np.zeros(1, np.int32), np.ones(1, np.uint8))


def test_mixed_rows_and_history_of_a_reused_sequence(model):
    """Rows without params bring their logits; a sequence whose history the host replaces (a slot
    reused by another request) is uploaded again, not appended to."""
    gpu = _core.Context(model, 256, 2, n_gpu_layers=-1)
    ref = _core.Context(model, 256, 2, n_gpu_layers=-1)
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, model.n_vocab, 6).tolist(), rng.integers(0, model.n_vocab, 6).tolist()
    tokens = np.asarray(a + b, np.int32)
    pos = np.asarray(list(range(6)) * 2, np.int32)
    seq = np.asarray([0] * 6 + [1] * 6, np.int32)
    want = np.asarray([0] * 5 + [1] + [0] * 5 + [1], np.uint8)
    params = dict(temperature=0.0, repeat_penalty=2.0, repeat_last_n=-1)
    out = _core.decode_sample_rows(gpu, tokens, pos, seq, want, [None, dict(params, seq=1, history=b)])
    logits = ref.decode(tokens, pos, seq, want)
    np.testing.assert_array_equal(np.asarray(out["host_logits"][0], np.float32), logits[0])
    assert out["ids"][1] == _core.Sampler(model.n_vocab, **params).sample(logits[1], np.asarray(b, np.int32))
    # Sequence 1's history now replaced by a (another request in the same slot).
    gpu.kv_seq_rm(1, 0, -1)
    ref.kv_seq_rm(1, 0, -1)
    out = _core.decode_sample_rows(gpu, np.asarray(a, np.int32), np.arange(6, dtype=np.int32),
                                   np.ones(6, np.int32), np.asarray([0] * 5 + [1], np.uint8),
                                   [dict(params, seq=1, history=a)])
    logits = ref.decode(np.asarray(a, np.int32), np.arange(6, dtype=np.int32), np.ones(6, np.int32),
                        np.asarray([0] * 5 + [1], np.uint8))
    assert out["ids"][0] == _core.Sampler(model.n_vocab, **params).sample(logits[0], np.asarray(a, np.int32))


def test_engine_step_copies_only_ids_and_waits_once(model):
    """Item 4: through the engine's GPU sampling path a step makes one device-to-host copy (the ids
    with their logprobs), two with top logprobs, and one wait."""
    engine = _core.BatchEngine(model, 256, n_parallel=2, n_threads=2, n_gpu_layers=-1)
    prompt = np.random.default_rng(4).integers(0, model.n_vocab, 10).tolist()
    for n_top, copies_per_step in ((0, 1), (3, 2)):
        before, steps_before = engine.gpu_counters(), engine.stats()["decode_steps_total"]
        rid = engine.submit(prompt, 16, [], **SAMPLING, seed=1, top_logprobs=n_top)
        while not (ev := engine.poll(rid, 5.0))["finished"]:
            pass
        after, steps = engine.gpu_counters(), engine.stats()["decode_steps_total"] - steps_before
        assert ev["finish_reason"] == "length"
        assert after["steps"] - before["steps"] == steps
        assert after["device_to_host_copies"] - before["device_to_host_copies"] == copies_per_step * steps
        assert after["host_syncs"] - before["host_syncs"] == steps
    engine.shutdown()


def test_engine_step_of_many_rows_waits_once(model):
    """Steps sampling more rows than one output-head pass takes (32) still copy the ids once and
    wait once: 40 sequences decode together."""
    n = 40
    engine = _core.BatchEngine(model, 32 * n, n_parallel=n, n_threads=2, n_gpu_layers=-1)
    rng = np.random.default_rng(5)
    before, steps_before = engine.gpu_counters(), engine.stats()["decode_steps_total"]
    rids = [engine.submit(rng.integers(0, model.n_vocab, 6).tolist(), 12, [], **SAMPLING, seed=i) for i in range(n)]
    for rid in rids:
        while not (ev := engine.poll(rid, 5.0))["finished"]:
            pass
        assert ev["finish_reason"] == "length" and ev["n_generated"] == 12
    after, steps = engine.gpu_counters(), engine.stats()["decode_steps_total"] - steps_before
    engine.shutdown()
    assert steps < n * 12  # sequences shared steps
    assert after["device_to_host_copies"] - before["device_to_host_copies"] == steps
    assert after["host_syncs"] - before["host_syncs"] == steps


def test_engine_gpu_path_matches_the_host_sampler(model):
    """The engine's GPU-sampled tokens, logprobs and top logprobs for a seeded request equal a host
    loop of Context.decode and the Sampler with the same seed (one request: the same steps)."""
    prompt = np.random.default_rng(6).integers(0, model.n_vocab, 7).tolist()
    engine = _core.BatchEngine(model, 256, n_parallel=1, n_threads=2, n_gpu_layers=-1)
    rid = engine.submit(prompt, 24, [], **SAMPLING, seed=9, top_logprobs=4)
    tokens, logprobs, tops = [], [], []
    while True:
        ev = engine.poll(rid, 5.0)
        tokens += ev["tokens"]
        logprobs += ev["logprobs"]
        tops += ev.get("top_logprobs", [])
        if ev["finished"]:
            break
    engine.shutdown()
    ctx = _core.Context(model, 256, 2, n_gpu_layers=-1)
    sampler = _core.Sampler(model.n_vocab, **SAMPLING, seed=9)
    logits = prefill(ctx, prompt)[0]
    history = list(prompt)
    for k, token in enumerate(tokens):
        assert token == sampler.sample(logits, np.asarray(history, np.int32)), k
        x = logits.astype(np.float64)
        norm = x.max() + np.log(np.exp(x - x.max()).sum())
        assert logprobs[k] == pytest.approx(x[token] - norm, abs=1e-5)
        assert [t for t, _ in tops[k]] == sorted(range(x.size), key=lambda i: (-x[i], i))[:4]
        history.append(token)
        logits = ctx.decode(np.asarray([token], np.int32), np.asarray([len(history) - 1], np.int32),
                            np.zeros(1, np.int32), np.ones(1, np.uint8))[0]
    assert len(tokens) == 24


def generate_one_copy_per_step(model_path, model, params, n=20):
    """(llm, prompt, tokens): n tokens of Llama(n_gpu_layers=-1).generate from a fixed 9-token
    prompt, asserting that each decode step copied one thing to the host (the id)."""
    llm = glmoe.Llama(model_path, n_gpu_layers=-1, n_ctx=128, verbose=False)
    prompt = np.random.default_rng(3).integers(0, model.n_vocab, 9).tolist()
    before = llm._ctx.gpu_counters()
    got = list(itertools.islice(llm.generate(prompt, **params), n))
    after = llm._ctx.gpu_counters()
    assert after["device_to_host_copies"] - before["device_to_host_copies"] == after["steps"] - before["steps"]
    return llm, prompt, got


@pytest.mark.parametrize("params", [dict(temp=0.0), dict(temp=0.9, top_k=40, top_p=0.95, min_p=0.05,
                                                          repeat_penalty=1.3, presence_penalty=0.2,
                                                          frequency_penalty=0.1, seed=11)])
def test_llama_generate_samples_in_the_step(model_path, model, params):
    """Llama(n_gpu_layers=-1).generate samples each token on the GPU inside its decode step: one
    device-to-host copy a step (the id), and the tokens of a host loop of Context.decode and the
    Sampler with the same parameters and seed."""
    llm, prompt, got = generate_one_copy_per_step(model_path, model, params)

    ctx = _core.Context(model, 128, 2, n_gpu_layers=-1)
    keys = {k: v for k, v in params.items() if k not in ("temp", "seed")}
    sampler = _core.Sampler(model.n_vocab, temperature=params["temp"], seed=params.get("seed", 0),
                            repeat_last_n=llm.last_n_tokens_size, **keys)
    logits = prefill(ctx, prompt)[0]
    history = list(prompt)
    for k, token in enumerate(got):
        assert token == sampler.sample(logits, np.asarray(history, np.int32)), k
        history.append(token)
        logits = ctx.decode(np.asarray([token], np.int32), np.asarray([len(history) - 1], np.int32),
                            np.zeros(1, np.int32), np.ones(1, np.uint8))[0]
