"""The llama-cpp-python-shaped Python front: completion and chat responses, streaming, stop
strings, logprobs, seeds, prefix reuse, state, context overflow, embeddings, and loading the file
(use_mmap, use_mlock)."""
from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import glmoe
import mlock_support
from glmoe import _core
from gguf_edit import copy_gguf
from glmoe.tools.make_model import PRESETS, ModelSpec, write_model
from glmoe.completion import logits_to_logprobs


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("api") / "tiny.gguf")
    write_model(path, ModelSpec(**PRESETS["tiny"]), seed=3)
    return path


@pytest.fixture(scope="module")
def llm(model_path):
    return glmoe.Llama(model_path, n_ctx=256, n_batch=32, n_threads=2, logits_all=True, verbose=False)


def greedy(llm, prompt, n, **kw):
    return llm(prompt, max_tokens=n, temperature=0.0, **kw)


def test_completion_response_shape(llm):
    r = greedy(llm, "Hello there", 6)
    assert r["object"] == "text_completion" and r["id"].startswith("cmpl-")
    assert isinstance(r["created"], int) and r["model"] == llm.model_path
    (choice,) = r["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("length", "stop") and choice["logprobs"] is None
    u = r["usage"]
    assert u["prompt_tokens"] == len(llm.tokenize(b"Hello there")) and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert u["completion_tokens"] <= 6


def test_greedy_equals_argmax_of_eval(llm, model_path):
    """create_completion's greedy tokens are the argmax of a separate Llama's eval() logits."""
    prompt = llm.tokenize(b"The quick brown fox")
    ref = glmoe.Llama(model_path, n_ctx=256, n_threads=1, verbose=False)
    ref.eval(prompt)
    expect = []
    for _ in range(8):
        t = int(np.argmax(ref.scores[ref.n_tokens - 1]))
        if t in llm.tokenizer_.eog_ids:
            break
        expect.append(t)
        ref.eval([t])
    r = greedy(llm, prompt, 8)
    assert r["choices"][0]["text"].encode() == llm.detokenize(expect).decode("utf-8", "ignore").encode()


def test_stream_concatenates_to_the_same_text(llm):
    full = greedy(llm, "abc def", 20)["choices"][0]
    chunks = list(greedy(llm, "abc def", 20, stream=True))
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == full["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["text"]


def test_stop_strings_cut_and_never_leak(llm):
    text = greedy(llm, "Once upon", 30)["choices"][0]["text"]
    assert len(text) > 6
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text[: text.index(stop)]
    r = greedy(llm, "Once upon", 30, stop=[stop, "\x00never"])
    assert r["choices"][0]["text"] == cut and r["choices"][0]["finish_reason"] == "stop"
    chunks = [c["choices"][0]["text"] for c in greedy(llm, "Once upon", 30, stop=stop, stream=True)]
    assert "".join(chunks) == cut
    # No chunk ever carried the beginning of the stop string past the cut.
    streamed = ""
    for piece in chunks:
        streamed += piece
        assert streamed == cut[: len(streamed)]


def test_max_tokens_and_echo(llm):
    r = greedy(llm, "xyz", 3, echo=True)
    assert r["choices"][0]["text"].startswith("xyz")
    assert r["usage"]["completion_tokens"] <= 3
    r0 = greedy(llm, "xyz", 5)
    assert r0["usage"]["completion_tokens"] <= 5


def test_logprobs_match_the_logits(llm, model_path):
    r = greedy(llm, "hello", 4, logprobs=3)
    lp = r["choices"][0]["logprobs"]
    prompt = llm.tokenize(b"hello")
    ref = glmoe.Llama(model_path, n_ctx=64, n_threads=1, verbose=False)
    ref.eval(prompt)
    first = logits_to_logprobs(ref.scores[ref.n_tokens - 1])
    assert abs(lp["token_logprobs"][0] - float(first.max())) < 1e-4  # greedy picks the max
    assert len(lp["top_logprobs"][0]) >= 1 and lp["text_offset"][0] == len("hello")
    with pytest.raises(ValueError, match="logits_all"):
        glmoe.Llama(model_path, n_ctx=64, verbose=False)("hi", max_tokens=2, logprobs=1)


def test_seed_makes_sampling_reproducible(llm):
    a = llm("seed test", max_tokens=12, temperature=1.0, seed=123)["choices"][0]["text"]
    b = llm("seed test", max_tokens=12, temperature=1.0, seed=123)["choices"][0]["text"]
    outs = {llm("seed test", max_tokens=12, temperature=1.0, seed=s)["choices"][0]["text"] for s in range(6)}
    assert a == b and len(outs) > 1


def test_prefix_reuse_does_not_recompute_the_cache(llm):
    llm.reset()
    prompt = llm.tokenize(b"a shared prefix that is long enough to matter")
    greedy(llm, prompt, 2)
    before = llm._ctx.n_evaluated
    greedy(llm, prompt + llm.tokenize(b" and more"), 2)
    evaluated = llm._ctx.n_evaluated - before
    assert evaluated <= len(llm.tokenize(b" and more")) + 2 + 1


def test_context_overflow_is_a_clear_error_and_leaves_state(model_path):
    small = glmoe.Llama(model_path, n_ctx=16, n_threads=1, verbose=False)
    small.eval([1, 2, 3])
    with pytest.raises(ValueError, match="exceed context window of 16"):
        small.eval(list(range(20)))
    assert small.n_tokens == 3
    with pytest.raises(ValueError, match="exceed context window"):
        small("word " * 40, max_tokens=4)


def test_save_and_load_state_restore_generation(llm):
    llm.reset()
    llm.eval(llm.tokenize(b"state test"))
    state = llm.save_state()
    after = greedy(llm, llm.tokenize(b"state test"), 6)["choices"][0]["text"]
    llm.reset()
    llm.eval(llm.tokenize(b"something else entirely"))
    llm.load_state(state)
    assert llm.n_tokens == state.n_tokens
    before = llm._ctx.n_evaluated
    again = greedy(llm, llm.tokenize(b"state test"), 6)["choices"][0]["text"]
    assert again == after
    assert llm._ctx.n_evaluated - before <= 7  # the restored cache was used
    other = glmoe.Llama(llm.model_path, n_ctx=64, verbose=False)
    with pytest.raises(ValueError, match="another size"):
        other.load_state(state)


def test_model_read_into_memory_gives_the_mapped_models_logits(model_path):
    """use_mmap=False (llama.cpp's --no-mmap) reads the file instead of mapping it: same weights."""
    prompt = [1, 5, 9, 200, 3]
    logits = []
    for use_mmap in (True, False):
        llm = glmoe.Llama(model_path, n_ctx=32, use_mmap=use_mmap, verbose=False)
        llm.eval(prompt)
        logits.append(llm.scores[llm.n_tokens - 1].copy())
        # llama.cpp's buffer names in the load log
        assert ("CPU_Mapped model buffer size" in llm._ctx.placement_summary()) == use_mmap
    assert np.array_equal(logits[0], logits[1])
    with pytest.raises(ValueError, match="use_mmap must be True or False"):
        glmoe.Llama(model_path, n_ctx=32, use_mmap="no", verbose=False)


def test_use_mlock_locks_the_models_bytes(model_path, capfd):
    """use_mlock (llama.cpp's --mlock) mlocks the file, mapped or read, while the model lives; where
    Linux refuses (RLIMIT_MEMLOCK without CAP_IPC_LOCK) a warning and the model loads unlocked."""
    size = os.path.getsize(model_path)
    gc.collect()  # no other model's lock is released while this test measures
    before = mlock_support.locked_bytes()
    allowed = mlock_support.may_mlock(os.getpid(), size, before)
    capfd.readouterr()
    for use_mmap in (True, False):
        model = _core.Model(model_path, use_mmap=use_mmap, use_mlock=True)
        grew = mlock_support.locked_bytes() - before
        err = capfd.readouterr().err
        assert model.mlocked == allowed
        if allowed:
            assert grew >= size and "mlock" not in err
        else:
            assert grew == 0 and "warning: failed to mlock" in err and "RLIMIT_MEMLOCK" in err
        del model
        assert mlock_support.locked_bytes() == before  # unmapping the file released the lock
    llm = glmoe.Llama(model_path, n_ctx=32, use_mlock=True, verbose=False)
    assert llm._model.mlocked == allowed and llm._init_args["use_mlock"] is True
    assert not glmoe.Llama(model_path, n_ctx=32, verbose=False)._model.mlocked
    with pytest.raises(ValueError, match="use_mlock must be True or False"):
        glmoe.Llama(model_path, n_ctx=32, use_mlock=1, verbose=False)


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # looked up before any fork


def _drop_cap_ipc_lock():
    """A subprocess's preexec_fn: CAP_IPC_LOCK leaves the bounding set, so the child runs without it
    (PR_CAPBSET_DROP; fails harmlessly unprivileged)."""
    _PRCTL(24, 14, 0, 0, 0)


_MLOCK_CHILD = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from glmoe import _core
from mlock_support import has_cap_ipc_lock
resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
results = []
for path in sys.argv[2:]:
    for use_mmap in (True, False):
        try:
            results.append(_core.Model(path, use_mmap=use_mmap, use_mlock=True).mlocked)
        except Exception as e:
            results.append(str(e))
print(json.dumps({"cap_ipc_lock": has_cap_ipc_lock(), "results": results}))
"""


def run_mlock_child(*paths):
    """Loads each file mapped and read with use_mlock=True in a child with RLIMIT_MEMLOCK 0, started
    without CAP_IPC_LOCK where this process may drop it from the child's bounding set (root).
    Returns the child's stderr, whether it kept CAP_IPC_LOCK, and per load mlocked or the error."""
    p = subprocess.run([sys.executable, "-c", _MLOCK_CHILD, os.path.dirname(__file__), *paths], capture_output=True,
                       text=True, timeout=60, preexec_fn=_drop_cap_ipc_lock)
    assert p.returncode == 0, p.stderr
    child = json.loads(p.stdout)
    return p.stderr, child["cap_ipc_lock"], child["results"]


def test_use_mlock_beyond_rlimit_memlock_warns_and_loads(model_path):
    """With RLIMIT_MEMLOCK 0, mlock fails but for a process with CAP_IPC_LOCK (root's), which Linux
    lets lock past the limit; without it (run_mlock_child) the refusal is tested too."""
    stderr, cap_ipc_lock, mlocked = run_mlock_child(model_path)
    if cap_ipc_lock:
        assert mlocked == [True, True] and "mlock" not in stderr
    else:
        assert mlocked == [False, False]
        warning = f"warning: failed to mlock {os.path.getsize(model_path)}-byte buffer: "
        assert stderr.count(warning) == 2 and "try increasing RLIMIT_MEMLOCK" in stderr


def test_a_model_that_fails_its_checks_is_not_locked_first(model_path, tmp_path):
    """The lock comes after the model's checks: mlock reads a mapped file whole, which for a big
    file refused for a tensor's shape would be minutes before the error. Observed where mlock is
    refused: only the good file's two loads warn."""
    bad = str(tmp_path / "bad.gguf")
    copy_gguf(model_path, bad, replace_tensors={"blk.0.attn_norm.weight": np.ones(95)})
    stderr, cap_ipc_lock, results = run_mlock_child(bad, model_path)
    assert all("'blk.0.attn_norm.weight' has shape [95]" in r for r in results[:2]), results
    assert results[2:] == [cap_ipc_lock] * 2
    assert stderr.count("warning: failed to mlock") == (0 if cap_ipc_lock else 2), stderr


def test_chat_completion_uses_the_template(llm):
    r = llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=4, temperature=0.0)
    assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-")
    msg = r["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str)
    chunks = list(llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=4, temperature=0.0,
                                             stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["finish_reason"] == r["choices"][0]["finish_reason"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == msg["content"]
    with pytest.raises(ValueError, match="messages"):
        llm.create_chat_completion([{"content": "no role"}])


def test_embed_returns_final_hidden_states(model_path):
    emb = glmoe.Llama(model_path, n_ctx=64, embedding=True, verbose=False)
    vecs, n = emb.embed("hello world", return_count=True)
    assert n == len(emb.tokenize(b"hello world")) and len(vecs) == n and len(vecs[0]) == emb.n_embd()
    unit = emb.embed(["a b", "c"], normalize=True)
    assert len(unit) == 2 and abs(np.linalg.norm(unit[0][0]) - 1) < 1e-5
    with pytest.raises(RuntimeError, match="embedding=True"):
        glmoe.Llama(model_path, n_ctx=16, verbose=False).embed("x")


def test_unsupported_arguments_are_refused(llm):
    with pytest.raises(NotImplementedError, match="mirostat_mode"):
        llm("x", max_tokens=1, mirostat_mode=2)
    with pytest.raises(TypeError, match="unexpected keyword"):
        llm("x", max_tokens=1, not_an_argument=1)


def test_llama_cpp_python_constructor_options(model_path, capsys):
    llm = glmoe.Llama(model_path, n_ctx=32, use_mmap=True, flash_attn=True, n_ubatch=64, verbose=True)
    assert "ignoring llama-cpp-python options glmoe does not have: flash_attn\n" in capsys.readouterr().err
    with pytest.raises(TypeError, match="unexpected keyword argument 'n_ctxx'"):
        glmoe.Llama(model_path, n_ctxx=32, verbose=False)
    assert llm.token_nl() == llm.tokenize(b"\n", add_bos=False)[0]
    assert glmoe.Llama.longest_token_prefix([1, 2, 3], [1, 2, 4]) == 2
    lp = glmoe.Llama.logits_to_logprobs(np.array([[0.0, 1.0], [2.0, 2.0]], np.float32))
    assert np.allclose(np.exp(lp).sum(axis=1), 1) and np.allclose(lp[1], np.log(0.5))
    llm.close()


def test_scores_hold_n_batch_rows_without_logits_all(model_path):
    """As llama-cpp-python: n_ctx x n_vocab floats only with logits_all, so a long context is not a
    MemoryError there; the last position's logits stay readable past n_batch tokens."""
    big = glmoe.Llama(model_path, n_ctx=1 << 16, n_batch=16, n_threads=1, verbose=False)
    assert big.scores.shape == (16, big.n_vocab())
    assert glmoe.Llama(model_path, n_ctx=64, n_batch=16, n_threads=1, logits_all=True,
                       verbose=False).scores.shape == (64, big.n_vocab())
    prompt = big.tokenize(b"The quick brown fox jumps over the lazy dog, again and again and again")
    assert len(prompt) > 16
    ref = glmoe.Llama(model_path, n_ctx=128, n_threads=1, logits_all=True, verbose=False)
    ref.eval(prompt)
    big.eval(prompt)
    (last,) = big.eval_logits
    assert np.array_equal(np.asarray(last, np.float32), ref.scores[len(prompt) - 1])
    state = big.save_state()
    assert state.scores.shape == (16, big.n_vocab())
    want = [t for t, _ in zip(big.generate(prompt + [11], temp=0.0), range(6))]
    assert want == [t for t, _ in zip(ref.generate(prompt + [11], temp=0.0), range(6))]
    big.load_state(state)
    assert np.array_equal(np.asarray(big.eval_logits[0], np.float32), ref.scores[len(prompt) - 1])
    assert big.sample(temp=0.0) == int(np.argmax(ref.scores[len(prompt) - 1]))


@pytest.mark.parametrize("share", [1.5, float("nan")])
def test_a_gpu_expert_share_outside_0_1_is_refused(model_path, share):
    with pytest.raises(ValueError, match="gpu_expert_share"):
        glmoe.Llama(model_path, n_ctx=32, gpu_expert_share=share, verbose=False)


def test_gpu_expert_share_is_kept_for_pickling(model_path):
    llm = glmoe.Llama(model_path, n_ctx=32, gpu_expert_share=0.25, verbose=False)
    assert llm.gpu_expert_share == 0.25 and llm.__getstate__()["gpu_expert_share"] == 0.25


def test_a_completion_detokenizes_each_token_once(model_path):
    # Each step adds its own piece to the text (pieces are context-free): a long completion must not
    # detokenize the whole text again at every token (that made streaming quadratic).
    llm = glmoe.Llama(model_path, n_ctx=512, verbose=False)
    calls = []
    detokenize = llm.detokenize

    def counting(tokens, *args, **kwargs):
        calls.append(len(tokens))
        return detokenize(tokens, *args, **kwargs)

    llm.detokenize = counting
    texts = []
    for stream in (False, True):
        calls.clear()
        out = llm.create_completion("In the beginning", max_tokens=120, temperature=0, stream=stream, stop=["zzzz"])
        texts.append("".join(c["choices"][0]["text"] for c in out) if stream else out["choices"][0]["text"])
        assert all(n == 1 for n in calls) and 100 <= len(calls) <= 120, (stream, len(calls))
    assert texts[0] == texts[1] and len(texts[0]) > 100  # the same greedy text both ways
