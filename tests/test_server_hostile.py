"""llama-server against hostile and careless clients: clear 4xx answers with OpenAI's error
body, and a bounded soak (connections opening and dropping mid-stream, garbage on raw sockets,
normal requests alongside) after which the server still answers the same, the KV cache is
empty again, and its memory has not grown past a bound."""
from __future__ import annotations

import asyncio
import random
import socket
import time

import httpx
import pytest

import server_harness as harness

SOAK_SECONDS = 15
RSS_GROWTH_BOUND = 48 << 20  # after warm-up; thread stacks and allocator pools settle within it


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
    ({"prompt": "x", "n": 3}, "n"),
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
    _assert_400(_post(server, "/v1/completions", raw=b'{"prompt": "x", "temperature": ' + literal + b"}"), "temperature")


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


async def _drop_mid_stream(url, headers, rng):
    body = {"prompt": f"drop {rng.random()}", "max_tokens": 64, "stream": True}
    try:
        async with httpx.AsyncClient(timeout=30) as c:
            async with c.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
                async for _ in r.aiter_raw():
                    if rng.random() < 0.5:
                        break
    except httpx.HTTPError:
        pass


async def _raw_garbage(port, rng):
    """Connects and sends nothing, half a request line, or a request whose body never comes."""
    junk = [b"", b"POST /v1/completions HT", b"POST /v1/completions HTTP/1.1\r\nContent-Length: 500\r\n\r\n{",
            b"\x16\x03\x01\x00\xa5garbage", b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 50]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(rng.choice(junk))
        await writer.drain()
        await asyncio.sleep(rng.random() * 0.2)
        writer.transport.abort()
    except OSError:
        pass


async def _soak(server, seconds, expected):
    rng = random.Random(0)
    headers = server.headers()
    deadline = time.monotonic() + seconds
    n_checked = 0

    async def droppers():
        while time.monotonic() < deadline:
            await asyncio.gather(*(_drop_mid_stream(server.url, headers, rng) for _ in range(8)),
                                 *(_raw_garbage(server.port, rng) for _ in range(16)))

    async def checker():
        nonlocal n_checked
        async with httpx.AsyncClient(timeout=60) as c:
            while time.monotonic() < deadline:
                r = await c.post(server.url + "/v1/completions", headers=headers, json=expected[0])
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected[1]
                n_checked += 1

    await asyncio.gather(droppers(), droppers(), checker())
    return n_checked


def _kv_cells_used(server) -> float:
    text = httpx.get(server.url + "/metrics", headers=server.headers()).text
    return float(next(l.split()[1] for l in text.splitlines() if l.startswith("llamacpp:kv_cache_tokens")))


def test_soak_connections_dropping(server):
    request = {"prompt": "The steady client", "max_tokens": 8, "temperature": 0}
    expected_text = _post(server, "/v1/completions", request).json()["choices"][0]["text"]
    asyncio.run(_soak(server, 2, (request, expected_text)))  # warm-up: threads, pools, caches
    rss_before = server.rss_bytes()
    n_checked = asyncio.run(_soak(server, SOAK_SECONDS, (request, expected_text)))
    assert n_checked >= 3
    deadline = time.monotonic() + 10
    while _kv_cells_used(server) != 0:  # cancelled requests leave their slots
        assert time.monotonic() < deadline, "KV cells still in use after the soak"
        time.sleep(0.1)
    assert _post(server, "/v1/completions", request).json()["choices"][0]["text"] == expected_text
    growth = server.rss_bytes() - rss_before
    print(f"soak: {n_checked} checked requests; RSS {rss_before >> 20} MiB, growth {growth / 2**20:.1f} MiB")
    assert growth < RSS_GROWTH_BOUND
