"""create_chat_completion: chat messages rendered through the GGUF's own chat template (under
template_limits' bounds, as llama-server renders it), completed, and answered in OpenAI's
chat-completion shapes (with tool calls and reasoning: chat_tools.py, chat_answer.py)."""
from __future__ import annotations

from typing import Dict, List, Optional, Union

from .chat_answer import chat_chunks, chat_response
from .chat_tools import plan_tools, template_messages
from .grammar import grammar_for_response_format
from .template_limits import render_bounded_sync

# Output cap of render_chat when the caller gives none (no context to measure against).
DEFAULT_MAX_RENDERED_CHARS = 1 << 26
TEMPLATE_VARIABLES = ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token")


def template_context(messages, tools, add_generation_prompt: bool, bos_token: str, eos_token: str,
                     template_kwargs: dict) -> dict:
    """The template's variables: template_kwargs (e.g. enable_thinking) and the chat's own."""
    reserved = sorted(set(template_kwargs) & set(TEMPLATE_VARIABLES))
    if reserved:
        raise ValueError(f"chat_template_kwargs: {reserved[0]!r} is set by the chat call itself")
    return dict(template_kwargs, messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                bos_token=bos_token, eos_token=eos_token)


def render_chat(template: str, messages: List[dict], *, tools=None, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", max_chars: int = DEFAULT_MAX_RENDERED_CHARS,
                timeout_s: Optional[float] = None, **template_kwargs) -> str:
    """The prompt text the model expects for messages, as the template renders it, under
    template_limits' bounds (timeout_s None: its TEMPLATE_TIMEOUT_S): a ValueError when the
    template fails or hits one."""
    context = template_context(messages, tools, add_generation_prompt, bos_token, eos_token, template_kwargs)
    return render_bounded_sync(template, context, max_chars, timeout_s)


def chat_prompt(llm, messages: List[dict], tools: Optional[List[dict]] = None,
                template_kwargs: Optional[dict] = None) -> str:
    """The prompt llm's chat template makes of OpenAI-style messages (see chat_tools.template_messages)."""
    if llm.chat_template is None:
        raise ValueError("the model file has no tokenizer.chat_template")
    tok = llm.tokenizer_
    context = template_context(template_messages(messages), tools, True, token_piece(tok, tok.bos_id),
                               token_piece(tok, tok.eos_id), dict(template_kwargs or {}))
    # Text over n_ctx times the longest token's bytes is more than n_ctx tokens: it cannot fit.
    return render_bounded_sync(llm.chat_template, context, llm.n_ctx() * tok.longest_piece)


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
        # GLM's call markup, as the server forces it; the template's thinking default holds, so the
        # grammar lets a <think> block come first unless the prompt closed it (enable_thinking false).
        grammar = plan.grammar
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
