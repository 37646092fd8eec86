"""llama.cpp's own llama-server endpoints on a tiny random model: /completion (string, token and
mixed prompts, streaming, stop words, logit_bias, the fields refused or accepted when off), /props,
/apply-template, the embeddings endpoints (--embedding, --pooling, checked against Llama.embed),
CORS and the public /models, as llama.cpp's server tests expect them."""
from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest

import server_harness as harness

N_EMBD = 64  # the tiny preset's


@pytest.fixture(scope="module")
def token_server(model_path):
    """--embedding with the model's pooling (none: per-token rows), and sampling flags /props reports."""
    srv = harness.ServerProcess(model_path, "--embedding", "--temp", "0.7", "-n", "32")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def pooled_server(model_path):
    srv = harness.ServerProcess(model_path, "--embeddings", "--pooling", "mean")
    yield srv
    srv.stop()


def post(srv, path, body, **kw):
    return httpx.post(srv.url + path, json=body, headers=srv.headers(), timeout=60, **kw)


def complete(srv, **body):
    r = post(srv, "/completion", {"temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def tokenize(srv, text, add_special=False):
    return post(srv, "/tokenize", {"content": text, "add_special": add_special}).json()["tokens"]


def sse_lines(response):
    """The stream's non-empty lines as (field, JSON value)."""
    out = []
    for line in response.text.split("\n"):
        if line:
            field, _, value = line.partition(": ")
            out.append((field, json.loads(value)))
    return out


def test_completion_greedy_text_equals_v1_completions(server):
    native = complete(server, prompt="Once upon a time", n_predict=12)
    r = post(server, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0})
    openai_shape = r.json()
    assert native["content"] == openai_shape["choices"][0]["text"] and native["stop"] is True
    assert native["tokens_predicted"] == openai_shape["usage"]["completion_tokens"]
    n_prompt = len(tokenize(server, "Once upon a time"))
    assert native["tokens_evaluated"] == openai_shape["usage"]["prompt_tokens"] == n_prompt
    reason = openai_shape["choices"][0]["finish_reason"]
    assert native["stop_type"] == ("limit" if reason == "length" else "eos") and native["stopping_word"] == ""
    assert native["model"] == "tiny" and native["prompt"] == "Once upon a time" and native["truncated"] is False
    assert native["timings"]["predicted_n"] == native["tokens_predicted"] and native["timings"]["cache_n"] == 0
    settings = native["generation_settings"]
    assert settings["n_predict"] == 12 and settings["temperature"] == 0
    assert settings["n_ctx"] == harness.N_CTX // harness.N_PARALLEL


def test_stream_adds_up_to_the_non_streamed_completion(server):
    full = complete(server, prompt="In the beginning", n_predict=10, return_tokens=True)
    assert len(full["tokens"]) == full["tokens_predicted"]
    r = post(server, "/completion", {"prompt": "In the beginning", "n_predict": 10, "temperature": 0, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_lines(r)
    assert all(field == "data" for field, _ in events) and "[DONE]" not in r.text  # llama.cpp's native stream
    chunks, last = [e for _, e in events[:-1]], events[-1][1]
    assert all(c["stop"] is False for c in chunks) and last["stop"] is True
    assert "".join(c["content"] for c in chunks) == full["content"] and last["content"] == ""
    streamed = [t for c in chunks for t in c["tokens"]]
    assert streamed and streamed == full["tokens"][:len(streamed)]
    assert [c["tokens_predicted"] for c in chunks] == sorted(c["tokens_predicted"] for c in chunks)
    for key in ("tokens_predicted", "tokens_evaluated", "stop_type", "stopping_word"):
        assert last[key] == full[key]
    assert last["timings"]["predicted_n"] == full["tokens_predicted"]


def test_token_and_mixed_prompts(server):
    head, tail = tokenize(server, "Once upon", add_special=True), tokenize(server, " a time")
    by_ids = complete(server, prompt=head + tail, n_predict=8)
    mixed = complete(server, prompt=["Once upon", *tail], n_predict=8)
    assert mixed["content"] == by_ids["content"] and mixed["tokens_evaluated"] == by_ids["tokens_evaluated"]
    assert by_ids["prompt"] == "Once upon a time"
    several = post(server, "/completion", {"prompt": ["Once upon a time", head + tail], "n_predict": 8,
                                           "temperature": 0}).json()
    assert [s["index"] for s in several] == [0, 1]
    assert several[1]["content"] == by_ids["content"] == several[0]["content"]


@pytest.mark.parametrize("prompt, param", [
    ([5, 512], "prompt"), ([], "prompt"), ([1.5, 2], "prompt.0"), ([True, 3], "prompt.0"), ({"a": 1}, "prompt"),
    (["ok", [1, None]], "prompt.1"), ("", "prompt"),
])
def test_bad_prompts_are_400(server, prompt, param):
    r = post(server, "/completion", {"prompt": prompt, "n_predict": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_streaming_several_prompts_is_refused(server):
    r = post(server, "/completion", {"prompt": ["a", "b"], "stream": True})
    assert r.status_code == 400 and "one request per prompt" in r.json()["error"]["message"]


def test_stop_word_n_predict_0_and_response_fields(server):
    text = complete(server, prompt="abc", n_predict=24, ignore_eos=True)["content"]
    assert len(text) >= 4
    stop = text[2:4]
    cut = complete(server, prompt="abc", n_predict=24, ignore_eos=True, stop=[stop])
    assert cut["content"] == text[:text.index(stop)]
    assert cut["stop_type"] == "word" and cut["stopping_word"] == stop
    none = complete(server, prompt="abc", n_predict=0)
    assert none["content"] == "" and none["tokens_predicted"] == 0 and none["stop_type"] == "limit"
    streamed_none = sse_lines(post(server, "/completion", {"prompt": "abc", "n_predict": 0, "stream": True}))
    assert len(streamed_none) == 1 and streamed_none[0][1]["stop"] is True
    assert complete(server, prompt="abc", max_tokens=3, ignore_eos=True)["tokens_predicted"] == 3  # llama.cpp's alias
    picked = complete(server, prompt="abc", n_predict=3, return_tokens=True,
                      response_fields=["content", "generation_settings/n_predict", "nothing/here"])
    assert set(picked) == {"content", "generation_settings/n_predict"} and picked["generation_settings/n_predict"] == 3


def test_logit_bias_forms(server):
    first = complete(server, prompt="Once upon a time", n_predict=1, return_tokens=True)["tokens"][0]
    for bias in ([[first, False]], {str(first): -100}, [[first, -1e9]]):
        out = complete(server, prompt="Once upon a time", n_predict=1, return_tokens=True, logit_bias=bias)
        assert out["tokens"][0] != first, bias
    banned = complete(server, prompt="Once upon a time", n_predict=1, logit_bias=[[first, False]])
    assert banned["generation_settings"]["logit_bias"] == [[first, False]]
    text = post(server, "/detokenize", {"tokens": [first]}).json()["content"]
    by_text = complete(server, prompt="Once upon a time", n_predict=1, return_tokens=True, logit_bias=[[text, False]])
    assert first not in by_text["tokens"]
    boosted = complete(server, prompt="Once upon a time", n_predict=4, return_tokens=True, logit_bias=[[77, 50]])
    assert boosted["tokens"] == [77] * 4
    for bad in ([[512, 1.0]], [[1, True]], [[1]], "x", [[1, "high"]]):
        r = post(server, "/completion", {"prompt": "x", "logit_bias": bad})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("logit_bias"), bad


@pytest.mark.parametrize("field, value", [
    ("mirostat", 2), ("dry_multiplier", 0.8),
    ("xtc_probability", 0.5), ("dynatemp_range", 0.5), ("top_n_sigma", 1.5), ("n_indent", 4),
    ("lora", [{"id": 0, "scale": 1.0}]), ("t_max_predict_ms", 500), ("min_keep", 3), ("n_cmpl", 9),
    ("grammar_lazy", True), ("n_probs", 21), ("samplers", ["top_p", "top_k"]),
    ("samplers", "kp"), ("samplers", ["top_k", "nope"]),
])
def test_fields_glmoe_cannot_honour_are_400_naming_them(server, field, value):
    r = post(server, "/completion", {"prompt": "x", field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"]


def test_fields_left_off_and_speed_hints_are_accepted(server):
    """What llama.cpp clients send by default changes nothing, so it runs (and gives the same text)."""
    plain = complete(server, prompt="Once upon a time", n_predict=6)["content"]
    off = complete(server, prompt="Once upon a time", n_predict=6, grammar="", mirostat=0, mirostat_tau=5.0,
                   dry_multiplier=0, dry_base=1.75, xtc_probability=0, xtc_threshold=0.1, dynatemp_range=0,
                   top_n_sigma=-1, n_indent=0, lora=[], samplers="edskypmxt", n_probs=0, cache_prompt=True,
                   id_slot=-1, n_keep=0, timings_per_token=False, post_sampling_probs=False, min_keep=0)
    assert off["content"] == plain
    listed = complete(server, prompt="Once upon a time", n_predict=6, samplers=[
        "penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature"])
    assert listed["content"] == plain


def test_sampling_fields_reach_the_sampler(server):
    """Seeded sampling is reproducible and differs from greedy for some seed; top_k 1 is greedy."""
    greedy = complete(server, prompt="Once upon a time", n_predict=12)["content"]
    sampled = [complete(server, prompt="Once upon a time", n_predict=12, temperature=1.5, seed=s, top_k=-1, min_p=0.0,
                        top_p=1.0, repeat_penalty=1.1, presence_penalty=0.5)["content"] for s in (1, 1, 2, 3)]
    assert sampled[0] == sampled[1] and any(s != greedy for s in sampled)
    top1 = complete(server, prompt="Once upon a time", n_predict=12, temperature=1.5, seed=7, top_k=1)["content"]
    assert top1 == greedy
    assert complete(server, prompt="Once upon a time", n_predict=12, temperature=-1)["content"] == greedy


def test_props(server, token_server):
    props = httpx.get(server.url + "/props", headers=server.headers()).json()
    assert props["total_slots"] == harness.N_PARALLEL and props["model_alias"] == "tiny"
    assert props["model_path"].endswith("tiny.gguf") and props["build_info"].startswith("glmoe")
    assert "[gMASK]" in props["chat_template"] and props["endpoint_props"] is False
    defaults = props["default_generation_settings"]
    assert defaults["n_ctx"] == harness.N_CTX // harness.N_PARALLEL
    assert defaults["params"]["temperature"] == 0.8 and defaults["params"]["n_predict"] == -1  # llama.cpp's
    flagged = httpx.get(token_server.url + "/props", headers=token_server.headers()).json()
    params = flagged["default_generation_settings"]["params"]
    assert params["temperature"] == pytest.approx(0.7) and params["n_predict"] == 32
    # -n is also what /completion runs with when the request gives no n_predict.
    assert complete(token_server, prompt="abc", ignore_eos=True)["tokens_predicted"] == 32
    r = post(server, "/props", {})
    assert r.status_code == 501 and "--props" in r.json()["error"]["message"]


def test_apply_template_is_the_chat_prompt(server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    prompt = post(server, "/apply-template", {"messages": messages, "tools": tools}).json()["prompt"]
    assert prompt.startswith("[gMASK]") and "Hi there" in prompt and "get_weather" in prompt
    chat = post(server, "/v1/chat/completions", {"messages": messages, "tools": tools, "max_tokens": 1}).json()
    assert chat["usage"]["prompt_tokens"] == len(tokenize(server, prompt))
    r = post(server, "/apply-template", {"messages": []})
    assert r.status_code == 400


def test_embeddings_need_the_flag(server):
    for path in ("/embedding", "/embeddings", "/v1/embeddings"):
        r = post(server, path, {"input": "hello"})
        assert r.status_code == 501 and "--embeddings" in r.json()["error"]["message"], path


def test_per_token_embeddings_equal_llama_embed(token_server, model_path):
    from glmoe import Llama

    llm = Llama(model_path, embedding=True, n_ctx=512, verbose=False)
    expected = np.asarray(llm.embed("hello world"))
    for path, body in (("/embedding", {"content": "hello world"}), ("/embeddings", {"input": ["hello world"]})):
        out = post(token_server, path, body).json()
        assert [o["index"] for o in out] == [0]
        rows = np.asarray(out[0]["embedding"])
        assert rows.shape == (len(tokenize(token_server, "hello world", True)), N_EMBD)
        np.testing.assert_allclose(rows, expected, rtol=1e-5, atol=1e-6)
    r = post(token_server, "/v1/embeddings", {"input": "hello"})
    assert r.status_code == 400 and "Pooling type 'none'" in r.json()["error"]["message"]
    r = post(token_server, "/embedding", {"content": "hello", "embd_normalize": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "embd_normalize"


def test_pooled_embeddings(pooled_server, token_server):
    texts = ["hello", "the word"]
    rows = [np.asarray(post(token_server, "/embedding", {"content": t}).json()[0]["embedding"]) for t in texts]
    out = post(pooled_server, "/v1/embeddings", {"input": texts, "model": "x"}).json()
    assert out["object"] == "list" and [d["index"] for d in out["data"]] == [0, 1]
    n_tokens = sum(len(tokenize(pooled_server, t, True)) for t in texts)
    assert out["usage"] == {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
    for got, r in zip(out["data"], rows):
        mean = r.mean(axis=0)
        np.testing.assert_allclose(got["embedding"], mean / np.linalg.norm(mean), rtol=1e-4, atol=1e-6)
    b64 = post(pooled_server, "/v1/embeddings", {"input": texts[0], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, out["data"][0]["embedding"], rtol=1e-6)
    raw = post(pooled_server, "/embedding", {"content": texts[0], "embd_normalize": -1}).json()
    np.testing.assert_allclose(raw[0]["embedding"], [rows[0].mean(axis=0)], rtol=1e-4, atol=1e-6)
    taxicab = np.asarray(post(pooled_server, "/embedding", {"content": texts[0], "embd_normalize": 1}).json()[0]
                         ["embedding"][0])
    assert np.abs(taxicab).sum() == pytest.approx(1.0, rel=1e-5)
    by_ids = post(pooled_server, "/v1/embeddings", {"input": tokenize(pooled_server, texts[0], True)}).json()
    np.testing.assert_allclose(by_ids["data"][0]["embedding"], out["data"][0]["embedding"], rtol=1e-6)
    # "content" is llama.cpp's field: /v1/embeddings then answers in llama.cpp's own shape.
    assert isinstance(post(pooled_server, "/v1/embeddings", {"content": "hello"}).json(), list)


@pytest.mark.parametrize("body, param", [
    ({}, None), ({"input": ""}, "input"), ({"input": [1, 99999]}, "input"), ({"input": "x", "dimensions": 8},
                                                                               "dimensions"),
    ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
    ({"input": [1] * (harness.N_CTX // harness.N_PARALLEL + 1)}, "input"),
])
def test_bad_embedding_requests_are_400(pooled_server, body, param):
    r = post(pooled_server, "/v1/embeddings", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_cors_as_llama_cpp(server):
    # llama.cpp's test_security.py: a preflight needs no key and allows the asking origin.
    r = httpx.options(server.url + "/completions", headers={
        "Origin": "web.mydomain.fr", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "Authorization"})
    assert r.status_code == 200
    assert r.headers["Access-Control-Allow-Origin"] == "web.mydomain.fr"
    assert r.headers["Access-Control-Allow-Credentials"] == "true"
    assert r.headers["Access-Control-Allow-Methods"] == "GET, POST"
    assert r.headers["Access-Control-Allow-Headers"] == "*"
    ok = httpx.post(server.url + "/completion", json={"prompt": "x", "n_predict": 1},
                    headers={**server.headers(), "Origin": "http://localhost"})
    assert ok.status_code == 200 and ok.headers["Access-Control-Allow-Origin"] == "http://localhost"
    refused = httpx.post(server.url + "/completion", json={"prompt": "x"}, headers={"Origin": "http://a.b"})
    assert refused.status_code == 401 and refused.headers["Access-Control-Allow-Origin"] == "http://a.b"
    assert httpx.get(server.url + "/health").headers["Access-Control-Allow-Origin"] == "*"


def test_models_public_and_the_rest_behind_the_key(server):
    for path in ("/models", "/v1/models"):
        r = httpx.get(server.url + path)
        assert r.status_code == 200 and "error" not in r.json() and r.json()["data"][0]["id"] == "tiny"
    for method, path in (("POST", "/completion"), ("GET", "/props"), ("POST", "/apply-template"),
                         ("POST", "/v1/embeddings"), ("POST", "/embedding")):
        r = httpx.request(method, server.url + path, json={})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", path
    metrics = httpx.get(server.url + "/metrics", headers=server.headers()).text
    assert 'route="/completion",status="200"' in metrics and 'route="/completion",status="401"' in metrics
