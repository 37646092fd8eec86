"""Constrained decoding (llguidance): JSON Schema, json_object and GBNF grammars through `Llama`
(grammar=, response_format=), llama-server (response_format, grammar, json_schema) and the engine's
per-request token masks. The tiny random model writes no JSON of its own, and these tests sample
its whole distribution (temperature 1, no top-k / top-p / min-p): only the grammar keeps the
output valid."""
from __future__ import annotations

import concurrent.futures
import json
import re
import threading
import time

import httpx
import numpy as np
import pytest

import glmoe
from glmoe import _core
from glmoe.grammar import GrammarError, LlamaGrammar, TokenConstraint
from glmoe.tokenizer import GGUFTokenizer

FULL = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)  # every token the grammar allows can be drawn
SEEDS = range(6)
PET_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "tags": {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 9}, "maxItems": 3},
        "owner": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                                   "vip": {"type": "boolean"}},
                  "required": ["id", "vip"], "additionalProperties": False},
    },
    "required": ["name", "kind", "age", "tags", "owner"],
    "additionalProperties": False,
}
YES_NO = 'root ::= "yes" | "no"'
# Bounded, so that a random model's expressions end: up to four terms, one level of parentheses.
ARITHMETIC = r'''root ::= term (op term){0,3}
term ::= num | "(" num (op num){1,2} ")"
num  ::= [1-9] [0-9]{0,2} | "0"
op   ::= " + " | " - " | " * "
'''
_NUM, _OP = r"(?:[1-9][0-9]{0,2}|0)", r"(?: \+ | - | \* )"
_TERM = rf"(?:{_NUM}|\({_NUM}(?:{_OP}{_NUM}){{1,2}}\))"
ARITHMETIC_RE = re.compile(rf"{_TERM}(?:{_OP}{_TERM}){{0,3}}")
QUOTE = 34  # the byte token '"' of the tiny vocabulary


def schema_errors(value, schema, path="$"):
    """What in value breaks schema (the keywords PET_SCHEMA uses); [] when it conforms."""
    errors = []
    kind = schema.get("type")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in enum")
    if kind == "object":
        if not isinstance(value, dict):
            return [f"{path}: not an object"]
        props = schema.get("properties", {})
        errors += [f"{path}: missing {k}" for k in schema.get("required", []) if k not in value]
        if schema.get("additionalProperties") is False:
            errors += [f"{path}: extra {k}" for k in value if k not in props]
        for k, v in value.items():
            if k in props:
                errors += schema_errors(v, props[k], f"{path}.{k}")
    elif kind == "array":
        if not isinstance(value, list) or len(value) > schema.get("maxItems", len(value)):
            return [f"{path}: not an array of at most {schema.get('maxItems')} items"]
        for i, v in enumerate(value):
            errors += schema_errors(v, schema["items"], f"{path}[{i}]")
    elif kind == "integer":
        if type(value) is not int or not schema.get("minimum", value) <= value <= schema.get("maximum", value):
            errors.append(f"{path}: {value!r} is not an integer in range")
    elif kind == "string":
        if not isinstance(value, str) or len(value) > schema.get("maxLength", len(value)):
            errors.append(f"{path}: {value!r} is not a short string")
    elif kind == "boolean" and not isinstance(value, bool):
        errors.append(f"{path}: {value!r} is not a boolean")
    return errors


def is_arithmetic(text: str) -> bool:
    """text is a sentence of ARITHMETIC (and so Python computes it)."""
    return ARITHMETIC_RE.fullmatch(text) is not None and isinstance(eval(text, {"__builtins__": {}}), int)


@pytest.fixture(scope="module")
def llm(model_path):
    return glmoe.Llama(model_path, n_ctx=1024, n_threads=1, verbose=False)


def post(server, path, body):
    return httpx.post(server.url + path, json=body, headers=server.headers(), timeout=60)


# ---- Llama ---------------------------------------------------------------------------------------

def test_llama_json_schema_always_validates(llm):
    grammar = LlamaGrammar.from_json_schema(json.dumps(PET_SCHEMA))
    outputs = set()
    for seed in SEEDS:
        r = llm("Tell me about a pet:", grammar=grammar, max_tokens=400, seed=seed, **FULL)["choices"][0]
        assert r["finish_reason"] == "stop", r
        assert schema_errors(json.loads(r["text"]), PET_SCHEMA) == []
        outputs.add(r["text"])
        # The same draw without the grammar is no JSON at all.
        free = llm("Tell me about a pet:", max_tokens=60, seed=seed, **FULL)["choices"][0]["text"]
        with pytest.raises(ValueError):
            json.loads(free)
    assert len(outputs) == len(SEEDS)  # the seeds really sample


def test_llama_chat_response_format(llm):
    chat = [{"role": "user", "content": "Answer in JSON."}]
    schema_format = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET_SCHEMA, "strict": True}}
    for seed in SEEDS:
        r = llm.create_chat_completion(chat, response_format=schema_format, max_tokens=400, seed=seed, **FULL)
        assert r["choices"][0]["finish_reason"] == "stop"
        assert schema_errors(json.loads(r["choices"][0]["message"]["content"]), PET_SCHEMA) == []
    # Any object: a bias for '"' keeps the random model's keys and strings short (and would wreck
    # JSON on its own: the grammar decides where a quote may go).
    non_empty = 0
    for seed in SEEDS:
        r = llm.create_chat_completion(chat, response_format={"type": "json_object"}, max_tokens=400, seed=seed,
                                       logit_bias={QUOTE: 4.0}, **FULL)
        assert r["choices"][0]["finish_reason"] == "stop"
        value = json.loads(r["choices"][0]["message"]["content"])
        assert isinstance(value, dict)
        non_empty += bool(value)
    assert non_empty >= len(SEEDS) // 2
    text = llm.create_chat_completion(chat, response_format={"type": "text"}, max_tokens=8, seed=0, **FULL)
    assert text["choices"][0]["message"]["content"]  # text: no constraint


def test_llama_gbnf_grammars(llm):
    yes_no = LlamaGrammar.from_string(YES_NO)
    answers = [llm("Q:", grammar=yes_no, max_tokens=10, seed=s, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)
               ["choices"][0] for s in range(16)]
    assert {a["text"] for a in answers} == {"yes", "no"} and {a["finish_reason"] for a in answers} == {"stop"}
    arithmetic = LlamaGrammar.from_string(ARITHMETIC)
    texts = []
    for seed in SEEDS:
        r = llm("Compute:", grammar=arithmetic, max_tokens=200, seed=seed, **FULL)["choices"][0]
        assert r["finish_reason"] == "stop" and is_arithmetic(r["text"]), r
        texts.append(r["text"])
    assert any(set("+-*") & set(t) for t in texts)  # not only single numbers
    # Streaming takes the same grammar path.
    chunks = list(llm("Compute:", grammar=arithmetic, max_tokens=200, seed=0, stream=True, **FULL))
    assert "".join(c["choices"][0]["text"] for c in chunks) == texts[0]


def test_llama_grammar_of_llama_cpp_python_and_files(llm, tmp_path):
    class LlamaCppPythonGrammar:  # llama-cpp-python's LlamaGrammar keeps its GBNF in _grammar
        _grammar = YES_NO

    r = llm("Q:", grammar=LlamaCppPythonGrammar(), max_tokens=5, seed=1, **FULL)
    assert r["choices"][0]["text"] in ("yes", "no")
    path = tmp_path / "g.gbnf"
    path.write_text(ARITHMETIC)
    r = llm("Compute:", grammar=LlamaGrammar.from_file(str(path)), max_tokens=200, seed=1, **FULL)
    assert is_arithmetic(r["choices"][0]["text"])
    with pytest.raises(TypeError):
        llm("Q:", grammar="root ::= \"x\"", max_tokens=5)


def test_llama_max_tokens_ends_json_with_length(llm):
    grammar = LlamaGrammar.from_json_schema(PET_SCHEMA)
    r = llm("Pet:", grammar=grammar, max_tokens=4, seed=0, **FULL)["choices"][0]
    assert r["finish_reason"] == "length" and r["text"].startswith("{")
    with pytest.raises(ValueError):
        json.loads(r["text"])
    chunks = list(llm("Pet:", grammar=grammar, max_tokens=4, seed=0, stream=True, **FULL))
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks) == r["text"]


def test_grammar_errors_are_clear(llm):
    with pytest.raises(GrammarError, match="Rule 'undefined' not found"):
        LlamaGrammar.from_string("root ::= undefined")
    with pytest.raises(GrammarError, match="Unexpected end of input"):
        LlamaGrammar.from_string('root ::= "unterminated')
    with pytest.raises(ValueError, match="Invalid type: wizard"):
        LlamaGrammar.from_json_schema({"type": "wizard"})
    with pytest.raises(ValueError, match="not JSON"):
        LlamaGrammar.from_json_schema("{not json")
    chat = [{"role": "user", "content": "x"}]
    with pytest.raises(ValueError, match="response_format type"):
        llm.create_chat_completion(chat, response_format={"type": "xml"})
    with pytest.raises(ValueError, match="not both"):
        llm.create_chat_completion(chat, response_format={"type": "json_object"},
                                   grammar=LlamaGrammar.from_string(YES_NO))
    with pytest.raises(NotImplementedError):  # sample() samples one token without grammar state
        llm.sample(grammar=LlamaGrammar.from_string(YES_NO))


# ---- engine: per-request token masks ----------------------------------------------------------------

def _drive(engine, rid, constraint, delay=0.0, progress=None):
    """Polls a constrained request to its end, answering each token with the next mask (after
    `delay`, to make the engine wait for it); returns its tokens and finish reason."""
    tokens = []
    while True:
        ev = engine.poll(rid, 10.0)
        tokens += ev["tokens"]
        if progress is not None:
            progress[0] = len(tokens)
        if ev["finished"]:
            return tokens, ev["finish_reason"]
        if ev["tokens"]:
            for t in ev["tokens"]:
                constraint.accept(t)
            time.sleep(delay)
            assert engine.set_token_mask(rid, constraint.n_accepted, constraint.next_mask())


def _plain(engine, rid):
    tokens = []
    while True:
        ev = engine.poll(rid, 10.0)
        tokens += ev["tokens"]
        if ev["finished"]:
            return tokens


def test_engine_masked_request_waits_alone(model_path):
    """A constrained request whose masks come late holds back only itself: the unconstrained one
    beside it runs on and gives what it gives alone, and so does the constrained one."""
    tok = GGUFTokenizer.from_gguf(model_path)
    eog = sorted(tok.eog_ids)
    engine = _core.BatchEngine(_core.Model(model_path), 1024, n_parallel=2, n_threads=1)
    grammar = LlamaGrammar.from_json_schema(PET_SCHEMA)
    plain_prompt, schema_prompt = tok.tokenize(b"Once upon a time"), tok.tokenize(b"Pet:")
    try:
        def submit_plain():
            return engine.submit(plain_prompt, 150, [], seed=7, **FULL)

        def submit_constrained():
            c = TokenConstraint(grammar, tok)
            return engine.submit(schema_prompt, 300, eog, seed=3, token_mask=c.next_mask(), **FULL), c

        plain_alone = _plain(engine, submit_plain())
        rid, c = submit_constrained()
        constrained_alone, reason = _drive(engine, rid, c)
        assert reason == "stop" and len(plain_alone) == 150
        assert schema_errors(json.loads(tok.detokenize(constrained_alone)), PET_SCHEMA) == []

        rid, c = submit_constrained()
        plain_rid = submit_plain()
        progress = [0]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            constrained = pool.submit(_drive, engine, rid, c, 0.01, progress)
            plain = _plain(engine, plain_rid)
            constrained_when_plain_done = progress[0]
            assert constrained.result() == (constrained_alone, "stop")
        assert plain == plain_alone
        assert constrained_when_plain_done < len(constrained_alone) // 2
    finally:
        engine.shutdown()


def test_engine_token_mask_checks(model_path):
    engine = _core.BatchEngine(_core.Model(model_path), 256, n_parallel=1, n_threads=1)
    try:
        words = engine.mask_words
        assert words == (512 + 31) // 32
        only_a = _mask_of([ord("a")], words)
        with pytest.raises(ValueError, match="words"):
            engine.submit([1, 2], 4, [], token_mask=only_a[:-1], **FULL)
        rid = engine.submit([1, 2], 3, [], token_mask=only_a, seed=1, **FULL)
        with pytest.raises(ValueError, match="mask for generated token 5, but the request's next token"):
            engine.set_token_mask(rid, 5, only_a)
        tokens = []
        while True:
            ev = engine.poll(rid, 10.0)
            tokens += ev["tokens"]
            if ev["finished"]:
                break
            if ev["tokens"]:
                assert engine.set_token_mask(rid, len(tokens), only_a)
        assert tokens == [ord("a")] * 3 and ev["finish_reason"] == "length"
        assert engine.set_token_mask(rid, 3, only_a) is False  # finished and forgotten
        free = engine.submit([1, 2], 2, [], **FULL)
        with pytest.raises(ValueError, match="without a token_mask"):
            engine.set_token_mask(free, 0, only_a)
        _plain(engine, free)
    finally:
        engine.shutdown()


def _mask_of(tokens, words):
    mask = np.zeros(words, dtype=np.uint32)
    for t in tokens:
        mask[t // 32] |= np.uint32(1 << (t % 32))
    return mask


# ---- llama-server ----------------------------------------------------------------------------------

def test_server_chat_response_format(server):
    chat = [{"role": "user", "content": "A pet, in JSON."}]
    for seed in SEEDS:
        body = {"messages": chat, "seed": seed, "max_tokens": 400, **FULL,
                "response_format": {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET_SCHEMA}}}
        choice = post(server, "/v1/chat/completions", body).json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        assert schema_errors(json.loads(choice["message"]["content"]), PET_SCHEMA) == []
        body = {"messages": chat, "seed": seed, "max_tokens": 400, "logit_bias": {str(QUOTE): 4.0}, **FULL,
                "response_format": {"type": "json_object"}}
        choice = post(server, "/v1/chat/completions", body).json()["choices"][0]
        assert choice["finish_reason"] == "stop" and isinstance(json.loads(choice["message"]["content"]), dict)


def test_server_completion_fields(server):
    for seed in SEEDS:
        base = {"prompt": "Q:", "seed": seed, "max_tokens": 200, **FULL}
        r = post(server, "/v1/completions", dict(base, grammar=ARITHMETIC)).json()["choices"][0]
        assert r["finish_reason"] == "stop" and is_arithmetic(r["text"]), r
        r = post(server, "/v1/completions", dict(base, json_schema=PET_SCHEMA, max_tokens=400)).json()["choices"][0]
        assert r["finish_reason"] == "stop" and schema_errors(json.loads(r["text"]), PET_SCHEMA) == []
        r = post(server, "/v1/completions", dict(base, response_format={"type": "json_object", "schema": PET_SCHEMA},
                                                 max_tokens=400)).json()["choices"][0]
        assert schema_errors(json.loads(r["text"]), PET_SCHEMA) == []
    events = httpx.post(server.url + "/v1/completions", headers=server.headers(), timeout=60,
                        json={"prompt": "Q:", "seed": 1, "max_tokens": 200, "grammar": YES_NO, "stream": True, **FULL})
    chunks = [json.loads(line[6:]) for line in events.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert "".join(c["choices"][0]["text"] for c in chunks) in ("yes", "no")
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_server_matches_llama(server, llm):
    """The engine's masked sampling is Llama's: same prompt, grammar and seed, same tokens."""
    prompt = llm.tokenize(b"Pet:")
    for seed in SEEDS[:3]:
        mine = llm(prompt, grammar=LlamaGrammar.from_json_schema(PET_SCHEMA), max_tokens=400, seed=seed, **FULL)
        served = post(server, "/v1/completions", {"prompt": prompt, "json_schema": PET_SCHEMA, "seed": seed,
                                                   "max_tokens": 400, **FULL}).json()
        assert served["choices"][0]["text"] == mine["choices"][0]["text"]


def test_server_batched_constrained_and_plain(server):
    """Requests in one batch, some constrained: each answers as it does alone."""
    plain = {"prompt": "Once upon a time", "seed": 11, "max_tokens": 300, "ignore_eos": True, **FULL}
    schema = {"prompt": "Pet:", "seed": 5, "max_tokens": 400, "json_schema": PET_SCHEMA, **FULL}
    gbnf = {"prompt": "Compute:", "seed": 2, "max_tokens": 200, "grammar": ARITHMETIC, **FULL}
    alone = [post(server, "/v1/completions", body).json()["choices"][0]["text"] for body in (plain, schema, gbnf)]
    bodies = [plain, schema, gbnf, plain]
    start = threading.Barrier(len(bodies))

    def run(body):
        start.wait()
        return post(server, "/v1/completions", body).json()["choices"][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(run, bodies))
    assert together == [alone[0], alone[1], alone[2], alone[0]]
    assert schema_errors(json.loads(together[1]), PET_SCHEMA) == [] and is_arithmetic(together[2])


def test_server_max_tokens_ends_json_with_length(server):
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "seed": 0, **FULL,
            "response_format": {"type": "json_schema", "json_schema": {"schema": PET_SCHEMA}}}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    events = httpx.post(server.url + "/v1/chat/completions", headers=server.headers(), timeout=60,
                        json=dict(body, stream=True)).text
    assert '"finish_reason": "length"' in events and events.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("path, extra, param, message", [
    ("/v1/completions", {"grammar": "root ::= undefined"}, "grammar", "Rule 'undefined' not found"),
    ("/v1/completions", {"grammar": "start: %undefined_directive"}, "grammar", ""),
    ("/v1/completions", {"json_schema": {"type": "wizard"}}, "json_schema", "Invalid type: wizard"),
    ("/v1/completions", {"grammar": YES_NO, "json_schema": {"type": "object"}}, "json_schema", "together"),
    ("/v1/completions", {"grammar": YES_NO, "ignore_eos": True}, "ignore_eos", "ignore_eos"),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format", "response_format type"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format", "json_schema object"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"schema": {"minimum": "x"}}}},
     "response_format", ""),
])
@pytest.mark.parametrize("stream", [False, True])
def test_server_bad_constraints_are_400(server, path, extra, param, message, stream):
    base = {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    r = post(server, path, dict(base, max_tokens=4, stream=stream, **extra))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"] and len(error["message"]) > len(param) + 2
