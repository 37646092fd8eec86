"""create_chat_completion: chat messages rendered through the GGUF's own chat template (in a
sandboxed jinja2 environment), completed, and answered in OpenAI's chat-completion shapes (with
tool calls and reasoning: chat_tools.py, chat_answer.py)."""
from __future__ import annotations

import json
from datetime import datetime
from typing import Dict, List, Optional, Union

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .chat_answer import chat_chunks, chat_response
from .chat_tools import plan_tools, template_messages
from .grammar import grammar_for_response_format


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Chat templates call tojson with Python's json.dumps keywords (transformers' convention).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def render_chat(template: str, messages: List[dict], *, tools=None, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **template_kwargs) -> str:
    """The prompt text the model expects for messages, as the template renders it."""
    try:
        return _environment().from_string(template).render(
            messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
            bos_token=bos_token, eos_token=eos_token, **template_kwargs,
        )
    except (TemplateError, OverflowError, RecursionError) as e:  # the sandbox's refusals included
        raise ValueError(f"chat template error: {e}") from e


def chat_prompt(llm, messages: List[dict], tools: Optional[List[dict]] = None,
                template_kwargs: Optional[dict] = None) -> str:
    """The prompt llm's chat template makes of OpenAI-style messages (see chat_tools.template_messages)."""
    if llm.chat_template is None:
        raise ValueError("the model file has no tokenizer.chat_template")
    tok = llm.tokenizer_
    return render_chat(
        llm.chat_template, template_messages(messages), tools=tools,
        bos_token=token_piece(tok, tok.bos_id),
        eos_token=token_piece(tok, tok.eos_id),
        **(template_kwargs or {}),
    )


def create_chat_completion(
    llm,
    messages: List[dict],
    functions: Optional[List[dict]] = None,
    function_call=None,
    tools: Optional[List[dict]] = None,
    tool_choice=None,
    temperature: float = 0.2,
    top_p: float = 0.95,
    top_k: int = 40,
    min_p: float = 0.05,
    typical_p: float = 1.0,
    stream: bool = False,
    stop: Optional[Union[str, List[str]]] = None,
    seed: Optional[int] = None,
    max_tokens: Optional[int] = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repeat_penalty: float = 1.0,
    model: Optional[str] = None,
    logit_bias: Optional[Dict[int, float]] = None,
    logprobs: Optional[bool] = None,
    top_logprobs: Optional[int] = None,
    chat_template_kwargs: Optional[dict] = None,
    response_format: Optional[dict] = None,
    grammar=None,
    reasoning_format: Optional[str] = None,
    **unsupported,
):
    """llama-cpp-python's create_chat_completion on the GGUF's template, with tool calls and
    reasoning_content read from GLM's markup. glmoe's own extras: chat_template_kwargs (e.g.
    {"enable_thinking": False}) and reasoning_format ("none" leaves <think> in content, as
    llama-server's --reasoning-format none)."""
    if reasoning_format not in (None, "auto", "deepseek", "none"):
        raise ValueError(f"reasoning_format must be 'auto', 'deepseek' or 'none', got {reasoning_format!r}")
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError("messages must be a list of dicts with a 'role'")
    plan = plan_tools(tools, tool_choice, functions, function_call)
    if response_format is not None:
        if grammar is not None:
            raise ValueError("pass grammar or response_format, not both")
        grammar = grammar_for_response_format(response_format)
    template_kwargs = dict(chat_template_kwargs or {})
    if plan.grammar is not None:
        if grammar is not None:
            raise ValueError("a forced tool call (tool_choice 'required' or a named function) has its own grammar: "
                             "do not pass grammar or response_format with it")
        grammar = plan.grammar
        # The call is written at once, as JSON: no thinking first (GLM's template closes the <think> block).
        template_kwargs.setdefault("enable_thinking", False)
    prompt = chat_prompt(llm, messages, plan.tools, template_kwargs)
    prompt_tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    result = llm.create_completion(
        prompt_tokens, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        typical_p=typical_p, stream=stream, stop=stop, seed=seed, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty, repeat_penalty=repeat_penalty, model=model, logit_bias=logit_bias,
        logprobs=top_logprobs if logprobs else None, grammar=grammar, _decode_special=True, **unsupported,
    )
    reasoning = reasoning_format != "none"
    return chat_chunks(result, plan, reasoning) if stream else chat_response(result, plan, reasoning)


def token_piece(tok, token_id: int) -> str:
    return tok.token_to_piece(token_id, special=True).decode("utf-8", errors="replace") if token_id >= 0 else ""
