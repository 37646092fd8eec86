"""llama-cpp-python parity of glmoe.Llama (issue 18, point 6): tool calls and reasoning_content read
from GLM's markup (streamed and not), OpenAI-style tool history, tool_choice, from_pretrained from a
local Hugging Face cache (offline), pickling, and constructor options honoured, accepted as
speed-only or refused. The tiny random model writes no markup of its own: grammars make it write
GLM's, so that the parsing is checked against text whose shape is known."""
from __future__ import annotations

import copy
import json
import os
import pickle
import re
import shutil
import sys
import warnings

import pytest

import glmoe
from glmoe.chat import chat_prompt
from glmoe.server.tool_grammar import policy_for, tool_grammar
from glmoe.server.tool_parsing import parse
from glmoe.tokenizer import TOKEN_CONTROL
from glmoe.tools.make_model import PRESETS, ModelSpec, write_model

FULL = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)  # every token a grammar allows can be drawn
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 9}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 5}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
USER = [{"role": "user", "content": "What is the weather?"}]
# GLM's markup for one get_weather call, after some text; "days" is an integer in the schema, so
# its value must come back as a JSON number, "city" as the raw string.
ONE_CALL = ('root ::= "Checking. <tool_call>get_weather\\n<arg_key>city</arg_key>\\n<arg_value>" [a-z]{1,6} '
            '"</arg_value>\\n<arg_key>days</arg_key>\\n<arg_value>" [1-9] "</arg_value>\\n</tool_call>"')
TWO_CALLS = ('root ::= "<tool_call>get_time\\n<arg_key>zone</arg_key>\\n<arg_value>" [A-Z]{3} '
             '"</arg_value>\\n</tool_call><tool_call>get_weather\\n<arg_key>city</arg_key>\\n<arg_value>Rome'
             '</arg_value>\\n<arg_key>days</arg_key>\\n<arg_value>2</arg_value>\\n</tool_call>"')
MARKUP = re.compile(r"Checking\. <tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>([a-z]{1,6})</arg_value>"
                    r"\n<arg_key>days</arg_key>\n<arg_value>([1-9])</arg_value>\n</tool_call>")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("parity") / "tiny.gguf")
    write_model(path, ModelSpec(**PRESETS["tiny"]), seed=3)
    return path


@pytest.fixture(scope="module")
def llm(model_path):
    return glmoe.Llama(model_path, n_ctx=2048, n_threads=2, verbose=False)


def grammar(text):
    return glmoe.LlamaGrammar.from_string(text, verbose=False)


def collect(chunks):
    """A chat stream's deltas added up: (content, reasoning_content, tool_calls by index, finish_reason)."""
    chunks = list(chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    content, reasoning, calls = "", "", {}
    for c in chunks[1:]:
        delta = c["choices"][0]["delta"]
        content += delta.get("content", "")
        reasoning += delta.get("reasoning_content", "")
        for call in delta.get("tool_calls", []):
            assert call["index"] not in calls  # each call comes whole, once
            calls[call["index"]] = call
    return content, reasoning, calls, chunks[-1]["choices"][0]["finish_reason"]


# ---- tool calls and reasoning ------------------------------------------------------------------

def test_tool_call_markup_becomes_tool_calls(llm):
    prompt = llm.tokenize(chat_prompt(llm, USER, TOOLS).encode(), add_bos=False, special=True)
    for seed in range(3):
        # The same draw as plain text: what the parser must read.
        raw = llm.create_completion(prompt, grammar=grammar(ONE_CALL), max_tokens=300, seed=seed, **FULL)
        city, days = MARKUP.fullmatch(raw["choices"][0]["text"]).groups()
        r = llm.create_chat_completion(USER, tools=TOOLS, grammar=grammar(ONE_CALL), max_tokens=300, seed=seed, **FULL)
        (choice,) = r["choices"]
        assert choice["finish_reason"] == "tool_calls"
        message = choice["message"]
        assert message["role"] == "assistant" and message["content"] == "Checking."
        (call,) = message["tool_calls"]
        assert call["id"].startswith("call_") and call["type"] == "function"
        assert call["function"]["name"] == "get_weather"
        assert isinstance(call["function"]["arguments"], str)
        assert json.loads(call["function"]["arguments"]) == {"city": city, "days": int(days)}
        assert r["usage"]["prompt_tokens"] == len(prompt)


def test_streamed_tool_calls_add_up_to_the_response(llm):
    kw = dict(tools=TOOLS, grammar=grammar(ONE_CALL), max_tokens=300, seed=7, **FULL)
    whole = llm.create_chat_completion(USER, **kw)["choices"][0]
    content, reasoning, calls, finish = collect(llm.create_chat_completion(USER, stream=True, **kw))
    assert (content, reasoning, finish) == ("Checking.", "", "tool_calls")
    assert list(calls) == [0]
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    assert calls[0]["function"] == whole["message"]["tool_calls"][0]["function"]

    kw["grammar"] = grammar(TWO_CALLS)
    whole = llm.create_chat_completion(USER, **kw)["choices"][0]
    assert whole["message"]["content"] is None and whole["finish_reason"] == "tool_calls"
    names = [c["function"]["name"] for c in whole["message"]["tool_calls"]]
    assert names == ["get_time", "get_weather"]
    assert json.loads(whole["message"]["tool_calls"][1]["function"]["arguments"]) == {"city": "Rome", "days": 2}
    content, _, calls, finish = collect(llm.create_chat_completion(USER, stream=True, **kw))
    assert content == "" and finish == "tool_calls" and sorted(calls) == [0, 1]
    assert [calls[i]["function"] for i in (0, 1)] == [c["function"] for c in whole["message"]["tool_calls"]]


def test_think_block_becomes_reasoning_content(llm):
    think = llm.tokenize(b"<think>", add_bos=False, special=True)
    assert len(think) == 1 and llm.tokenizer_.token_type(think[0]) == TOKEN_CONTROL  # a special token, as in GLM
    # Lark's <think> is that token itself: it reaches the text only if special tokens are decoded.
    g = 'start: <think> "\\nLet me see. " </think> "\\nIt is so. "'
    r = llm.create_chat_completion(USER, grammar=grammar(g), max_tokens=60, temperature=0)
    message = r["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "It is so.", "reasoning_content": "Let me see."}
    content, reasoning, calls, finish = collect(
        llm.create_chat_completion(USER, grammar=grammar(g), max_tokens=60, temperature=0, stream=True))
    assert (content, reasoning, calls, finish) == ("It is so.", "Let me see.", {}, r["choices"][0]["finish_reason"])
    plain = llm.create_chat_completion(USER, grammar=grammar(g), max_tokens=60, temperature=0, reasoning_format="none")
    assert plain["choices"][0]["message"] == {"role": "assistant",
                                              "content": "<think>\nLet me see. </think>\nIt is so."}
    with pytest.raises(ValueError, match="reasoning_format"):
        llm.create_chat_completion(USER, reasoning_format="hidden")


def test_plain_chat_stream_matches_the_response(llm):
    for seed in range(3):
        kw = dict(max_tokens=24, seed=seed, **FULL)
        message = llm.create_chat_completion(USER, **kw)["choices"][0]["message"]
        content, reasoning, _, _ = collect(llm.create_chat_completion(USER, stream=True, **kw))
        assert content == message["content"] and content == content.strip()
        assert reasoning == message.get("reasoning_content", "")


def test_streamed_chat_logprobs_cover_every_token_once(model_path):
    llm = glmoe.Llama(model_path, n_ctx=2048, n_threads=2, verbose=False, logits_all=True)
    kw = dict(tools=TOOLS, grammar=grammar(ONE_CALL), max_tokens=300, seed=5, logprobs=True, top_logprobs=2, **FULL)
    whole = llm.create_chat_completion(USER, **kw)["choices"][0]["logprobs"]["content"]
    assert len(whole) == llm.create_chat_completion(USER, **kw)["usage"]["completion_tokens"]
    streamed = [entry for c in llm.create_chat_completion(USER, stream=True, **kw)
                if c["choices"][0]["logprobs"] for entry in c["choices"][0]["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in whole]
    assert [e["logprob"] for e in streamed] == [e["logprob"] for e in whole]


def test_tool_choice_none_lists_no_tools_and_parses_no_calls(llm):
    auto = llm.create_chat_completion(USER, tools=TOOLS, max_tokens=1, temperature=0)
    r = llm.create_chat_completion(USER, tools=TOOLS, tool_choice="none", grammar=grammar(ONE_CALL), max_tokens=300,
                                   temperature=0)
    message = r["choices"][0]["message"]
    assert "tool_calls" not in message and MARKUP.fullmatch(message["content"])
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["prompt_tokens"] == llm.create_chat_completion(USER, max_tokens=1)["usage"]["prompt_tokens"]
    assert r["usage"]["prompt_tokens"] < auto["usage"]["prompt_tokens"]


def conforms(arguments: dict, tool: dict) -> bool:
    props = tool["function"]["parameters"]["properties"]
    if set(arguments) != set(props):
        return False
    for key, value in arguments.items():
        spec = props[key]
        if spec["type"] == "string" and not (isinstance(value, str) and len(value) <= spec["maxLength"]):
            return False
        if spec["type"] == "integer" and not (type(value) is int and spec["minimum"] <= value <= spec["maximum"]):
            return False
    return True


def forced_draw(llm, tool_choice, seed, max_tokens):
    """What a forced call's answer must be: the same draw as a plain completion under llama-server's
    grammar of GLM's call markup (server/tool_grammar.py), read by llama-server's parser."""
    prompt = chat_prompt(llm, USER, TOOLS)  # the template's default: thinking allowed, as the server
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    forced = tool_grammar(TOOLS, policy_for(TOOLS, tool_choice, None, prompt), llm.tokenizer_)
    raw = llm.create_completion(ids, grammar=forced, max_tokens=max_tokens, seed=seed, _decode_special=True,
                                **FULL)["choices"][0]
    return raw, parse(raw["text"], TOOLS, True)


def test_tool_choice_required_always_calls_a_tool(llm):
    by_name = {t["function"]["name"]: t for t in TOOLS}
    for seed in range(4):
        r = llm.create_chat_completion(USER, tools=TOOLS, tool_choice="required", max_tokens=1000, seed=seed, **FULL)
        (choice,) = r["choices"]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        calls = choice["message"]["tool_calls"]
        assert len(calls) >= 1
        for call in calls:
            assert conforms(json.loads(call["function"]["arguments"]), by_name[call["function"]["name"]])
        # The model wrote GLM's own markup, as it does unforced, and as the server forces it (after
        # thinking, where the template leaves it open).
        raw, parsed = forced_draw(llm, "required", seed, 1000)
        after_thinking = re.sub(r"^\s*<think>.*?</think>", "", raw["text"], flags=re.S)
        assert after_thinking.lstrip().startswith("<tool_call>") and parsed.content == ""
        assert [c["function"] for c in calls] == [dict(c) for c in parsed.tool_calls]
        # Without the constraint the same draw is no call at all.
        free = llm.create_chat_completion(USER, tools=TOOLS, max_tokens=40, seed=seed, **FULL)["choices"][0]
        assert "tool_calls" not in free["message"]


def test_named_tool_choice_calls_that_tool(llm):
    choice_of = {"type": "function", "function": {"name": "get_time"}}
    for seed in range(3):
        kw = dict(tools=TOOLS, tool_choice=choice_of, max_tokens=1000, seed=seed, **FULL)
        r = llm.create_chat_completion(USER, **kw)["choices"][0]
        calls = r["message"]["tool_calls"]
        assert {c["function"]["name"] for c in calls} == {"get_time"} and r["finish_reason"] == "tool_calls"
        assert all(conforms(json.loads(c["function"]["arguments"]), TIME) for c in calls)
        _, parsed = forced_draw(llm, choice_of, seed, 1000)
        assert [c["function"] for c in calls] == [dict(c) for c in parsed.tool_calls]
        content, _, streamed, finish = collect(llm.create_chat_completion(USER, stream=True, **kw))
        assert content == "" and finish == "tool_calls"
        assert [streamed[i]["function"] for i in sorted(streamed)] == [c["function"] for c in calls]
    # llama-cpp-python's legacy spelling: functions / function_call, answered with function_call too.
    r = llm.create_chat_completion(USER, functions=[t["function"] for t in TOOLS], function_call={"name": "get_time"},
                                   max_tokens=1000, seed=0, **FULL)["choices"][0]
    assert r["message"]["function_call"] == r["message"]["tool_calls"][0]["function"]
    assert r["message"]["function_call"]["name"] == "get_time"


def test_forced_call_may_think_when_the_template_lets_it(llm):
    """With enable_thinking the grammar allows a <think> block first (as the server's does): what
    it holds is reasoning_content, and the call still follows."""
    kw = dict(tools=TOOLS, tool_choice="required", max_tokens=1000, chat_template_kwargs={"enable_thinking": True},
              **FULL)
    tags = [llm.tokenize(tag, add_bos=False, special=True)[0] for tag in (b"<think>", b"</think>")]
    thought = 0
    for seed in range(6):
        # The tags made likely: the random model thinks now and then, and briefly.
        r = llm.create_chat_completion(USER, seed=seed, logit_bias={t: 3.0 for t in tags}, **kw)["choices"][0]
        assert r["finish_reason"] == "tool_calls" and r["message"]["tool_calls"]
        thought += bool(r["message"].get("reasoning_content"))
    assert thought


@pytest.mark.parametrize("kw, message", [
    (dict(tool_choice="required"), "needs tools"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "not among the tools"),
    (dict(tools=TOOLS, tool_choice="any"), "tool_choice must be"),
    (dict(tools=[{"type": "function", "function": {"description": "no name"}}]), r"tools\[0\]"),
    (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "own grammar"),
    (dict(tools=TOOLS, functions=[WEATHER["function"]]), "not both"),
])
def test_bad_tool_requests_are_clear_errors(llm, kw, message):
    with pytest.raises(ValueError, match=message):
        llm.create_chat_completion(USER, max_tokens=1, **kw)


def test_openai_history_renders_as_glm_markup(llm):
    history = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    before = copy.deepcopy(history)
    prompt = chat_prompt(llm, history, TOOLS)
    assert history == before  # the caller's messages are not changed
    assert "<|system|>\nBe brief." in prompt
    assert ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
            "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>") in prompt
    assert "<|observation|>\n<tool_response>\nsunny\n</tool_response>" in prompt
    assert "None" not in prompt
    r = llm.create_chat_completion(history, tools=TOOLS, max_tokens=2, temperature=0)
    assert r["usage"]["prompt_tokens"] == len(llm.tokenize(prompt.encode(), add_bos=False, special=True))
    broken = copy.deepcopy(history)
    broken[2]["tool_calls"][0]["function"]["arguments"] = "{city: Paris"
    with pytest.raises(ValueError, match=r"messages\[2\]\.tool_calls\[0\]\.function\.arguments is not JSON"):
        llm.create_chat_completion(broken, tools=TOOLS)


def test_openai_v1_objects(llm):
    pytest.importorskip("openai")
    kw = dict(tools=TOOLS, grammar=grammar(ONE_CALL), max_tokens=300, seed=3, **FULL)
    r = llm.create_chat_completion_openai_v1(USER, **kw)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city", "days"}
    chunks = list(llm.create_chat_completion_openai_v1(USER, stream=True, **kw))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert [c.choices[0].delta.tool_calls[0].function.arguments for c in chunks if c.choices[0].delta.tool_calls] == \
        [call.function.arguments]


# ---- constructor options ----------------------------------------------------------------------

@pytest.mark.parametrize("name, value", [
    ("lora_path", "adapter.gguf"), ("lora_base", "base.gguf"), ("lora_scale", 0.5),
    ("rope_scaling_type", 2), ("rope_freq_base", 10000.0), ("rope_freq_scale", 0.5), ("yarn_ext_factor", 1.0),
    ("yarn_attn_factor", 2.0), ("yarn_beta_fast", 8.0), ("yarn_beta_slow", 2.0), ("yarn_orig_ctx", 4096),
    ("chat_handler", print), ("tokenizer", object()), ("kv_overrides", {"a": 1}),
    ("vocab_only", True), ("main_gpu", 1), ("pooling_type", 1), ("attention_type", 1), ("chat_format", "chatml"),
])
def test_options_that_would_change_results_are_refused(name, value):
    # Refused before the file is opened: this one does not exist.
    with pytest.raises(NotImplementedError, match=f"^{name}="):
        glmoe.Llama("/nonexistent/model.gguf", verbose=False, **{name: value})


def test_options_at_values_that_mean_glmoe_behaviour_are_accepted(model_path):
    neutral = dict(lora_path=None, lora_base=None, lora_scale=1.0, rope_scaling_type=-1, rope_freq_base=0.0,
                   rope_freq_scale=1.0, yarn_ext_factor=-1.0, yarn_attn_factor=1.0, yarn_beta_fast=32.0,
                   yarn_beta_slow=1.0, yarn_orig_ctx=0, type_k=None, type_v=None, chat_handler=None, tokenizer=None,
                   kv_overrides=None, vocab_only=False, main_gpu=0, pooling_type=0, attention_type=-1,
                   chat_format="chat_template.default", use_mmap=True, use_mlock=False, flash_attn=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about either
        llm = glmoe.Llama(model_path, n_ctx=64, verbose=False, **neutral)
    assert llm.chat_format == "chat_template.default" and llm.chat_template == llm.metadata["tokenizer.chat_template"]
    assert glmoe.Llama(model_path, n_ctx=64, verbose=False).chat_format == "chat_template.default"
    with pytest.raises(NotImplementedError, match="tokenizer.chat_template.tool_use"):
        glmoe.Llama(model_path, n_ctx=64, verbose=False, chat_format="chat_template.tool_use")


def test_speed_only_options_are_accepted_with_one_warning(model_path):
    with pytest.warns(UserWarning) as record:
        glmoe.Llama(model_path, n_ctx=64, verbose=False, flash_attn=True, n_threads_batch=4, numa=True,
                    offload_kqv=False, tensor_split=[0.5, 0.5], use_mmap=False, use_mlock=True)
    messages = [str(w.message) for w in record]  # use_mmap and use_mlock are glmoe's too: not named
    assert messages == ["glmoe accepts but does not use flash_attn, n_threads_batch, numa, offload_kqv, tensor_split: "
                        "they change speed or memory use, not results"]
    with pytest.raises(TypeError, match="unexpected keyword argument 'flash_attention'"):
        glmoe.Llama(model_path, flash_attention=True, verbose=False)


def test_last_n_tokens_size_is_the_penalty_window(model_path):
    def run(last_n, penalty):
        llm = glmoe.Llama(model_path, n_ctx=256, n_threads=2, verbose=False, last_n_tokens_size=last_n)
        return llm("In the beginning", max_tokens=40, temperature=0, repeat_penalty=penalty)["choices"][0]["text"]

    plain = run(64, 1.0)
    assert run(0, 3.0) == plain  # a window of 0 tokens penalises nothing
    assert run(64, 3.0) != plain
    assert run(1, 3.0) != run(64, 3.0)
    with pytest.raises(ValueError, match="last_n_tokens_size"):
        glmoe.Llama(model_path, last_n_tokens_size=-2, verbose=False)


def test_small_llama_cpp_python_methods(llm):
    assert llm.pooling_type() == 0
    llm.set_cache(None)
    with pytest.warns(UserWarning, match="set_cache"):
        llm.set_cache(object())
    llm.set_cache(None)


# ---- pickling ---------------------------------------------------------------------------------

def test_pickled_llama_loads_the_same_file_and_generates_the_same(model_path):
    llm = glmoe.Llama(model_path, n_ctx=128, n_batch=16, n_threads=2, seed=1234, verbose=False,
                      last_n_tokens_size=8, tensor_overrides="exps=CPU")
    state = llm.__getstate__()
    assert state["model_path"] == model_path and state["n_ctx"] == 128 and state["n_batch"] == 16
    assert state["seed"] == 1234 and state["last_n_tokens_size"] == 8 and state["tensor_overrides"] == ["exps=CPU"]
    again = pickle.loads(pickle.dumps(llm))
    assert again is not llm and again.model_path == model_path and again.n_ctx() == 128
    kw = dict(max_tokens=24, temperature=0, repeat_penalty=2.0)
    assert again("And God said", **kw)["choices"][0]["text"] == llm("And God said", **kw)["choices"][0]["text"]
    sampled = dict(max_tokens=24, temperature=1.0)
    assert again("And", **sampled)["choices"][0]["text"] == llm("And", **sampled)["choices"][0]["text"]  # same seed
    llm.close()
    with pytest.raises(ValueError, match="Llama is closed"):
        pickle.dumps(llm)
    assert again("x", max_tokens=1)["choices"]  # the copy is independent of the closed original


def test_closed_llama_refuses_the_new_methods(model_path):
    llm = glmoe.Llama(model_path, n_ctx=64, verbose=False)
    llm.close()
    for call in (llm.pooling_type, lambda: llm.set_cache(None), llm.__getstate__,
                 lambda: llm.create_chat_completion_openai_v1(USER),
                 lambda: llm.create_chat_completion(USER, tools=TOOLS, tool_choice="required")):
        with pytest.raises(ValueError, match="Llama is closed"):
            call()


# ---- from_pretrained --------------------------------------------------------------------------

REPO = "glmoe-test/tiny-GGUF"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_hf_cache(root, model_path):
    """A Hugging Face hub cache holding one snapshot of REPO, laid out as huggingface_hub writes it:
    refs/main names the commit, snapshots/COMMIT/... link to blobs/."""
    repo = root / ("models--" + REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    files = {"tiny-Q8_0.gguf": model_path, "fp16/tiny-F16.gguf": model_path, "README.md": None}
    for i, (name, source) in enumerate(files.items()):
        blob = repo / "blobs" / f"{i:040x}"
        blob.parent.mkdir(exist_ok=True)
        if source is None:
            blob.write_text("# tiny\n")
        else:
            shutil.copyfile(source, blob)
        link = repo / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return repo / "snapshots" / COMMIT


@pytest.fixture
def offline_hub(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read when huggingface_hub was imported

    def no_network(*args, **kwargs):
        raise AssertionError("from_pretrained asked the Hub while offline")

    monkeypatch.setattr(hub.HfApi, "list_repo_files", no_network)
    return hub


def test_from_pretrained_offline_from_the_cache(tmp_path, model_path, offline_hub):
    snapshot = make_hf_cache(tmp_path / "hub", model_path)
    kw = dict(cache_dir=tmp_path / "hub", n_ctx=64, n_threads=2, verbose=False)
    llm = glmoe.Llama.from_pretrained(REPO, "*Q8_0.gguf", **kw)
    assert llm.model_path == str(snapshot / "tiny-Q8_0.gguf") and llm.n_ctx() == 64
    reference = glmoe.Llama(model_path, n_ctx=64, n_threads=2, verbose=False)
    greedy = dict(max_tokens=12, temperature=0)
    assert llm("In the", **greedy)["choices"][0]["text"] == reference("In the", **greedy)["choices"][0]["text"]
    # A pattern is matched against paths in the repository, subfolders included.
    assert glmoe.Llama.from_pretrained(REPO, "fp16/*.gguf", **kw).model_path == str(snapshot / "fp16" / "tiny-F16.gguf")
    with_readme = glmoe.Llama.from_pretrained(REPO, "*F16*", additional_files=["README.md"], **kw)
    assert with_readme.model_path.endswith("F16.gguf")
    with pytest.raises(ValueError, match="Multiple files"):
        glmoe.Llama.from_pretrained(REPO, "*.gguf", **kw)
    with pytest.raises(ValueError, match=r'matches \*Q4_K_M.gguf\n\nAvailable files:\n\["README.md", "fp16/'):
        glmoe.Llama.from_pretrained(REPO, "*Q4_K_M.gguf", **kw)
    with pytest.raises(ValueError, match="No file found"):
        glmoe.Llama.from_pretrained(REPO, "*Q8_0.gguf", additional_files=["*.safetensors"], **kw)
    from huggingface_hub.errors import LocalEntryNotFoundError

    with pytest.raises(LocalEntryNotFoundError):  # nothing cached for this repository
        glmoe.Llama.from_pretrained("glmoe-test/absent", "*.gguf", **kw)


def test_from_pretrained_offline_from_a_local_dir(tmp_path, model_path, offline_hub):
    local = tmp_path / "models"
    local.mkdir()
    shutil.copyfile(model_path, local / "tiny-Q8_0.gguf")
    llm = glmoe.Llama.from_pretrained(REPO, "*Q8_0.gguf", local_dir=local, cache_dir=tmp_path / "empty-cache",
                                      n_ctx=64, verbose=False)
    assert os.path.samefile(llm.model_path, local / "tiny-Q8_0.gguf")


def test_from_pretrained_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # what a missing package looks like to import
    with pytest.raises(ImportError, match="huggingface-hub"):
        glmoe.Llama.from_pretrained(REPO, "*.gguf")
