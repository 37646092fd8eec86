"""The engine's sampler against an independent float64 numpy implementation of each definition.

Statistical tests: each chi-square goodness-of-fit test fails below p = 1e-4. There are
CHI2_SETTINGS of them, so a correct sampler fails one with probability below
len(CHI2_SETTINGS) * 1e-4 for a random choice of seeds; the seeds are fixed, so a run is
reproducible either way.
"""
import math
import random

import numpy as np
import pytest
from scipy import stats

from glmoe import _core

DEFAULTS = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, typical_p=1.0,
                repeat_penalty=1.0, repeat_last_n=64, presence_penalty=0.0,
                frequency_penalty=0.0, logit_bias=None)


def reference(logits, history, **kw):
    """The final distribution over the vocabulary, from the definitions, in float64."""
    p = {**DEFAULTS, **kw}
    x = logits.astype(np.float64)
    n = len(x)
    ids = np.arange(n)
    for token, bias in (p["logit_bias"] or {}).items():
        x[token] += bias

    last_n = p["repeat_last_n"]
    window = np.asarray(history, dtype=np.int64)
    if last_n >= 0:
        window = window[max(0, len(window) - last_n):] if last_n > 0 else window[:0]
    counts = np.bincount(window, minlength=n)
    seen = counts > 0
    xs = x[seen]
    x[seen] = (np.where(xs <= 0, xs * p["repeat_penalty"], xs / p["repeat_penalty"])
               - counts[seen] * p["frequency_penalty"] - p["presence_penalty"])

    if p["temperature"] <= 0:
        return np.eye(n)[np.argmax(x)]  # argmax takes the first, i.e. lowest id, of ties

    def softmax(mask, t=1.0):
        out = np.zeros(n)
        e = np.exp((x[mask] - x[mask].max()) / t)
        out[mask] = e / e.sum()
        return out

    keep = x > -np.inf
    by_logit = np.lexsort((ids, -x))  # descending logit, ties by ascending id
    if p["top_k"] > 0:
        keep[by_logit[p["top_k"]:]] = False

    if p["typical_p"] < 1:
        q = softmax(keep)
        kept = ids[keep]
        entropy = -np.sum(q[kept] * np.log(q[kept]))
        score = np.abs(-np.log(q[kept]) - entropy)
        ranked = kept[np.lexsort((kept, -x[kept], score))]
        over = np.cumsum(q[ranked]) > p["typical_p"]
        n_keep = int(np.argmax(over)) + 1 if over.any() else len(ranked)
        keep[:] = False
        keep[ranked[:n_keep]] = True

    if p["top_p"] < 1:
        q = softmax(keep)
        ranked = by_logit[keep[by_logit]]
        reached = np.cumsum(q[ranked]) >= p["top_p"]
        n_keep = int(np.argmax(reached)) + 1 if reached.any() else len(ranked)
        keep[ranked[n_keep:]] = False

    if p["min_p"] > 0:
        q = softmax(keep)
        keep &= q >= p["min_p"] * q.max()

    return softmax(keep, p["temperature"])


def engine_dist(sampler, logits, history):
    ids, probs = sampler.probabilities(logits, np.asarray(history, dtype=np.int32))
    assert len(np.unique(ids)) == len(ids)
    dense = np.zeros(len(logits))
    dense[ids] = probs
    assert abs(dense.sum() - 1) < 1e-5
    return dense


def random_logits(rng, n, scale):
    return (rng.standard_normal(n) * scale).astype(np.float32)


FILTER_SETTINGS = [
    {},  # llama-cpp-python's create_completion defaults
    dict(top_k=0, top_p=1.0, min_p=0.0, temperature=1.0),
    dict(top_k=0, top_p=1.0, min_p=0.0, temperature=0.3),
    dict(top_k=1, top_p=1.0, min_p=0.0),
    dict(top_k=5, top_p=1.0, min_p=0.0, temperature=2.0),
    dict(top_k=-1, top_p=0.5, min_p=0.0),
    dict(top_k=0, top_p=0.9, min_p=0.0, temperature=1.0),
    dict(top_k=0, top_p=0.0, min_p=0.0),
    dict(top_k=0, top_p=1.0, min_p=0.1),
    dict(top_k=0, top_p=1.0, min_p=0.01, temperature=1.5),
    dict(top_k=0, top_p=1.0, min_p=0.0, typical_p=0.5),
    dict(top_k=0, top_p=1.0, min_p=0.0, typical_p=0.95, temperature=1.0),
    dict(top_k=0, top_p=1.0, min_p=0.0, typical_p=0.0),
    dict(top_k=100, typical_p=0.8, top_p=0.7, min_p=0.02, temperature=1.2),
]


@pytest.mark.parametrize("n_vocab", [7, 1000, 151552])
@pytest.mark.parametrize("settings", FILTER_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "defaults")
def test_filters_match_reference(n_vocab, settings):
    rng = np.random.default_rng([n_vocab, FILTER_SETTINGS.index(settings)])
    sampler = _core.Sampler(n_vocab, seed=1, **settings)
    for scale in (0.5, 2.0, 6.0):
        logits = random_logits(rng, n_vocab, scale)
        np.testing.assert_allclose(engine_dist(sampler, logits, []), reference(logits, [], **settings),
                                   rtol=0, atol=1e-5)


def test_defaults_are_llama_cpp_python_create_completion():
    n = 500
    logits = random_logits(np.random.default_rng(0), n, 3.0)
    history = [1, 2, 2, 3]
    explicit = _core.Sampler(n, seed=1, **{k: v for k, v in DEFAULTS.items() if v is not None})
    np.testing.assert_array_equal(engine_dist(_core.Sampler(n, seed=1), logits, history),
                                  engine_dist(explicit, logits, history))


CHI2_SETTINGS = [
    (50, 1.0, {}),
    (50, 1.0, dict(top_k=0, top_p=1.0, min_p=0.0, temperature=1.0)),
    (1000, 2.0, dict(top_k=0, top_p=0.9, min_p=0.0, temperature=1.3)),
    (200, 1.0, dict(top_k=30, typical_p=0.7, top_p=1.0, min_p=0.0, temperature=1.0)),
    (100, 1.5, dict(top_k=0, min_p=0.02, top_p=1.0, repeat_penalty=1.5, frequency_penalty=0.3,
                    presence_penalty=0.4, logit_bias={3: 2.0, 4: -math.inf})),
]


@pytest.mark.parametrize("n_vocab,scale,settings", CHI2_SETTINGS)
def test_draws_follow_the_distribution(n_vocab, scale, settings):
    rng = np.random.default_rng(CHI2_SETTINGS.index((n_vocab, scale, settings)))
    logits = random_logits(rng, n_vocab, scale)
    history = rng.integers(0, n_vocab, 40).astype(np.int32)
    expected = reference(logits, history, **settings)
    sampler = _core.Sampler(n_vocab, seed=12345, **settings)
    n_draws = 30000
    counts = np.bincount([sampler.sample(logits, history) for _ in range(n_draws)], minlength=n_vocab)
    assert counts[expected == 0].sum() == 0, "drew a token the filters removed"
    # Pool the bins expected to hold fewer than 5 draws, so the chi-square approximation holds.
    e = expected * n_draws
    small = (e < 5) & (expected > 0)
    obs = np.append(counts[e >= 5], counts[small].sum())
    exp = np.append(e[e >= 5], e[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    if len(exp) < 2:
        pytest.skip("degenerate distribution")
    assert stats.chisquare(obs, exp).pvalue > 1e-4


def mt19937_random(seed):
    """Python's random.Random set to std::mt19937's state after seed(seed) (init_genrand):
    its random() is the same genrand_res53 the engine draws with."""
    state = [seed]
    for i in range(1, 624):
        state.append((1812433253 * (state[-1] ^ (state[-1] >> 30)) + i) & 0xFFFFFFFF)
    r = random.Random()
    r.setstate((3, tuple(state) + (624,), None))
    return r


def test_draws_are_the_documented_function_of_seed_and_distribution():
    n = 300
    logits = random_logits(np.random.default_rng(7), n, 2.0)
    settings = dict(top_k=0, top_p=0.95, min_p=0.0, temperature=1.0)
    cdf = np.cumsum(reference(logits, [], **settings))
    r = mt19937_random(2024)
    expected = [int(np.searchsorted(cdf, r.random(), side="right")) for _ in range(2000)]
    sampler = _core.Sampler(n, seed=2024, **settings)
    assert [sampler.sample(logits, np.zeros(0, np.int32)) for _ in range(2000)] == expected


def test_seeds():
    n = 1000
    logits = random_logits(np.random.default_rng(3), n, 1.0)
    none = np.zeros(0, np.int32)
    settings = dict(top_k=0, top_p=1.0, min_p=0.0)

    def draws(sampler, k=200):
        return [sampler.sample(logits, none) for _ in range(k)]

    a = draws(_core.Sampler(n, seed=42, **settings))
    assert a == draws(_core.Sampler(n, seed=42, **settings))
    assert a != draws(_core.Sampler(n, seed=43, **settings))
    s = _core.Sampler(n, seed=1, **settings)
    draws(s)
    s.reseed(42)
    assert draws(s) == a
    # No seed, or llama.cpp's LLAMA_DEFAULT_SEED, means a random one.
    assert draws(_core.Sampler(n, **settings)) != draws(_core.Sampler(n, **settings))
    for random_seed in (0xFFFFFFFF, -1):
        assert draws(_core.Sampler(n, seed=random_seed, **settings)) != draws(_core.Sampler(n, seed=random_seed, **settings))
    for bad in (-2, 2**32):
        with pytest.raises(ValueError, match="seed"):
            _core.Sampler(n, seed=bad)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_greedy_is_argmax(temperature):
    rng = np.random.default_rng(5)
    for n in (7, 151552):
        s = _core.Sampler(n, temperature=temperature, seed=1)
        for _ in range(5):
            logits = random_logits(rng, n, 3.0)
            assert s.sample(logits, np.zeros(0, np.int32)) == int(np.argmax(logits))
            ids, probs = s.probabilities(logits, np.zeros(0, np.int32))
            assert ids.tolist() == [int(np.argmax(logits))] and probs.tolist() == [1.0]


def test_ties_go_to_the_lowest_id():
    logits = np.array([0.0, 1.0, 3.0, 2.0, 3.0, 3.0], np.float32)
    none = np.zeros(0, np.int32)
    assert _core.Sampler(6, temperature=0.0).sample(logits, none) == 2
    # top_k ranks ties by id too, so its cut is deterministic.
    ids, _ = _core.Sampler(6, top_k=2, top_p=1.0, min_p=0.0).probabilities(logits, none)
    assert sorted(ids.tolist()) == [2, 4]
    # A bias can create the tie; the penalty can break it.
    assert _core.Sampler(6, temperature=0.0, logit_bias={1: 2.0}).sample(logits, none) == 1
    s = _core.Sampler(6, temperature=0.0, repeat_penalty=1.5)
    assert s.sample(logits, np.array([2, 1], np.int32)) == 4


PENALTY_SETTINGS = [
    dict(repeat_penalty=1.3),
    dict(repeat_penalty=0.7),
    dict(frequency_penalty=0.5),
    dict(presence_penalty=0.8),
    dict(frequency_penalty=-0.3, presence_penalty=-0.2),
    dict(repeat_penalty=1.2, frequency_penalty=0.4, presence_penalty=0.6),
    dict(repeat_penalty=1.2, frequency_penalty=0.4, repeat_last_n=5),
    dict(repeat_penalty=1.2, frequency_penalty=0.4, repeat_last_n=-1),
    dict(repeat_penalty=1.2, frequency_penalty=0.4, repeat_last_n=0),
    dict(logit_bias={0: 5.0, 7: -3.5, 99: -math.inf}),
    dict(logit_bias={10: 1.0, 11: -1.0}, repeat_penalty=1.5, presence_penalty=1.0),
]


@pytest.mark.parametrize("settings", PENALTY_SETTINGS, ids=str)
def test_penalties_and_bias_match_reference(settings):
    n = 100
    rng = np.random.default_rng(PENALTY_SETTINGS.index(settings))
    logits = random_logits(rng, n, 2.0)
    logits[:20] = np.abs(logits[:20]) * np.where(np.arange(20) % 2 == 0, 1, -1)  # both signs repeated
    logits[20] = 0.0
    history = np.array(list(rng.integers(0, n, 80)) + [0, 1, 2, 3, 0, 0, 1, 20, 10, 11], np.int32)
    unfiltered = dict(top_k=0, top_p=1.0, min_p=0.0, temperature=1.0, **settings)
    got = engine_dist(_core.Sampler(n, seed=1, **unfiltered), logits, history)
    want = reference(logits, history, **unfiltered)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # Compared as logits up to a constant, so that small probabilities count as much as large.
    live = want > 0
    diff = np.log(got[live]) - np.log(want[live])
    assert np.ptp(diff) < 1e-4
    if 99 in (settings.get("logit_bias") or {}):
        assert got[99] == 0
        s = _core.Sampler(n, seed=1, **unfiltered)
        assert 99 not in {s.sample(logits, history) for _ in range(2000)}


@pytest.mark.parametrize("kwargs,message", [
    (dict(top_p=-0.1), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=math.nan), "top_p"),
    (dict(min_p=-0.01), "min_p"),
    (dict(min_p=1.01), "min_p"),
    (dict(typical_p=-1.0), "typical_p"),
    (dict(typical_p=2.0), "typical_p"),
    (dict(repeat_penalty=0.0), "repeat_penalty"),
    (dict(repeat_penalty=-1.1), "repeat_penalty"),
    (dict(repeat_penalty=math.inf), "repeat_penalty"),
    (dict(repeat_last_n=-2), "repeat_last_n"),
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature=math.inf), "temperature"),
    (dict(presence_penalty=math.nan), "presence_penalty"),
    (dict(frequency_penalty=-math.inf), "frequency_penalty"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logit_bias={10: 1.0}), "logit_bias"),
    (dict(logit_bias={3: math.nan}), "logit_bias"),
    (dict(logit_bias={3: math.inf}), "logit_bias"),
], ids=str)
def test_invalid_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _core.Sampler(10, **kwargs)


def test_invalid_inputs():
    with pytest.raises(ValueError, match="n_vocab"):
        _core.Sampler(0)
    s = _core.Sampler(10, repeat_penalty=1.1)
    logits = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match="n_vocab"):
        s.sample(np.zeros(9, np.float32), np.zeros(0, np.int32))
    with pytest.raises(ValueError, match="history token 10"):
        s.sample(logits, np.array([1, 10], np.int32))
    with pytest.raises(ValueError, match="-inf"):
        s.sample(np.full(10, -np.inf, np.float32), np.zeros(0, np.int32))
    with pytest.raises(ValueError, match="-inf"):
        _core.Sampler(10, temperature=0).sample(np.full(10, -np.inf, np.float32), np.zeros(0, np.int32))
    banned = _core.Sampler(3, logit_bias={0: -math.inf, 1: -math.inf, 2: -math.inf})
    with pytest.raises(ValueError, match="-inf"):
        banned.sample(np.zeros(3, np.float32), np.zeros(0, np.int32))


def test_accepted_edge_values():
    """Values llama.cpp gives a meaning to are accepted with that meaning."""
    logits = np.array([1.0, 3.0, 2.0, 3.0, 0.5], np.float32)
    none = np.zeros(0, np.int32)

    def support(**kw):
        ids, _ = _core.Sampler(5, **kw).probabilities(logits, none)
        return sorted(ids.tolist())

    assert support(top_k=0, top_p=1.0, min_p=0.0) == [0, 1, 2, 3, 4]  # top_k <= 0: whole vocab
    assert support(top_k=-5, top_p=1.0, min_p=0.0) == [0, 1, 2, 3, 4]
    assert support(top_k=99, top_p=1.0, min_p=0.0) == [0, 1, 2, 3, 4]
    assert support(top_k=0, top_p=0.0, min_p=0.0) == [1]  # min_keep = 1
    assert support(top_k=0, top_p=1.0, min_p=1.0) == [1, 3]  # every token at p_max
    assert len(support(top_k=0, top_p=1.0, min_p=0.0, typical_p=0.0)) == 1
    assert support(temperature=-0.5) == [1]  # temperature <= 0: greedy
