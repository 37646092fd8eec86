"""Constrained output for the server: a request's llama.cpp `grammar` (GBNF) / `json_schema` or
OpenAI `response_format` as a TokenConstraint (a bad one is a 400 with llguidance's message), and
the poll that feeds the engine each next token's mask.

The engine samples a constrained request's token only once its mask is set, and defers just that
request while the mask is late. The mask is computed in the polling worker thread as soon as the
previous token arrives, so it is ready while the engine's next step is still running."""
from __future__ import annotations

from typing import Optional

from starlette.concurrency import run_in_threadpool

from ..grammar import GrammarError, LlamaGrammar, TokenConstraint, grammar_for_response_format
from ..tokenizer import GGUFTokenizer
from .errors import APIError, bad_request


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


def _constraint(req, tokenizer: GGUFTokenizer) -> Optional[TokenConstraint]:
    grammar = _grammar_of(req)
    if grammar is None:
        return None
    if req.ignore_eos:
        raise bad_request("ignore_eos cannot be combined with a grammar (the grammar ends the output)", "ignore_eos")
    try:
        constraint = TokenConstraint(grammar, tokenizer)
        constraint.next_mask()  # the first token's, here rather than on the event loop
    except ValueError as e:
        raise bad_request(str(e)) from None
    return constraint


async def constraint_for(req, tokenizer: GGUFTokenizer) -> Optional[TokenConstraint]:
    """req's output constraint, or None. Compiled off the event loop: a big grammar takes a while."""
    if not req.grammar and req.json_schema is None and req.response_format is None:
        return None
    return await run_in_threadpool(_constraint, req, tokenizer)


def poll_constrained(engine, constraint: TokenConstraint, request_id: int, timeout: float) -> dict:
    """engine.poll(), then the grammar takes the new token and the engine gets the next one's mask."""
    ev = engine.poll(request_id, timeout)
    if ev["tokens"] and not ev["finished"]:
        try:
            for token in ev["tokens"]:
                constraint.accept(token)
            mask = constraint.next_mask()
        except GrammarError as e:
            raise APIError(500, f"constrained decoding failed: {e}") from None
        engine.set_token_mask(request_id, constraint.n_accepted, mask)
    return ev
