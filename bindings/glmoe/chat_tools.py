"""OpenAI tool use on the GGUF's chat template, for Llama.create_chat_completion.

template_messages() turns OpenAI's history into what GLM's template reads (tool-call arguments as a
mapping, not a JSON string). plan_tools() reads tools / tool_choice (and llama-cpp-python's legacy
functions / function_call) into a ToolPlan: the tools the template lists, whether the answer is
parsed for GLM's tool-call markup, and for a forced call ("required" or a named function) the
grammar of the call, which the model then writes as JSON, as llama-cpp-python does for a named one:
the arguments object for a named function, {"name": ..., "arguments": {...}} for "required"."""
from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any, Dict, List, Optional

from .grammar import LlamaGrammar

REQUIRED = "required"


@dataclasses.dataclass
class ToolPlan:
    tools: Optional[List[dict]] = None  # what the template lists and the answer is parsed against
    forced: Optional[str] = None  # None, REQUIRED, or the name of the function that must be called
    grammar: Optional[LlamaGrammar] = None  # of a forced call
    legacy: bool = False  # the request used functions / function_call: answers carry function_call too


def template_messages(messages: Any) -> List[dict]:
    """Copies of OpenAI chat messages as GLM's template reads them: tool-call arguments decoded
    from JSON, "developer" as "system", and keys whose value is None left out (the template would
    print None as text). The caller's messages are not changed."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError("messages must be a list of dicts with a 'role'")
    out = []
    for i, message in enumerate(messages):
        m = {k: copy.deepcopy(v) for k, v in message.items() if v is not None}
        if m["role"] == "developer":
            m["role"] = "system"
        calls = m.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            raise ValueError(f"messages[{i}].tool_calls must be a list")
        for j, call in enumerate(calls or []):
            fn = call.get("function", call) if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ValueError(f"messages[{i}].tool_calls[{j}] needs a function with a name")
            if isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"] or "{}")
                except ValueError as e:
                    raise ValueError(f"messages[{i}].tool_calls[{j}].function.arguments is not JSON: {e}") from None
            if not isinstance(fn.get("arguments", {}), dict):
                raise ValueError(f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object")
        out.append(m)
    return out


def _function(tool: Any, where: str) -> dict:
    fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f'{where} must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}')
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise ValueError(f"{where}.function.parameters must be a JSON Schema object")
    return fn


def _legacy(tools, tool_choice, functions, function_call):
    """llama-cpp-python's conversion of functions / function_call into tools / tool_choice."""
    if functions is not None:
        if tools is not None:
            raise ValueError("pass tools or functions, not both")
        if not isinstance(functions, list):
            raise ValueError("functions must be a list")
        tools = [{"type": "function", "function": f} for f in functions]
    if function_call is not None:
        if tool_choice is not None:
            raise ValueError("pass tool_choice or function_call, not both")
        if function_call in ("none", "auto"):
            tool_choice = function_call
        elif isinstance(function_call, dict) and isinstance(function_call.get("name"), str):
            tool_choice = {"type": "function", "function": {"name": function_call["name"]}}
        else:
            raise ValueError('function_call must be "none", "auto" or {"name": ...}')
    return tools, tool_choice


def plan_tools(tools=None, tool_choice=None, functions=None, function_call=None) -> ToolPlan:
    legacy = functions is not None or function_call is not None
    tools, tool_choice = _legacy(tools, tool_choice, functions, function_call)
    if tools is not None and not isinstance(tools, list):
        raise ValueError("tools must be a list")
    by_name: Dict[str, dict] = {}
    for i, tool in enumerate(tools or []):
        by_name[_function(tool, f"tools[{i}]")["name"]] = tool
    if tool_choice is None or tool_choice == "auto":
        return ToolPlan(tools=tools or None, legacy=legacy)
    if tool_choice == "none":  # as llama-server: the template does not list the tools either
        return ToolPlan(legacy=legacy)
    if not by_name:
        raise ValueError(f"tool_choice {tool_choice!r} needs tools")
    if tool_choice == REQUIRED:
        # One call of any tool: its name and arguments, each tool's own schema for its arguments.
        schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "arguments": _params(tool)},
                             "required": ["name", "arguments"], "additionalProperties": False}
                            for name, tool in by_name.items()]}
        return ToolPlan(tools=tools, forced=REQUIRED, grammar=_call_grammar(schema), legacy=legacy)
    is_named = isinstance(tool_choice, dict) and tool_choice.get("type", "function") == "function"
    fn = tool_choice.get("function") if is_named else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                         '{"name": ...}}')
    name = fn["name"]
    if name not in by_name:
        raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
    return ToolPlan(tools=tools, forced=name, grammar=_call_grammar(_params(by_name[name])), legacy=legacy)


def _params(tool: dict) -> dict:
    params = tool["function"].get("parameters")
    return params if params else {"type": "object"}


def _call_grammar(schema: dict) -> LlamaGrammar:
    # At most one space between JSON tokens: a call has no use for the newlines and indents that
    # response_format allows, and a model that drifts into them would spend max_tokens there.
    options = {"whitespace_pattern": "[ ]?", **(schema.get("x-guidance") or {})}
    return LlamaGrammar.from_json_schema(dict(schema, **{"x-guidance": options}), verbose=False)


def forced_call(plan: ToolPlan, text: str) -> Optional[Dict[str, str]]:
    """The call a forced answer spells, as {"name", "arguments": JSON text}; None when the text is
    not a complete call (generation stopped early)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if plan.forced == REQUIRED:
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return None
        name, arguments = value["name"], value.get("arguments", {})
    else:
        name, arguments = plan.forced, value
    return {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}
