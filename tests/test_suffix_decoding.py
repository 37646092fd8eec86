"""Suffix decoding: the index against a brute-force reference, the shared store's budget, and
speculative generation in Llama (greedy identical, sampling distribution unchanged, adaptive)."""
from __future__ import annotations

import pickle
import random
import time
from collections import Counter

import numpy as np
import pytest

import glmoe
from glmoe import _core
from glmoe.tools.make_model import PRESETS, ModelSpec, write_model

SEP = -1


def reference_draft(docs, tail, max_depth, max_spec_factor, min_token_prob, max_spec_tokens, depth_limit,
                    max_tokens=1 << 30):
    """The specification, by brute force: the longest suffix of tail (<= max_depth) that occurs
    in the documents followed by a token; then, token by token, its most frequent continuation
    (latest occurrence on ties) while the path probability stays >= min_token_prob, at most
    floor(factor * match) tokens, the cap, max_tokens, and the depth limit."""
    text = []
    for d in docs:
        text += list(d) + [SEP]
    n = len(text)

    def occurrences(pattern):
        L = len(pattern)
        return [i for i in range(n - L) if text[i : i + L] == pattern and text[i + L] != SEP]

    match, occ = 0, []
    for L in range(1, min(max_depth, len(tail), depth_limit - 1) + 1):
        found = occurrences(list(tail[len(tail) - L :]))
        if not found:
            break
        match, occ = L, found
    if match == 0:
        return []
    budget = min(int(np.floor(np.float32(max_spec_factor) * match)), max_spec_tokens, max_tokens)
    draft, prob = [], 1.0
    for j in range(budget):
        depth = match + j
        if depth >= depth_limit:
            break
        nexts = [(text[i + depth], i + depth) for i in occ if i + depth < n and text[i + depth] != SEP]
        if not nexts:
            break
        count, last = {}, {}
        for tok, pos in nexts:
            count[tok] = count.get(tok, 0) + 1
            last[tok] = max(last.get(tok, -1), pos)
        best = max(count, key=lambda t: (count[t], last[t]))
        prob *= count[best] / len(nexts)
        if prob < float(np.float32(min_token_prob)):  # the engine holds the threshold as a float
            break
        draft.append(best)
        occ = [i for i in occ if i + depth < n and text[i + depth] == best]
    return draft


def random_params(rng):
    return dict(max_depth=rng.randint(1, 8), max_spec_factor=rng.choice([0.5, 1.0, 2.0, 4.0]),
                min_token_prob=rng.choice([0.0, 0.1, 0.3, 0.6]), max_spec_tokens=rng.randint(1, 10))


def ints(seq):
    return np.asarray(seq, dtype=np.int32)


def test_drafter_matches_reference_at_every_step():
    rng = random.Random(1)
    for trial in range(40):
        params = random_params(rng)
        alphabet = rng.choice([2, 3, 5, 50])
        drafter = _core.SuffixDrafter(**params, adaptive=False)
        text = []
        for _ in range(rng.randint(20, 90)):
            tok = rng.randrange(alphabet) if rng.random() < 0.7 or len(text) < 8 else text[rng.randrange(len(text) - 4)]
            text.append(tok)
            drafter.append(ints([tok]))
            max_tokens = rng.choice([3, 1 << 30])
            got = drafter.propose(max_tokens).tolist()
            want = reference_draft([text], text, **params, depth_limit=params["max_depth"] + params["max_spec_tokens"],
                                   max_tokens=max_tokens)
            assert got == want, (trial, params, text)


def test_store_matches_reference():
    rng = random.Random(2)
    for trial in range(60):
        params = random_params(rng)
        depth_limit = rng.randint(2, 12)
        alphabet = rng.choice([2, 3, 6])
        store = _core.SuffixStore(1 << 30, depth_limit)
        docs = [[rng.randrange(alphabet) for _ in range(rng.randint(1, 40))] for _ in range(rng.randint(1, 4))]
        for d in docs:
            store.add(ints(d))
        for _ in range(10):
            tail = [rng.randrange(alphabet) for _ in range(rng.randint(1, 12))]
            got = store.propose(ints(tail), **params).tolist()
            assert got == reference_draft(docs, tail, **params, depth_limit=depth_limit), (trial, params, docs, tail)


def test_store_evicts_oldest_within_budget():
    budget = 64 << 10
    store = _core.SuffixStore(budget, 32)
    docs = [list(range(1000 * k, 1000 * k + 300)) for k in range(40)]  # distinct tokens per document
    for d in docs:
        store.add(ints(d))
        assert store.bytes <= budget
    assert 0 < store.n_documents < len(docs)
    assert store.propose(ints(docs[0][:10])).size == 0  # the oldest are gone
    assert store.propose(ints(docs[-1][:10])).tolist() == docs[-1][10:20]  # factor 1: 10 tokens


def test_drafter_uses_store_of_earlier_outputs():
    decoding = glmoe.SuffixDecoding(global_cache_bytes=1 << 20)
    earlier = decoding.drafter()
    earlier.append(ints([1, 2]))
    earlier.mark_prompt_end()
    earlier.append(ints(range(100, 140)))
    earlier.finish()
    fresh = decoding.drafter()
    fresh.append(ints([7, 100, 101, 102, 103]))
    assert fresh.propose().tolist() == list(range(104, 108))


def test_update_and_propose_cost_at_100k_tokens():
    """Microbenchmark: per-token append + propose on a 100k-token context of code-like text."""
    rng = np.random.default_rng(0)
    lines = [rng.integers(0, 5000, size=rng.integers(5, 15)).astype(np.int32) for _ in range(400)]
    text = np.concatenate([lines[i] for i in rng.integers(0, len(lines), size=12000)])[:100_000]
    drafter = _core.SuffixDrafter(adaptive=False)
    t0 = time.perf_counter()
    drafter.append(text)
    drafter.propose()  # the index catches up with the appended text when a draft is asked for
    build_us = (time.perf_counter() - t0) * 1e6 / len(text)
    n = 2000
    t0 = time.perf_counter()
    for tok in lines[0].tolist() * (n // len(lines[0])):
        drafter.append(np.array([tok], np.int32))
        drafter.propose()
    step_us = (time.perf_counter() - t0) * 1e6 / (n // len(lines[0]) * len(lines[0]))
    print(f"\nsuffix drafter at 100k tokens: indexing {build_us:.2f} us/token (bulk), "
          f"append+propose {step_us:.2f} us/step (from Python)")
    assert step_us < 1000


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sfx") / "tiny.gguf")
    write_model(path, ModelSpec(**PRESETS["tiny"]), seed=0)
    return path


def make_llm(path, draft_model=None, **kw):
    return glmoe.Llama(path, n_ctx=512, n_batch=64, n_threads=2, verbose=False, draft_model=draft_model, **kw)


REPETITIVE = [11, 12, 13, 14, 15, 16, 17, 18] * 6 + [11, 12, 13]


def test_greedy_identical_and_drafts_accepted(model_path):
    plain = make_llm(model_path)
    drafted = make_llm(model_path, glmoe.SuffixDecoding(), logits_all=True)
    want = plain(REPETITIVE, max_tokens=120, temperature=0.0)
    got = drafted(REPETITIVE, max_tokens=120, temperature=0.0)
    assert got["choices"][0]["text"] == want["choices"][0]["text"]
    stats = drafted.last_draft_stats
    assert stats["accepted"] > 0 and stats["steps"] < 119, stats
    assert got["timings"]["draft_n_accepted"] == stats["accepted"]
    # The state is what plain generation leaves: same tokens, same KV cache positions.
    assert drafted.n_tokens == plain.n_tokens
    assert np.array_equal(drafted._input_ids, plain._input_ids)
    # plain keeps n_batch rows of logits (no logits_all): its last ones through eval_logits.
    assert np.array_equal(drafted.scores[drafted.n_tokens - 1], np.asarray(plain.eval_logits[-1], np.float32))
    # Token by token through generate(), with prefix reuse of the previous call.
    prompt = REPETITIVE + [20, 21]
    want = [t for t, _ in zip(plain.generate(prompt, temp=0.0), range(50))]
    assert [t for t, _ in zip(drafted.generate(prompt, temp=0.0), range(50))] == want


def test_llama_cpp_style_draft_callable(model_path):
    """Any LlamaDraftModel-like callable works; a wrong draft is rejected without harm."""
    plain = make_llm(model_path)
    want = [t for t, _ in zip(plain.generate(REPETITIVE, temp=0.0), range(40))]
    drafted = make_llm(model_path, lambda ids: np.array([5, 6, 7], dtype=np.intc))
    assert [t for t, _ in zip(drafted.generate(REPETITIVE, temp=0.0), range(40))] == want
    drafted = make_llm(model_path, glmoe.SuffixDecoding(adaptive=False))
    drafted.draft_model = drafted.draft_model.__call__  # the callable path of the same drafter
    assert [t for t, _ in zip(drafted.generate(REPETITIVE, temp=0.0), range(40))] == want


def test_sampling_distribution_unchanged(model_path):
    """Chi-square homogeneity of the first generated tokens (each position, and the pair of
    second and third tokens) with and without drafting, 1000 seeds each; fails below p = 0.001."""
    stats_mod = pytest.importorskip("scipy.stats")
    n_seeds, n_tokens = 1000, 4
    kw = dict(temp=1.0, top_k=3, top_p=1.0, min_p=0.0)

    def draft_modes(ids):
        """Drafts the most frequent plain continuation of the tokens generated so far: a
        deterministic draft that the target accepts often and rejects often."""
        generated, draft = tuple(int(t) for t in ids[len(REPETITIVE) :]), []
        while len(draft) < 3 and generated in modes:
            draft.append(modes[generated])
            generated += (modes[generated],)
        return np.array(draft, np.intc)

    totals = {"drafted": 0, "accepted": 0}

    def runs(llm, seeds):
        out = []
        for seed in seeds:
            gen = llm.generate(REPETITIVE, seed=seed, **kw)
            out.append([t for t, _ in zip(gen, range(n_tokens))])
            gen.close()
            for k in totals:
                totals[k] += (llm.last_draft_stats or {}).get(k, 0)
        return np.array(out)

    plain = runs(make_llm(model_path), range(n_seeds))
    counts = {}
    for row in plain.tolist():
        for i in range(n_tokens):
            counts.setdefault(tuple(row[:i]), Counter())[row[i]] += 1
    modes = {prefix: c.most_common(1)[0][0] for prefix, c in counts.items()}
    # Seeds apart from the plain runs', so that the two samples are independent.
    drafted = runs(make_llm(model_path, draft_modes), range(n_seeds, 2 * n_seeds))
    assert 0.2 * totals["drafted"] < totals["accepted"] < 0.9 * totals["drafted"], totals  # both paths taken
    columns = [plain[:, i] for i in range(n_tokens)], [drafted[:, i] for i in range(n_tokens)]
    columns[0].append(plain[:, 1] * 100000 + plain[:, 2])
    columns[1].append(drafted[:, 1] * 100000 + drafted[:, 2])
    p_values = []
    for a, b in zip(*columns):
        cats = sorted(set(a.tolist()) | set(b.tolist()))
        table = np.array([[np.sum(a == c) for c in cats], [np.sum(b == c) for c in cats]])
        table = table[:, table.sum(axis=0) >= 5]  # the test's approximation needs populated cells
        if table.shape[1] < 2:
            continue
        p_values.append(stats_mod.chi2_contingency(table)[1])
        assert p_values[-1] > 1e-3, (p_values[-1], table)
    print(f"\nspeculative sampling: {totals}, chi-square p-values {[round(float(p), 3) for p in p_values]}")
    # More than the distribution: for a seed, the same tokens with and without drafts.
    assert np.array_equal(runs(make_llm(model_path, draft_modes), range(200)), plain[:200])


def test_adaptive_stops_drafting_on_text_without_repetition():
    """Drafts from an index that always misses: the control pauses drafting for most steps."""
    drafter = _core.SuffixDrafter(adaptive=True)
    rng = np.random.default_rng(0)
    drafter.append(np.tile(rng.integers(0, 100, 20, dtype=np.int32), 5))
    for _ in range(400):
        drafter.append(rng.integers(0, 100, 1, dtype=np.int32))
        draft = drafter.propose()
        drafter.record(int(draft.size), 0)
    s = drafter.stats
    assert s["paused"] > 0.9 * 400 and s["drafted"] < 0.1 * 400 * 2, s


def repeating_drafter():
    drafter = _core.SuffixDrafter(adaptive=True)
    drafter.append(np.tile(np.arange(10, 30, dtype=np.int32), 4))
    return drafter


def test_adaptive_keeps_drafting_while_drafts_pay():
    drafter = repeating_drafter()
    for _ in range(20):
        draft = drafter.propose()
        assert draft.size > 0
        drafter.record(int(draft.size), max(1, int(draft.size) // 2))  # half accepted
    assert drafter.stats["paused"] == 0



def linear_costs(per_token, n=32):
    return [1.0 + per_token * k for k in range(n + 1)]


def given(costs):
    """A relative_cost for SuffixDrafter.propose that answers with these step costs."""
    return lambda max_extra: costs


def test_adaptive_length_follows_the_step_cost():
    """At the prior acceptance (2/3 a token) the yield per cost of k draft tokens is
    (1 + a + ... + a^k) / cost[k]: cheap verification (the tiny model on the GPU, about 6% a
    token) verifies a long draft, the Air-shaped MoE's (37% for one token) one token, and a
    step dearer than the best yield verifies none."""
    a = 2 / 3
    expected = {}
    for name, costs in [("cheap", linear_costs(0.06)), ("moe", [1.0, 1.37, 1.78, 2.15, 2.61, 3.04, 3.48, 3.84]),
                        ("dear", linear_costs(0.7))]:
        gains = [sum(a ** i for i in range(k + 1)) / costs[min(k, len(costs) - 1)] for k in range(1, 33)]
        best = int(np.argmax(gains)) + 1
        expected[name] = best if gains[best - 1] > 1 else 0
        drafter = repeating_drafter()
        assert drafter.propose(32, given(costs)).size == expected[name], (name, gains)
    assert expected["cheap"] > expected["moe"] == 1 and expected["dear"] == 0


def test_adaptive_probes_one_token_after_a_pause():
    """Once nothing pays, drafting pauses; a one-token probe follows each pause, which doubles
    while probes are rejected; an accepted probe raises the estimate. Where verification is
    cheap the first pause is 8 steps."""
    drafter = repeating_drafter()
    costs = linear_costs(0.4)
    steps = 0
    while (draft := drafter.propose(8, given(costs))).size > 0:  # rejected drafts until nothing pays
        drafter.record(int(draft.size), 0)
        steps += 1
        assert steps < 10

    def steps_to_probe():
        for n in range(1, 300):
            if (size := drafter.propose(8, given(costs)).size) > 0:
                assert size == 1
                return n
        raise AssertionError("no probe")

    # A probe costs 0.4 of a step here: pauses of 40 steps keep probing within 1% of the time.
    assert steps_to_probe() == 40 + 1  # the paused steps, then the probe
    drafter.record(1, 0)
    assert steps_to_probe() == 1 + 80 + 1  # the step that finds nothing pays, the pause, the probe
    drafter.record(1, 1)  # accepted: the estimate rises to where one token pays again
    assert drafter.propose(8, given(costs)).size >= 1

    cheap = repeating_drafter()
    while (draft := cheap.propose(8)).size > 0:
        cheap.record(int(draft.size), 0)
    assert [cheap.propose(8).size for _ in range(9)] == [0] * 8 + [1]


def test_acceptance_carries_across_requests_through_the_store():
    """A sequence's estimate starts from the store's, which every sequence sharing it updates:
    after requests whose drafts were all rejected, a new one does not draft at an MoE's cost."""
    moe_costs = [1.0, 1.37, 1.78, 2.15, 2.61, 3.04, 3.48, 3.84]
    store = _core.SuffixStore(1 << 20, 96)

    def request():
        drafter = _core.SuffixDrafter(store=store)
        drafter.append(np.tile(np.arange(10, 30, dtype=np.int32), 4))
        return drafter

    assert request().propose(8, given(moe_costs)).size == 1  # nothing known yet: the prior drafts
    for _ in range(3):
        drafter = request()
        draft = drafter.propose(8, given(moe_costs))
        drafter.record(int(draft.size), 0)
    assert request().propose(8, given(moe_costs)).size == 0
    assert repeating_drafter().propose(8, given(moe_costs)).size == 1  # a drafter without the store


def test_step_cost_model():
    m = _core.StepCostModel()
    assert m.relative(1, 4) == [1.0] * 5  # nothing known: drafting looks free (the control floors it)
    # Each size's first step (a graph capture, say) is not counted, and a size needs 3 timed steps.
    for n, seconds in [(1, 9.0), (1, 1.0), (1, 1.0), (3, 9.0), (3, 2.0), (3, 2.0)]:
        m.record(n, seconds)
    assert m.relative(1, 3) == [1.0] * 4  # size 1 has 2 timed steps: not known yet
    m.record(1, 1.0)
    m.record(3, 2.0)
    r = m.relative(1, 5)
    # Sizes 2, 4, 5 and 6 are interpolated and extrapolated on the line through sizes 1 and 3.
    assert r == pytest.approx([1.0, 1.5, 2.0, 2.5, 3.0, 3.5])
    for seconds in (0.5, 0.5, 0.5, 0.5):
        m.record(2, seconds)  # cheaper than size 1: noise, and a bigger step never costs less
    assert m.relative(1, 2) == pytest.approx([1.0, 1.0, 2.0])
    m.record(3, 100.0)  # a stall: the median of size 3's steps does not move
    assert m.relative(1, 2)[2] == pytest.approx(2.0)
    for seconds in (3.0, 3.0, 3.0, 3.0, 3.0):
        m.record(3, seconds)  # but a lasting change does, within the window of 8 steps
    assert m.relative(1, 2)[2] == pytest.approx(3.0)
    assert m.relative(0, 2) == [1.0] * 3 and m.relative(65, 2) == [1.0] * 3


def test_context_times_its_steps(model_path):
    ctx = _core.Context(_core.Model(model_path), 256, n_threads=1)
    assert ctx.relative_step_costs(1, 3) == [1.0] * 4
    for p in range(6):  # 5 timed steps of each size
        for n, p0 in ((1, 8 * p), (4, 8 * p + 1)):
            pos = np.arange(p0, p0 + n, dtype=np.int32)
            ctx.decode(np.ones(n, np.int32), pos, np.zeros(n, np.int32), np.ones(n, np.uint8))
    r = ctx.relative_step_costs(1, 5)
    assert r[0] == 1.0 and all(b >= a for a, b in zip(r, r[1:])), r
    # Sizes 2 and 3 on the line between the two sizes run, 5 and 6 beyond it.
    assert r[2] - r[1] == pytest.approx((r[3] - 1.0) / 3) and r[5] - r[4] == pytest.approx((r[3] - 1.0) / 3)


def test_pickled_llama_rebuilds_its_suffix_decoding(model_path):
    """The engine's store is not picklable: the draft comes back from its constructor's arguments,
    with an empty store, and the copy's greedy output is the original's."""
    llm = make_llm(model_path, glmoe.SuffixDecoding(max_depth=24, max_spec_tokens=8, global_cache_bytes=1 << 20))
    want = llm(REPETITIVE, max_tokens=40, temperature=0.0)["choices"][0]["text"]
    again = pickle.loads(pickle.dumps(llm))
    draft = again.draft_model
    assert isinstance(draft, glmoe.SuffixDecoding) and draft is not llm.draft_model
    assert draft.params == llm.draft_model.params and draft.adaptive == llm.draft_model.adaptive
    assert draft.store is not None and draft.store is not llm.draft_model.store
    assert again(REPETITIVE, max_tokens=40, temperature=0.0)["choices"][0]["text"] == want
    assert again.last_draft_stats["accepted"] > 0  # it drafts, from the sequence's own text
    assert pickle.loads(pickle.dumps(glmoe.SuffixDecoding(global_cache_bytes=0))).store is None
