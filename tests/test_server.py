"""llama-server end to end on a tiny random model, with the official openai client: every
endpoint, streaming and not, concurrent clients (greedy results equal to sequential ones), the
API key, 404, 503 while loading; and the GLM tool-call / reasoning parser on crafted text."""
from __future__ import annotations

import concurrent.futures
import json
import os
import threading
import time

import httpx
import openai
import pytest

import mlock_support
import server_harness as harness
from glmoe.server.tool_parsing import StreamParser, parse

GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=harness.API_KEY, max_retries=0, timeout=60)


def _chat(client, content, stream=False, **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                          stream=stream, max_tokens=kw.pop("max_tokens", 12), **GREEDY, **kw)


def test_health_and_models(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_completion_stream_equals_non_stream(client):
    full = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, **GREEDY)
    choice = full.choices[0]
    assert choice.finish_reason in ("length", "stop") and full.usage.completion_tokens <= 10
    assert full.usage.prompt_tokens > 0 and full.object == "text_completion"
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completion_stop_string_and_echo(client):
    text = client.completions.create(model="tiny", prompt="abc", max_tokens=16, **GREEDY).choices[0].text
    if len(text) < 6:
        pytest.skip("the random model stopped early")
    stop = text[3:5]
    cut = client.completions.create(model="tiny", prompt="abc", max_tokens=16, stop=[stop], **GREEDY).choices[0]
    assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="abc", max_tokens=16, stop=stop, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed) == cut.text
    echoed = client.completions.create(model="tiny", prompt="abc", max_tokens=4, echo=True, **GREEDY)
    assert echoed.choices[0].text.startswith("abc")


def test_chat_stream_equals_non_stream(client):
    full = _chat(client, "Hello there")
    msg = full.choices[0].message
    assert msg.role == "assistant" and full.object == "chat.completion"
    chunks = list(_chat(client, "Hello there", stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    assert streamed.strip() == (msg.content or "").strip()
    assert reasoning.strip() == (getattr(msg, "reasoning_content", None) or "").strip()
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_chat_reasoning_and_tools_fields_match_parser(client):
    """The random model's raw output (reasoning_format none, no tools) parsed here must equal
    what the server reports with parsing on."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    raw = _chat(client, "Weather?", max_tokens=24, tools=tools, extra_body={"reasoning_format": "none"})
    raw_text = raw.choices[0].message.content or ""
    parsed = parse(raw_text, tools)
    got = _chat(client, "Weather?", max_tokens=24, tools=tools).choices[0]
    assert (got.message.content or "") == parsed.content
    assert getattr(got.message, "reasoning_content", None) == (parsed.reasoning or None)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in got.message.tool_calls or []] == \
        [(c["name"], json.loads(c["arguments"])) for c in parsed.tool_calls]
    assert got.finish_reason == ("tool_calls" if parsed.tool_calls else raw.choices[0].finish_reason)


def test_chat_with_tool_history_renders(client):
    messages = [{"role": "user", "content": "weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, **GREEDY)
    assert out.usage.prompt_tokens > 0


def test_concurrent_clients_equal_sequential(client):
    prompts = [f"Client number {i} says" for i in range(10)]

    def run(p):
        return client.completions.create(model="tiny", prompt=p, max_tokens=12, **GREEDY).choices[0].text

    sequential = [run(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        concurrent_ = list(pool.map(run, prompts))
    assert concurrent_ == sequential

    def run_chat(p):
        return "".join(c.choices[0].delta.content or "" for c in _chat(client, p, stream=True))

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        streamed = list(pool.map(run_chat, prompts))
    assert streamed == [(_chat(client, p).choices[0].message.content or "") for p in prompts]


def test_tokenize_detokenize(server):
    h = server.headers()
    ids = httpx.post(server.url + "/tokenize", json={"content": "hello world"}, headers=h).json()["tokens"]
    assert ids and all(isinstance(t, int) for t in ids)
    text = httpx.post(server.url + "/detokenize", json={"tokens": ids}, headers=h).json()["content"]
    assert text == "hello world"
    pieces = httpx.post(server.url + "/tokenize", json={"content": "hello", "with_pieces": True}, headers=h).json()
    assert "".join(p["piece"] for p in pieces["tokens"]) == "hello"


def test_metrics_and_slots(server, client):
    client.completions.create(model="tiny", prompt="x", max_tokens=2, **GREEDY)
    text = httpx.get(server.url + "/metrics", headers=server.headers()).text
    for name in ("llamacpp:prompt_tokens_total", "llamacpp:tokens_predicted_total", "llamacpp:requests_deferred",
                 "llamacpp:kv_cache_usage_ratio", "llamacpp:predicted_tokens_seconds", "glmoe:http_requests_total"):
        assert f"\n{name}" in "\n" + text
    slots = httpx.get(server.url + "/slots", headers=server.headers()).json()
    assert len(slots) == harness.N_PARALLEL and {"id", "state", "n_past"} <= set(slots[0])


@pytest.fixture(scope="module")
def spec_server(model_path):
    srv = harness.ServerProcess(model_path, "--spec-suffix", "--spec-max-depth", "16")
    yield srv
    srv.stop()


def test_spec_suffix_same_greedy_text_with_timings(server, spec_server):
    # A repeated phrase, so that drafts are proposed and some accepted.
    body = {"model": "tiny", "prompt": "one two three four five six " * 6, "max_tokens": 40, "temperature": 0}
    want = httpx.post(server.url + "/v1/completions", json=body, headers=server.headers(), timeout=60).json()
    got = httpx.post(spec_server.url + "/v1/completions", json=body, headers=spec_server.headers(), timeout=60).json()
    assert got["choices"][0]["text"] == want["choices"][0]["text"]
    t = got["timings"]
    assert t["predicted_n"] == got["usage"]["completion_tokens"] and t["prompt_n"] == got["usage"]["prompt_tokens"]
    assert 0 <= t["draft_n_accepted"] <= t["draft_n"] and t["draft_n"] > 0
    assert "draft_n" not in want["timings"]  # the plain server reports no drafting
    # A stream carries the timings on its last choice chunk.
    with httpx.stream("POST", spec_server.url + "/v1/completions", json=dict(body, stream=True),
                      headers=spec_server.headers(), timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want["choices"][0]["text"]
    # The first request's output is in the shared store now: the second drafts at least as much.
    streamed = chunks[-1]["timings"]
    assert streamed["draft_n"] >= t["draft_n"] and "timings" not in chunks[0]
    metrics = httpx.get(spec_server.url + "/metrics", headers=spec_server.headers()).text
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if not line.startswith("#")}
    assert values["glmoe:draft_tokens_total"] == t["draft_n"] + streamed["draft_n"]
    assert values["glmoe:draft_tokens_accepted_total"] == t["draft_n_accepted"] + streamed["draft_n_accepted"]


# ---- placement flags (-ngl, -ot, -cmoe, -ncmoe) -------------------------------------------

def test_cli_placement_flags_reach_the_settings():
    from glmoe.server.cli import parser, settings_from_args

    args = parser().parse_args(["-m", "x.gguf", "-ngl", "99", "-ot", "exps=CPU", "--override-tensor",
                                r"blk\.0\.=CUDA0,shexp=CPU", "-cmoe", "-ncmoe", "3"])
    s = settings_from_args(args)
    assert s.n_gpu_layers == 99 and s.cpu_moe and s.n_cpu_moe == 3
    assert s.tensor_overrides == ["exps=CPU", r"blk\.0\.=CUDA0,shexp=CPU"]
    s = settings_from_args(parser().parse_args(["-m", "x.gguf"]))
    assert (s.n_gpu_layers, s.tensor_overrides, s.cpu_moe, s.n_cpu_moe) == (0, [], False, 0)


@pytest.mark.parametrize("args, message", [
    (["-ot", "exps"], "expected PATTERN=BUFFER"), (["-ot", "exps=GPU"], "unknown buffer type 'GPU'"),
    (["-ot", "ffn_(up=CPU"], "invalid regular expression"), (["-ncmoe", "-1"], "--n-cpu-moe"),
])
def test_cli_bad_placement_flags_are_usage_errors(model_path, args, message, capsys):
    from glmoe.server.cli import main

    with pytest.raises(SystemExit) as e:
        main(["-m", model_path, *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_override_matching_no_tensor_fails_the_load(model_path):
    from glmoe.server.app import ServerState, _load
    from glmoe.server.settings import Settings

    state = ServerState()
    _load(state, Settings(model_path=model_path, n_ctx=256, n_parallel=1, n_threads=1, n_gpu_layers=-1,
                          tensor_overrides=["no_such_tensor=CPU"]))
    assert state.generator is None and "matches no tensor" in state.load_error


def test_placement_flags_serve_the_same_greedy_text(server, model_path):
    from cuda_support import HAVE_GPU

    placed = harness.ServerProcess(model_path, "-ngl", "-1", "-ot", "exps=CPU", "-ot", r"blk\.0\.=CUDA0",
                                   "-cmoe", "-ncmoe", "1")
    try:
        body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
        got = httpx.post(placed.url + "/v1/completions", json=body, headers=placed.headers(), timeout=60).json()
        assert got["usage"]["completion_tokens"] > 0
        if not HAVE_GPU:  # on the CPU the flags change nothing but where the weights would be
            want = httpx.post(server.url + "/v1/completions", json=body, headers=server.headers(), timeout=60).json()
            assert got["choices"][0]["text"] == want["choices"][0]["text"]
    finally:
        placed.stop()


def test_api_key_and_404(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="x", max_tokens=1)
    r = httpx.get(server.url + "/v1/nothing-here", headers=server.headers())
    assert r.status_code == 404 and set(r.json()["error"]) >= {"message", "type", "param", "code"}


def test_503_while_loading(model_path):
    import uvicorn

    from glmoe.server.app import create_app
    from glmoe.server.settings import Settings

    release = threading.Event()
    settings = Settings(model_path=model_path, n_ctx=512, n_parallel=1, n_threads=1,
                        before_load=lambda: release.wait(30))
    port = harness.free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                r = httpx.get(url + "/health")
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert r.status_code == 503 and r.json()["error"]["message"] == "Loading model"
        assert httpx.post(url + "/v1/completions", json={"prompt": "x"}).status_code == 503
        release.set()
        while httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        release.set()
        srv.should_exit = True
        thread.join(15)


# ---- the GLM parser on crafted text ------------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "zip": {"type": "string"}}}}}]
GLM_OUTPUT = ("\n<think>\nThe user wants weather.\n</think>\nLet me check.\n<tool_call>get_weather\n"
              "<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n"
              "<arg_value>3</arg_value>\n<arg_key>zip</arg_key>\n<arg_value>75001</arg_value>\n</tool_call>"
              "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Rome</arg_value>\n</tool_call>")


def test_parse_glm_output():
    p = parse(GLM_OUTPUT, TOOLS)
    assert p.reasoning == "The user wants weather." and p.content == "Let me check."
    assert [c["name"] for c in p.tool_calls] == ["get_weather"] * 2
    # Strings stay strings where the schema says so ("75001"); other values are JSON.
    assert json.loads(p.tool_calls[0]["arguments"]) == {"city": "Paris", "days": 3, "zip": "75001"}
    assert json.loads(p.tool_calls[1]["arguments"]) == {"city": "Rome"}
    no_tools = parse(GLM_OUTPUT, None)
    assert no_tools.tool_calls == [] and "<tool_call>" in no_tools.content
    assert parse(GLM_OUTPUT, TOOLS, reasoning=False).reasoning == ""
    assert parse("plain answer", TOOLS).content == "plain answer" and parse("plain answer").reasoning == ""
    unfinished = parse("<think>still going", TOOLS)
    assert unfinished.reasoning == "still going" and unfinished.content == ""
    assert parse("ok <tool_call>get_weather\n<arg_key>ci", TOOLS).content == "ok <tool_call>get_weather\n<arg_key>ci"


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_stream_parser_deltas_add_up(step):
    sp = StreamParser(TOOLS)
    deltas = []
    for i in range(0, len(GLM_OUTPUT), step):
        deltas += sp.feed(GLM_OUTPUT[i:i + step])
    deltas += sp.finish()
    whole = parse(GLM_OUTPUT, TOOLS)
    assert "".join(d.get("reasoning_content", "") for d in deltas).strip() == whole.reasoning
    assert "".join(d.get("content", "") for d in deltas).strip() == whole.content
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert [c["index"] for c in calls] == [0, 1]
    assert [c["function"] for c in calls] == whole.tool_calls
    assert all("<" not in d.get("content", "") for d in deltas)  # no markup leaks into content


# ---- llama.cpp's server flags (issue 18, point 2) -----------------------------------------

def _parse(*argv):
    from glmoe.server.cli import parser, settings_from_args

    return settings_from_args(parser().parse_args(["-m", "x.gguf", *argv]))


def test_cli_llama_flags_reach_the_settings(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# a comment\n\nkey-one\nkey-two\n")
    s = _parse("--jinja", "-n", "64", "-s", "42", "--temp", "0.6", "--top-k", "20", "--top-p", "0.9", "--min-p",
               "0.1", "--typical", "0.95", "--repeat-penalty", "1.1", "--repeat-last-n", "32", "--presence-penalty",
               "0.5", "--frequency-penalty", "0.25", "--reasoning-format", "none", "--reasoning-budget", "0",
               "--chat-template-kwargs", '{"foo": 1}', "--api-key", "k0", "--api-key-file", str(keys))
    assert s.n_predict == 64 and s.reasoning_format == "none"
    assert s.sampling_defaults == dict(seed=42, temperature=0.6, top_k=20, top_p=0.9, min_p=0.1, typical_p=0.95,
                                       repeat_penalty=1.1, repeat_last_n=32, presence_penalty=0.5,
                                       frequency_penalty=0.25)
    assert s.chat_template_kwargs == {"foo": 1, "enable_thinking": False}  # --reasoning-budget 0
    assert s.all_api_keys == ["k0", "key-one", "key-two"]
    llama_cpp = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)  # its server's, where no flag says
    assert _parse("--typical-p", "0.5", "--n-predict", "3", "--seed", "-1").sampling_defaults == \
        dict(llama_cpp, typical_p=0.5, seed=-1)
    s = _parse()  # no flag: llama.cpp's sampling defaults and -n -1, today's reasoning split
    assert (s.n_predict, s.sampling_defaults, s.reasoning_format, s.chat_template_kwargs) == \
        (-1, llama_cpp, "auto", {})
    # The template's own enable_thinking given explicitly wins over --reasoning-budget 0.
    assert _parse("--reasoning-budget", "0", "--chat-template-kwargs", '{"enable_thinking": true}') \
        .chat_template_kwargs == {"enable_thinking": True}


def test_cli_llama_cpp_python_spellings_are_aliases():
    from glmoe.server.cli import parser, unused_flags

    s = _parse("--n_ctx", "1024", "--n_batch", "64", "--n_threads", "3", "--n_gpu_layers", "-1", "--model_alias",
               "foo", "--api_key", "k", "--ssl_keyfile", "a.pem", "--ssl_certfile", "b.pem", "--seed", "3",
               "--last_n_tokens_size", "16")
    assert (s.n_ctx, s.n_batch, s.n_threads, s.n_gpu_layers, s.alias, s.api_key) == (1024, 64, 3, -1, "foo", "k")
    assert s.sampling_defaults == dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_last_n=16, seed=3)
    args = parser().parse_args(["--use_mmap", "False", "--use_mlock", "true", "--flash_attn", "1",
                                "--n_threads_batch", "4", "--cache", "no"])
    assert unused_flags(args) == "-tb 4, --flash_attn True, --cache False"  # --use_mlock is used
    assert args.use_mmap is False and _parse("--use_mmap", "1").use_mmap is True
    assert args.use_mlock is True and _parse("--use_mlock", "0").use_mlock is False


def test_cli_speed_only_flags_are_accepted_and_reported():
    from glmoe.server.cli import parser, unused_flags

    args = parser().parse_args(["-cb", "--cont-batching", "--no-warmup", "--no-mmap", "--mlock", "-tb", "4",
                                "--timeout", "30", "-fa", "-ub", "256", "-v", "--metrics"])
    assert unused_flags(args) == "-ub 256, -fa on, -tb 4"  # --timeout, --no-mmap and --mlock are used
    assert args.use_mmap is False and parser().parse_args([]).use_mmap is True
    assert _parse("--mlock").use_mlock is True and _parse().use_mlock is False
    assert args.timeout == 30 and parser().parse_args([]).timeout == 600  # llama.cpp's default
    assert args.verbose and unused_flags(parser().parse_args([])) == ""


@pytest.mark.parametrize("args, message", [
    (["--no-jinja"], "always renders the chat template with jinja"),
    (["-nocb"], "always batches"), (["--no-cont-batching"], "always batches"),
    (["--mirostat", "2"], "no such stage"), (["--xtc-probability", "0.5"], "no such stage"),
    (["--dry-multiplier", "0.8"], "no such stage"), (["--samplers", "top_k"], "order is fixed"),
    (["--pooling", "rank"], "reranking is not supported"),
    (["--cache-reuse", "256"], "not supported yet"),
    (["--slot-save-path", "/proc/no/such"], "not a usable directory"),
    (["--props"], "/props"), (["--grammar-file", "/no/such.gbnf"], "No such file"),
    (["--reasoning-budget", "-5"], "--reasoning-budget: -1 (unrestricted), 0 (no thinking) or a number"),
    (["--reasoning-format", "deepseek-legacy"], "invalid choice"),
    (["--chat-template-kwargs", "[1, 2]"], "must be a JSON object"),
    (["--chat-template-kwargs", "{nope"], "not JSON"),
    (["-n", "0"], "--n-predict must be"), (["-n", "-2"], "--n-predict must be"),
    (["--temp", "nan"], "--temp"), (["--top-p", "1.5"], "--top-p"), (["--seed", "-5"], "--seed"),
    (["--ssl-key-file", "key.pem"], "go together"), (["--chat_format", "chatml"], "jinja template"),
    (["--use_mmap", "maybe"], "not a boolean"), (["-lm", "mapped"], "unknown load mode 'mapped'"),
    (["--api-key-file", "/no/such/keys"], "no such file"),
])
def test_cli_refused_llama_flags_are_usage_errors(model_path, args, message, capsys):
    from glmoe.server.cli import main

    with pytest.raises(SystemExit) as e:
        main(["-m", model_path, *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_version_exits_0(capsys):
    from glmoe.server.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "glmoe" in capsys.readouterr().err


def test_model_failing_to_load_exits_the_server(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    proc = subprocess.run([sys.executable, "-m", "glmoe.server", "-m", str(bad), "--port", str(harness.free_port())],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "failed to load" in proc.stderr and "not a GGUF file" in proc.stderr


FLAG_SEED, FLAG_TEMP, FLAG_TOP_K, FLAG_N_PREDICT = 7, 0.9, 20, 5


@pytest.fixture(scope="module")
def flags_server(model_path, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("# not a key\n\nfile-key\n")
    srv = harness.ServerProcess(model_path, "--jinja", "-n", str(FLAG_N_PREDICT), "-s", str(FLAG_SEED),
                                "--temp", str(FLAG_TEMP), "--top-k", str(FLAG_TOP_K), "--reasoning-budget", "0",
                                "--reasoning-format", "none", "--api-key-file", str(keys), "-cb", "--no-warmup",
                                "--no-mmap", "--mlock", "-tb", "2", "--timeout", "30")
    yield srv
    srv.stop()


def _post(srv, path, body, key=harness.API_KEY):
    r = httpx.post(srv.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_mlock_locks_the_model_read_into_memory(flags_server, model_path):
    # --no-mmap --mlock: the server holds the file's bytes locked (VmLck), where Linux lets it.
    size = os.path.getsize(model_path)
    pid = flags_server.proc.pid
    locked = mlock_support.locked_bytes(pid)
    assert locked >= size if mlock_support.may_mlock(pid, size) else locked == 0


def test_n_predict_is_the_default_and_the_cap(flags_server):
    body = {"prompt": "Once upon a time", "ignore_eos": True, "temperature": 0}
    usage = lambda **kw: _post(flags_server, "/v1/completions", dict(body, **kw))["usage"]["completion_tokens"]
    assert usage() == FLAG_N_PREDICT  # no max_tokens: -n
    assert usage(max_tokens=3) == 3  # the request's own wins
    assert usage(n_predict=2) == 2  # llama.cpp's field name too
    assert usage(max_tokens=50) == FLAG_N_PREDICT  # capped at -n, as llama.cpp does
    chat = _post(flags_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                        "ignore_eos": True, "temperature": 0})
    assert chat["usage"]["completion_tokens"] == FLAG_N_PREDICT


def test_seed_and_sampling_defaults_apply_to_unset_fields(server, flags_server):
    body = {"prompt": "The weather today is", "max_tokens": 5, "ignore_eos": True}
    got = _post(flags_server, "/v1/completions", body)["choices"][0]["text"]
    assert got == _post(flags_server, "/v1/completions", body)["choices"][0]["text"]  # -s: the same each time
    explicit = dict(body, temperature=FLAG_TEMP, top_k=FLAG_TOP_K, seed=FLAG_SEED)
    assert got == _post(server, "/v1/completions", explicit)["choices"][0]["text"]
    # A request's own values win: greedy here equals greedy on the server without the flags.
    greedy = dict(body, temperature=0)
    assert _post(flags_server, "/v1/completions", greedy)["choices"][0]["text"] == \
        _post(server, "/v1/completions", greedy)["choices"][0]["text"]
    other_seed = dict(explicit, seed=FLAG_SEED + 1)  # a request's seed wins over -s
    assert _post(flags_server, "/v1/completions", other_seed)["choices"][0]["text"] == \
        _post(server, "/v1/completions", other_seed)["choices"][0]["text"]


def test_reasoning_budget_0_disables_thinking_in_the_template(server, flags_server):
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": 0}
    plain = _post(server, "/v1/chat/completions", chat)["usage"]["prompt_tokens"]
    no_think = _post(flags_server, "/v1/chat/completions", chat)["usage"]["prompt_tokens"]
    assert no_think > plain  # GLM's template adds "/nothink" and an empty <think></think>
    # The request's chat_template_kwargs win over the server's.
    thinking = dict(chat, chat_template_kwargs={"enable_thinking": True})
    assert _post(flags_server, "/v1/chat/completions", thinking)["usage"]["prompt_tokens"] == plain
    assert _post(server, "/v1/chat/completions", dict(chat, chat_template_kwargs={"enable_thinking": False})) \
        ["usage"]["prompt_tokens"] == no_think


def test_reasoning_format_none_keeps_reasoning_in_content(flags_server):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 24, "temperature": 0, "tools": tools,
            "chat_template_kwargs": {"enable_thinking": True}}
    raw = _post(flags_server, "/v1/chat/completions", chat)["choices"][0]["message"]
    assert "reasoning_content" not in raw  # the server's --reasoning-format none
    assert _post(flags_server, "/v1/chat/completions", dict(chat, reasoning_format="none"))["choices"][0]["message"] \
        == raw
    split = _post(flags_server, "/v1/chat/completions", dict(chat, reasoning_format="auto"))["choices"][0]["message"]
    parsed = parse(raw["content"] or "", tools)
    assert (split["content"] or "") == parsed.content and split.get("reasoning_content") == (parsed.reasoning or None)


def test_api_key_file_keys_and_api_key_both_work(flags_server):
    body = {"prompt": "x", "max_tokens": 1}
    for key in (harness.API_KEY, "file-key"):
        assert _post(flags_server, "/v1/completions", body, key=key)["usage"]["completion_tokens"] == 1
    for key in ("# not a key", "wrong"):
        r = httpx.post(flags_server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 401


def test_ssl_key_and_cert_serve_https(model_path, tmp_path):
    import shutil
    import subprocess

    if not shutil.which("openssl"):
        pytest.skip("no openssl to make a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    srv = harness.ServerProcess(model_path, "--ssl-key-file", str(key), "--ssl-cert-file", str(cert), scheme="https")
    try:
        r = httpx.get(srv.url + "/v1/models", headers=srv.headers(), verify=False)
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"
        with pytest.raises(httpx.HTTPError):
            httpx.get(srv.url.replace("https", "http") + "/health", timeout=5)
    finally:
        srv.stop()
