"""The host side of per-row GPU sampling that runs without a GPU: the record of what the device's
sequence histories hold (HistoryMirror: what a step must upload), the refusals of
Context.decode_sample_rows, and the engine's output on a CPU-only context, which samples every row
on the host as before (the GPU tests are in test_cuda_sample_rows.py)."""
import numpy as np
import pytest

from glmoe import _core
from glmoe.tools.make_model import PRESETS, ModelSpec, write_model


def test_history_mirror_uploads_only_what_changed():
    m = _core.HistoryMirror(4, 16)
    assert m.sync(0, [5, 6, 7]) == 0  # nothing held: all of it
    assert m.sync(0, [5, 6, 7]) == 3  # unchanged: nothing
    m.appended(0, 8)  # the kernel appended the sampled token
    assert m.sync(0, [5, 6, 7, 8]) == 4  # the engine accepted it: nothing to upload
    assert m.sync(0, [5, 6, 7, 8, 9]) == 4  # a token the device did not append: only it
    assert m.sync(0, [5, 6, 1]) == 2  # truncated and changed: from the first difference
    assert m.held(0) == [5, 6, 1]
    m.appended(0, 3)
    assert m.sync(0, [5, 6, 1, 4]) == 3  # the host rejected the appended token
    assert m.sync(1, []) == 0 and m.held(1) == []
    # A slot reused by another request: the new history is uploaded from where it differs.
    assert m.sync(0, [9, 9]) == 0
    m.forget(0)
    assert m.sync(0, [9, 9]) == 0
    assert m.held(2) == []  # sequences are independent


def test_history_mirror_refuses_bad_input():
    m = _core.HistoryMirror(2, 3)
    with pytest.raises(ValueError, match="exceeds"):
        m.sync(0, [1, 2, 3, 4])
    with pytest.raises(ValueError, match="sequence 2"):
        m.sync(2, [1])
    m.sync(1, [1, 2, 3])
    with pytest.raises(Exception, match="capacity"):
        m.appended(1, 4)  # a full history takes no append
    with pytest.raises(ValueError):
        _core.HistoryMirror(0, 3)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("sample_rows") / "tiny.gguf"
    write_model(str(path), ModelSpec(**PRESETS["tiny"]), seed=0)
    return _core.Model(str(path))


def one_row(ctx, rows):
    return _core.decode_sample_rows(ctx, np.asarray([1, 2], np.int32), np.asarray([0, 1], np.int32),
                                    np.zeros(2, np.int32), np.asarray([0, 1], np.uint8), rows)


def test_decode_sample_rows_needs_the_output_head_on_the_gpu(model):
    ctx = _core.Context(model, 64, 1)
    assert not ctx.samples_on_gpu
    with pytest.raises(Exception, match="output head on the GPU"):
        one_row(ctx, [dict(temperature=0.0)])
    with pytest.raises(ValueError, match="unknown row sampling key top_n"):
        one_row(ctx, [dict(top_n=3)])


def generate(engine, prompt, n, **kw):
    rid = engine.submit(prompt, n, [], **kw)
    tokens, logprobs = [], []
    while True:
        ev = engine.poll(rid, 5.0)
        tokens += ev["tokens"]
        logprobs += ev["logprobs"]
        if ev["finished"]:
            return tokens, logprobs


SAMPLING = dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, typical_p=0.9, repeat_penalty=1.3,
                presence_penalty=0.2, frequency_penalty=0.1, repeat_last_n=8, logit_bias={3: 1.0})


def test_cpu_engine_samples_on_the_host_as_before(model):
    """Without a GPU every row takes the host path: the engine's tokens and logprobs are the CPU
    Sampler's over Context.decode's logits, for one seed."""
    prompt = [1, 5, 9, 2, 7]
    engine = _core.BatchEngine(model, 256, n_parallel=2, n_threads=1)
    try:
        tokens, logprobs = generate(engine, prompt, 12, **SAMPLING, seed=3)
        counters = engine.gpu_counters()
    finally:
        engine.shutdown()
    assert counters == {"steps": 0, "device_to_host_copies": 0, "host_syncs": 0}
    ctx = _core.Context(model, 128, 1)
    sampler = _core.Sampler(model.n_vocab, **SAMPLING, seed=3)
    n = len(prompt)
    logits = ctx.decode(np.asarray(prompt, np.int32), np.arange(n, dtype=np.int32), np.zeros(n, np.int32),
                        np.asarray([0] * (n - 1) + [1], np.uint8))[0]
    history = list(prompt)
    for k, token in enumerate(tokens):
        assert token == sampler.sample(logits, np.asarray(history, np.int32)), k
        x = logits.astype(np.float64)
        assert logprobs[k] == pytest.approx(x[token] - x.max() - np.log(np.exp(x - x.max()).sum()), abs=1e-5)
        history.append(token)
        logits = ctx.decode(np.asarray([token], np.int32), np.asarray([len(history) - 1], np.int32),
                            np.zeros(1, np.int32), np.ones(1, np.uint8))[0]
    assert len(tokens) == 12
