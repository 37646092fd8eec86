"""Constrained output for the server: a request's llama.cpp `grammar` (GBNF) / `json_schema` or
OpenAI `response_format`, or the tool calls its tool_choice / parallel_tool_calls demand
(tool_grammar.py), as TokenConstraints (a bad one is a 400 with llguidance's message), and the poll
that feeds the engine each next token's mask.

A request that sets none of them gets the server's default (--grammar, --grammar-file, -j, -jf), as
in llama.cpp. The app sets it per request in SERVER_DEFAULT (a ContextVar), so that every route
that builds constraints, the Anthropic one included, applies it without passing it along.

The engine samples a constrained request's token only once its mask is set, and defers just that
request while the mask is late. The mask is computed in the polling worker thread as soon as the
previous token arrives, so it is ready while the engine's next step is still running."""
from __future__ import annotations

import contextvars
from typing import List, Optional

from starlette.concurrency import run_in_threadpool

from ..grammar import GrammarError, LlamaGrammar, TokenConstraint, grammar_for_response_format
from ..tokenizer import GGUFTokenizer
from .errors import APIError, bad_request
from .tool_grammar import policy_for, tool_grammar

SERVER_DEFAULT: "contextvars.ContextVar[Optional[LlamaGrammar]]" = contextvars.ContextVar("glmoe_server_grammar",
                                                                                         default=None)


def _sets_grammar(req) -> bool:
    """Whether req asks for a grammar of its own ("" and response_format text are llama.cpp's "none")."""
    rf = req.response_format
    return bool(req.grammar) or req.json_schema is not None or \
        (rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"))


def _grammar_of(req) -> Optional[LlamaGrammar]:
    """The request's grammar, as llama.cpp's server reads the three fields (one of them at most)."""
    gbnf = req.grammar or None  # "" is llama.cpp's "no grammar"
    given = [name for name, value in (("grammar", gbnf), ("json_schema", req.json_schema)) if value is not None]
    rf = req.response_format
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        given.append("response_format")
    if len(given) > 1:
        raise bad_request(f"{given[0]} and {given[1]} cannot be used together", given[1])
    try:
        if gbnf is not None:
            return LlamaGrammar.from_string(gbnf, verbose=False)
        if req.json_schema is not None:
            schema = {"type": "object"} if req.json_schema == {} else req.json_schema  # llama.cpp: any object
            return LlamaGrammar.from_json_schema(schema, verbose=False)
        return grammar_for_response_format(rf)
    except GrammarError as e:
        raise bad_request(f"{given[0]}: {e}", given[0]) from None


def _tool_choice(req) -> Optional[str]:
    """A 400 for a tool_choice that is not OpenAI's; "named" for a function's name, else the string."""
    choice = getattr(req, "tool_choice", None)
    if isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request('tool_choice: "none", "auto", "required" or {"type": "function", "function": '
                              '{"name": ...}}', "tool_choice")
        choice = "named"
    if choice in ("required", "named") and not getattr(req, "tools", None):
        raise bad_request("tool_choice: forcing a tool call needs tools", "tool_choice")
    return choice


def _tool_grammar_of(req, tokenizer: GGUFTokenizer, prompt: Optional[str]) -> Optional[LlamaGrammar]:
    _tool_choice(req)
    tools = [t.model_dump(exclude_none=True) for t in getattr(req, "tools", None) or []]
    try:
        policy = policy_for(tools, getattr(req, "tool_choice", None), getattr(req, "parallel_tool_calls", None),
                            prompt)
        return None if policy is None else tool_grammar(tools, policy, tokenizer)
    except (ValueError, KeyError) as e:  # GrammarError is a ValueError
        raise bad_request(f"tool_choice: {e}", "tool_choice") from None


def _constraints(req, tokenizer: GGUFTokenizer, n: int, prompt: Optional[str],
                 server_default: Optional[LlamaGrammar]) -> List[Optional[TokenConstraint]]:
    grammar, tools = _grammar_of(req), _tool_grammar_of(req, tokenizer, prompt)
    if grammar is not None and tools is not None:
        raise bad_request("a grammar or response_format cannot be combined with a forced tool call (tool_choice "
                          "required or a function, or parallel_tool_calls false)", "tool_choice")
    grammar = grammar or tools
    if grammar is None and not _sets_grammar(req):
        grammar = server_default
    if grammar is None:
        return [None] * n
    if req.ignore_eos:
        why = "the grammar ends the output" if grammar is not server_default else \
            "the server's --grammar / --json-schema ends the output"
        raise bad_request(f"ignore_eos cannot be combined with a grammar ({why})", "ignore_eos")
    out = []
    try:
        for _ in range(n):  # one per choice: each follows its own tokens
            constraint = TokenConstraint(grammar, tokenizer)
            constraint.next_mask()  # the first token's, here rather than on the event loop
            out.append(constraint)
    except ValueError as e:
        raise bad_request(str(e)) from None
    return out


def _wants_tools(req) -> bool:
    return _tool_choice(req) in ("required", "named") or (getattr(req, "parallel_tool_calls", None) is False
                                                          and bool(getattr(req, "tools", None)))


async def constraints_for(req, tokenizer: GGUFTokenizer, n: int = 1,
                          prompt: Optional[str] = None) -> List[Optional[TokenConstraint]]:
    """req's output constraint for each of n generations (None: no constraint). prompt: a chat
    request's rendered prompt (whether it leaves the model room to think). Compiled off the event
    loop: a big grammar takes a while."""
    server_default = SERVER_DEFAULT.get()
    if server_default is None and not _sets_grammar(req) and not _wants_tools(req):
        return [None] * n
    return await run_in_threadpool(_constraints, req, tokenizer, n, prompt, server_default)


def poll_constrained(engine, constraint: TokenConstraint, n_before: int, request_id: int, timeout: float) -> dict:
    """engine.poll(), then the grammar takes the new token and the engine gets the next one's mask.
    n_before: the tokens the constraint took before this request (an earlier request's, continued)."""
    ev = engine.poll(request_id, timeout)
    if ev["tokens"] and not ev["finished"]:
        try:
            for token in ev["tokens"]:
                constraint.accept(token)
            mask = constraint.next_mask()
        except GrammarError as e:
            raise APIError(500, f"constrained decoding failed: {e}") from None
        engine.set_token_mask(request_id, constraint.n_accepted - n_before, mask)
    return ev
