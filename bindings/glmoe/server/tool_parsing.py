"""GLM-4.5's assistant output back into OpenAI's fields: the `<think>...</think>` block into
reasoning_content, `<tool_call>NAME\n<arg_key>K</arg_key>\n<arg_value>V</arg_value>...</tool_call>`
blocks into tool_calls, the rest into content.

parse() reads a finished text. The streaming parser re-parses the text so far, holding back
whatever could still turn into markup (an unfinished tag, an open tool call), and hands out only
what grew since the last call, so the deltas add up to what parse() gives for the whole text
(but for the whitespace parse() strips from the ends of content and reasoning)."""
from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any, Dict, List, Optional

from ..completion import held_back_for_stop

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)


@dataclasses.dataclass
class Parsed:
    content: str = ""
    reasoning: str = ""
    tool_calls: List[Dict[str, Any]] = dataclasses.field(default_factory=list)  # {"name", "arguments": str}


def _string_params(tools: Optional[List[dict]]) -> Dict[str, set]:
    """Per function, the parameters its schema declares as strings (their values stay raw text)."""
    out = {}
    for tool in tools or []:
        fn = tool.get("function", tool)
        params = fn.get("parameters") if isinstance(fn, dict) else None
        props = params.get("properties") if isinstance(params, dict) else None
        if not isinstance(props, dict):  # schemas.py refuses such tools; a Python caller may not
            props = {}
        out[fn.get("name") if isinstance(fn, dict) else None] = {k for k, v in props.items() if isinstance(v, dict) and v.get("type") == "string"}
    return out


def parse_tool_call(body: str, string_params: Dict[str, set]) -> Dict[str, str]:
    """One `NAME\\n<arg_key>..` block (without its tool_call tags) as {"name", "arguments"}."""
    name = body.split("<arg_key>", 1)[0].strip()
    args: Dict[str, Any] = {}
    for key, raw in _ARG.findall(body):
        key = key.strip()
        # The template writes strings raw and everything else as JSON.
        if key in string_params.get(name, ()):
            args[key] = raw
        else:
            try:
                args[key] = json.loads(raw)
            except ValueError:
                args[key] = raw
    return {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}


def _split(text: str, final: bool, parse_tools: bool, parse_think: bool, string_params) -> Parsed:
    out = Parsed()
    rest = text
    if parse_think:
        lead = rest.lstrip()
        if lead.startswith(THINK_OPEN):
            inner = lead[len(THINK_OPEN):]
            end = inner.find(THINK_CLOSE)
            if end < 0:  # still thinking
                keep = len(inner) if final else len(inner) - held_back_for_stop(inner, [THINK_CLOSE])
                out.reasoning = inner[:keep].lstrip()
                return out
            out.reasoning = inner[:end].lstrip()
            rest = inner[end + len(THINK_CLOSE):]
        elif not final and THINK_OPEN.startswith(lead):
            return out  # might still become <think>
    rest = rest.lstrip()
    pos = 0
    while parse_tools:
        start = rest.find(CALL_OPEN, pos)
        if start < 0:
            break
        out.content += rest[pos:start]
        end = rest.find(CALL_CLOSE, start)
        if end < 0:
            if final:  # an unfinished call is shown as text rather than lost
                out.content += rest[start:]
            pos = len(rest)
            break
        out.tool_calls.append(parse_tool_call(rest[start + len(CALL_OPEN):end], string_params))
        pos = end + len(CALL_CLOSE)
    tail = rest[pos:]
    if not final and parse_tools:
        tail = tail[: len(tail) - held_back_for_stop(tail, [CALL_OPEN])]
    out.content += tail
    return out


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def parse(text: str, tools: Optional[List[dict]] = None, reasoning: bool = True) -> Parsed:
    """The finished assistant text; tool calls are looked for only when the request had tools."""
    parsed = _split(text, True, bool(tools), reasoning, _string_params(tools))
    parsed.content, parsed.reasoning = parsed.content.strip(), parsed.reasoning.strip()
    return parsed


class StreamParser:
    """Feeds text pieces, returns OpenAI chat delta dicts (reasoning_content, content, tool_calls)."""

    def __init__(self, tools: Optional[List[dict]] = None, reasoning: bool = True):
        self._tools, self._reasoning = bool(tools), reasoning
        self._string_params = _string_params(tools)
        self._text = ""
        self._sent = Parsed()
        self.n_tool_calls = 0

    def feed(self, piece: str, final: bool = False) -> List[dict]:
        self._text += piece
        now = _split(self._text, final, self._tools, self._reasoning, self._string_params)
        deltas = []
        if len(now.reasoning) > len(self._sent.reasoning):
            deltas.append({"reasoning_content": now.reasoning[len(self._sent.reasoning):]})
        if len(now.content) > len(self._sent.content):
            deltas.append({"content": now.content[len(self._sent.content):]})
        for call in now.tool_calls[len(self._sent.tool_calls):]:
            deltas.append({"tool_calls": [{"index": self.n_tool_calls, "id": new_call_id(), "type": "function",
                                           "function": call}]})
            self.n_tool_calls += 1
        self._sent = now
        return deltas

    def finish(self) -> List[dict]:
        return self.feed("", final=True)


def openai_tool_calls(calls: List[Dict[str, str]]) -> Optional[List[dict]]:
    return [{"id": new_call_id(), "type": "function", "function": c} for c in calls] or None
