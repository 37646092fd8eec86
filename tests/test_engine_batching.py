"""The continuous-batching engine (_core.BatchEngine): results, queueing, cancellation, limits.

Greedy equality against one-sequence-at-a-time decoding needs batch-invariant kernels; the tiny
model is all-F32, whose kernels are.
"""
import threading
import time

import numpy as np
import pytest

from glmoe import _core
from glmoe.tools.make_model import PRESETS, ModelSpec, write_model

N_THREADS = 1
# A context long enough that a request generating up to it keeps its slot for a good while.
LONG_CTX = 4096


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine") / "tiny.gguf"
    write_model(str(path), ModelSpec(**PRESETS["tiny"]), seed=0)
    return _core.Model(str(path))


@pytest.fixture
def engine_factory(model):
    engines = []

    def make(n_ctx=512, n_parallel=4, n_batch=512, **spec):
        e = _core.BatchEngine(model, n_ctx, n_parallel=n_parallel, n_threads=N_THREADS, n_batch=n_batch, **spec)
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.shutdown()


def prompt_of(length, salt):
    return [(salt * 131 + i * 17 + 3) % 500 + 1 for i in range(length)]


def reference_greedy(model, prompt, n):
    """Greedy continuation and its log-probabilities, decoding this prompt alone."""
    ctx = _core.Context(model, 256, n_threads=N_THREADS)
    i32 = lambda xs: np.asarray(xs, dtype=np.int32)
    logits = ctx.decode(i32(prompt), i32(range(len(prompt))), i32([0] * len(prompt)),
                        np.asarray([0] * (len(prompt) - 1) + [1], dtype=np.uint8))[-1]
    tokens, logprobs = [], []
    for k in range(n):
        t = int(np.argmax(logits))
        x = logits.astype(np.float64)
        logprobs.append(x[t] - x.max() - np.log(np.exp(x - x.max()).sum()))
        tokens.append(t)
        pos = len(prompt) + k
        logits = ctx.decode(i32([t]), i32([pos]), i32([0]), np.ones(1, dtype=np.uint8))[0]
    return tokens, logprobs


def collect(engine, rid, timeout=30.0):
    """Polls to the end; returns (tokens, logprobs, final event)."""
    tokens, logprobs = [], []
    deadline = time.monotonic() + timeout
    while True:
        ev = engine.poll(rid, 1.0)
        tokens += ev["tokens"]
        logprobs += ev["logprobs"]
        if ev["finished"]:
            return tokens, logprobs, ev
        assert time.monotonic() < deadline, "request did not finish"


def test_concurrent_greedy_equals_sequential(model, engine_factory):
    # n_batch 16 forces chunked prefill of the longer prompts between decode steps.
    engine = engine_factory(n_ctx=512, n_parallel=4, n_batch=16)
    cases = [(prompt_of(length, salt), max_tokens)
             for salt, (length, max_tokens) in enumerate([(1, 5), (40, 12), (7, 1), (23, 20), (3, 9), (60, 4),
                                                           (11, 15), (2, 2), (33, 7), (5, 18), (17, 3), (48, 10)])]
    results = [None] * len(cases)
    start = threading.Barrier(len(cases))

    def client(i):
        prompt, max_tokens = cases[i]
        start.wait()
        rid = engine.submit(prompt, max_tokens, [], temperature=0)
        results[i] = collect(engine, rid)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    for (prompt, max_tokens), (tokens, logprobs, ev) in zip(cases, results):
        want_tokens, want_logprobs = reference_greedy(model, prompt, max_tokens)
        assert tokens == want_tokens
        np.testing.assert_allclose(logprobs, want_logprobs, rtol=0, atol=1e-4)
        assert ev["finish_reason"] == "length" and ev["error"] is None
        assert ev["n_prompt"] == len(prompt) and ev["n_generated"] == max_tokens
        assert ev["t_prompt_ms"] >= 0 and ev["t_gen_ms"] >= 0
    s = engine.stats()
    assert s["kv_cells_used"] == 0 and s["requests_running"] == 0 and s["requests_waiting"] == 0
    assert s["prompt_tokens_total"] == sum(len(p) for p, _ in cases)
    assert s["generated_tokens_total"] == sum(m for _, m in cases)
    # Fewer steps than one request at a time would take: sequences did share steps.
    steps_alone = sum(-(-len(p) // 16) + m - 1 for p, m in cases)
    assert 0 < s["decode_steps_total"] < steps_alone and s["t_busy_ms_total"] > 0


def test_queue_is_fifo(engine_factory):
    engine = engine_factory(n_ctx=256, n_parallel=1)
    rids = [engine.submit(prompt_of(10, k), 30, [], temperature=0) for k in range(4)]
    _, _, last = collect(engine, rids[-1])
    assert last["finish_reason"] == "length"
    # One slot, served in order: every earlier request finished before the last one started.
    for rid in rids[:-1]:
        ev = engine.poll(rid, 0)
        assert ev["finished"] and len(ev["tokens"]) == 30
    assert engine.stats()["requests_waiting"] == 0


def test_more_requests_than_slots_all_complete(engine_factory):
    engine = engine_factory(n_ctx=256, n_parallel=2, n_batch=8)
    rids = [engine.submit(prompt_of(5 + k, k), 6, [], temperature=0.7, seed=k) for k in range(9)]
    assert engine.stats()["requests_waiting"] + engine.stats()["requests_running"] <= 9
    for rid in rids:
        tokens, _, ev = collect(engine, rid)
        assert len(tokens) == 6 and ev["finish_reason"] == "length"


def test_slots_report_progress(engine_factory):
    engine = engine_factory(n_ctx=LONG_CTX, n_parallel=2)
    rid = engine.submit(prompt_of(20, 1), 0, [], temperature=0)
    engine.poll(rid, 10.0)  # first token out: the slot is generating
    (busy,) = [s for s in engine.slots() if s["request_id"] is not None]
    assert busy["request_id"] == rid and busy["state"] == "generating"
    assert busy["n_prompt"] == 20 and busy["n_past"] >= 20 and busy["n_generated"] >= 1
    idle = [s for s in engine.slots() if s["request_id"] is None]
    assert all(s["state"] == "idle" for s in idle) and len(idle) == 1
    engine.cancel(rid)
    assert all(s["state"] == "idle" and s["request_id"] is None for s in engine.slots())


def test_cancel_frees_kv_at_once(engine_factory):
    engine = engine_factory(n_ctx=LONG_CTX, n_parallel=2)
    running = engine.submit(prompt_of(100, 1), 0, [], temperature=0)
    ev = engine.poll(running, 10.0)
    assert ev["tokens"] and not ev["finished"]
    assert engine.stats()["kv_cells_used"] >= 100
    engine.cancel(running)
    s = engine.stats()
    assert s["kv_cells_used"] == 0 and s["requests_running"] == 0
    with pytest.raises(KeyError):
        engine.poll(running, 0)
    engine.cancel(running)  # already forgotten: no-op
    engine.cancel(12345)    # unknown: no-op


def test_cancel_wakes_a_waiting_poll(engine_factory):
    engine = engine_factory(n_ctx=LONG_CTX, n_parallel=1)
    blocker = engine.submit(prompt_of(50, 2), 0, [], temperature=0)
    queued = engine.submit(prompt_of(5, 3), 5, [], temperature=0)
    seen = {}
    poller = threading.Thread(target=lambda: seen.update(engine.poll(queued, 30.0)))
    poller.start()
    time.sleep(0.1)
    engine.cancel(queued)
    poller.join(5.0)
    assert seen["finished"] and seen["finish_reason"] == "cancelled" and seen["tokens"] == []
    with pytest.raises(KeyError):
        engine.poll(queued, 0)
    engine.cancel(blocker)
    assert engine.stats()["kv_cells_used"] == 0


def test_eog_stops_without_the_eog_token(model, engine_factory):
    engine = engine_factory()
    prompt = prompt_of(8, 4)
    greedy, _ = reference_greedy(model, prompt, 12)
    k = next(i for i in range(2, 12) if greedy[i] not in greedy[:i])
    rid = engine.submit(prompt, 50, [greedy[k], 511], temperature=0)
    tokens, _, ev = collect(engine, rid)
    assert tokens == greedy[:k]
    assert ev["finish_reason"] == "stop" and ev["n_generated"] == k


def test_length_limits(engine_factory):
    engine = engine_factory(n_ctx=64, n_parallel=2)  # slots of 32 positions
    assert engine.stats()["n_ctx_slot"] == 32
    for n_prompt, max_tokens, want in [(30, 0, 2), (31, 0, 1), (10, 3, 3), (30, 100, 2)]:
        tokens, _, ev = collect(engine, engine.submit(prompt_of(n_prompt, 5), max_tokens, [], temperature=0))
        assert len(tokens) == want and ev["finish_reason"] == "length"
    with pytest.raises(ValueError, match="prompt of 32 tokens does not fit the slot context of 32"):
        engine.submit(prompt_of(32, 5), 1, [])


def test_bad_submissions(model, engine_factory):
    engine = engine_factory()
    with pytest.raises(ValueError):
        engine.submit([], 5, [])
    with pytest.raises(ValueError):
        engine.submit([1, model.n_vocab], 5, [])
    with pytest.raises(ValueError):
        engine.submit([1, -1], 5, [])
    with pytest.raises(ValueError):
        engine.submit([1, 2**40], 5, [])
    with pytest.raises(ValueError):
        engine.submit([1, 2], 5, [], top_p=1.5)
    with pytest.raises(ValueError):
        engine.submit([1, 2], 5, [], seed=-2)
    with pytest.raises(TypeError):
        engine.submit([1, 2], 5, [], no_such_option=1)
    with pytest.raises(ValueError):
        _core.BatchEngine(model, 100, n_parallel=65)
    assert engine.stats()["requests_waiting"] == 0


def test_numpy_prompt(model, engine_factory):
    engine = engine_factory()
    prompt = prompt_of(9, 6)
    a, _, _ = collect(engine, engine.submit(np.asarray(prompt, dtype=np.int32), 6, [], temperature=0))
    b, _, _ = collect(engine, engine.submit(prompt, 6, [], temperature=0))
    assert a == b == reference_greedy(model, prompt, 6)[0]


def test_seeds_reproduce_under_sampling(engine_factory):
    engine = engine_factory(n_parallel=4)
    prompt = prompt_of(6, 7)
    kw = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.1)
    rids = [engine.submit(prompt, 20, [], seed=s, **kw) for s in (42, 42, 43, 42)]
    outs = [collect(engine, r)[0] for r in rids]
    assert outs[0] == outs[1] == outs[3]
    assert outs[2] != outs[0]


def test_poll_timeout_returns_nothing(engine_factory):
    engine = engine_factory(n_ctx=LONG_CTX, n_parallel=1)
    blocker = engine.submit(prompt_of(50, 8), 0, [], temperature=0)
    queued = engine.submit(prompt_of(5, 9), 5, [], temperature=0)
    t0 = time.monotonic()
    ev = engine.poll(queued, 0.05)
    assert time.monotonic() - t0 >= 0.04
    assert ev["tokens"] == [] and ev["logprobs"] == [] and not ev["finished"] and ev["finish_reason"] is None
    assert engine.stats()["requests_waiting"] == 1
    engine.cancel(blocker)
    tokens, _, ev = collect(engine, queued)
    assert len(tokens) == 5


def test_shutdown(model):
    engine = _core.BatchEngine(model, LONG_CTX, n_parallel=1, n_threads=N_THREADS)
    running = engine.submit(prompt_of(50, 10), 0, [], temperature=0)
    queued = engine.submit(prompt_of(5, 11), 5, [], temperature=0)
    engine.shutdown()
    for rid in (running, queued):
        ev = engine.poll(rid, 0)
        assert ev["finished"] and ev["finish_reason"] in ("cancelled", "length")
    assert engine.stats()["kv_cells_used"] == 0
    with pytest.raises(RuntimeError):
        engine.submit([1, 2], 1, [])
    engine.shutdown()  # idempotent
    del engine         # the destructor shuts down again


def test_submit_cancel_cycles_do_not_leak(engine_factory):
    engine = engine_factory(n_ctx=256, n_parallel=4, n_batch=32)

    def churn(salt):
        for k in range(500):
            rid = engine.submit(prompt_of(1 + k % 20, salt + k), 0, [], temperature=0)
            if k % 3 == 0:
                engine.poll(rid, 0.001)
            engine.cancel(rid)

    threads = [threading.Thread(target=churn, args=(s * 1000,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = engine.stats()
    assert s["kv_cells_used"] == 0 and s["requests_running"] == 0 and s["requests_waiting"] == 0
    assert all(sl["state"] == "idle" for sl in engine.slots())
    tokens, _, ev = collect(engine, engine.submit(prompt_of(4, 1), 3, [], temperature=0))
    assert len(tokens) == 3


# ---- suffix decoding -------------------------------------------------------------------------

def repetitive_prompt(salt, period=6, repeats=5):
    """A phrase said over and over: the drafter finds long matches, so drafts are accepted."""
    return prompt_of(period, salt) * repeats


def run_concurrently(engine, cases):
    """Submits every case (prompt, max_tokens, kwargs) at once; returns collect()'s results."""
    results = [None] * len(cases)
    start = threading.Barrier(len(cases))

    def client(i):
        prompt, max_tokens, kw = cases[i]
        start.wait()
        results[i] = collect(engine, engine.submit(prompt, max_tokens, [], **kw))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("n_batch", [512, 8])
def test_suffix_drafting_greedy_is_bitwise_plain(engine_factory, n_batch):
    # Drafted and draft-free requests (draft=False) share steps; n_batch 8 leaves drafts little
    # room beside four decode tokens and prompt chunks. Slots of 96 positions: requests that run
    # to the slot context (max_tokens 0) test the draft's room at the end.
    greedy = dict(temperature=0)
    cases = [(repetitive_prompt(k), m, dict(greedy, draft=k % 3 != 2))
             for k, m in enumerate([24, 0, 17, 30, 0, 9])] + [(prompt_of(13, 9), 20, greedy)]
    plain = run_concurrently(engine_factory(n_ctx=384, n_parallel=4, n_batch=n_batch), cases)
    engine = engine_factory(n_ctx=384, n_parallel=4, n_batch=n_batch, spec_suffix=True, spec_max_depth=16,
                            spec_adaptive=False)
    drafted = run_concurrently(engine, cases)
    for (_, _, kw), (want, want_lp, want_ev), (got, got_lp, ev) in zip(cases, plain, drafted):
        assert got == want and got_lp == want_lp  # bitwise: decode is batch-invariant
        assert ev["finish_reason"] == want_ev["finish_reason"] and ev["n_generated"] == want_ev["n_generated"]
        assert want_ev["draft_n"] == 0 and 0 <= ev["draft_n_accepted"] <= ev["draft_n"]
        if not kw.get("draft", True):
            assert ev["draft_n"] == 0
    assert sum(ev["draft_n_accepted"] for _, _, ev in drafted) > 0
    s = engine.stats()
    assert s["draft_tokens_total"] == sum(ev["draft_n"] for _, _, ev in drafted)
    assert s["draft_accepted_total"] == sum(ev["draft_n_accepted"] for _, _, ev in drafted)
    assert s["generated_tokens_total"] == sum(len(t) for t, _, _ in plain)
    assert s["kv_cells_used"] == 0  # rejected draft positions left no cells behind and s["requests_running"] == 0


def test_suffix_drafting_sampling_reproduces_per_seed(engine_factory):
    # Verification samples each position as plain decoding does, one draw of the request's own
    # stream per token, so a seed gives the same tokens with and without drafts, whatever the
    # drafts were (their lengths follow measured step times, which differ from run to run).
    kw = dict(temperature=0.7, top_k=20, top_p=0.95, min_p=0.0, repeat_penalty=1.05)
    cases = [(repetitive_prompt(k), 24, dict(kw, seed=s)) for k, s in [(0, 1), (1, 1), (0, 2), (0, 1)]]

    def run(spec):
        # Not adaptive: whether drafts pay at this temperature is not the point, their verification is.
        engine = engine_factory(n_ctx=256, n_parallel=2, spec_suffix=spec, spec_max_depth=16, spec_adaptive=False)
        return run_concurrently(engine, cases)

    plain, a, b = run(False), run(True), run(True)
    assert [t for t, _, _ in a] == [t for t, _, _ in plain] == [t for t, _, _ in b]
    assert sum(ev["draft_n_accepted"] for _, _, ev in a) > 0
    assert a[2][0] != a[0][0]
    assert sum(ev["draft_n_accepted"] for _, _, ev in a) > 0


def test_suffix_drafting_bad_parameters(model):
    with pytest.raises(ValueError):
        _core.BatchEngine(model, 256, spec_suffix=True, spec_max_depth=0)
    with pytest.raises(ValueError):
        _core.BatchEngine(model, 256, spec_suffix=True, spec_min_token_prob=2.0)
