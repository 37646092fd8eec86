"""create_chat_completion: chat messages rendered through the GGUF's own chat template (in a
sandboxed jinja2 environment), completed, and answered in OpenAI's chat-completion shapes."""
from __future__ import annotations

import json
from datetime import datetime
from typing import Dict, List, Optional, Union

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

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


def create_chat_completion(
    llm,
    messages: List[dict],
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
    **unsupported,
):
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError("messages must be a list of dicts with a 'role'")
    if response_format is not None:
        if grammar is not None:
            raise ValueError("pass grammar or response_format, not both")
        grammar = grammar_for_response_format(response_format)
    if llm.chat_template is None:
        raise ValueError("the model file has no tokenizer.chat_template")
    tok = llm.tokenizer_
    prompt = render_chat(
        llm.chat_template, messages, tools=tools,
        bos_token=token_piece(tok, tok.bos_id),
        eos_token=token_piece(tok, tok.eos_id),
        **(chat_template_kwargs or {}),
    )
    prompt_tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    result = llm.create_completion(
        prompt_tokens, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        typical_p=typical_p, stream=stream, stop=stop, seed=seed, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty, repeat_penalty=repeat_penalty, model=model, logit_bias=logit_bias,
        logprobs=top_logprobs if logprobs else None, grammar=grammar, **unsupported,
    )
    return _chat_chunks(result) if stream else _chat_response(result)


def token_piece(tok, token_id: int) -> str:
    return tok.token_to_piece(token_id, special=True).decode("utf-8", errors="replace") if token_id >= 0 else ""


def _chat_logprobs(lp):
    if lp is None:
        return None
    content = []
    for text, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        content.append({
            "token": text, "logprob": value, "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))} for t, v in (top or {}).items()],
        })
    return {"content": content}


def _chat_response(completion: dict) -> dict:
    choice = completion["choices"][0]
    return {
        "id": "chat" + completion["id"], "object": "chat.completion", "created": completion["created"],
        "model": completion["model"],
        "choices": [{
            "index": 0, "message": {"role": "assistant", "content": choice["text"]},
            "logprobs": _chat_logprobs(choice["logprobs"]), "finish_reason": choice["finish_reason"],
        }],
        "usage": completion["usage"],
    }


def _chat_chunks(chunks):
    try:
        yield from _chat_chunks_of(chunks)
    finally:  # closing the chat stream closes the completion stream (and releases its lock)
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _chat_chunks_of(chunks):
    first = True
    for chunk in chunks:
        choice = chunk["choices"][0]
        base = {"id": "chat" + chunk["id"], "object": "chat.completion.chunk", "created": chunk["created"],
                "model": chunk["model"]}
        if first:
            yield dict(base, choices=[{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                       "finish_reason": None}])
            first = False
        if choice["finish_reason"] is not None:
            yield dict(base, choices=[{"index": 0, "delta": {}, "logprobs": None,
                                       "finish_reason": choice["finish_reason"]}])
        elif choice["text"]:
            yield dict(base, choices=[{"index": 0, "delta": {"content": choice["text"]},
                                       "logprobs": _chat_logprobs(choice["logprobs"]), "finish_reason": None}])
