"""llama-server against hostile and careless clients: clear 4xx answers with OpenAI's error body
(connections: test_server_connections.py; a soak of all of it: test_server_soak.py)."""
from __future__ import annotations

import socket
import time

import httpx
import pytest

import server_harness as harness


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = harness.ServerProcess(harness.make_tiny_model(tmp_path_factory.mktemp("hostile-model")))
    yield srv
    srv.stop()


def _post(server, path, body=None, raw=None):
    kw = {"content": raw} if raw is not None else {"json": body}
    return httpx.post(server.url + path, headers=dict(server.headers(), **{"Content-Type": "application/json"}),
                      timeout=60, **kw)


def _assert_400(r, param=None):
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param, err


@pytest.mark.parametrize("raw", [b"{", b"not json", b"", b"[1, 2", b"\xff\xfe", b"null", b"[]", b"42"])
def test_malformed_json(server, raw):
    _assert_400(_post(server, "/v1/chat/completions", raw=raw))
    _assert_400(_post(server, "/v1/completions", raw=raw))


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "temperature": -0.5}, "temperature"),  # OpenAI's range: 0 (greedy) .. 2
    ({"prompt": "x", "temperature": 1e308}, "temperature"),
    ({"prompt": "x", "top_p": 5}, "top_p"),
    ({"prompt": "x", "top_k": -3}, "top_k"),
    ({"prompt": "x", "min_p": -1}, "min_p"),
    ({"prompt": "x", "repeat_penalty": 0}, "repeat_penalty"),
    ({"prompt": "x", "presence_penalty": 1e9}, "presence_penalty"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "x", "n": 5}, "n"),  # more choices than slots
    ({"prompt": "x", "seed": -7}, "seed"),
    ({"prompt": "x", "logit_bias": {"1": 1e6}}, "logit_bias.1"),
    ({"prompt": {"a": 1}}, None),
    ({"prompt": [-1, 2]}, None),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({}, "prompt"),
])
def test_bad_completion_fields(server, body, param):
    _assert_400(_post(server, "/v1/completions", body), param)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_numbers(server, literal):
    raw = b'{"prompt": "x", "temperature": ' + literal + b"}"
    _assert_400(_post(server, "/v1/completions", raw=raw), "temperature")


@pytest.mark.parametrize("body", [
    {"messages": "hello"},
    {"messages": []},
    {"messages": [{"role": "wizard", "content": "x"}]},
    {"messages": [{"content": "x"}]},
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{nope"}}]}]},
    {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {}}]},
    {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}},
    {"messages": [{"role": "user", "content": "x"}], "stream": "yes please"},
])
def test_bad_chat_fields(server, body):
    _assert_400(_post(server, "/v1/chat/completions", body))


def test_prompt_over_context(server):
    r = _post(server, "/v1/completions", {"prompt": "word " * harness.N_CTX, "max_tokens": 4})
    _assert_400(r)
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = _post(server, "/v1/completions", {"prompt": "word " * harness.N_CTX, "max_tokens": 4, "stream": True})
    _assert_400(r)  # refused before the stream starts


def test_huge_max_tokens_is_capped(server):
    """As llama.cpp: capped at the room the slot has left, finish_reason "length"."""
    r = _post(server, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 10**15, "temperature": 0,
                                          "logit_bias": {str(t): -100 for t in range(8)}})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["completion_tokens"] <= harness.N_CTX // harness.N_PARALLEL - 3


def test_wrong_method_and_content_length(server):
    r = httpx.get(server.url + "/v1/completions", headers=server.headers())
    assert r.status_code == 405 and "error" in r.json()
    # A body announced as ~100 GB is refused from its headers, before anything is read.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + harness.API_KEY.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: 99999999999\r\n\r\n{}")
        assert s.recv(4096).split(b"\r\n", 1)[0] == b"HTTP/1.1 413 Request Entity Too Large"


# --- issue 19: bounded work before any work -------------------------------------------------------------

def _assert_error(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error", err
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err


def _health_latency_while(server, fn):
    """fn()'s answer and the slowest /health answer while it ran."""
    import threading

    result, worst = [], 0.0
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    while thread.is_alive():
        t0 = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        worst = max(worst, time.monotonic() - t0)
        time.sleep(0.05)
    thread.join()
    return result[0], worst


def test_oversized_bodies_refused_at_once(server):
    """A 20 MB chat request (before: 24 s with /health frozen, then a 400) is a 413 from its headers."""
    big = "hello world " * (20_000_000 // 12)
    t0 = time.monotonic()
    for path, body in [("/v1/chat/completions", {"messages": [{"role": "user", "content": big}]}),
                       ("/v1/completions", {"prompt": big}), ("/tokenize", {"content": big})]:
        r = _post(server, path, body)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    assert time.monotonic() - t0 < 10


def _chunked(server, path, n_bytes):
    """Sends a chunked body (no Content-Length) of n_bytes whose end never comes; the status line."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {harness.API_KEY}\r\n"
                  "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b'{"content": "' + b"a" * (64 << 10)
        sent = 0
        try:
            while sent < n_bytes:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                chunk = b"a" * (64 << 10)
        except OSError:
            pass
        return s.recv(4096).split(b"\r\n", 1)[0]


def test_chunked_body_limit(server):
    """No Content-Length: the bytes are counted as they arrive (before: read whole, whatever its size)."""
    assert _chunked(server, "/tokenize", 2 << 20) == b"HTTP/1.1 413 Request Entity Too Large"
    assert _chunked(server, "/v1/chat/completions", 2 << 20) == b"HTTP/1.1 413 Request Entity Too Large"
    assert _post(server, "/tokenize", {"content": "still here"}).status_code == 200


def test_prompt_longer_than_any_slot_refused_before_tokenizing(server):
    """Under the body limit but more bytes than a slot's tokens can spell (before: tokenized on the
    way to the same 400, holding the GIL; /health waited)."""
    text = "hello world " * 70_000  # 840 kB: > 1024 tokens * the longest piece of the tiny vocabulary
    r, worst = _health_latency_while(server, lambda: _post(server, "/v1/completions", {"prompt": text}))
    _assert_error(r, 400, "prompt", "context_length_exceeded")
    assert "bytes" in r.json()["error"]["message"]
    r, worst_chat = _health_latency_while(
        server, lambda: _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}))
    _assert_error(r, 400, "messages", "context_length_exceeded")
    many = [{"role": "user", "content": "hi"}] * 20_000  # 700 kB
    r = _post(server, "/v1/chat/completions", {"messages": many})
    _assert_error(r, 400, "messages", "context_length_exceeded")
    assert max(worst, worst_chat) < 1.0


LOOPING_TEMPLATE = (
    "{% if mode == 'loop' %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    "{% elif mode == 'balloon' %}{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}"
    "{% elif mode == 'huge' %}{{ 'x' * 10000000000 }}"
    "{% elif mode == 'ljust' %}{{ 'x'.ljust(10000000000) }}"
    "{% elif mode == 'center' %}{{ 'x' | center(10000000000) }}"
    "{% elif mode == 'format' %}{{ '%10000000000s' % 'x' }}"
    "{% elif mode == 'recurse' %}{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}"
    "{% else %}{% for m in messages %}<|user|>{{ m.content }}{% endfor %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def template_server(tmp_path_factory):
    srv = harness.ServerProcess(harness.make_tiny_model(tmp_path_factory.mktemp("template-model")),
                                "--chat-template", LOOPING_TEMPLATE)
    yield srv
    srv.stop()


@pytest.mark.parametrize("mode", ["loop", "balloon", "huge", "ljust", "center", "format", "recurse"])
def test_template_that_loops_or_balloons_is_stopped(template_server, mode):
    """Before: "loop" ran for hours on the event loop (no /health), "balloon" built 10 GB, "huge"
    tried to allocate 10 GB at once. Now: a 400 within the time limit, /health answering meanwhile."""
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "chat_template_kwargs": {"mode": mode}}
    t0 = time.monotonic()
    r, worst = _health_latency_while(template_server, lambda: _post(template_server, "/v1/chat/completions", body))
    _assert_error(r, 400, "messages")
    assert time.monotonic() - t0 < 15 and worst < 1.0
    body["chat_template_kwargs"] = {"mode": "plain"}
    assert _post(template_server, "/v1/chat/completions", body).status_code == 200


# --- issue 19: client errors are 4xx with OpenAI's error body ---------------------------------------------

@pytest.mark.parametrize("path,raw,param", [
    ("/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"prompt": ["a\\udfffb"], "max_tokens": 2}', "prompt.0"),
    ("/v1/completions", b'{"prompt": "a", "stop": ["\\ud800"], "max_tokens": 2}', "stop.0"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\uDBFF"}]}]}',
     "messages.0.content.0.text"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", '
                             b'"function": {"name": "f", "description": "\\udc00"}}]}', "tools.0.function.description"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", '
                             b'"function": {"name": "f", "parameters": {"properties": {"\\ud800": {}}}}}]}',
     "tools.0.function.parameters.properties"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": '
                             b'{"k": "\\ud800"}}', "chat_template_kwargs.k"),
    ("/tokenize", b'{"content": "\\ud800"}', "content"),
])
def test_lone_surrogates(server, path, raw, param):
    """Before: 500 "UnicodeEncodeError: ..." for prompt, content, tools and /tokenize; 200 for stop."""
    _assert_error(_post(server, path, raw=raw), 400, param)


def test_surrogate_pair_is_text(server):
    raw = b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}], "max_tokens": 2}'
    assert _post(server, "/v1/chat/completions", raw=raw).status_code == 200


@pytest.mark.parametrize("body,param", [
    # Before: 500 "AttributeError: 'list' object has no attribute 'items'" (the tool-call parser, after generating).
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": [1]}}}]},
     "tools.0.function.parameters"),
    # Before: 200, the malformed schema in the prompt.
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"required": "a"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": 5}}}}]},
     "tools.0.function.parameters"),
    # Before: 500 "AttributeError: 'int' object has no attribute 'get'".
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": 5}]}]}, "messages.0.tool_calls.0.function"),
    # Before: 400 with Python's "render_chat() got multiple values for argument 'messages'".
    ({"chat_template_kwargs": {"messages": 5}}, "chat_template_kwargs"),
])
def test_malformed_tools_and_template_inputs(server, body, param):
    body = dict({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}, **body)
    _assert_error(_post(server, "/v1/chat/completions", body), 400, param)


def _token_of(server, text):
    ids = _post(server, "/tokenize", {"content": text}).json()["tokens"]
    assert len(ids) == 1
    return ids[0]


def test_logit_bias_is_honoured(server):
    """Before: dropped (a +100 bias changed nothing). OpenAI's string keys, as token ids."""
    token = _token_of(server, "Q")
    for path, body in [("/v1/completions", {"prompt": [1, 2, 3]}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}]})]:
        base = dict(body, max_tokens=4, temperature=0)
        r = _post(server, path, dict(base, logit_bias={str(token): 100}))
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert (choice["text"] if "text" in choice else choice["message"]["content"]) == "QQQQ"
    # and a ban: the token a greedy completion emits first never comes
    plain = _post(server, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 1, "temperature": 0}).json()
    first = _post(server, "/tokenize", {"content": plain["choices"][0]["text"]}).json()["tokens"]
    if len(first) == 1:
        banned = _post(server, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 1, "temperature": 0,
                                                   "logit_bias": {str(first[0]): -100}}).json()
        assert banned["choices"][0]["text"] != plain["choices"][0]["text"]


@pytest.mark.parametrize("bias", [{"99999999": 1}, {"-1": 1}, {"abc": 1}, {"1.5": 1}])
def test_logit_bias_outside_vocabulary(server, bias):
    """Before: 200, the bias silently dropped."""
    _assert_error(_post(server, "/v1/completions", {"prompt": "a", "max_tokens": 2, "logit_bias": bias}), 400,
                  "logit_bias")
    _assert_error(_post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                                         "max_tokens": 2, "logit_bias": bias}), 400, "logit_bias")


# --- issue 19: connections ---------------------------------------------------------------------------------

def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "glmoe.server", *args], capture_output=True, text=True, timeout=60)


def test_busy_port_is_a_clean_error(server):
    """Before: uvicorn's error after the model started loading, then exit status 3 and a nanobind leak report."""
    p = _cli("--host", "127.0.0.1", "--port", str(server.port))
    assert p.returncode == 1, p.stderr
    assert "cannot listen on 127.0.0.1" in p.stderr and "Traceback" not in p.stderr and "leak" not in p.stderr


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_bad_port_is_a_usage_error(port):
    """Before: exit 1 with an OverflowError traceback from asyncio."""
    p = _cli("--port", port)
    assert p.returncode == 2 and "a port is 0 to 65535" in p.stderr and "Traceback" not in p.stderr
