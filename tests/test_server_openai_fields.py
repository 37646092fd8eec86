"""OpenAI / llama.cpp request fields on llama-server (issue 18.4), on the tiny random model:

- logprobs: the engine's top logprobs (plain, drafted and constrained tokens), OpenAI chat's
  logprobs / top_logprobs (with the official client, streamed and not), legacy completions'
  logprobs, llama.cpp's n_probs (completion_probabilities); all checked against the model's own
  log-softmax from glmoe.Llama's logits;
- n > 1 on chat and completions: choices, their seeds and usage, streamed chunks by index;
- tool_choice required / a function, parallel_tool_calls false (and Anthropic's any / tool /
  disable_parallel_tool_use) kept by a grammar over GLM's tool-call markup;
- grammar / json_schema / response_format on llama.cpp's /completion.

The tiny model writes no tool calls or JSON of its own, and most tests sample its whole
distribution (temperature 1, no top-k / top-p / min-p): only the grammar keeps the output valid."""
from __future__ import annotations

import json

import httpx
import numpy as np
import openai
import pytest

import glmoe
import server_harness as harness
from glmoe import _core
from glmoe.grammar import GrammarError, TokenConstraint
from glmoe.server.tool_grammar import ToolPolicy, tool_grammar
from glmoe.tokenizer import GGUFTokenizer
from test_constrained import ARITHMETIC, PET_SCHEMA, YES_NO, is_arithmetic, schema_errors

FULL = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
SEEDS = range(6)
CHAT = [{"role": "user", "content": "What is the weather like?"}]
NO_THINKING = {"enable_thinking": False}
THINK_OPEN, THINK_CLOSE = 510, 511  # the tiny vocabulary's <think> and </think> (special tokens)
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city", "days"],
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"type": "string", "enum": ["c", "f"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}, "hourly": {"type": "boolean"}}}}}
NOTE = {"type": "function", "function": {"name": "add_note", "parameters": {
    "type": "object", "required": ["text"],
    "properties": {"text": {"type": "string", "minLength": 1, "maxLength": 20},
                   "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}}}}}
TOOLS = [WEATHER, NOTE]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def server(model_path):
    # Slots of 4096 tokens: with tools, the chat prompt alone is over 1000 (byte-level) tokens. A
    # default seed, for Anthropic's API (which has none).
    srv = harness.ServerProcess(model_path, "-c", str(4 * 4096), "--seed", "1")
    yield srv
    srv.stop()


TAGS = ["<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"]


@pytest.fixture(scope="module")
def tags_model_path(model_path, tmp_path_factory):
    """The tiny model with GLM's tool-call tags as special tokens, as GLM's own vocabulary has them."""
    from gguf import GGUFReader, GGUFValueType
    from gguf_edit import copy_gguf

    fields = GGUFReader(model_path).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    first = tokens.index("<filler_0>")
    for i, tag in enumerate(TAGS):
        tokens[first + i], types[first + i] = tag, 3  # control
    path = str(tmp_path_factory.mktemp("tags-model") / "tags.gguf")
    copy_gguf(model_path, path, set_keys={"tokenizer.ggml.tokens": (tokens, GGUFValueType.ARRAY),
                                          "tokenizer.ggml.token_type": (types, GGUFValueType.ARRAY)})
    return path


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=harness.API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm(model_path):
    return glmoe.Llama(model_path, n_ctx=512, n_threads=1, logits_all=True, verbose=False)


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return GGUFTokenizer.from_gguf(model_path)


def post(server, path, body, status=200):
    r = httpx.post(server.url + path, json=body, headers=server.headers(), timeout=60)
    assert r.status_code == status, r.text
    return r.json()


def sse(server, path, body):
    r = httpx.post(server.url + path, json=dict(body, stream=True), headers=server.headers(), timeout=60)
    assert r.status_code == 200, r.text
    lines = [line for line in r.text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
    return [json.loads(line[6:]) for line in lines]


def model_logprobs(llm, prompt, generated):
    """log-softmax of the model's raw logits at each generated position (float64)."""
    llm.reset()
    llm.eval(list(prompt) + list(generated))
    rows = np.asarray(llm.scores[len(prompt) - 1: len(prompt) - 1 + len(generated)], dtype=np.float64)
    rows -= rows.max(axis=1, keepdims=True)
    return rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))


def check_against_model(llm, prompt, entries, n_top):
    """llama.cpp completion_probabilities entries are the model's own logprobs and top tokens."""
    ids = [e["id"] for e in entries]
    lp = model_logprobs(llm, prompt, ids)
    for k, e in enumerate(entries):
        assert e["logprob"] == pytest.approx(lp[k, e["id"]], abs=1e-4)
        best = np.argsort(-lp[k], kind="stable")[:n_top]
        assert [t["id"] for t in e["top_logprobs"]] == best.tolist()
        assert [t["logprob"] for t in e["top_logprobs"]] == pytest.approx(lp[k, best].tolist(), abs=1e-4)


def tool_calls_ok(message, allowed):
    """Each tool call names an allowed tool and its arguments validate; the calls."""
    calls = message.get("tool_calls") or []
    for call in calls:
        name = call["function"]["name"]
        assert name in allowed, name
        args = json.loads(call["function"]["arguments"])
        assert schema_errors(args, SCHEMAS[name]) == [], (name, args)
        if name == "add_note":
            assert len(args["text"]) >= 1
    return calls


# ---- logprobs ------------------------------------------------------------------------------------

def test_engine_top_logprobs_only_when_asked(model_path):
    model = _core.Model(model_path)
    engine = _core.BatchEngine(model, 256, n_parallel=2, n_threads=1)
    try:
        def run(**kw):
            rid, events = engine.submit([1, 2, 3], 6, [], temperature=0.0, **kw), []
            while not (events and events[-1]["finished"]):
                events.append(engine.poll(rid, 5.0))
            return events

        plain = run()
        assert all("top_logprobs" not in ev for ev in plain)
        events = run(top_logprobs=4)
        tokens = [t for ev in events for t in ev["tokens"]]
        logprobs = [p for ev in events for p in ev["logprobs"]]
        tops = [row for ev in events if ev["tokens"] for row in ev["top_logprobs"]]
        assert tokens == [t for ev in plain for t in ev["tokens"]] and len(tops) == len(tokens) == 6
        for token, logprob, top in zip(tokens, logprobs, tops):
            assert len(top) == 4 and top[0] == (token, pytest.approx(logprob))  # greedy: the most likely
            assert [p for _, p in top] == sorted((p for _, p in top), reverse=True)
        for bad in (-1, 21):
            with pytest.raises(ValueError, match="top_logprobs"):
                engine.submit([1], 2, [], top_logprobs=bad)
    finally:
        engine.shutdown()


def test_drafted_tokens_report_the_same_top_logprobs(model_path):
    """Drafted positions (suffix decoding, several rows a step) report what single steps do."""
    model = _core.Model(model_path)

    def run(engine):
        rid = engine.submit([1, 2, 3, 4, 5], 40, [], temperature=0.0, top_logprobs=3)
        tokens, logprobs, tops = [], [], []
        while True:
            ev = engine.poll(rid, 5.0)
            tokens, logprobs = tokens + ev["tokens"], logprobs + ev["logprobs"]
            tops += ev.get("top_logprobs", [])
            if ev["finished"]:
                return tokens, logprobs, tops, ev["draft_n_accepted"]

    plain = _core.BatchEngine(model, 256, n_parallel=1, n_threads=1)
    # Not adaptive: drafts whatever the measured step times (a loaded machine drafted too little).
    drafting = _core.BatchEngine(model, 256, n_parallel=1, n_threads=1, spec_suffix=True, spec_adaptive=False)
    try:
        want = run(plain)
        run(drafting)  # its output joins the suffix store: the same request is then drafted
        got = run(drafting)
    finally:
        plain.shutdown()
        drafting.shutdown()
    assert got[3] > 10 and got[0] == want[0]
    assert got[1] == pytest.approx(want[1], abs=1e-5)
    assert [[i for i, _ in row] for row in got[2]] == [[i for i, _ in row] for row in want[2]]


def test_n_probs_are_the_models_own(server, llm):
    """/completion's completion_probabilities: raw log-softmax (logit bias not applied), top tokens in
    order; the stream's chunks add up to the whole answer's."""
    prompt = llm.tokenize(b"Once upon a time")
    body = {"prompt": prompt, "n_predict": 10, "n_probs": 5, "seed": 3, "return_tokens": True,
            "logit_bias": [[ord("e"), 6.0], [THINK_OPEN, False]], **FULL}
    whole = post(server, "/completion", body)
    entries = whole["completion_probabilities"]
    assert [e["id"] for e in entries] == whole["tokens"] and len(entries) == 10
    assert "".join(bytes(e["bytes"]).decode("latin-1") for e in entries) == \
        llm.detokenize(whole["tokens"]).decode("latin-1")
    check_against_model(llm, prompt, entries, 5)
    chunks = sse(server, "/completion", body)
    assert [e for c in chunks for e in c.get("completion_probabilities", [])] == entries
    assert whole["generation_settings"]["n_probs"] == 5
    via_logprobs = post(server, "/completion", dict({k: v for k, v in body.items() if k != "n_probs"}, logprobs=5))
    assert via_logprobs["completion_probabilities"] == entries  # llama.cpp's other name for n_probs
    assert "completion_probabilities" not in post(server, "/completion", dict(body, n_probs=0))


def test_constrained_tokens_report_unmasked_logprobs(server, llm):
    prompt = llm.tokenize(b"Compute:")
    for seed in SEEDS[:3]:
        r = post(server, "/completion", {"prompt": prompt, "n_predict": 60, "grammar": ARITHMETIC, "n_probs": 3,
                                         "seed": seed, "return_tokens": True, **FULL})
        assert is_arithmetic(r["content"])
        check_against_model(llm, prompt, r["completion_probabilities"], 3)


def test_chat_logprobs_with_the_openai_client(client, server):
    kw = dict(model="tiny", messages=CHAT, max_tokens=12, seed=7, logprobs=True, top_logprobs=3,
              extra_body=dict(chat_template_kwargs=NO_THINKING, top_k=0, min_p=0.0,
                              logit_bias={str(THINK_OPEN): -100}))
    whole = client.chat.completions.create(**kw)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == 12
    for e in content:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and e.logprob <= tops[0] + 1e-6
        assert all(t.bytes and t.token == bytes(t.bytes).decode("utf-8", errors="ignore") for t in e.top_logprobs)
    text = b"".join(bytes(e.bytes) for e in content).decode("utf-8", errors="replace")
    assert text.strip() == whole.choices[0].message.content

    streamed = [e for chunk in client.chat.completions.create(stream=True, **kw) for choice in chunk.choices
                if choice.logprobs is not None for e in choice.logprobs.content]
    assert [(e.token, e.bytes, e.logprob) for e in streamed] == [(e.token, e.bytes, e.logprob) for e in content]
    assert [[t.token for t in e.top_logprobs] for e in streamed] == \
        [[t.token for t in e.top_logprobs] for e in content]

    no_top = client.chat.completions.create(**dict(kw, top_logprobs=None))
    assert [e.top_logprobs for e in no_top.choices[0].logprobs.content] == [[]] * 12
    assert client.chat.completions.create(**dict(kw, logprobs=None, top_logprobs=None)).choices[0].logprobs is None


@pytest.mark.parametrize("body, param", [
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
])
def test_chat_logprobs_refusals(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", headers=server.headers(), timeout=60,
                   json={"messages": CHAT, "max_tokens": 2, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_completions_legacy_logprobs(server):
    prompt = "Once upon a time"
    base = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "logprobs": 2}
    whole = post(server, "/v1/completions", base)["choices"][0]
    lp = whole["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 16
    assert lp["text_offset"][0] == len(prompt) and lp["text_offset"] == sorted(lp["text_offset"])
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert top[token] == value and len(top) <= 3 and value == max(top.values())  # greedy
    chunks = sse(server, "/v1/completions", base)
    streamed = {k: [x for c in chunks if c["choices"][0]["logprobs"] for x in c["choices"][0]["logprobs"][k]]
                for k in lp}
    assert streamed == lp and chunks[-1]["choices"][0]["logprobs"] is None

    # A stop string cuts the text, and the logprobs of the tokens that made only the cut part.
    text = whole["text"]
    stop = next(t for t in lp["tokens"][3:] if t.strip() and text.find(t) >= 4)
    cut = text.find(stop)
    stopped = post(server, "/v1/completions", dict(base, stop=[stop]))["choices"][0]
    assert stopped["text"] == text[:cut] and stopped["finish_reason"] == "stop"
    kept = sum(1 for offset in lp["text_offset"] if offset - len(prompt) < cut)
    assert stopped["logprobs"]["tokens"] == lp["tokens"][:kept]
    for bad in ({"logprobs": 21}, {"logprobs": 1, "echo": True}):
        r = httpx.post(server.url + "/v1/completions", headers=server.headers(), json=dict(base, **bad))
        assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs", r.text


# ---- n > 1 ---------------------------------------------------------------------------------------

def test_n_chat_choices_with_the_openai_client(client):
    kw = dict(model="tiny", messages=CHAT, max_tokens=10, seed=11,
              extra_body=dict(chat_template_kwargs=NO_THINKING, top_k=0, min_p=0.0))
    three = client.chat.completions.create(n=3, **kw)
    assert [c.index for c in three.choices] == [0, 1, 2]
    texts = [c.message.content for c in three.choices]
    assert len(set(texts)) == 3  # seeds 11, 12, 13: different draws
    for i in range(3):  # choice i is what n=1 gives with the seed advanced by i
        alone = client.chat.completions.create(**dict(kw, seed=11 + i))
        assert alone.choices[0].message.content == texts[i]
    assert three.usage.prompt_tokens == alone.usage.prompt_tokens
    assert three.usage.completion_tokens == 30 and three.usage.total_tokens == alone.usage.prompt_tokens + 30

    greedy = client.chat.completions.create(n=3, **dict(kw, temperature=0))
    assert len({c.message.content for c in greedy.choices}) == 1

    parts = {0: "", 1: "", 2: ""}
    usage = None
    for chunk in client.chat.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **kw):
        for c in chunk.choices:
            parts[c.index] += c.delta.content or ""
        usage = chunk.usage or usage
    assert [parts[i].strip() for i in range(3)] == texts and usage.completion_tokens == 30


def test_n_completions_streamed_and_not(server):
    base = {"prompt": "Once upon a time", "max_tokens": 8, "seed": 4, "n": 2, **FULL}
    whole = post(server, "/v1/completions", base)
    assert [c["index"] for c in whole["choices"]] == [0, 1] and whole["usage"]["completion_tokens"] == 16
    texts = [c["text"] for c in whole["choices"]]
    assert texts[0] != texts[1]
    chunks = sse(server, "/v1/completions", dict(base, logprobs=1))
    for i in range(2):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == texts[i]
        assert [c["finish_reason"] for c in mine][-1] == "length"
        assert sum(len(c["logprobs"]["tokens"]) for c in mine if c["logprobs"]) == 8
    r = httpx.post(server.url + "/v1/completions", headers=server.headers(),
                   json=dict(base, n=harness.N_PARALLEL + 1))
    assert r.status_code == 400 and r.json()["error"]["param"] == "n" and "slots" in r.json()["error"]["message"]


def test_n_with_a_grammar_constrains_every_choice(server):
    body = {"prompt": "Pet:", "max_tokens": 400, "seed": 2, "n": 3, "json_schema": PET_SCHEMA, **FULL}
    choices = post(server, "/v1/completions", body)["choices"]
    assert len({c["text"] for c in choices}) == 3
    for c in choices:
        assert c["finish_reason"] == "stop" and schema_errors(json.loads(c["text"]), PET_SCHEMA) == []


# ---- forced tool calls -----------------------------------------------------------------------------

def _feeds(constraint, tokenizer, text, special=True) -> bool:
    """Whether the grammar takes text (tokenized with special tokens, or spelled) from where it is."""
    try:
        for t in tokenizer.tokenize(text.encode(), add_bos=False, special=special):
            constraint.accept(t)
    except GrammarError:
        return False
    return True


def _only_end(constraint, tokenizer) -> bool:
    allowed = np.unpackbits(constraint.next_mask().view(np.uint8), bitorder="little")[: tokenizer.n_vocab]
    return set(np.nonzero(allowed)[0].tolist()) <= set(tokenizer.eog_ids) and constraint.is_accepting()


CALL = "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Rome</arg_value>\n" \
       "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"


def test_tool_grammar_accepts_calls_and_nothing_else(tokenizer):
    def constraint(names, least, most, thinking=True):
        return TokenConstraint(tool_grammar(TOOLS, ToolPolicy(names, least, most, thinking), tokenizer), tokenizer)

    both = ["get_weather", "add_note"]
    one = constraint(both, True, True)
    assert _feeds(one, tokenizer, "\n<think>hmm</think>\n" + CALL) and _only_end(one, tokenizer)
    many = constraint(both, True, False)
    assert _feeds(many, tokenizer, CALL + "\n<tool_call>add_note\n<arg_key>text</arg_key>\n<arg_value>x<y"
                                         "</arg_value>\n</tool_call>") and many.is_accepting()
    assert not constraint(both, True, False).is_accepting()  # a call is required
    assert not _feeds(constraint(both, True, False), tokenizer, "Sure! " + CALL)
    assert not _feeds(constraint(["get_weather"], True, False), tokenizer, "<tool_call>add_note")
    assert not _feeds(constraint(both, True, False, thinking=False), tokenizer, "<think>")
    for bad in (CALL.replace("<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n", ""),  # required days missing
                CALL.replace("<arg_value>3<", "<arg_value>9<"),  # days above its maximum
                CALL.replace("<arg_value>Rome<", "<arg_value>Constantinople<"),  # city over maxLength
                CALL.replace("</arg_value>\n</tool_call>", "</arg_value>\n<arg_key>unit</arg_key>\n<arg_value>k"),
                CALL.replace("<arg_key>city", "<arg_key>town")):
        assert not _feeds(constraint(both, True, False), tokenizer, bad), bad
    auto = constraint(both, False, True)
    assert _feeds(auto, tokenizer, "Let me look. " + CALL) and _only_end(auto, tokenizer)
    prose = constraint(both, False, True)
    assert _feeds(prose, tokenizer, "No tools needed.") and prose.is_accepting()


def test_tool_grammar_with_special_tags(tags_model_path):
    """Tags that are special tokens are those tokens: not their spelling, and no text runs into them."""
    tokenizer = GGUFTokenizer.from_gguf(tags_model_path)
    assert len(tokenizer.tokenize(CALL.encode(), add_bos=False, special=True)) < len(CALL) - 50

    def constraint(least=True, most=False):
        policy = ToolPolicy(["get_weather", "add_note"], least, most)
        return TokenConstraint(tool_grammar(TOOLS, policy, tokenizer), tokenizer)

    one = constraint(most=True)
    assert _feeds(one, tokenizer, "\n<think>hmm</think>\n" + CALL) and _only_end(one, tokenizer)
    assert not _feeds(constraint(), tokenizer, "<tool_call>", special=False)
    head = CALL.split("Rome")[0]
    value = constraint()
    assert _feeds(value, tokenizer, head) and _feeds(value, tokenizer, "Ro</arg", special=False)
    assert not _feeds(value, tokenizer, "_value>", special=False)  # the close tag's text would end the value
    auto = constraint(least=False, most=True)
    assert _feeds(auto, tokenizer, "Text first. " + CALL) and _only_end(auto, tokenizer)


def test_forced_calls_with_special_tags_end_to_end(tags_model_path):
    srv = harness.ServerProcess(tags_model_path, "-c", str(4 * 4096), "--seed", "3")
    try:
        for seed in SEEDS[:4]:
            body = {"messages": CHAT, "tools": TOOLS, "tool_choice": "required", "max_tokens": 1500, "seed": seed,
                    "chat_template_kwargs": NO_THINKING, "logprobs": True, **FULL}
            choice = post(srv, "/v1/chat/completions", body)["choices"][0]
            assert choice["finish_reason"] == "tool_calls" and tool_calls_ok(choice["message"], SCHEMAS)
            assert "<tool_call>" in [e["token"] for e in choice["logprobs"]["content"]]  # one token
    finally:
        srv.stop()


@pytest.mark.parametrize("tool_choice, parallel, allowed", [
    ("required", None, {"get_weather", "add_note"}),
    ("required", False, {"get_weather", "add_note"}),
    ({"type": "function", "function": {"name": "add_note"}}, None, {"add_note"}),
    ({"type": "function", "function": {"name": "get_weather"}}, False, {"get_weather"}),
])
def test_chat_forced_tool_calls_parse_and_validate(server, tool_choice, parallel, allowed):
    for seed in SEEDS:
        # </think> made likely, so that thinking (allowed before the calls) ends soon.
        body = {"messages": CHAT, "tools": TOOLS, "tool_choice": tool_choice, "max_tokens": 1500, "seed": seed,
                "logit_bias": {str(THINK_CLOSE): 4.0}, **FULL}
        if parallel is not None:
            body["parallel_tool_calls"] = parallel
        if seed % 2:
            body["chat_template_kwargs"] = NO_THINKING
        choice = post(server, "/v1/chat/completions", body)["choices"][0]
        calls = tool_calls_ok(choice["message"], allowed)
        assert choice["finish_reason"] == "tool_calls" and len(calls) >= 1, choice
        if parallel is False:
            assert len(calls) == 1
    events = sse(server, "/v1/chat/completions", dict(body, seed=1))
    deltas = [c["choices"][0]["delta"] for c in events if c["choices"]]
    streamed = [call for d in deltas for call in d.get("tool_calls") or []]
    assert streamed and all(c["function"]["name"] in allowed for c in streamed)
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_chat_auto_with_one_call_at_most(server):
    for seed in SEEDS:
        body = {"messages": CHAT, "tools": TOOLS, "parallel_tool_calls": False, "max_tokens": 60, "seed": seed,
                "chat_template_kwargs": NO_THINKING, **FULL}
        message = post(server, "/v1/chat/completions", body)["choices"][0]["message"]
        assert len(tool_calls_ok(message, {"get_weather", "add_note"})) <= 1


@pytest.mark.parametrize("extra, message", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tool_choice": {"type": "function", "name": "get_weather"}}, "tool_choice"),
    ({"tool_choice": "required", "tools": None}, "needs tools"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot be combined"),
    ({"tool_choice": "required", "ignore_eos": True}, "ignore_eos"),
])
def test_chat_tool_choice_refusals(server, extra, message):
    body = dict({"messages": CHAT, "tools": TOOLS, "max_tokens": 4}, **extra)
    r = httpx.post(server.url + "/v1/chat/completions", headers=server.headers(), json=body, timeout=60)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


ANTHROPIC = {"x-api-key": harness.API_KEY, "anthropic-version": "2023-06-01"}
ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in TOOLS]


def _messages(server, status=200, **fields):
    body = {"model": "tiny", "max_tokens": 1500, "messages": CHAT, "tools": ANTHROPIC_TOOLS, "temperature": 1.0,
            "top_k": 0, **fields}
    r = httpx.post(server.url + "/v1/messages", headers=ANTHROPIC, json=body, timeout=60)
    assert r.status_code == status, r.text
    return r.json()


def test_anthropic_tool_choice_any_tool_and_one_call(server):
    thought = 0
    for run in range(4):  # the server's seed is fixed: the question varies
        question = [{"role": "user", "content": f"Question {run}: what is the weather like?"}]
        for choice, allowed in (({"type": "any"}, {"get_weather", "add_note"}),
                                ({"type": "tool", "name": "add_note"}, {"add_note"}),
                                ({"type": "any", "disable_parallel_tool_use": True}, {"get_weather", "add_note"})):
            # A thinking budget of 6 tokens: a <think> still open then is closed, and the call follows.
            answer = _messages(server, messages=question, tool_choice=choice,
                               thinking={"type": "enabled", "budget_tokens": 6})
            uses = [b for b in answer["content"] if b["type"] == "tool_use"]
            thought += any(b["type"] == "thinking" for b in answer["content"])
            assert answer["stop_reason"] == "tool_use" and uses, answer
            for use in uses:
                assert use["name"] in allowed and schema_errors(use["input"], SCHEMAS[use["name"]]) == []
            if choice.get("disable_parallel_tool_use"):
                assert len(uses) == 1
    assert thought  # some answers went through the budget's join
    _messages(server, 400, tool_choice={"type": "tool"})
    unknown = _messages(server, 400, tool_choice={"type": "tool", "name": "x"})
    assert "not among the tools" in unknown["error"]["message"]


# ---- grammar / json_schema / response_format on /completion ----------------------------------------

def test_native_completion_constraints(server):
    for seed in SEEDS[:4]:
        base = {"prompt": "Q:", "seed": seed, "n_predict": 400, **FULL}
        assert post(server, "/completion", dict(base, grammar=YES_NO))["content"] in ("yes", "no")
        r = post(server, "/completion", dict(base, json_schema=PET_SCHEMA))
        assert r["stop_type"] == "eos" and schema_errors(json.loads(r["content"]), PET_SCHEMA) == []
        r = post(server, "/completion", dict(base, response_format={"type": "json_schema",
                                                                     "json_schema": {"schema": PET_SCHEMA}}))
        assert schema_errors(json.loads(r["content"]), PET_SCHEMA) == []
    several = post(server, "/completion", {"prompt": ["A:", "B:"], "json_schema": PET_SCHEMA, "n_predict": 400,
                                           "seed": 1, **FULL})
    assert all(schema_errors(json.loads(r["content"]), PET_SCHEMA) == [] for r in several)
    chunks = sse(server, "/completion", {"prompt": "Q:", "grammar": ARITHMETIC, "n_predict": 200, "seed": 5, **FULL})
    assert is_arithmetic("".join(c["content"] for c in chunks)) and chunks[-1]["stop_type"] == "eos"


@pytest.mark.parametrize("body, param", [
    ({"grammar": "root ::= undefined"}, "grammar"),
    ({"json_schema": {"type": "wizard"}}, "json_schema"),
    ({"grammar": YES_NO, "json_schema": {}}, "json_schema"),
    ({"n_probs": 21}, "n_probs"),
    ({"n_probs": 2, "post_sampling_probs": True}, "post_sampling_probs"),
    ({"logprobs": True}, "logprobs"),
    ({"n": 99}, "n"),
    ({"n_cmpl": 0}, "n_cmpl"),
])
def test_native_completion_refusals(server, body, param):
    r = httpx.post(server.url + "/completion", headers=server.headers(), json=dict({"prompt": "x"}, **body))
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
