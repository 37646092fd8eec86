"""Anthropic's Messages API, as llama.cpp's llama-server offers it for agentic coding clients:
POST /v1/messages (streamed or not) and /v1/messages/count_tokens, answered in Anthropic's shapes,
errors included ({"type": "error", "error": {"type", "message"}}).

A request becomes the /v1/chat/completions request of the same conversation (system prompt, tool
uses as tool calls, tool results as "tool" messages, thinking as reasoning_content, tools in
OpenAI's form), rendered by the chat path's own chat_prompt, and runs as it does: Generator, then
tool_parsing's StreamParser, whose deltas become content blocks (thinking, text, tool_use) in the
order the model wrote them, so a streamed answer has the blocks a whole one has.

thinking: {"type": "enabled" | "adaptive"} sets the template's enable_thinking, "disabled" clears
it; without the field the server's default holds (--reasoning-budget, --chat-template-kwargs), as
in llama.cpp. budget_tokens, or else --reasoning-budget N > 0, is kept by thinking_budget.py. Several text blocks (system prompt, a
message) are joined with a blank line; a tool result with is_error is sent as "Error: " + its text
(GLM's template has no error flag). tool_choice any / tool and disable_parallel_tool_use are kept
by constraining the output to GLM's tool-call markup (tool_grammar.py), as OpenAI's tool_choice
required / a function and parallel_tool_calls false are. Refused with a 400: image and document
blocks, a final assistant message (prefill), Anthropic's server tools and the request fields of
features glmoe does not have."""
from __future__ import annotations

import json
import sys
import traceback
import uuid
from typing import Annotated, Any, Callable, Dict, List, Literal, Optional, Union

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .constraints import constraints_for
from .errors import APIError, bad_request
from .generation import Finish
from .json_routes import OffLoopJSONRoute
from .schemas import ChatCompletionRequest, SamplingFields, Tool, _check_schema
from .thinking_budget import budget_that_applies, generate_within_budget
from .tool_parsing import StreamParser

PATHS = {"/v1/messages", "/v1/messages/count_tokens"}
BLOCK_SEPARATOR = "\n\n"
# Request fields of Anthropic features that change the answer and that glmoe does not have.
UNSUPPORTED_FIELDS = ("container", "mcp_servers", "context_management", "output_format", "output_config")
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                503: "overloaded_error"}


# ---- request schemas ------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # as Anthropic's API: an unknown field is a 400


class ToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: Optional[str] = None
    disable_parallel_tool_use: Optional[bool] = None

    @model_validator(mode="after")
    def _name(self):
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("name goes with type tool, and type tool needs it")
        return self


class Thinking(_Strict):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: Optional[Annotated[int, Field(ge=1)]] = None

    @model_validator(mode="after")
    def _budget(self):
        if self.type == "enabled" and self.budget_tokens is None:
            raise ValueError("budget_tokens is required when thinking is enabled")
        if self.type != "enabled" and self.budget_tokens is not None:
            raise ValueError(f"budget_tokens goes with thinking enabled, not {self.type}")
        return self


class AnthropicTool(_Strict):
    type: Optional[str] = None  # "custom" or absent; Anthropic's server tools name their version here
    name: Annotated[str, Field(min_length=1)]
    description: Optional[str] = None
    input_schema: Optional[Dict[str, Any]] = None
    cache_control: Optional[Dict[str, Any]] = None  # a prompt-caching hint: nothing to do here
    strict: Optional[bool] = None

    @model_validator(mode="after")
    def _custom(self):
        if self.type not in (None, "custom"):
            raise ValueError(f"Anthropic's server tool {self.type!r} is not available; only custom tools "
                             f"(name, description, input_schema)")
        if self.input_schema is None:
            raise ValueError("input_schema is required")
        _check_schema(self.input_schema, "input_schema")
        if self.strict:
            raise ValueError("strict tool inputs need constrained decoding, which glmoe does not have yet")
        return self

    def openai(self) -> dict:
        """As the chat path hands tools to the template and the tool-call parser."""
        return Tool(function={"name": self.name, "description": self.description,
                              "parameters": self.input_schema}).model_dump(exclude_none=True)


class AnthropicMessage(_Strict):
    role: Literal["user", "assistant"]
    content: Union[str, List[Dict[str, Any]]]


class MessagesRequest(_Strict):
    model: Optional[str] = None
    max_tokens: Optional[Annotated[int, Field(ge=1)]] = None  # required by /v1/messages, not by count_tokens
    messages: Annotated[List[AnthropicMessage], Field(min_length=1)]
    system: Optional[Union[str, List[Dict[str, Any]]]] = None
    stop_sequences: Optional[List[str]] = None
    temperature: Optional[float] = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    top_p: Optional[float] = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    top_k: Optional[Annotated[int, Field(ge=0, le=1 << 30)]] = None
    stream: bool = False
    tools: Optional[List[AnthropicTool]] = None
    tool_choice: Optional[ToolChoice] = None
    thinking: Optional[Thinking] = None
    metadata: Optional[Dict[str, Any]] = None  # user_id: nothing to do with it here
    service_tier: Optional[str] = None  # Anthropic's capacity choice: one server, one tier
    container: Optional[Any] = None
    mcp_servers: Optional[Any] = None
    context_management: Optional[Any] = None
    output_format: Optional[Any] = None
    output_config: Optional[Any] = None

    @field_validator("stop_sequences")
    @classmethod
    def _no_empty_stop(cls, value):
        if value is not None and not all(value):
            raise ValueError("a stop sequence cannot be empty")
        return value


# ---- errors ---------------------------------------------------------------------------------

def error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(status, "invalid_request_error"), "message": message}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message), status_code=err.status)


def _validation_error(exc: RequestValidationError) -> APIError:
    err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": ""}
    if err.get("type") == "json_invalid":
        return bad_request(f"malformed JSON: {err.get('ctx', {}).get('error', err['msg'])}")
    path = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
    message = err["msg"].removeprefix("Value error, ")
    return bad_request(f"{path}: {message}" if path else message)


class _AnthropicRoute(OffLoopJSONRoute):
    """Answers this API's errors in Anthropic's shape (the app's handlers answer in OpenAI's); big
    bodies are parsed off the event loop, as the app's other routes."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as e:
                return error_response(_validation_error(e))
            except APIError as e:
                return error_response(e)
            except Exception as e:  # a bug: the traceback goes to the log, the client gets no internals
                traceback.print_exception(e, file=sys.stderr)
                return error_response(APIError(500, f"internal server error ({type(e).__name__})"))

        return answer


# ---- request conversion ---------------------------------------------------------------------

def _get(block: dict, key: str, kind, where: str, default=None):
    value = block.get(key, default)
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise bad_request(f"{where}.{key}: expected {names}")
    return value


def _refuse_block(kind: str, where: str, context: str):
    if kind in ("image", "document"):
        raise bad_request(f"{where}: {kind} content blocks are not supported (the model reads text only)")
    raise bad_request(f"{where}: content blocks of type {kind!r} are not supported in {context}")


def _texts(blocks: List[dict], where: str, context: str) -> str:
    """Text blocks (of a system prompt, a tool result) joined."""
    parts = []
    for j, block in enumerate(blocks):
        if block.get("type") != "text":
            _refuse_block(str(block.get("type")), f"{where}.{j}", context)
        parts.append(_get(block, "text", str, f"{where}.{j}"))
    return BLOCK_SEPARATOR.join(parts)


def _tool_result(block: dict, where: str) -> dict:
    content = block.get("content", "")
    if not isinstance(content, str):
        content = _texts(_get(block, "content", list, where), f"{where}.content", "a tool result")
    if _get(block, "is_error", bool, where, False):
        content = "Error: " + content
    return {"role": "tool", "tool_call_id": _get(block, "tool_use_id", str, where), "content": content}


def _user_turn(blocks: List[dict], where: str) -> List[dict]:
    """A user message's blocks in their order: runs of text as user messages, tool results as tool messages."""
    out: List[dict] = []
    texts: List[str] = []
    for j, block in enumerate(blocks):
        kind, at = block.get("type"), f"{where}.{j}"
        if kind == "text":
            texts.append(_get(block, "text", str, at))
        elif kind == "tool_result":
            if texts:
                out.append({"role": "user", "content": BLOCK_SEPARATOR.join(texts)})
                texts = []
            out.append(_tool_result(block, at))
        else:
            _refuse_block(str(kind), at, "user messages")
    if texts or not out:
        out.append({"role": "user", "content": BLOCK_SEPARATOR.join(texts)})
    return out


def _assistant_turn(blocks: List[dict], where: str) -> dict:
    texts, thoughts, calls = [], [], []
    for j, block in enumerate(blocks):
        kind, at = block.get("type"), f"{where}.{j}"
        if kind == "text":
            texts.append(_get(block, "text", str, at))
        elif kind == "thinking":  # its signature only vouches for Anthropic's own thinking
            thoughts.append(_get(block, "thinking", str, at))
        elif kind == "tool_use":
            function = {"name": _get(block, "name", str, at), "arguments": _get(block, "input", dict, at)}
            calls.append({"id": _get(block, "id", str, at, ""), "type": "function", "function": function})
        else:
            _refuse_block(str(kind), at, "assistant messages")
    message = {"role": "assistant", "content": BLOCK_SEPARATOR.join(texts)}
    if thoughts:
        message["reasoning_content"] = BLOCK_SEPARATOR.join(thoughts)
    if calls:
        message["tool_calls"] = calls
    return message


def chat_messages(req: MessagesRequest) -> List[dict]:
    """The system prompt and messages as the chat template's messages, in the shape the chat path gives it."""
    if req.messages[-1].role == "assistant":
        raise bad_request("messages: a final assistant message (a prefill to continue) is not supported")
    out: List[dict] = []
    if isinstance(req.system, str):
        out.append({"role": "system", "content": req.system})
    elif req.system is not None:
        out.append({"role": "system", "content": _texts(req.system, "system", "a system prompt")})
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
        elif m.role == "user":
            out += _user_turn(m.content, f"messages.{i}.content")
        else:
            out.append(_assistant_turn(m.content, f"messages.{i}.content"))
    return out


def chat_request(req: MessagesRequest) -> ChatCompletionRequest:
    """The /v1/chat/completions request that renders the same prompt."""
    _refuse_unsupported(req)
    kwargs = None if req.thinking is None else {"enable_thinking": req.thinking.type != "disabled"}
    choice, parallel = (None, None) if req.tool_choice is None else _tool_choice(req.tool_choice)
    return ChatCompletionRequest(messages=chat_messages(req), tools=[t.openai() for t in req.tools or []] or None,
                                 tool_choice=choice, parallel_tool_calls=parallel, chat_template_kwargs=kwargs)


def _tool_choice(choice: ToolChoice):
    """OpenAI's tool_choice and parallel_tool_calls for Anthropic's tool_choice."""
    openai = {"any": "required", "tool": {"type": "function", "function": {"name": choice.name}}}.get(choice.type,
                                                                                                     choice.type)
    return openai, (False if choice.disable_parallel_tool_use else None)


def _refuse_unsupported(req: MessagesRequest) -> None:
    for name in UNSUPPORTED_FIELDS:
        if getattr(req, name) is not None:
            raise bad_request(f"{name}: not supported by this server")


def _sampling_fields(req: MessagesRequest) -> SamplingFields:
    """The request's sampling and length as the OpenAI routes' fields, so that the server's defaults
    (--temp, --top-k, -n ...) apply to what it leaves unset in the same way."""
    names = ("temperature", "top_p", "top_k", "max_tokens")
    given = {k: getattr(req, k) for k in names if getattr(req, k) is not None}
    return SamplingFields(**given)


# ---- response conversion --------------------------------------------------------------------

def _block_start(index: int, block: dict) -> dict:
    return {"type": "content_block_start", "index": index, "content_block": block}


class ContentBlocks:
    """GLM output text, piece by piece, as Anthropic content blocks: feed() and finish() return the
    stream events, `blocks` holds the blocks so far. Whitespace at a text or thinking block's ends is
    dropped, as tool_parsing.parse() strips it."""

    _DELTA = {"text": ("text", "text_delta"), "thinking": ("thinking", "thinking_delta")}

    def __init__(self, tools: Optional[List[dict]], reasoning: bool):
        self._parser = StreamParser(tools, reasoning)
        self.blocks: List[dict] = []
        self.n_tool_use = 0
        self._kind: Optional[str] = None  # the text or thinking run in progress
        self._started = False  # ... has a block (it had more than whitespace)
        self._blank = ""  # whitespace at its end, held back until more text follows

    def feed(self, piece: str) -> List[dict]:
        return self._events(self._parser.feed(piece))

    def finish(self) -> List[dict]:
        return self._events(self._parser.finish()) + self._close()

    def _events(self, deltas: List[dict]) -> List[dict]:
        events = []
        for d in deltas:
            if "reasoning_content" in d:
                events += self._grow("thinking", d["reasoning_content"])
            elif "content" in d:
                events += self._grow("text", d["content"])
            else:
                events += self._close() + self._tool_use(d["tool_calls"][0]["function"])
        return events

    def _grow(self, kind: str, text: str) -> List[dict]:
        events = self._close() if kind != self._kind else []
        self._kind = kind
        body = self._blank + text
        if not self._started:
            body = body.lstrip()
        grown = body.rstrip()
        self._blank = body[len(grown):]
        if grown:
            field, delta_type = self._DELTA[kind]
            if not self._started:
                self._started = True
                block = {"type": kind, field: ""}
                if kind == "thinking":
                    block["signature"] = ""  # Anthropic signs its own thinking; there is nothing to sign here
                self.blocks.append(block)
                events.append(_block_start(len(self.blocks) - 1, dict(block)))
            self.blocks[-1][field] += grown
            events.append({"type": "content_block_delta", "index": len(self.blocks) - 1,
                           "delta": {"type": delta_type, field: grown}})
        return events

    def _close(self) -> List[dict]:
        events = [{"type": "content_block_stop", "index": len(self.blocks) - 1}] if self._started else []
        self._kind, self._started, self._blank = None, False, ""
        return events

    def _tool_use(self, call: Dict[str, str]) -> List[dict]:
        block = {"type": "tool_use", "id": "toolu_" + uuid.uuid4().hex[:24], "name": call["name"]}
        self.blocks.append(dict(block, input=json.loads(call["arguments"])))
        self.n_tool_use += 1
        index = len(self.blocks) - 1
        return [_block_start(index, dict(block, input={})),
                {"type": "content_block_delta", "index": index,
                 "delta": {"type": "input_json_delta", "partial_json": call["arguments"]}},
                {"type": "content_block_stop", "index": index}]


def message_content(text: str, tools: Optional[List[dict]], reasoning: bool = True) -> ContentBlocks:
    """A whole answer's blocks (and how many are tool uses)."""
    blocks = ContentBlocks(tools, reasoning)
    blocks.feed(text)
    blocks.finish()
    return blocks


def stop_reason(finish: Finish, n_tool_use: int) -> Dict[str, Optional[str]]:
    if finish.reason == "length":
        return {"stop_reason": "max_tokens", "stop_sequence": None}
    if finish.stop_word:
        return {"stop_reason": "stop_sequence", "stop_sequence": finish.stop_word}
    return {"stop_reason": "tool_use" if n_tool_use else "end_turn", "stop_sequence": None}


def _usage(n_input: int, n_output: int) -> dict:
    return {"input_tokens": n_input, "output_tokens": n_output, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0}


def _sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


# ---- routes ---------------------------------------------------------------------------------

def register(app, state, settings, tokenize_prompt: Callable, chat_prompt: Callable) -> None:
    """Adds the routes to create_app's app. tokenize_prompt(text, add_bos, param) and
    chat_prompt(ChatCompletionRequest) -> (prompt, tools) are create_app's own."""
    router = APIRouter(route_class=_AnthropicRoute)

    async def prompt_tokens(req: MessagesRequest):
        """(prompt token ids, the tools the template showed)."""
        prompt, tools = await chat_prompt(chat_request(req))
        return await tokenize_prompt(prompt, False, "messages"), tools

    @router.post("/v1/messages/count_tokens")
    async def count_tokens(req: MessagesRequest):
        tokens, _ = await prompt_tokens(req)
        return {"input_tokens": len(tokens)}

    @router.post("/v1/messages")
    async def messages(req: MessagesRequest, request: Request):
        if req.max_tokens is None:
            raise bad_request("max_tokens: Field required")
        chat = chat_request(req)
        prompt, tools = await chat_prompt(chat)
        constraint = (await constraints_for(chat, state.tokenizer, 1, prompt))[0]
        tokens = await tokenize_prompt(prompt, False, "messages")
        fields = _sampling_fields(req)
        gen = state.generator
        max_tokens = gen.check_prompt(tokens, fields.requested_max_tokens(settings.n_predict))
        sampling = fields.sampling_kwargs(settings.sampling_defaults)
        stops = req.stop_sequences or []
        client_gone = None if req.stream else request.is_disconnected
        # thinking.budget_tokens, else the server's --reasoning-budget (as chat completions apply it).
        given = req.thinking.budget_tokens if req.thinking is not None else None
        budget = budget_that_applies(settings.reasoning_budget if given is None else given, prompt, max_tokens)
        if budget is not None:
            run = generate_within_budget(gen, state.tokenizer, tokens, max_tokens, budget, sampling, stops,
                                         client_gone, constraint)
        else:
            # Decoded with special tokens so that GLM's <think> and <tool_call> markup reaches the parser.
            run = gen.generate(tokens, max_tokens, sampling, stops, special=True, client_gone=client_gone,
                               constraint=constraint)
        reasoning = settings.reasoning_format != "none"
        message = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant",
                   "model": settings.model_name}

        if not req.stream:
            parts, finish = [], None
            async for item in run:
                if isinstance(item, Finish):
                    finish = item
                else:
                    parts.append(item)
            if finish is None:
                return Response(status_code=499)  # nobody is listening
            content = message_content("".join(parts), tools, reasoning)
            return dict(message, content=content.blocks, **stop_reason(finish, content.n_tool_use),
                        usage=_usage(finish.n_prompt, finish.n_generated))

        async def events():
            yield {"type": "message_start", "message": dict(message, content=[], stop_reason=None,
                                                             stop_sequence=None, usage=_usage(len(tokens), 0))}
            blocks = ContentBlocks(tools, reasoning)
            async for item in run:
                if isinstance(item, Finish):
                    for event in blocks.finish():
                        yield event
                    yield {"type": "message_delta", "delta": stop_reason(item, blocks.n_tool_use),
                           "usage": _usage(item.n_prompt, item.n_generated)}
                    yield {"type": "message_stop"}
                else:
                    for event in blocks.feed(item):
                        yield event

        async def body():
            try:
                async for event in events():
                    yield _sse(event)
            except APIError as e:  # after the headers went out, an error can only be told in the stream
                yield _sse(error_body(e.status, e.message))

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    app.include_router(router)
