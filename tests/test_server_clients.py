"""Client compatibility (issue 18, point 7): the official openai package and an Anthropic Messages
client written with plain httpx, against one llama-server (--embedding, mean pooling) on the tiny
random model. Each answer must parse into the client's own types and hold what was asked for:
streams adding up to the whole answer, tool calls under their schemas, JSON under a response_format,
logprobs, n choices, embeddings (floats and base64)."""
from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import openai
import pydantic
import pytest

import server_harness as harness

FULL = dict(temperature=1.0, top_p=1.0, extra_body={"top_k": 0, "min_p": 0.0})
NO_THINKING = {"enable_thinking": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city", "days"],
    "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1,
                                                                          "maximum": 7}}}}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=6)
    age: int = pydantic.Field(ge=0, le=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = harness.ServerProcess(harness.make_tiny_model(tmp_path_factory.mktemp("clients-model")), "--embedding",
                                "--pooling", "mean")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=harness.API_KEY, max_retries=0, timeout=60)


def test_openai_chat_and_stream(client):
    kw = dict(model="tiny", messages=USER, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw)
    assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens <= 12
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_openai_completions_with_n_and_logprobs(client):
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, n=2, logprobs=2, seed=4,
                                  **FULL)
    assert [c.index for c in r.choices] == [0, 1]
    # One entry per generated token (a token's own text may be part of a character: no join check).
    assert sum(len(c.logprobs.tokens) for c in r.choices) == r.usage.completion_tokens
    for choice in r.choices:
        lp = choice.logprobs
        assert all(len(top) >= 2 for top in lp.top_logprobs) and all(v <= 0 for v in lp.token_logprobs)
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == len("Once upon a time")
    assert r.choices[0].text != r.choices[1].text  # the second choice's seed is advanced
    streamed = {0: "", 1: ""}
    for chunk in client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, n=2, seed=4,
                                           stream=True, **FULL):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert [streamed[0], streamed[1]] == [c.text for c in r.choices]


def test_openai_chat_logprobs_and_n(client):
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=5, n=2, logprobs=True, top_logprobs=3,
                                       seed=2, **FULL)
    assert [c.index for c in r.choices] == [0, 1]
    for choice in r.choices:
        entries = choice.logprobs.content
        assert entries and all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in entries)


def test_openai_forced_tool_call_and_stream(client):
    kw = dict(model="tiny", messages=USER, tools=[WEATHER], tool_choice="required", max_tokens=400, seed=1,
              parallel_tool_calls=False, temperature=1.0, top_p=1.0,
              extra_body={"top_k": 0, "min_p": 0.0, "chat_template_kwargs": NO_THINKING})
    r = client.chat.completions.create(**kw)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "days"} and len(args["city"]) <= 8 and 1 <= args["days"] <= 7
    deltas = [c.choices[0].delta for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    streamed = [t for d in deltas for t in d.tool_calls or []]
    assert [(t.index, t.function.name, t.function.arguments) for t in streamed] == \
        [(0, "get_weather", call.function.arguments)]


def test_openai_structured_output(client):
    # The client's own helper: a pydantic model as a strict json_schema, parsed back into it.
    for seed in range(3):
        r = client.chat.completions.parse(model="tiny", messages=USER, response_format=Pet, max_tokens=300, seed=seed,
                                          **FULL)
        pet = r.choices[0].message.parsed
        assert isinstance(pet, Pet) and len(pet.name) <= 6 and 0 <= pet.age <= 30
    schema = {"type": "json_schema", "json_schema": {"name": "pet", "schema": Pet.model_json_schema()}}
    r = client.chat.completions.create(model="tiny", messages=USER, response_format=schema, max_tokens=300, seed=0,
                                       **FULL)
    Pet.model_validate_json(r.choices[0].message.content)


def test_openai_embeddings(client):
    floats = client.embeddings.create(model="tiny", input=["hello world", "goodbye"])
    packed = client.embeddings.create(model="tiny", input=["hello world", "goodbye"], encoding_format="base64")
    assert [d.index for d in floats.data] == [0, 1] and floats.usage.prompt_tokens > 0
    for a, b in zip(floats.data, packed.data):
        assert a.embedding == pytest.approx(np.frombuffer(base64.b64decode(b.embedding), "<f4").tolist(), rel=1e-6)
        assert sum(x * x for x in a.embedding) == pytest.approx(1.0, rel=1e-4)  # normalized
    assert floats.data[0].embedding != floats.data[1].embedding


# ---- an Anthropic Messages client on httpx ----------------------------------------------------------

class Anthropic:
    """What Anthropic's SDK sends and reads: x-api-key and anthropic-version, SSE events by name."""

    def __init__(self, url: str):
        self.http = httpx.Client(base_url=url, timeout=60, headers={
            "x-api-key": harness.API_KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"})

    def create(self, **body) -> dict:
        r = self.http.post("/v1/messages", json=body)
        r.raise_for_status()
        return r.json()

    def stream(self, **body) -> dict:
        """The message that the stream's events build."""
        message, blocks, partial = None, [], {}
        with self.http.stream("POST", "/v1/messages", json=dict(body, stream=True)) as r:
            r.raise_for_status()
            event = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    assert data["type"] == event
                    if event == "message_start":
                        message = data["message"]
                    elif event == "content_block_start":
                        blocks.append(dict(data["content_block"]))
                    elif event == "content_block_delta":
                        delta, block = data["delta"], blocks[data["index"]]
                        if delta["type"] == "text_delta":
                            block["text"] += delta["text"]
                        elif delta["type"] == "thinking_delta":
                            block["thinking"] += delta["thinking"]
                        elif delta["type"] == "input_json_delta":
                            partial[data["index"]] = partial.get(data["index"], "") + delta["partial_json"]
                    elif event == "message_delta":
                        message.update(data["delta"])
        for index, text in partial.items():
            blocks[index]["input"] = json.loads(text)
        return dict(message, content=blocks)


def test_anthropic_messages_stream_and_tools(server):
    client = Anthropic(server.url)
    body = dict(model="tiny", max_tokens=16, temperature=0, system="Be brief.", messages=USER,
                thinking={"type": "disabled"})
    whole = client.create(**body)
    assert whole["type"] == "message" and whole["role"] == "assistant"
    assert whole["stop_reason"] in ("end_turn", "max_tokens") and whole["usage"]["output_tokens"] <= 16
    streamed = client.stream(**body)
    assert streamed["content"] == whole["content"] and streamed["stop_reason"] == whole["stop_reason"]
    tools = [{"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}]
    calls = dict(body, max_tokens=400, temperature=1.0, top_k=0, tools=tools,
                 # One call: with parallel calls allowed a random model may go on calling until max_tokens.
                 tool_choice={"type": "any", "disable_parallel_tool_use": True})
    for answer in (client.create(**calls), client.stream(**calls)):
        uses = [b for b in answer["content"] if b["type"] == "tool_use"]
        assert answer["stop_reason"] == "tool_use" and uses
        for use in uses:
            assert use["name"] == "get_weather" and set(use["input"]) == {"city", "days"}
            assert use["id"].startswith("toolu_") and 1 <= use["input"]["days"] <= 7
