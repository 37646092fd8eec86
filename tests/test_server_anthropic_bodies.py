"""Big Anthropic /v1/messages bodies are parsed off the event loop, as the app's other routes
(json_routes.OffLoopJSONRoute): /health keeps answering while they are processed."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

import server_harness as harness
from glmoe.server import anthropic
from glmoe.server.json_routes import PARSE_IN_THREAD_BYTES

HEADERS = {"x-api-key": harness.API_KEY, "anthropic-version": "2023-06-01", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = harness.ServerProcess(harness.make_tiny_model(tmp_path_factory.mktemp("anthropic-bodies")))
    yield srv
    srv.stop()


def _health(server) -> float:
    t0 = time.monotonic()
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    return time.monotonic() - t0


def _big_body(n_blocks: int) -> bytes:
    """About 1 MB: a conversation of many short text blocks (the most JSON items per byte an
    Anthropic client sends), far more text than a slot's context."""
    blocks = [{"type": "text", "text": f"line {i}"} for i in range(n_blocks)]
    return json.dumps({"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": blocks}]}).encode()


def test_big_message_bodies_are_parsed_in_a_thread(monkeypatch):
    """The Anthropic routes hand a body over PARSE_IN_THREAD_BYTES to a thread, as the app's other
    routes do (before: json.loads on the event loop, through FastAPI's own APIRoute)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from glmoe.server import json_routes

    parsed_in_thread, real_loads = [], json.loads
    prompts = []

    async def spy(fn, *args):  # json.loads, maybe patched below: the real one runs
        parsed_in_thread.append(len(args[0]))
        return real_loads(*args)

    def loads_on_loop(*a, **k):
        raise AssertionError("parsed on the event loop")

    async def chat_prompt(chat):  # the app's: the template's text and the tools; here the messages' spelling
        prompts.append(repr(chat.messages))
        return prompts[-1], None

    async def tokenize_prompt(text, add_bos, param):
        return list(range(len(text)))

    app = FastAPI()
    anthropic.register(app, None, None, tokenize_prompt, chat_prompt)
    client = TestClient(app)
    monkeypatch.setattr(json_routes, "run_in_threadpool", spy)
    monkeypatch.setattr(json, "loads", loads_on_loop)  # what Starlette's Request.json() calls
    body = _big_body(25_500)
    r = client.post("/v1/messages/count_tokens", content=body, headers=HEADERS)
    assert r.status_code == 200, r.text
    assert real_loads(r.content) == {"input_tokens": len(prompts[0])} and "line 25499" in prompts[0]
    assert parsed_in_thread == [len(body)]
    # Errors still come in Anthropic's shape, a body's JSON error included.
    r = client.post("/v1/messages/count_tokens", content=body[:-1], headers=HEADERS)
    assert r.status_code == 400 and real_loads(r.content)["error"]["type"] == "invalid_request_error", r.text
    assert parsed_in_thread == [len(body), len(body) - 1]


def test_health_answers_while_a_1_mb_message_is_processed(server):
    """End to end, three 1 MB bodies one after another: parsed, validated, converted, rendered under
    the template's bounds and refused for their length, /health within 0.2 s throughout. (Parsing
    1 MB takes 15-30 ms: this guards the whole path; the test above pins where the parse runs.)"""
    body = _big_body(25_500)
    assert 1_000_000 < len(body) and len(body) > PARSE_IN_THREAD_BYTES
    answers, worst = [], 0.0

    def send_each():
        for _ in range(3):
            answers.append(httpx.post(server.url + "/v1/messages", content=body, headers=HEADERS, timeout=60))

    thread = threading.Thread(target=send_each)
    thread.start()
    while thread.is_alive():
        worst = max(worst, _health(server))
        time.sleep(0.01)
    thread.join()
    for r in answers:  # processed to the end: the prompt is refused for its length, in Anthropic's shape
        assert r.status_code == 400, r.text
        assert r.json()["type"] == "error" and "context" in r.json()["error"]["message"], r.text
    assert worst < 0.2, worst
