"""A text completion as OpenAI's chat completion (or its stream of chunks): GLM's <think> block
becomes reasoning_content and its tool-call markup tool_calls, with llama-server's parser (a forced
call is that markup too: chat_tools.ToolCallGrammar). The streamed deltas add up to the unstreamed
message: content and reasoning_content are stripped at both ends in both."""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional

from .chat_tools import ToolPlan
from .server.tool_parsing import StreamParser, openai_tool_calls, parse

_TEXT_FIELDS = ("reasoning_content", "content")


def chat_logprobs(lp) -> Optional[dict]:
    """Legacy completion logprobs as a chat choice's {"content": [...]}."""
    if lp is None:
        return None
    content = []
    for text, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        content.append({
            "token": text, "logprob": value, "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))}
                             for t, v in (top or {}).items()],
        })
    return {"content": content}


def _finish_reason(reason: Optional[str], n_calls: int) -> Optional[str]:
    return "tool_calls" if n_calls and reason == "stop" else reason


def _parsed(plan: ToolPlan, text: str, reasoning: bool):
    """(content, reasoning_content, [{"name", "arguments"}]) of a finished answer."""
    parsed = parse(text, plan.tools, reasoning)
    return parsed.content, parsed.reasoning, parsed.tool_calls


def chat_response(completion: dict, plan: ToolPlan, reasoning: bool) -> dict:
    choice = completion["choices"][0]
    content, reasoning_text, calls = _parsed(plan, choice["text"], reasoning)
    tool_calls = openai_tool_calls(calls)
    message = {"role": "assistant", "content": content if content or not tool_calls else None}
    if reasoning_text:
        message["reasoning_content"] = reasoning_text
    if tool_calls:
        message["tool_calls"] = tool_calls
        if plan.legacy:
            message["function_call"] = dict(calls[0])
    return {
        "id": "chat" + completion["id"], "object": "chat.completion", "created": completion["created"],
        "model": completion["model"],
        "choices": [{"index": 0, "message": message, "logprobs": chat_logprobs(choice["logprobs"]),
                     "finish_reason": _finish_reason(choice["finish_reason"], len(calls))}],
        "usage": completion["usage"],
    }


class _Trimmed:
    """A parser's deltas with content and reasoning_content stripped at both ends, as parse()
    strips them: leading whitespace of a field is dropped, trailing whitespace is held back until
    more of that field follows, and dropped at the end."""

    def __init__(self, parser):
        self._parser = parser
        self._started: Dict[str, bool] = {}
        self._held: Dict[str, str] = {}

    @property
    def n_tool_calls(self) -> int:
        return self._parser.n_tool_calls

    def feed(self, piece: str) -> List[dict]:
        return self._trim(self._parser.feed(piece))

    def finish(self) -> List[dict]:
        return self._trim(self._parser.finish())

    def _trim(self, deltas: List[dict]) -> List[dict]:
        out = []
        for delta in deltas:
            delta = dict(delta)
            for field in _TEXT_FIELDS:
                if field not in delta:
                    continue
                text = delta[field] if self._started.get(field) else delta[field].lstrip()
                text = self._held.get(field, "") + text if text else ""
                body = text.rstrip()
                if body:
                    self._started[field] = True
                    self._held[field] = text[len(body):]
                    delta[field] = body
                else:
                    if text:
                        self._held[field] = text
                    del delta[field]
            if delta:
                out.append(delta)
        return out


def chat_chunks(chunks, plan: ToolPlan, reasoning: bool) -> Iterator[dict]:
    try:
        yield from _chunks_of(chunks, plan, reasoning)
    finally:  # closing the chat stream closes the completion stream (and releases its lock)
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _chunks_of(chunks, plan: ToolPlan, reasoning: bool) -> Iterator[dict]:
    parser = _Trimmed(StreamParser(plan.tools, reasoning))
    pending_logprobs: List[dict] = []  # of tokens whose text the parser still holds back
    first = True

    def chunk(source, delta, finish_reason=None):
        logprobs = {"content": pending_logprobs[:]} if pending_logprobs else None
        pending_logprobs.clear()
        return {"id": "chat" + source["id"], "object": "chat.completion.chunk", "created": source["created"],
                "model": source["model"],
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}

    def with_legacy(delta):
        if plan.legacy and delta.get("tool_calls") and delta["tool_calls"][0]["index"] == 0:
            delta = dict(delta, function_call=dict(delta["tool_calls"][0]["function"]))
        return delta

    for source in chunks:
        choice = source["choices"][0]
        if first:
            yield {"id": "chat" + source["id"], "object": "chat.completion.chunk", "created": source["created"],
                   "model": source["model"],
                   "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}]}
            first = False
        lp = chat_logprobs(choice["logprobs"])
        if lp is not None:
            pending_logprobs.extend(lp["content"])
        if choice["finish_reason"] is not None:
            for delta in parser.finish():
                yield chunk(source, with_legacy(delta))
            yield chunk(source, {}, _finish_reason(choice["finish_reason"], parser.n_tool_calls))
        elif choice["text"]:
            for delta in parser.feed(choice["text"]):
                yield chunk(source, with_legacy(delta))
