"""Forced tool calls as a grammar: OpenAI's tool_choice "required" or a named function and
parallel_tool_calls false (Anthropic's tool_choice any / tool and disable_parallel_tool_use) become
an llguidance Lark grammar over GLM-4.5's tool-call markup, as its chat template writes it:

    \\n<think>...</think>\\n<tool_call>NAME\\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value>\\n</tool_call>

so that the reply holds calls tool_parsing.parse() reads, of the allowed tools only. The Python
API forces calls with it too (chat_tools.ToolCallGrammar), so both answer a forced call alike.

What the grammar enforces: the tool names; each declared argument at most once, in the schema's
order, every required one present; a string argument (schema type "string") as the raw text the
template writes, its enum / const and minLength / maxLength kept; every other argument as JSON
valid under its own schema (llguidance's JSON Schema support, the same as response_format). Not
enforced: a string argument's pattern and format; keywords that tie arguments together (e.g.
dependentRequired); extra arguments are never written (the declared ones always suffice). A tool
without declared properties takes any arguments (none if additionalProperties is false).

A markup tag that the vocabulary has as a special token (as GLM's own vocabulary does) is that
token; otherwise its text. The model may think first (a <think> block); "required" allows no text
besides, "auto" with at most one call allows text before it. When the prompt ends the thinking
already (GLM's template with enable_thinking false), no <think> block is allowed."""
from __future__ import annotations

import dataclasses
import json
from typing import Dict, List, Optional

from ..grammar import JSON_SCHEMA_DEFAULTS, LlamaGrammar
from ..tokenizer import TOKEN_CONTROL, TOKEN_UNKNOWN, GGUFTokenizer

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
KEY_OPEN, KEY_CLOSE = "<arg_key>", "</arg_key>"
VALUE_OPEN, VALUE_CLOSE = "<arg_value>", "</arg_value>"
ANY_TEXT = "/(?s:.*)/"


@dataclasses.dataclass
class ToolPolicy:
    """Which tools may be called and how many times. names: the allowed tools (in the request's order)."""

    names: List[str]
    at_least_one: bool
    at_most_one: bool
    thinking: bool = True  # a <think> block may come first (not when the prompt closed it already)


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _without(body: str, text: str) -> str:
    """A Lark terminal: the regex `body`, not containing `text` (a tag: only / needs escaping)."""
    return f"{body} & ~/(?s:.*){text.replace('/', chr(92) + '/')}(?s:.*)/"


class _Builder:
    def __init__(self, tokenizer: GGUFTokenizer):
        self._specials: Dict[str, int] = {}
        for text in (THINK_OPEN, THINK_CLOSE, CALL_OPEN, CALL_CLOSE, KEY_OPEN, KEY_CLOSE, VALUE_OPEN, VALUE_CLOSE):
            ids = tokenizer.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            if len(ids) == 1 and tokenizer.token_type(ids[0]) in (TOKEN_CONTROL, TOKEN_UNKNOWN):
                self._specials[text] = ids[0]
        self.rules: List[str] = []
        self._n = 0

    def is_special(self, text: str) -> bool:
        return text in self._specials

    def tag(self, text: str) -> str:
        token = self._specials.get(text)
        return f"<[{token}]>" if token is not None else _literal(text)

    def rule(self, body: str, options: str = "") -> str:
        """A new rule for body; its name."""
        self._n += 1
        name = f"r{self._n}"
        self.rules.append(f"{name}{options}: {body}")
        return name

    def terminal(self, body: str) -> str:
        self._n += 1
        name = f"T{self._n}"
        self.rules.append(f"{name}: {body}")
        return name

    def text_then(self, closer: str, body: str = ANY_TEXT) -> str:
        """Text matching the regex `body` up to the first `closer` tag, and the tag."""
        if self.is_special(closer):  # no text runs into a special token; its text would fool the parser
            return f"{self.terminal(_without(body, closer))} {self.tag(closer)}"
        # Lazy: the text ends at the closer's first occurrence.
        return self.rule(f"{body} {_literal(closer)}", "[lazy]")

    def think(self) -> str:
        return f"{self.tag(THINK_OPEN)} {self.text_then(THINK_CLOSE)}"

    def value(self, schema) -> str:
        """An argument's value and the closing tag."""
        if isinstance(schema, dict) and schema.get("type") == "string":
            choices = schema["enum"] if isinstance(schema.get("enum"), list) else \
                [schema["const"]] if "const" in schema else None
            if choices is not None:
                strings = [c for c in choices if isinstance(c, str)]
                if not strings:
                    raise ValueError("a string argument's enum / const holds no string")
                return f"({' | '.join(_literal(c) for c in strings)}) {self.tag(VALUE_CLOSE)}"
            low, high = schema.get("minLength"), schema.get("maxLength")
            if isinstance(low, int) or isinstance(high, int):
                body = f"/(?s:.){{{max(int(low or 0), 0)},{'' if high is None else int(high)}}}/"
                return self.text_then(VALUE_CLOSE, body)
            return self.text_then(VALUE_CLOSE)
        sub = {"x-guidance": JSON_SCHEMA_DEFAULTS}
        if isinstance(schema, dict):
            sub.update(schema)
        elif schema is False:
            sub["not"] = {}
        return f"%json {json.dumps(sub, ensure_ascii=False)} {self.tag(VALUE_CLOSE)}"

    def argument(self, key: str, value: str) -> str:
        tags = self.tag(KEY_OPEN), self.tag(KEY_CLOSE), self.tag(VALUE_OPEN)
        return self.rule(f'{tags[0]} {key} {tags[1]} "\\n" {tags[2]} {value} "\\n"')

    def arguments(self, parameters) -> str:
        props = parameters.get("properties") if isinstance(parameters, dict) else None
        if not isinstance(props, dict) or not props:
            if isinstance(parameters, dict) and parameters.get("additionalProperties") is False:
                return '""'
            key = self.terminal(r"/[^<\n]+/")  # as parse_tool_call reads keys: up to the closing tag
            return f"{self.argument(key, self.text_then(VALUE_CLOSE))}*"
        required = set(parameters.get("required") or [])
        parts = [self.argument(_literal(k), self.value(v)) + ("" if k in required else "?") for k, v in props.items()]
        return " ".join(parts)

    def call(self, tool: dict) -> str:
        """The rest of a call after its opening tag."""
        arguments = self.arguments(tool.get("parameters"))
        return self.rule(f'{_literal(tool["name"])} "\\n" {arguments} {self.tag(CALL_CLOSE)}')


def tool_grammar(tools: List[dict], policy: ToolPolicy, tokenizer: GGUFTokenizer) -> LlamaGrammar:
    """The grammar for `policy` over OpenAI-style tools ({"type": "function", "function": {...}})."""
    functions = {t["function"]["name"]: t["function"] for t in tools}
    b = _Builder(tokenizer)
    rest = b.rule(" | ".join(b.call(functions[name]) for name in dict.fromkeys(policy.names)))
    call = b.rule(f"{b.tag(CALL_OPEN)} {rest}")
    lead = b.rule(f'"\\n"? ({b.think()} "\\n"?)?' if policy.thinking else '"\\n"?')
    if policy.at_least_one:
        calls = call if policy.at_most_one else f'{call} ("\\n" {call})*'
        start = f"{lead} {calls}"
    else:  # at most one call, after any text (a call tag only as the call's own)
        if b.is_special(CALL_OPEN):
            start = f"{lead} {b.terminal(ANY_TEXT)} ({b.tag(CALL_OPEN)} {rest})?"
        else:
            start = f"{lead} ({b.terminal(_without(ANY_TEXT, CALL_OPEN))} | {b.text_then(CALL_OPEN)} {rest})"
    lark = "\n".join([f"start: {start}", *b.rules]) + "\n"
    return LlamaGrammar.from_string(lark, verbose=False)


def policy_for(tools: Optional[List[dict]], tool_choice, parallel: Optional[bool],
               prompt: Optional[str] = None) -> Optional[ToolPolicy]:
    """The calls a request's tool_choice and parallel_tool_calls demand, or None for no constraint.
    tool_choice: None, "auto", "none", "required" or {"type": "function", "function": {"name"}}
    (checked by the caller); an unknown name is a ValueError. prompt: the rendered prompt."""
    if not tools or tool_choice == "none":
        return None
    names = [t["function"]["name"] for t in tools]
    single = parallel is False
    thinking = prompt is None or not prompt.rstrip().endswith(THINK_CLOSE)
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        if name not in names:
            raise ValueError(f"the function {name!r} is not among the tools")
        return ToolPolicy([name], True, single, thinking)
    if tool_choice == "required":
        return ToolPolicy(names, True, single, thinking)
    return ToolPolicy(names, False, True, thinking) if single else None
