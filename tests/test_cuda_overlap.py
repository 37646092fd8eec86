"""Overlapped decoding (issue 16 item 2; Context.begin_sampled, the engine's overlapped run, Llama's
overlapped generate): each step is begun before the host has read the token it evaluates (the
device feeds its own sample back), and the output is token for token what stepping one at a time
gives; a step begun for a token nobody asks for leaves no cell in the cache."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import glmoe
from glmoe import _core

from cuda_support import cuda_only
from test_cuda_sample_rows import generate_one_copy_per_step, model, model_path  # noqa: F401 (fixtures)

pytestmark = cuda_only

PLAIN = dict(temperature=0.9, top_k=40, top_p=0.95, min_p=0.05, logit_bias={5: 1.5})


def one(token, pos, seq=0):
    return (np.asarray([token], np.int32), np.asarray([pos], np.int32), np.asarray([seq], np.int32),
            np.ones(1, np.uint8))


def stepped(model, prompt, n, seed, params, forced=()):
    """n tokens by decode_sample_with, one step at a time (the reference), after the prompt (one
    batch) and the `forced` tokens (one step each)."""
    ctx = _core.Context(model, 256, 2, n_gpu_layers=-1)
    sampler = _core.Sampler(model.n_vocab, **params, seed=seed)
    none = np.zeros(0, np.int32)
    k = len(prompt)
    batch = (np.asarray(prompt, np.int32), np.arange(k, dtype=np.int32), np.zeros(k, np.int32),
             np.asarray([0] * (k - 1) + [1], np.uint8))
    if not forced:
        out = [ctx.decode_sample_with(*batch, sampler, none)]
    else:
        ctx.decode(*batch)
        for i, t in enumerate(forced[:-1]):
            ctx.decode(*one(t, k + i))
        out = [ctx.decode_sample_with(*one(forced[-1], k + len(forced) - 1), sampler, none)]
    k += len(forced)
    for i in range(n - 1):
        out.append(ctx.decode_sample_with(*one(out[-1], k + i), sampler, none))
    return out


@pytest.mark.parametrize("params", [dict(temperature=0.0), PLAIN])
def test_context_steps_fed_from_the_device_match_stepping(model, params):
    """begin_sampled_with(sampled_token(0)) takes the previous step's sample on the device: the
    tokens equal decode_sample_with's, one wait and one id copy per step."""
    prompt = np.random.default_rng(1).integers(0, model.n_vocab, 11).tolist()
    want = stepped(model, prompt, 30, 7, params)
    ctx = _core.Context(model, 256, 2, n_gpu_layers=-1)
    sampler = _core.Sampler(model.n_vocab, **params, seed=7)
    assert ctx.overlaps_with(sampler)
    k = len(prompt)
    first = ctx.decode_sample_with(np.asarray(prompt, np.int32), np.arange(k, dtype=np.int32), np.zeros(k, np.int32),
                                   np.asarray([0] * (k - 1) + [1], np.uint8), sampler, np.asarray(prompt, np.int32))
    before = ctx.gpu_counters()
    ctx.begin_sampled_with(first, k, 0, sampler)
    got = [first]
    for i in range(1, 29):
        ctx.begin_sampled_with(_core.sampled_token(0), k + i, 0, sampler)
        assert ctx.n_pending == 2
        got.append(ctx.end_sampled_one())
    got.append(ctx.end_sampled_one())
    after = ctx.gpu_counters()
    assert got == want
    steps = after["steps"] - before["steps"]
    assert steps == 29
    assert after["device_to_host_copies"] - before["device_to_host_copies"] == steps
    assert after["host_syncs"] - before["host_syncs"] == steps
    assert ctx.kv_used == k + 29


def test_overlapped_steps_refuse_what_they_cannot_do(model):
    ctx = _core.Context(model, 64, 2, n_gpu_layers=-1)
    greedy = _core.Sampler(model.n_vocab, temperature=0.0)
    penalized = _core.Sampler(model.n_vocab, temperature=0.0, repeat_penalty=1.3)
    assert not ctx.overlaps_with(penalized)
    with pytest.raises(ValueError, match="cannot overlap"):
        ctx.begin_sampled_with(1, 0, 0, penalized)
    with pytest.raises(ValueError, match="out of range"):  # no earlier sampled step to take from
        ctx.begin_sampled_with(_core.sampled_token(0), 0, 0, greedy)
    assert ctx.kv_used == 0
    ctx.begin_sampled_with(1, 0, 0, greedy)
    with pytest.raises(ValueError, match="out of range"):  # that step sampled one row, not two
        ctx.begin_sampled_with(_core.sampled_token(1), 1, 0, greedy)
    ctx.begin_sampled_with(_core.sampled_token(0), 1, 0, greedy)
    with pytest.raises(RuntimeError, match="pending"):
        ctx.begin_sampled_with(_core.sampled_token(0), 2, 0, greedy)
    with pytest.raises(RuntimeError, match="pending"):
        ctx.decode(*one(3, 2))
    ctx.end_sampled_one()
    ctx.end_sampled_one()
    assert ctx.n_pending == 0 and ctx.kv_used == 2
    with pytest.raises(RuntimeError, match="without a step"):
        ctx.end_sampled_one()
    cpu_head = _core.Context(model, 64, 2, n_gpu_layers=1)
    assert not cpu_head.overlaps_with(greedy)


@pytest.mark.parametrize("params", [dict(temp=0.0), dict(temp=0.9, top_k=40, top_p=0.95, min_p=0.05, seed=11)])
def test_llama_generate_overlaps_and_matches_stepping(model_path, model, params):
    """Llama.generate without penalties takes the overlapped path: the same tokens as stepping,
    one id copy per step, and after the caller stops only the tokens it was given before the
    last are in the cache (the step begun for the last one is dropped), as when stepping."""
    llm, prompt, got = generate_one_copy_per_step(model_path, model, params)
    keys = {k: v for k, v in params.items() if k not in ("temp", "seed")}
    sampler_params = dict(temperature=params["temp"], repeat_last_n=llm.last_n_tokens_size, **keys)
    assert llm._ctx.overlaps_with(_core.Sampler(model.n_vocab, **sampler_params))
    assert got == stepped(model, prompt, 20, params.get("seed", 0), sampler_params)
    assert llm.n_tokens == len(prompt) + 19
    assert llm._ctx.kv_used == llm.n_tokens and llm._ctx.n_pending == 0
    # The cache it left is the one stepping leaves: continuing from it gives stepping's tokens.
    more = list(itertools.islice(llm.generate(prompt + got, temp=0.0), 5))
    assert more == stepped(model, prompt, 5, 0, dict(temperature=0.0), forced=got)


def test_llama_overlapped_generation_up_to_a_full_context(model_path, model):
    """At the end of the context the overlapped path hands over as stepping does: every token
    that fits, then eval's error for the one that does not."""
    llm = glmoe.Llama(model_path, n_gpu_layers=-1, n_ctx=32, verbose=False)
    prompt = np.random.default_rng(4).integers(0, model.n_vocab, 20).tolist()
    got = []
    with pytest.raises(ValueError, match="exceed context window"):
        for token in llm.generate(prompt, temp=0.0):
            got.append(token)
    assert got == stepped(model, prompt, 13, 0, dict(temperature=0.0))
    assert llm.n_tokens == 32 and llm._ctx.n_pending == 0


def engine_outputs(engine, rids):
    out = {}
    for rid in rids:
        tokens, ev = [], None
        while True:
            ev = engine.poll(rid, 10.0)
            tokens += ev["tokens"]
            if ev["finished"]:
                break
        out[rid] = (tokens, ev["finish_reason"])
    return out


@pytest.mark.parametrize("keep_slot_cache", [False, True])
def test_engine_overlapped_run_matches_each_sequence_alone(model, keep_slot_cache):
    """Four requests at different depths with different lengths, one ending on an end-of-generation
    token mid-run: each output equals its sequence stepped alone (steps of up to 8 tokens give each
    token the same bits), most steps were overlapped, and the cache holds no cell of a dropped step."""
    rng = np.random.default_rng(8)
    prompts = [rng.integers(0, model.n_vocab, n).tolist() for n in (2, 1, 3, 2)]  # every step <= 8 tokens
    alone = [stepped(model, p, 24, 0, dict(temperature=0.0)) for p in prompts]
    eog = alone[2][10]  # request 2 stops there (and so may others that sample it)
    engine = _core.BatchEngine(model, 512, n_parallel=4, n_threads=2, n_gpu_layers=-1,
                               keep_slot_cache=keep_slot_cache)
    before = engine.gpu_counters()
    limits = (24, 17, 24, 6)
    rids = [engine.submit(p, m, [eog] if i == 2 else [], temperature=0.0)
            for i, (p, m) in enumerate(zip(prompts, limits))]
    out = engine_outputs(engine, rids)
    for i, rid in enumerate(rids):
        tokens, reason = out[rid]
        want = alone[i][:limits[i]]
        if i == 2:
            want = want[:want.index(eog)]
        assert tokens == want, i
        assert reason == ("stop" if i == 2 else "length")
    stats, after = engine.stats(), engine.gpu_counters()
    assert stats["overlapped_steps_total"] > stats["decode_steps_total"] // 2
    assert after["device_to_host_copies"] - before["device_to_host_copies"] == after["steps"] - before["steps"]
    assert after["host_syncs"] - before["host_syncs"] == after["steps"] - before["steps"]
    if keep_slot_cache:
        assert stats["kv_cells_used"] == sum(s["n_past"] for s in engine.slots())
    else:
        assert stats["kv_cells_used"] == 0
    engine.shutdown()


def test_engine_cancel_during_an_overlapped_run(model):
    """A cancel while steps run overlapped ends that request at once; the others go on unchanged."""
    rng = np.random.default_rng(9)
    prompts = [rng.integers(0, model.n_vocab, 2).tolist() for _ in range(3)]  # every step <= 8 tokens
    engine = _core.BatchEngine(model, 512, n_parallel=3, n_threads=2, n_gpu_layers=-1)
    rids = [engine.submit(p, 40, [], temperature=0.0) for p in prompts]
    first = engine.poll(rids[1], 10.0)
    engine.cancel(rids[1])
    out = engine_outputs(engine, [rids[0], rids[2]])
    for i in (0, 2):
        assert out[rids[i]] == (stepped(model, prompts[i], 40, 0, dict(temperature=0.0)), "length")
    assert not first["finished"]
    assert engine.stats()["kv_cells_used"] == 0
    engine.shutdown()
