"""llama-server's llama.cpp flags added for issue 18: the server-wide grammar (--grammar,
--grammar-file, -j, -jf) as the constraint of requests that set none, on every endpoint;
--reasoning-budget N > 0 on chat completions; -rea / --reasoning-effort as template variables;
llama.cpp's LLAMA_ARG_* environment variables (the command line winning); n / n_cmpl on /completion.
One server is started from environment variables alone."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

import server_harness as harness
from glmoe.server.cli import main, parser, settings_from_args
from glmoe.server.cli_env import env_arguments

YES_NO = 'root ::= "yes" | "no"'
FULL = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
BUDGET = 5
# 30 letters of thinking at most, then "done": without a budget the model thinks all 30 (its own
# </think> is banned by the request's logit_bias, so only the grammar's limit closes the block).
THINKING = 'start: <think> /[a-z]{1,30}/ </think> "done"'


class EnvServer(harness.ServerProcess):
    """llama-server configured by llama.cpp's variables, with -c and --grammar on the command line."""

    def __init__(self, model_path: str):
        self.port = harness.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, LLAMA_ARG_MODEL=model_path, LLAMA_ARG_HOST="127.0.0.1",
                   LLAMA_ARG_PORT=str(self.port), LLAMA_API_KEY=harness.API_KEY, LLAMA_ARG_ALIAS="from-env",
                   LLAMA_ARG_N_PARALLEL="3", LLAMA_ARG_CTX_SIZE="64", LLAMA_ARG_THREADS="1",
                   LLAMA_ARG_THINK_BUDGET=str(BUDGET), LLAMA_ARG_NO_CONTEXT_SHIFT="1")
        args = ["-c", str(3 * 1024), "--grammar", YES_NO]  # -c wins over LLAMA_ARG_CTX_SIZE
        self.proc = subprocess.Popen([sys.executable, "-m", "glmoe.server", *args], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._wait_ready()


@pytest.fixture(scope="module")
def env_server(model_path):
    srv = EnvServer(model_path)
    yield srv
    srv.stop()


def post(srv, path, body, status=200, headers=None):
    r = httpx.post(srv.url + path, json=body, headers=headers or srv.headers(), timeout=60)
    assert r.status_code == status, r.text
    return r.json()


def sse(srv, path, body):
    r = httpx.post(srv.url + path, json=dict(body, stream=True), headers=srv.headers(), timeout=60)
    assert r.status_code == 200, r.text
    return [json.loads(line[6:]) for line in r.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def parse_env(argv, env):
    ap = parser()
    return settings_from_args(ap.parse_args(env_arguments(ap, argv, env) + argv))


# ---- environment variables ---------------------------------------------------------------------

def test_env_variables_stand_for_their_flags():
    env = {"LLAMA_ARG_MODEL": "m.gguf", "LLAMA_ARG_CTX_SIZE": "1024", "LLAMA_ARG_N_PARALLEL": "2",
           "LLAMA_ARG_N_GPU_LAYERS": "-1", "LLAMA_ARG_OVERRIDE_TENSOR": "exps=CPU", "LLAMA_ARG_CPU_MOE": "on",
           "LLAMA_ARG_TEMPERATURE": "0.5", "LLAMA_ARG_TOP_K": "7", "LLAMA_API_KEY": "k",
           "LLAMA_ARG_CHAT_TEMPLATE_KWARGS": '{"a": 1}', "LLAMA_ARG_THINK": "none", "LLAMA_ARG_EMBEDDINGS": "true",
           "LLAMA_ARG_JINJA": "1", "LLAMA_ARG_CONT_BATCHING": "enabled", "LLAMA_ARG_THINK_BUDGET": "64"}
    s = parse_env([], env)
    assert (s.model_path, s.n_ctx, s.n_parallel, s.n_gpu_layers, s.tensor_overrides, s.cpu_moe) == \
        ("m.gguf", 1024, 2, -1, ["exps=CPU"], True)
    assert s.sampling_defaults == dict(temperature=0.5, top_k=7, top_p=0.95, min_p=0.05) and s.api_key == "k"
    assert (s.chat_template_kwargs, s.reasoning_format, s.embedding, s.reasoning_budget) == \
        ({"a": 1}, "none", True, 64)
    # The command line wins, in any spelling; a false switch does nothing.
    for argv in (["-c", "2048"], ["-c2048"], ["--ctx-size=2048"], ["--n_ctx", "2048"]):
        assert parse_env(argv, env).n_ctx == 2048
    assert parse_env(["-ot", "blk=CPU"], env).tensor_overrides == ["blk=CPU"]
    assert not parse_env([], {"LLAMA_ARG_CPU_MOE": "0"}).cpu_moe
    assert not parse_env([], {"LLAMA_ARG_MMAP": "0"}).use_mmap and not parse_env([], {"LLAMA_ARG_NO_MMAP": "1"}).use_mmap
    assert parse_env([], {}).use_mmap and parse_env(["--mmap"], {"LLAMA_ARG_NO_MMAP": "1"}).use_mmap
    assert not parse_env([], {"LLAMA_ARG_LOAD_MODE": "none"}).use_mmap
    modes = [parse_env(["-lm", m], {}) for m in ("auto", "mmap", "mmap+mlock", "none", "mlock", "dio")]
    assert [s.use_mmap for s in modes] == [True, True, True, False, False, False]
    assert [s.use_mlock for s in modes] == [False, False, True, False, True, False]
    assert parse_env(["-lm", "mmap", "--no-mmap"], {}).use_mmap  # an explicit mode wins
    s = parse_env(["-lm", "none", "--mlock"], {})  # --mlock locks whatever the mode loads
    assert (s.use_mmap, s.use_mlock) == (False, True)
    assert parse_env([], {"LLAMA_ARG_MLOCK": "1"}).use_mlock and not parse_env([], {"LLAMA_ARG_MLOCK": "off"}).use_mlock
    assert parse_env([], {"LLAMA_ARG_LOAD_MODE": "mmap+mlock"}).use_mlock and not parse_env([], {}).use_mlock
    assert parse_env([], {"LLAMA_ARG_CHAT_TEMPLATE": "-{{ x }}"}).chat_template == "-{{ x }}"  # a value like a flag


@pytest.mark.parametrize("env, message", [
    ({"LLAMA_ARG_ROPE_SCALE": "2"}, "LLAMA_ARG_ROPE_SCALE (--rope-scale): RoPE scaling is not supported"),
    ({"LLAMA_ARG_NO_CONT_BATCHING": "1"}, "LLAMA_ARG_NO_CONT_BATCHING (--no-cont-batching)"),
    ({"LLAMA_ARG_JINJA": "false"}, "LLAMA_ARG_JINJA (--no-jinja)"),
    ({"LLAMA_ARG_NO_KV_OFFLOAD": "1"}, "LLAMA_ARG_NO_KV_OFFLOAD is set: llama.cpp's variable for a flag glmoe"),
    ({"LLAMA_ARG_CPU_MOE": "maybe"}, "not a boolean"),
    ({"LLAMA_ARG_CTX_SIZE": "big"}, "--ctx-size"),
    ({"LLAMA_ARG_THINK_BUDGET_MESSAGE": "stop"}, "</think> alone"),
])
def test_env_variables_glmoe_cannot_honour_are_usage_errors(model_path, monkeypatch, capsys, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as e:
        main(["-m", model_path])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_server_started_from_env_variables(env_server):
    models = httpx.get(env_server.url + "/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["from-env"]
    props = httpx.get(env_server.url + "/props", headers=env_server.headers()).json()
    assert props["total_slots"] == 3 and props["default_generation_settings"]["n_ctx"] == 1024  # -c 3072 / 3
    assert httpx.get(env_server.url + "/props").status_code == 401  # LLAMA_API_KEY


# ---- reasoning flags -----------------------------------------------------------------------------

def test_reasoning_flags_are_template_variables(model_path):
    def kwargs(*argv):
        return settings_from_args(parser().parse_args(["-m", "x.gguf", *argv])).chat_template_kwargs

    assert kwargs("-rea", "off") == kwargs("--reasoning", "false") == {"enable_thinking": False}
    assert kwargs("--reasoning", "on") == {"enable_thinking": True} and kwargs("-rea", "auto") == {}
    assert kwargs("--reasoning-effort", "high") == {"reasoning_effort": "high"}
    assert kwargs("--reasoning-effort", "default") == {}
    assert kwargs("-rea", "on", "--chat-template-kwargs", '{"enable_thinking": false}') == {"enable_thinking": False}
    assert settings_from_args(parser().parse_args(["--reasoning-budget", "256"])).reasoning_budget == 256


@pytest.mark.parametrize("args, message", [
    (["-rea", "maybe"], "not on, off or auto"),
    (["--reasoning-budget", "-2"], "--reasoning-budget: -1"),
    (["-rea", "on", "--reasoning-budget", "0"], "contradict"),
    (["--grammar", "root ::= undefined"], "--grammar:"),
    (["-j", "{nope"], "--json-schema:"),
    (["--grammar", YES_NO, "-j", "{}"], "--grammar and --json-schema"),
    (["--grammar-file", "/no/such.gbnf"], "--grammar-file:"),
    (["--reasoning-budget-message", "enough"], "</think> alone"),
    (["--no-slots"], "always serves /slots"),
])
def test_bad_reasoning_and_grammar_flags_are_usage_errors(model_path, args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["-m", model_path, *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_reasoning_budget_closes_long_thinking(server, env_server):
    think_close = post(server, "/tokenize", {"content": "</think>"})["tokens"]
    assert len(think_close) == 1  # a special token
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 80, "grammar": THINKING,
            "logit_bias": {str(think_close[0]): -100}, "chat_template_kwargs": {"enable_thinking": True}, **FULL}
    for seed in range(3):
        free = post(server, "/v1/chat/completions", dict(chat, seed=seed))["choices"][0]["message"]
        kept = post(env_server, "/v1/chat/completions", dict(chat, seed=seed))
        message = kept["choices"][0]["message"]
        assert len(free["reasoning_content"]) == 30 and free["content"] == "done"
        # The budget's tokens (the <think> tag one of them), then </think> forced and the answer.
        assert free["reasoning_content"].startswith(message["reasoning_content"])
        assert 1 <= len(message["reasoning_content"]) < 30 and message["content"] == "done"
        assert kept["choices"][0]["finish_reason"] == "stop"
        streamed = sse(env_server, "/v1/chat/completions", dict(chat, seed=seed))
        deltas = [c["choices"][0]["delta"] for c in streamed if c["choices"]]
        assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
    # What the budget cannot give is refused, unless the template closes the thinking itself.
    refused = post(env_server, "/v1/chat/completions", dict(chat, logprobs=True), 400)
    assert "--reasoning-budget 5" in refused["error"]["message"] and refused["error"]["param"] == "logprobs"
    post(env_server, "/v1/chat/completions", dict(chat, logprobs=True, grammar="",
                                                  chat_template_kwargs={"enable_thinking": False}))


def test_reasoning_budget_tokens_is_the_per_request_budget(server, env_server):
    """llama.cpp's reasoning_budget_tokens: a request's own budget, -1 (or unset) the server's."""
    think_close = post(server, "/tokenize", {"content": "</think>"})["tokens"]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 80, "grammar": THINKING,
            "logit_bias": {str(think_close[0]): -100}, "chat_template_kwargs": {"enable_thinking": True}, **FULL}

    def reasoning(srv, **fields):
        return post(srv, "/v1/chat/completions", dict(chat, **fields))["choices"][0]["message"]["reasoning_content"]

    for seed in range(2):
        by_flag = reasoning(env_server, seed=seed)
        assert 1 <= len(by_flag) < 30
        assert reasoning(server, seed=seed, reasoning_budget_tokens=BUDGET) == by_flag
        assert reasoning(env_server, seed=seed, reasoning_budget_tokens=-1) == by_flag
        assert len(reasoning(env_server, seed=seed, reasoning_budget_tokens=80)) == 30  # as large as max_tokens
        assert len(reasoning(server, seed=seed)) == 30
    refused = post(server, "/v1/chat/completions", dict(chat, reasoning_budget_tokens=BUDGET, logprobs=True), 400)
    assert f"reasoning_budget_tokens {BUDGET}" in refused["error"]["message"]
    for fields, param in ((dict(reasoning_budget_tokens=0), "reasoning_budget_tokens"),
                          (dict(reasoning_budget_message="enough"), "reasoning_budget_message")):
        assert post(server, "/v1/chat/completions", dict(chat, **fields), 400)["error"]["param"] == param
    post(server, "/v1/chat/completions", dict(chat, reasoning_budget_tokens=-2), 400)


# ---- the server-wide grammar ---------------------------------------------------------------------

def test_grammar_flags_build_the_default(tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "properties": {"a": {"type": "integer"}}}')
    grammar = tmp_path / "yes.gbnf"
    grammar.write_text(YES_NO)

    def default(*argv):
        return settings_from_args(parser().parse_args(["-m", "x.gguf", *argv])).default_grammar

    assert default() is None
    assert default("--grammar", YES_NO).kind == default("--grammar-file", str(grammar)).kind == "gbnf"
    assert default("-j", schema.read_text()).kind == default("-jf", str(schema)).kind == "json_schema"


def test_default_grammar_applies_where_a_request_sets_none(env_server):
    answers = []
    for seed in range(3):
        base = dict(FULL, seed=seed, max_tokens=40)
        answers.append(post(env_server, "/v1/completions", dict(base, prompt="Q:"))["choices"][0]["text"])
        answers.append(post(env_server, "/completion", dict(base, prompt="Q:"))["content"])
        answers.append(post(env_server, "/v1/completions", dict(base, prompt="Q:", response_format={"type": "text"},
                                                                grammar=""))["choices"][0]["text"])
        chat = dict(base, messages=[{"role": "user", "content": "hi"}],
                    chat_template_kwargs={"enable_thinking": False})
        answers.append(post(env_server, "/v1/chat/completions", chat)["choices"][0]["message"]["content"])
        messages = post(env_server, "/v1/messages", {"model": "x", "max_tokens": 40, "messages": chat["messages"],
                                                     "thinking": {"type": "disabled"}, "temperature": 1.0},
                        headers={"x-api-key": harness.API_KEY, "anthropic-version": "2023-06-01"})
        answers.append("".join(b["text"] for b in messages["content"] if b["type"] == "text"))
    assert set(answers) <= {"yes", "no"}, answers
    # A request's own constraint replaces it.
    own = post(env_server, "/v1/completions", dict(FULL, prompt="Q:", max_tokens=200, seed=1,
                                                   json_schema={"type": "object", "properties": {}}))
    assert isinstance(json.loads(own["choices"][0]["text"]), dict)
    assert post(env_server, "/completion", {"prompt": "Q:", "grammar": 'root ::= "maybe"'})["content"] == "maybe"
    refused = post(env_server, "/v1/completions", {"prompt": "Q:", "ignore_eos": True}, 400)
    assert "--grammar" in refused["error"]["message"]


# ---- n / n_cmpl on /completion ------------------------------------------------------------------

def test_native_completion_n_cmpl(server):
    base = dict(FULL, n_predict=8, seed=11, return_tokens=True)
    single = {p: [post(server, "/completion", dict(base, prompt=p, seed=11 + j)) for j in range(3)]
              for p in ("Once", "Twice")}
    several = post(server, "/completion", dict(base, prompt="Once", n_cmpl=3))
    assert [r["index"] for r in several] == [0, 1, 2]
    # Choice j is what one completion with the seed advanced by j gives (llama.cpp's child seeds).
    assert [r["content"] for r in several] == [r["content"] for r in single["Once"]]
    assert [r["generation_settings"]["seed"] for r in several] == [11, 12, 13]
    assert len({tuple(r["tokens"]) for r in several}) > 1
    # Prompts times n, each prompt's choices in turn; "n" is the fallback name.
    grid = post(server, "/completion", dict(base, prompt=["Once", "Twice"], n=2))
    assert [r["index"] for r in grid] == [0, 1, 2, 3]
    assert [r["content"] for r in grid] == [single[p][j]["content"] for p in ("Once", "Twice") for j in (0, 1)]
    chunks = sse(server, "/completion", dict(base, prompt="Once", n_cmpl=3))
    for i in range(3):
        mine = [c for c in chunks if c["index"] == i]
        assert "".join(c["content"] for c in mine) == several[i]["content"] and mine[-1]["stop"]
    too_many = post(server, "/completion", dict(base, prompt="Once", n_cmpl=harness.N_PARALLEL + 1), 400)
    assert too_many["error"]["param"] == "n_cmpl"


# ---- llama.cpp's other endpoints ------------------------------------------------------------------

def test_llama_cpp_endpoints_answer_or_say_why_not(server):
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    counted = post(server, "/v1/chat/completions/input_tokens", chat)
    tokens = post(server, "/tokenize", {"content": post(server, "/apply-template", chat)["prompt"]})["tokens"]
    assert counted == {"object": "response.input_tokens", "input_tokens": len(tokens)}
    assert post(server, "/chat/completions/input_tokens", chat) == counted
    # /completions is llama.cpp's native completion, as /completion (OpenAI's is under /v1).
    native = post(server, "/completions", {"prompt": "Once", "n_predict": 4, "temperature": 0})
    assert native == post(server, "/completion", {"prompt": "Once", "n_predict": 4, "temperature": 0}) | \
        {"timings": native["timings"]}
    assert httpx.get(server.url + "/lora-adapters", headers=server.headers()).json() == []
    for path, words in [("/infill", "fill-in-the-middle"), ("/v1/rerank", "reranking"), ("/v1/responses", "Responses"),
                        ("/slots/0?action=save", "slots"), ("/lora-adapters", "LoRA"),
                        ("/v1/audio/transcriptions", "audio")]:
        refused = post(server, path, {}, 501)
        assert words in refused["error"]["message"], path
    r = httpx.get(server.url + "/v1/stream", headers=server.headers())
    assert r.status_code == 501 and "resumable" in r.json()["error"]["message"]
