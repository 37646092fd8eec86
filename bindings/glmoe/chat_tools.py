"""OpenAI tool use on the GGUF's chat template, for Llama.create_chat_completion.

template_messages() turns OpenAI's history into what GLM's template reads (tool-call arguments as a
mapping, not a JSON string). plan_tools() reads tools / tool_choice (and llama-cpp-python's legacy
functions / function_call) into a ToolPlan: the tools the template lists and the answer is parsed
against, and for a forced call ("required" or a named function) a ToolCallGrammar: the grammar of
GLM's own tool-call markup that llama-server forces (server/tool_grammar.py), so that the model
writes its calls as it would unforced and both APIs answer alike."""
from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any, Dict, List, Optional, Sequence

from .grammar import LlamaGrammar
from .server.tool_grammar import policy_for, tool_grammar
from .tokenizer import GGUFTokenizer

REQUIRED = "required"


class MessageError(ValueError):
    """A malformed chat message; param is where, as a dotted path ("messages.2.tool_calls.0.function")."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass
class ToolCallGrammar:
    """A forced call's grammar before it meets a model: which of GLM's tags are special tokens comes
    from the vocabulary, and whether a <think> block may come first from the prompt (none when the
    template closed it already). Llama.generate() builds it with for_prompt()."""

    tools: List[dict]
    tool_choice: Any  # REQUIRED or {"type": "function", "function": {"name": ...}}

    def for_prompt(self, tokenizer: GGUFTokenizer, prompt_tokens: Sequence[int]) -> LlamaGrammar:
        # The tail is enough to see whether the prompt ends with </think>.
        tail = tokenizer.detokenize([int(t) for t in prompt_tokens[-16:]], special=True)
        prompt_end = tail.decode("utf-8", errors="replace")
        try:
            policy = policy_for(self.tools, self.tool_choice, None, prompt_end)
            return tool_grammar(self.tools, policy, tokenizer)
        except KeyError as e:  # a tool without the parts a call is built from
            raise ValueError(f"tools: cannot force a call: {e}") from None


@dataclasses.dataclass
class ToolPlan:
    tools: Optional[List[dict]] = None  # what the template lists and the answer is parsed against
    grammar: Optional[ToolCallGrammar] = None  # of a forced call
    legacy: bool = False  # the request used functions / function_call: answers carry function_call too


def template_messages(messages: Any) -> List[dict]:
    """Copies of OpenAI chat messages as GLM's template reads them: tool-call arguments decoded
    from JSON, "developer" as "system", and keys whose value is None left out (the template would
    print None as text). The caller's messages are not changed. A malformed one: MessageError."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise MessageError("messages must be a list of dicts with a 'role'", "messages")
    out = []
    for i, message in enumerate(messages):
        m = {k: copy.deepcopy(v) for k, v in message.items() if v is not None}
        if m["role"] == "developer":
            m["role"] = "system"
        calls = m.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            raise MessageError(f"messages[{i}].tool_calls must be a list", f"messages.{i}.tool_calls")
        for j, call in enumerate(calls or []):
            where = f"messages.{i}.tool_calls.{j}.function"
            fn = call.get("function", call) if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise MessageError(f"messages[{i}].tool_calls[{j}] needs a function with a name", where)
            if isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"] or "{}")
                except ValueError as e:
                    raise MessageError(f"messages[{i}].tool_calls[{j}].function.arguments is not JSON: {e}",
                                       where + ".arguments") from None
            if not isinstance(fn.get("arguments", {}), dict):
                raise MessageError(f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object",
                                   where + ".arguments")
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
    if tool_choice == REQUIRED:  # one call or more, of any tool (as llama-server without parallel_tool_calls)
        return ToolPlan(tools=tools, grammar=ToolCallGrammar(tools, REQUIRED), legacy=legacy)
    is_named = isinstance(tool_choice, dict) and tool_choice.get("type", "function") == "function"
    fn = tool_choice.get("function") if is_named else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                         '{"name": ...}}')
    name = fn["name"]
    if name not in by_name:
        raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
    named = {"type": "function", "function": {"name": name}}
    return ToolPlan(tools=tools, grammar=ToolCallGrammar(tools, named), legacy=legacy)
