"""llama-server's Anthropic Messages API (/v1/messages, /v1/messages/count_tokens) end to end on a
tiny random model with plain httpx: answers equal to what /v1/chat/completions gives for the same
conversation, streamed events adding up to the whole answer, stop sequences, max_tokens, tool
history, thinking on / off and its token budget, errors in Anthropic's shape, the x-api-key header;
and the conversion of GLM tool-call markup into content blocks on crafted text."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

import server_harness as harness
from glmoe import _core
from glmoe.server.anthropic import MessagesRequest, chat_messages, message_content, ContentBlocks, stop_reason
from glmoe.server.generation import Finish, Generator
from glmoe.server.schemas import SamplingFields
from glmoe.server.thinking_budget import generate_within_budget
from glmoe.tokenizer import GGUFTokenizer

X_API_KEY = {"x-api-key": harness.API_KEY, "anthropic-version": "2023-06-01"}
BEARER = {"Authorization": f"Bearer {harness.API_KEY}"}
HELLO = [{"role": "user", "content": "Hello there"}]


def _post(srv, path, body, headers=None, status=200):
    r = httpx.post(srv.url + path, json=body, headers=X_API_KEY if headers is None else headers, timeout=60)
    assert r.status_code == status, r.text
    return r


def _message(srv, messages=HELLO, **fields):
    body = {"model": "tiny", "max_tokens": 16, "temperature": 0, "messages": messages, **fields}
    return _post(srv, "/v1/messages", body).json()


def _chat(srv, messages, **fields):
    body = {"messages": messages, "max_tokens": 16, "temperature": 0, **fields}
    return _post(srv, "/v1/chat/completions", body, BEARER).json()


def _text(message) -> str:
    return "".join(b["text"] for b in message["content"] if b["type"] == "text")


def _sse_events(body: str):
    """(event name, data) pairs of an SSE body."""
    out = []
    for chunk in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in chunk.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def _assemble(events):
    """The message a stream of Anthropic events adds up to, after checking their order: message_start,
    content blocks opened, grown and closed one at a time from index 0, message_delta, message_stop."""
    assert all(name == data["type"] for name, data in events)
    kinds = [name for name, _ in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    message = dict(events[0][1]["message"])
    assert message["content"] == [] and message["stop_reason"] is None
    blocks, open_index = [], None
    for name, data in events[1:-2]:
        if name == "content_block_start":
            assert open_index is None and data["index"] == len(blocks)
            blocks.append(dict(data["content_block"]))
            open_index = data["index"]
            partial_json = ""
        elif name == "content_block_delta":
            assert data["index"] == open_index
            delta, block = data["delta"], blocks[open_index]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            else:
                assert delta["type"] == "input_json_delta"
                partial_json += delta["partial_json"]
                block["input"] = json.loads(partial_json)
        else:
            assert name == "content_block_stop" and data["index"] == open_index
            open_index = None
    assert open_index is None
    delta = events[-2][1]
    message.update(content=blocks, usage=delta["usage"], **delta["delta"])
    return message


def _stream(srv, messages=HELLO, **fields):
    body = {"model": "tiny", "max_tokens": 16, "temperature": 0, "messages": messages, "stream": True, **fields}
    r = _post(srv, "/v1/messages", body)
    assert r.headers["content-type"].startswith("text/event-stream")
    return _sse_events(r.text)


def _same_answer(a, b, usage=True):
    keep = ("content", "stop_reason", "stop_sequence", "model", "role", "type") + (("usage",) if usage else ())
    assert {k: a[k] for k in keep} == {k: b[k] for k in keep}


# ---- the API end to end ---------------------------------------------------------------------

def test_message_is_the_chat_completion_answer(server):
    got = _message(server)
    assert got["type"] == "message" and got["role"] == "assistant" and got["model"] == "tiny"
    assert got["id"].startswith("msg_")
    chat = _chat(server, HELLO)
    choice = chat["choices"][0]
    assert _text(got) == (choice["message"]["content"] or "")
    thinking = [b["thinking"] for b in got["content"] if b["type"] == "thinking"]
    assert thinking == ([choice["message"]["reasoning_content"]] if choice["message"].get("reasoning_content") else [])
    assert got["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
    assert got["usage"]["output_tokens"] == chat["usage"]["completion_tokens"]
    assert got["stop_reason"] == {"length": "max_tokens", "stop": "end_turn"}[choice["finish_reason"]]


def test_stream_adds_up_to_the_message(server):
    whole = _message(server, max_tokens=24)
    events = _stream(server, max_tokens=24)
    assert events[0][1]["message"]["usage"]["input_tokens"] == whole["usage"]["input_tokens"]
    assert any(name == "content_block_delta" for name, _ in events)
    _same_answer(_assemble(events), whole)


def test_max_tokens_is_the_stop_reason_at_the_limit(server):
    got = _message(server, max_tokens=3)
    assert got["stop_reason"] == "max_tokens" and got["stop_sequence"] is None
    assert got["usage"]["output_tokens"] == 3


def test_system_prompt_string_and_blocks(server):
    system = "You are terse."
    as_string = _message(server, system=system)
    chat = _chat(server, [{"role": "system", "content": system}] + HELLO)
    assert as_string["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
    assert as_string["usage"]["input_tokens"] > _message(server)["usage"]["input_tokens"]
    assert _text(as_string) == (chat["choices"][0]["message"]["content"] or "")
    blocks = [{"type": "text", "text": "You are"}, {"type": "text", "text": "terse.", "cache_control": {"type": "x"}}]
    joined = _message(server, system="You are\n\nterse.")
    _same_answer(_message(server, system=blocks), joined)


def test_stop_sequences(server):
    full = _text(_message(server, max_tokens=24))
    stop = full[len(full) // 2: len(full) // 2 + 5]
    assert stop and full.count(stop) >= 1
    got = _message(server, max_tokens=24, stop_sequences=["no such text", stop])
    assert _text(got) == full[: full.index(stop)]
    assert got["stop_reason"] == "stop_sequence" and got["stop_sequence"] == stop
    streamed = _assemble(_stream(server, max_tokens=24, stop_sequences=["no such text", stop]))
    # At a stop the count is what the engine made by then, which may run past the stop by a step or two.
    _same_answer(streamed, got, usage=False)
    assert streamed["usage"]["input_tokens"] == got["usage"]["input_tokens"]


def _tool_conversation():
    anthropic = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Two cities.", "signature": "sig"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome", "days": 2}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
             "content": [{"type": "text", "text": "no data"}, {"type": "text", "text": "try later"}]},
            {"type": "text", "text": "Summarize."}]},
    ]
    openai = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "Two cities.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "toolu_2", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no data\n\ntry later"},
        {"role": "user", "content": "Summarize."},
    ]
    return anthropic, openai


WEATHER_TOOL = {"name": "get_weather", "description": "Weather for a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"},
                                                                  "days": {"type": "integer"}}}}
WEATHER_FUNCTION = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                                     "parameters": WEATHER_TOOL["input_schema"]}}


def test_tool_history_converts_to_chat_messages():
    anthropic, openai = _tool_conversation()
    req = MessagesRequest(max_tokens=8, system=[{"type": "text", "text": "Be brief."}], messages=anthropic)
    assert chat_messages(req) == [{"role": "system", "content": "Be brief."}] + openai


def test_tool_history_renders_as_the_chat_path(server):
    anthropic, openai = _tool_conversation()
    got = _message(server, anthropic, tools=[WEATHER_TOOL])
    chat = _chat(server, openai, tools=[WEATHER_FUNCTION])
    assert got["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
    assert _text(got) == (chat["choices"][0]["message"]["content"] or "")
    # The tools reach the template; tool_choice none hides them, as it does for chat completions.
    no_tools = _message(server, anthropic)["usage"]["input_tokens"]
    assert no_tools < got["usage"]["input_tokens"]
    assert _message(server, anthropic, tools=[WEATHER_TOOL], tool_choice={"type": "none"})["usage"]["input_tokens"] \
        == no_tools
    auto = _message(server, anthropic, tools=[WEATHER_TOOL], tool_choice={"type": "auto"})
    assert auto["usage"]["input_tokens"] == got["usage"]["input_tokens"]


def test_thinking_switches_the_templates_enable_thinking(server):
    def prompt_tokens(**fields):
        return _message(server, max_tokens=1, **fields)["usage"]["input_tokens"]

    def chat_prompt_tokens(enable):
        return _chat(server, HELLO, max_tokens=1, chat_template_kwargs={"enable_thinking": enable})["usage"][
            "prompt_tokens"]

    off, on = prompt_tokens(thinking={"type": "disabled"}), prompt_tokens(thinking={"type": "adaptive"})
    assert off == chat_prompt_tokens(False) and on == chat_prompt_tokens(True)
    assert off > on  # GLM's template adds "/nothink" and an empty <think></think>
    assert prompt_tokens(thinking={"type": "enabled", "budget_tokens": 1024}) == on
    assert prompt_tokens() == on  # unset: the server's default (thinking, here)


def test_thinking_budget_join_gives_the_single_request_answer(server):
    """The model does not think, so a budget smaller than the answer only splits the generation in two
    requests; the second continues from the very tokens of the first."""
    unbudgeted = _message(server, max_tokens=20, thinking={"type": "enabled", "budget_tokens": 20})
    budgeted = _message(server, max_tokens=20, thinking={"type": "enabled", "budget_tokens": 6})
    _same_answer(budgeted, unbudgeted)
    assert budgeted["usage"]["output_tokens"] == 20
    streamed = _assemble(_stream(server, max_tokens=20, thinking={"type": "enabled", "budget_tokens": 6}))
    _same_answer(streamed, unbudgeted)


# Thinking of 1 to 30 letters, then "done": what the server's --reasoning-budget cuts is visible.
SERVER_BUDGET = 5
THINKING_GRAMMAR = 'start: <think> /[a-z]{1,30}/ </think> "done"'


@pytest.fixture(scope="module")
def budget_server(model_path):
    srv = harness.ServerProcess(model_path, "--reasoning-budget", str(SERVER_BUDGET), "--grammar", THINKING_GRAMMAR)
    yield srv
    srv.stop()


def _thinking(message) -> str:
    return "".join(b["thinking"] for b in message["content"] if b["type"] == "thinking")


def test_server_reasoning_budget_holds_without_budget_tokens(budget_server):
    """--reasoning-budget N applies where a request gives no thinking.budget_tokens, as on chat
    completions; a request's own budget_tokens wins (one as large as max_tokens limits nothing)."""
    free = _message(budget_server, max_tokens=80, thinking={"type": "enabled", "budget_tokens": 80})
    kept = _message(budget_server, max_tokens=80)
    assert len(_thinking(free)) > len(_thinking(kept)) >= 1 and _thinking(free).startswith(_thinking(kept))
    assert _text(kept) == "done" and kept["stop_reason"] == "end_turn"
    _same_answer(kept, _message(budget_server, max_tokens=80, thinking={"type": "adaptive"}))
    _same_answer(kept, _message(budget_server, max_tokens=80,
                                thinking={"type": "enabled", "budget_tokens": SERVER_BUDGET}))
    _same_answer(_assemble(_stream(budget_server, max_tokens=80)), kept)
    chat = _chat(budget_server, HELLO, max_tokens=80)["choices"][0]["message"]
    assert chat["reasoning_content"] == _thinking(kept) and chat["content"] == "done"


def test_count_tokens_is_the_messages_input_tokens(server):
    anthropic, _ = _tool_conversation()
    body = {"model": "tiny", "messages": anthropic, "system": "Be brief.", "tools": [WEATHER_TOOL]}
    counted = _post(server, "/v1/messages/count_tokens", body).json()
    assert counted == {"input_tokens": _message(server, max_tokens=1, **{k: v for k, v in body.items()
                                                                         if k != "model"})["usage"]["input_tokens"]}
    thinking_off = _post(server, "/v1/messages/count_tokens", dict(body, thinking={"type": "disabled"})).json()
    assert thinking_off["input_tokens"] > counted["input_tokens"]


@pytest.mark.parametrize("fields, status, words", [
    ({"max_tokens": None}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64",
                                                   "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]},
     400, "image content blocks are not supported"),
    ({"messages": [{"role": "system", "content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "image", "source": {}}]}]}]}, 400, "messages.0.content.0.content.0: image"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "tool", "name": "get_time"}}, 400, "not among the tools"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "tool"}}, 400, "tool_choice"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 400, "server tool"),
    ({"tools": [{"name": "f", "input_schema": {"type": "object", "properties": []}}]}, 400, "properties"),
    ({"messages": HELLO + [{"role": "assistant", "content": "The answer is"}]}, 400, "prefill"),
    ({"thinking": {"type": "enabled"}}, 400, "budget_tokens"),
    ({"temperature": 1.5}, 400, "temperature"),
    ({"stop_sequences": [""]}, 400, "stop_sequences"),
    ({"mcp_servers": [{"type": "url", "url": "http://x"}]}, 400, "mcp_servers"),
    ({"frequency_penalty": 1.0}, 400, "frequency_penalty"),  # not a Messages API field
    ({"messages": [{"role": "assistant", "content": [{"type": "redacted_thinking", "data": "x"}]}] + HELLO}, 400,
     "redacted_thinking"),
])
def test_bad_requests_get_anthropic_errors(server, fields, status, words):
    body = {"model": "tiny", "max_tokens": 4, "messages": HELLO, **fields}
    for stream in (False, True):  # refused before a stream starts, with a status
        r = _post(server, "/v1/messages", dict(body, stream=stream), status=status)
        err = r.json()
        assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
        assert words in err["error"]["message"]


def test_malformed_json_and_too_long_prompts(server):
    r = httpx.post(server.url + "/v1/messages", content=b"{not json", headers=dict(X_API_KEY, **{
        "content-type": "application/json"}), timeout=60)
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    for words in (1000, 4000):  # more tokens than a slot's context; more text than any prompt that fits
        long = [{"role": "user", "content": "word " * words}]
        err = _post(server, "/v1/messages", {"max_tokens": 4, "messages": long}, status=400).json()
        assert err["error"]["type"] == "invalid_request_error" and "context" in err["error"]["message"]


def test_api_key_from_x_api_key_or_bearer(server):
    body = {"max_tokens": 1, "messages": HELLO}
    for headers in (X_API_KEY, BEARER):
        assert _post(server, "/v1/messages", body, headers).json()["usage"]["output_tokens"] == 1
        assert _post(server, "/v1/messages/count_tokens", body, headers).json()["input_tokens"] > 0
    for headers in ({"x-api-key": "wrong"}, {}, {"Authorization": "Bearer wrong"}):
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            err = _post(server, path, body, headers, status=401).json()
            assert err == {"type": "error", "error": {"type": "authentication_error", "message": "Invalid API Key"}}


# ---- GLM output as content blocks (crafted text: the random model writes no tool calls) ------

TOOLS = [WEATHER_FUNCTION]
GLM_OUTPUT = ("<think>The user wants weather.\n</think>\nLet me check.\n<tool_call>get_weather\n"
              "<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
              "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>\n"
              "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Rome</arg_value>\n</tool_call>")


def test_glm_tool_calls_become_tool_use_blocks():
    got = message_content(GLM_OUTPUT, TOOLS)
    assert [b["type"] for b in got.blocks] == ["thinking", "text", "tool_use", "tool_use"]
    assert got.blocks[0] == {"type": "thinking", "thinking": "The user wants weather.", "signature": ""}
    assert got.blocks[1] == {"type": "text", "text": "Let me check."}
    assert [(b["name"], b["input"]) for b in got.blocks[2:]] == [("get_weather", {"city": "Paris", "days": 3}),
                                                               ("get_weather", {"city": "Rome"})]
    assert all(b["id"].startswith("toolu_") for b in got.blocks[2:]) and got.n_tool_use == 2
    assert stop_reason(Finish("stop", 1, 1), got.n_tool_use) == {"stop_reason": "tool_use", "stop_sequence": None}
    # Without tools in the request the markup is text; without reasoning parsing, <think> too.
    assert [b["type"] for b in message_content(GLM_OUTPUT, None).blocks] == ["thinking", "text"]
    assert [b["type"] for b in message_content(GLM_OUTPUT, TOOLS, reasoning=False).blocks] == \
        ["text", "tool_use", "tool_use"]
    assert message_content("", TOOLS).blocks == []


@pytest.mark.parametrize("step", [1, 4, 9, 1000])
def test_streamed_blocks_add_up_to_the_whole(step):
    blocks = ContentBlocks(TOOLS, True)
    events = []
    for i in range(0, len(GLM_OUTPUT), step):
        events += blocks.feed(GLM_OUTPUT[i:i + step])
    events += blocks.finish()
    start = {"type": "message_start", "message": {"content": [], "stop_reason": None}}
    end = [{"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None}, "usage": {}},
           {"type": "message_stop"}]
    message = _assemble([(e["type"], e) for e in [start] + events + end])
    whole = message_content(GLM_OUTPUT, TOOLS).blocks
    assert [{k: v for k, v in b.items() if k != "id"} for b in message["content"]] == \
        [{k: v for k, v in b.items() if k != "id"} for b in whole]


def test_stop_reasons():
    assert stop_reason(Finish("length", 1, 4), 0)["stop_reason"] == "max_tokens"
    assert stop_reason(Finish("length", 1, 4), 2)["stop_reason"] == "max_tokens"
    assert stop_reason(Finish("stop", 1, 4), 0) == {"stop_reason": "end_turn", "stop_sequence": None}
    assert stop_reason(Finish("stop", 1, 4, {}, "END"), 1) == {"stop_reason": "stop_sequence", "stop_sequence": "END"}


# ---- the thinking budget, on a model made to think forever ----------------------------------

def _run_budgeted(model_path, max_tokens, budget, stops):
    """generate_within_budget with the model's every token biased to <think>: (text, Finish)."""
    async def run():
        tokenizer = GGUFTokenizer.from_gguf(model_path)
        engine = _core.BatchEngine(_core.Model(model_path), 256, n_parallel=1, n_threads=1)
        gen = Generator(engine, tokenizer, 1)
        try:
            think = tokenizer.tokenize(b"<think>", add_bos=False, special=True)
            sampling = dict(SamplingFields(temperature=0).sampling_kwargs(), logit_bias={think[0]: 100.0})
            prompt = tokenizer.tokenize(b"Hello", add_bos=False, special=True)
            parts, finish = [], None
            async for item in generate_within_budget(gen, tokenizer, prompt, max_tokens, budget, sampling, stops):
                if isinstance(item, Finish):
                    finish = item
                else:
                    parts.append(item)
            return "".join(parts), finish
        finally:
            gen.close()

    return asyncio.run(run())


def test_thinking_budget_closes_the_thinking(model_path):
    text, finish = _run_budgeted(model_path, max_tokens=10, budget=4, stops=[])
    assert text == "<think>" * 4 + "</think>" + "<think>" * 6  # the close is the prompt's, not generated
    assert finish.reason == "length" and finish.n_generated == 10 and finish.n_prompt == 5


def test_thinking_budget_finds_a_stop_across_the_join(model_path):
    stop = "<think></think><think>"  # the first request's last token, the close, the second's first token
    text, finish = _run_budgeted(model_path, max_tokens=10, budget=4, stops=[stop])
    assert text == "<think>" * 3
    assert finish.reason == "stop" and finish.stop_word == stop and finish.n_generated >= 5
