"""One Llama shared between threads (issue 19, point 4): concurrent calls are serialised and each
gets exactly what it would get alone; streams hold the lock from their first step to their end
(or close / garbage collection); a closed Llama raises a clear error from every method."""
from __future__ import annotations

import gc
import os
import threading
import time

import pytest

import glmoe
from glmoe.__main__ import default_model_path

PROMPTS = ["In the beginning God created", "And the LORD spake unto Moses, saying,"]
N_ROUNDS = 12


@pytest.fixture(scope="module")
def llm():
    return glmoe.Llama(default_model_path(), n_ctx=256, n_batch=16, n_threads=2, verbose=False)


def completion(llm, prompt, seed):
    return llm(prompt, max_tokens=12, temperature=0.9, seed=seed)["choices"][0]["text"]


def streamed(llm, prompt, seed):
    return "".join(c["choices"][0]["text"] for c in llm(prompt, max_tokens=12, temperature=0.9, seed=seed,
                                                         stream=True))


def chat_streamed(llm, prompt, seed):
    chunks = llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=8, temperature=0.9,
                                        seed=seed, stream=True)
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


def run_threads(fns):
    errors, results = [], [None] * len(fns)
    start = threading.Barrier(len(fns))

    def body(i):
        try:
            start.wait()
            results[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a thread hung"
    if errors:
        raise errors[0]
    return results


def test_two_threads_get_what_they_get_alone(llm):
    kinds = [completion, streamed, chat_streamed]
    alone = {(k.__name__, p, s): k(llm, p, s) for k in kinds for p in PROMPTS for s in (1, 2)}
    assert len({v for v in alone.values()}) > 2  # the seeds and prompts give different texts
    for r in range(N_ROUNDS):
        jobs = []
        for t in range(2):
            kind, prompt, seed = kinds[(r + t) % 3], PROMPTS[(r + t) % 2], 1 + (r // 2 + t) % 2
            jobs.append(((kind.__name__, prompt, seed), lambda k=kind, p=prompt, s=seed: k(llm, p, s)))
        results = run_threads([fn for _, fn in jobs])
        for (key, _), got in zip(jobs, results):
            assert got == alone[key], f"round {r}: {key}"


def test_threads_mixing_eval_generate_and_state(llm):
    tokens = llm.tokenize(PROMPTS[0].encode())

    def eval_and_save():
        llm.reset()
        llm.eval(tokens)
        return llm.save_state().n_tokens

    def generated():
        out = []
        for tok in llm.generate(tokens, temp=0.0):
            out.append(tok)
            if len(out) == 6:
                break
        return out

    want = generated()
    for _ in range(6):
        n, got = run_threads([eval_and_save, generated])
        assert n == len(tokens) and got == want


def test_open_stream_holds_the_lock_until_closed(llm):
    stream = llm(PROMPTS[0], max_tokens=50, temperature=0.0, stream=True)
    next(stream)
    done = threading.Event()
    t = threading.Thread(target=lambda: (llm.reset(), done.set()))
    t.start()
    assert not done.wait(0.3), "another thread ran while a stream was open"
    stream.close()
    assert done.wait(10), "closing the stream did not release the lock"
    t.join()


def test_abandoned_stream_releases_when_collected(llm):
    stream = llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=50, stream=True)
    next(stream)
    del stream
    gc.collect()
    done = threading.Event()
    threading.Thread(target=lambda: (llm.reset(), done.set()), daemon=True).start()
    assert done.wait(10), "a garbage-collected stream kept the lock"


def test_stream_stepped_by_several_threads(llm):
    """A stream started in one thread and stepped in others (as a thread pool does) still holds
    the lock, gives the text it gives alone, and releases it at its end."""
    want = streamed(llm, PROMPTS[1], 5)
    stream = llm(PROMPTS[1], max_tokens=12, temperature=0.9, seed=5, stream=True)
    parts = [next(stream)["choices"][0]["text"]]

    def step():
        for c in stream:
            parts.append(c["choices"][0]["text"])
            return

    while True:
        n = len(parts)
        t = threading.Thread(target=step)
        t.start()
        t.join(10)
        if len(parts) == n:
            break
    assert "".join(parts) == want
    done = threading.Event()
    threading.Thread(target=lambda: (llm.reset(), done.set()), daemon=True).start()
    assert done.wait(10)


def test_closed_llama_raises_a_clear_error():
    llm = glmoe.Llama(default_model_path(), n_ctx=64, n_threads=1, verbose=False)
    state = llm.save_state()
    stream = llm("In the", max_tokens=4, stream=True)  # not started: fails at its first step
    llm.close()
    llm.close()  # twice is fine
    calls = {
        "__call__": lambda: llm("In the", max_tokens=2),
        "create_completion": lambda: llm.create_completion("In the", max_tokens=2),
        "create_chat_completion": lambda: llm.create_chat_completion([{"role": "user", "content": "Hi"}]),
        "eval": lambda: llm.eval([1, 2]),
        "generate": lambda: next(llm.generate([1, 2])),
        "sample": lambda: llm.sample(),
        "embed": lambda: llm.embed("In the"),
        "create_embedding": lambda: llm.create_embedding("In the"),
        "save_state": llm.save_state,
        "load_state": lambda: llm.load_state(state),
        "reset": llm.reset,
        "set_seed": lambda: llm.set_seed(1),
        "tokenize": lambda: llm.tokenize(b"In the"),
        "detokenize": lambda: llm.detokenize([1]),
        "n_ctx": llm.n_ctx, "n_vocab": llm.n_vocab, "n_embd": llm.n_embd,
        "token_bos": llm.token_bos, "token_eos": llm.token_eos, "token_nl": llm.token_nl,
        "tokenizer": llm.tokenizer,
        "open stream": lambda: next(stream),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="Llama is closed"):
            call()


def test_close_waits_for_an_open_stream():
    llm = glmoe.Llama(default_model_path(), n_ctx=64, n_threads=1, verbose=False)
    stream = llm("In the", max_tokens=40, temperature=0.0, stream=True)
    next(stream)
    closed = threading.Event()
    threading.Thread(target=lambda: (llm.close(), closed.set()), daemon=True).start()
    time.sleep(0.2)
    assert not closed.is_set()
    for _ in stream:  # the stream finishes normally, then close() goes ahead
        pass
    assert closed.wait(10)


@pytest.mark.parametrize("n_threads", [-2, 4097, 10**6, 2**31 - 1, 1.5, "4"])
def test_absurd_thread_counts_are_refused(n_threads):
    with pytest.raises(ValueError, match="n_threads"):
        glmoe.Llama(default_model_path(), n_ctx=64, n_threads=n_threads, verbose=False)


@pytest.mark.parametrize("n_threads", [None, -1, 0, 1])
def test_default_thread_counts_work(n_threads):
    llm = glmoe.Llama(default_model_path(), n_ctx=64, n_threads=n_threads, verbose=False)
    assert 1 <= llm._ctx.n_threads <= max(os.cpu_count() or 1, 1)


@pytest.mark.parametrize("n_threads", [-2, 4097, 2**31 - 1])
def test_core_refuses_absurd_thread_counts(n_threads):
    model = glmoe._core.Model(default_model_path())
    with pytest.raises(ValueError, match="n_threads"):
        glmoe._core.Context(model, 64, n_threads)
    with pytest.raises(ValueError, match="n_threads"):
        glmoe._core.BatchEngine(model, 64, n_threads=n_threads)
