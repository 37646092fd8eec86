"""The FastAPI app: create_app(settings). The model loads in a thread after startup, so the
server answers (503 "Loading model") from the first moment, as llama.cpp's does."""
from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import traceback
import threading
import time
import uuid
from typing import List, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import _core
from ..chat import token_piece
from ..chat_tools import MessageError, template_messages
from ..tokenizer import GGUFTokenizer
from . import anthropic, constraints, limits, metrics, native
from .choices import check_n, choice_sampling, collect_all, merged, text_of, total_usage
from .constraints import constraints_for
from .errors import APIError, bad_request, error_body
from .generation import Finish, Generator
from .logprobs import TokenTexts, chat_content, legacy_block
from .json_routes import OffLoopJSONRoute
from .schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .settings import Settings
from .thinking_budget import budget_that_applies, generate_within_budget
from .tool_parsing import StreamParser, openai_tool_calls, parse

# Answered without the API key, as llama.cpp does (its security tests read /models without one).
PUBLIC_PATHS = {"/health", "/v1/health", "/models", "/v1/models"}
ROUTES = {"/health", "/v1/health", "/models", "/v1/models", "/v1/completions",
          "/chat/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/metrics",
          "/slots"} | native.ROUTES | anthropic.PATHS
MAX_BODY_BYTES = limits.MAX_BODY_CEILING
TEMPLATE_VARIABLES = ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token")


class ServerState:
    def __init__(self):
        self.generator: Optional[Generator] = None
        self.tokenizer: Optional[GGUFTokenizer] = None
        self.model = None
        self.chat_template: Optional[str] = None
        self.load_error: Optional[str] = None
        self.created = int(time.time())
        self.max_prompt_bytes = 0  # no text over this many UTF-8 bytes fits a slot (limits.py)
        self.max_body_bytes = MAX_BODY_BYTES
        self.http = metrics.HTTPCounters()


def _load(state: ServerState, settings: Settings) -> None:
    try:
        if settings.before_load:
            settings.before_load()
        model = _core.Model(settings.model_path, use_mmap=settings.use_mmap, use_mlock=settings.use_mlock)
        tokenizer = GGUFTokenizer.from_gguf(settings.model_path)
        engine = _core.BatchEngine(model, settings.n_ctx or model.n_ctx_train, n_parallel=settings.n_parallel,
                                   n_threads=settings.n_threads, n_batch=settings.n_batch,
                                   spec_suffix=settings.spec_suffix, spec_max_depth=settings.spec_max_depth,
                                   spec_max_spec_factor=settings.spec_max_spec_factor,
                                   spec_min_token_prob=settings.spec_min_token_prob,
                                   n_gpu_layers=settings.n_gpu_layers,
                                   tensor_overrides=settings.tensor_overrides, n_cpu_moe=settings.n_cpu_moe,
                                   cpu_moe=settings.cpu_moe, type_k=settings.type_k, type_v=settings.type_v,
                                   keep_slot_cache=settings.slot_save_path is not None)
        state.chat_template = settings.chat_template or model.metadata().get("tokenizer.chat_template")
        state.model, state.tokenizer = model, tokenizer
        generator = Generator(engine, tokenizer, settings.n_parallel, settings.spec_suffix)
        state.max_prompt_bytes = generator.n_ctx_slot * limits.longest_piece(tokenizer)
        state.max_body_bytes = limits.max_body_bytes(state.max_prompt_bytes)
        state.generator = generator
        print(f"llama-server: loaded {settings.model_path} ({model.description}); "
              f"{settings.n_parallel} slots of {state.generator.n_ctx_slot} tokens; bodies up to "
              f"{state.max_body_bytes} bytes", file=sys.stderr)
        for line in engine.placement_summary().splitlines():
            print(f"llama-server: {line}", file=sys.stderr)
    except Exception as e:  # reported by /health and every other route
        state.load_error = f"{type(e).__name__}: {e}"
        print(f"llama-server: failed to load {settings.model_path}: {state.load_error}", file=sys.stderr)
        if settings.on_load_failure is not None:
            settings.on_load_failure(state.load_error)


class Gate:
    """Pure ASGI middleware (responses pass through untouched): API key, loading state, body size
    (Content-Length, then the bytes as they arrive, so chunked bodies too), lone surrogates, and the
    per-route request counter. A body is read whole before the app sees it."""

    def __init__(self, app, state: ServerState, settings: Settings):
        self.app, self.state, self.settings = app, state, settings

    def _refusal(self, scope) -> Optional[APIError]:
        path = scope["path"]
        headers = dict(scope["headers"])
        keys = self.settings.all_api_keys
        if keys and path not in PUBLIC_PATHS:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:] if auth.lower().startswith("bearer ") else headers.get(b"x-api-key", b"").decode("latin-1")
            if given not in keys:
                return APIError(401, "Invalid API Key", code="invalid_api_key")
        if self.state.load_error:
            return APIError(500, f"the model failed to load: {self.state.load_error}")
        if self.state.generator is None:
            return APIError(503, "Loading model")
        try:
            if int(headers.get(b"content-length", b"0")) > self.state.max_body_bytes:
                return self._too_large(body_read=False)
        except ValueError:
            return bad_request("bad Content-Length")
        return None

    def _too_large(self, body_read: bool) -> APIError:
        """body_read: the refused body was read to its end, so the connection can stay open."""
        err = APIError(413, f"the request body is over {self.state.max_body_bytes} bytes (the most that can "
                            f"fit a slot's context)", code="request_too_large")
        err.close_connection = not body_read
        return err

    async def _buffered(self, receive):
        """(receive for the app, None) with the body read and checked, or (None, refusal); (None, None)
        when the client left."""
        try:
            body = await limits.read_body(receive, self.state.max_body_bytes)
        except limits.BodyTooLarge as e:
            # Read to its end (while it keeps coming), so that the refusal is not lost to a reset.
            return None, self._too_large(body_read=e.ended or await limits.drain(receive))
        except asyncio.TimeoutError:
            return None, APIError(408, f"the request body did not arrive within {limits.BODY_READ_TIMEOUT_S:g} s")
        if body is None:
            return None, None
        if len(body) > 4096:
            path = await run_in_threadpool(limits.lone_surrogate_path, body)
        else:
            path = limits.lone_surrogate_path(body)
        if path is not None:
            return None, bad_request(f"{path}: a lone UTF-16 surrogate (\\ud800-\\udfff) is not text", path)
        sent = [False]

        async def replay():
            if sent[0]:
                return await receive()  # after the body: disconnect notices
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay, None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        constraints.SERVER_DEFAULT.set(self.settings.default_grammar)  # this request's task only
        try:
            refusal = self._refusal(scope)
            if refusal is None and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
                receive_app, refusal = await self._buffered(receive)
                if receive_app is None and refusal is None:
                    status[0] = 499
                    return
                receive = receive_app or receive
            if refusal is not None:
                if refusal.status == 413 and refusal.close_connection:  # refused by its Content-Length
                    refusal.close_connection = not await limits.drain(receive)
                response = anthropic.error_response(refusal) if scope["path"] in anthropic.PATHS \
                    else refusal.response()
                if refusal.status == 408 or refusal.close_connection:
                    response.headers.update({"Connection": "close"})
                await response(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.state.http.count(route, status[0])


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _stream(events):
    """SSE body: each item of events (an async iterator of dicts) as a data line, then [DONE].
    An error after the headers went out can only be told in the stream."""

    async def body():
        try:
            async for obj in events:
                yield _sse(obj)
        except APIError as e:
            yield _sse(e.body())
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def create_app(settings: Settings) -> FastAPI:
    state = ServerState()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=_load, args=(state, settings), name="glmoe-load", daemon=True).start()
        yield
        if state.generator is not None:
            state.generator.close()

    app = FastAPI(title="glmoe llama-server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.router.route_class = OffLoopJSONRoute  # big bodies parsed, big answers encoded, off the event loop
    app.state.server = state
    app.add_middleware(Gate, state=state, settings=settings)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        # FastAPI answers 422; OpenAI and llama.cpp answer 400 with the error body.
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": ""}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            return bad_request(f"malformed JSON: {err.get('ctx', {}).get('error', err['msg'])}").response()
        param = ".".join(loc) or None
        message = f"{param}: {err['msg']}" if param else err["msg"]
        return bad_request(message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        message = "File Not Found" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        # A bug: the traceback goes to the log, the client gets no internals.
        traceback.print_exception(exc, file=sys.stderr)
        return JSONResponse(error_body(500, f"internal server error ({type(exc).__name__})"), status_code=500)

    def check_length(text: str, param: str, limit: Optional[int] = None) -> bytes:
        """text as UTF-8, after a 400 when it is too long to fit a slot whatever its tokens."""
        limit = state.max_prompt_bytes if limit is None else limit
        if len(text) > limit:  # characters <= bytes: no need to encode
            raise limits.too_long(len(text), limit, state.generator.n_ctx_slot, param)
        data = text.encode("utf-8")
        if len(data) > limit:
            raise limits.too_long(len(data), limit, state.generator.n_ctx_slot, param)
        return data

    async def tokenize_prompt(text: str, add_bos: bool, param: str = "prompt"):
        # Bounded first (the tokenizer holds the GIL), then in a thread: a prompt of megabytes must not
        # hold up every other client's stream or /health.
        data = check_length(text, param)
        return await run_in_threadpool(state.tokenizer.tokenize, data, add_bos=add_bos, special=True)

    def logit_bias(req) -> dict:
        """OpenAI's {"token id as a string": bias} as the engine's {id: bias}; a 400 for a key that is
        not a token id of this vocabulary."""
        bias = {}
        for key, value in (req.logit_bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                raise bad_request(f"logit_bias: {key!r} is not a token id", "logit_bias") from None
            if not 0 <= token < state.tokenizer.n_vocab:
                raise bad_request(f"logit_bias: token id {token} out of range [0, {state.tokenizer.n_vocab})",
                                  "logit_bias")
            bias[token] = float(value)
        return bias

    def sampling_of(req) -> dict:
        sampling = req.sampling_kwargs(settings.sampling_defaults)
        bias = logit_bias(req)
        if bias:
            sampling["logit_bias"] = bias
        return sampling

    def check_ids(ids, param: str):
        bad = [t for t in ids if t >= state.tokenizer.n_vocab]
        if bad:
            raise bad_request(f"token id {bad[0]} out of range [0, {state.tokenizer.n_vocab})", param)

    def client_gone(request: Request):
        return request.is_disconnected

    @app.get("/health")
    @app.get("/v1/health")
    async def health():
        return {"status": "ok"}

    @app.get("/models")
    @app.get("/v1/models")
    async def models():
        meta = {"n_vocab": state.model.n_vocab, "n_ctx_train": state.model.n_ctx_train,
                "n_ctx_slot": state.generator.n_ctx_slot, "description": state.model.description}
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": state.created,
                                            "owned_by": "glmoe", "meta": meta}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        if req.suffix is not None:
            raise bad_request("suffix (fill-in-the-middle) is not supported", "suffix")
        if req.logprobs is not None and req.echo:
            raise bad_request("logprobs with echo: the prompt's logprobs are not computed (only the generated "
                              "tokens')", "logprobs")
        check_n(req.n, settings.n_parallel)
        prompt = req.prompt[0] if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], str) \
            else req.prompt
        sampling = sampling_of(req)
        constraints = await constraints_for(req, state.tokenizer, req.n)
        if isinstance(prompt, str):
            tokens, prompt_text = await tokenize_prompt(prompt, True), prompt
        else:
            check_ids(prompt, "prompt")
            tokens = list(prompt)
        gen = state.generator
        max_tokens = gen.check_prompt(tokens, req.requested_max_tokens(settings.n_predict))
        if not isinstance(prompt, str):
            prompt_text = state.tokenizer.detokenize(tokens, special=True).decode("utf-8", errors="replace")
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": settings.model_name}
        runs = [gen.generate(tokens, max_tokens, kwargs, req.stop_list(), special=False,
                             client_gone=None if req.stream else client_gone(request), ignore_eos=req.ignore_eos,
                             constraint=constraint, logprobs=req.logprobs)
                for kwargs, constraint in zip(choice_sampling(sampling, req.n), constraints)]
        texts = TokenTexts(state.tokenizer, special=False)

        def choice(index, text, reason, pieces=None):
            lp = None if req.logprobs is None or pieces is None else \
                legacy_block([t for p in pieces for t in p.tokens], texts, len(prompt_text))
            return {"text": text, "index": index, "logprobs": lp, "finish_reason": reason}

        if not req.stream:
            results = await collect_all(runs)
            if any(finish is None for _, finish in results):
                return Response(status_code=499)  # nobody is listening
            choices = []
            for i, (items, finish) in enumerate(results):
                text = "".join(text_of(item) for item in items)
                choices.append(choice(i, prompt_text + text if req.echo else text, finish.reason, items))
            finishes = [finish for _, finish in results]
            return dict(base, choices=choices, usage=total_usage(finishes), timings=finishes[0].timings)

        async def events():
            if req.echo:
                for i in range(req.n):
                    yield dict(base, choices=[choice(i, prompt_text, None)])
            finishes = []
            async for i, item in merged(runs):
                if isinstance(item, Finish):
                    finishes.append(item)
                    yield dict(base, choices=[choice(i, "", item.reason)], timings=item.timings)
                else:
                    yield dict(base, choices=[choice(i, text_of(item), None, [item])])
            if req.include_usage:
                yield dict(base, choices=[], usage=total_usage(finishes))

        return _stream(events())

    async def chat_prompt(req: ChatCompletionRequest):
        """The chat template's text for req's messages, tools and template kwargs, and the tools."""
        if state.chat_template is None:
            raise bad_request("the model has no chat template (start the server with --chat-template)")
        tools = None if req.tool_choice == "none" or not req.tools else [t.model_dump(exclude_none=True)
                                                                         for t in req.tools]
        try:
            messages = template_messages([m.model_dump(exclude_none=True) for m in req.messages])
        except MessageError as e:
            raise bad_request(str(e), e.param) from None
        reserved = sorted(set(req.chat_template_kwargs or {}) & set(TEMPLATE_VARIABLES))
        if reserved:
            raise bad_request(f"chat_template_kwargs: {reserved[0]!r} is set by the server", "chat_template_kwargs")
        tok = state.tokenizer
        # In a thread of its own with a time limit; output over what can fit a slot is refused as it grows.
        prompt = await limits.render_bounded(
            state.chat_template, state.max_prompt_bytes,
            **{**settings.chat_template_kwargs, **(req.chat_template_kwargs or {})},
            messages=messages, tools=tools, add_generation_prompt=True,
            bos_token=token_piece(tok, tok.bos_id), eos_token=token_piece(tok, tok.eos_id))
        return prompt, tools

    def budget_for(req: ChatCompletionRequest, prompt: str, max_tokens: int) -> Optional[int]:
        """The request's reasoning_budget_tokens (llama.cpp's field; -1 or unset: --reasoning-budget),
        where it can matter (budget_that_applies)."""
        if req.reasoning_budget_message:
            raise bad_request("reasoning_budget_message: glmoe ends thinking that runs out of its budget with "
                              "</think> alone", "reasoning_budget_message")
        budget = req.reasoning_budget_tokens
        if budget == 0:
            raise bad_request("reasoning_budget_tokens: 0 is not supported (glmoe cannot close the thinking as it "
                              "opens); chat_template_kwargs {\"enable_thinking\": false} turns thinking off",
                              "reasoning_budget_tokens")
        return budget_that_applies(settings.reasoning_budget if budget in (None, -1) else budget, prompt, max_tokens)

    @app.post("/chat/completions")
    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs: logprobs must be true to use it", "top_logprobs")
        n_top = (req.top_logprobs or 0) if req.logprobs else None
        check_n(req.n, settings.n_parallel)
        sampling = sampling_of(req)
        prompt, tools = await chat_prompt(req)
        constraints = await constraints_for(req, state.tokenizer, req.n, prompt)
        tokens = await tokenize_prompt(prompt, False, "messages")
        gen = state.generator
        max_tokens = gen.check_prompt(tokens, req.requested_max_tokens(settings.n_predict))
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": settings.model_name}
        budget = budget_for(req, prompt, max_tokens)
        if budget is not None:
            limit = f"--reasoning-budget {budget}" if req.reasoning_budget_tokens in (None, -1) else \
                f"reasoning_budget_tokens {budget}"
            for field, given in (("logprobs", n_top is not None), ("ignore_eos", req.ignore_eos)):
                if given:
                    raise bad_request(f"{field}: not available while thinking is limited ({limit}), which may take "
                                      f"two generations", field)

        def run(kwargs, constraint):
            gone = None if req.stream else client_gone(request)
            if budget is not None:
                return generate_within_budget(gen, state.tokenizer, tokens, max_tokens, budget, kwargs,
                                              req.stop_list(), gone, constraint)
            # Decoded with special tokens so that GLM's <think> and <tool_call> markup reaches the parser.
            return gen.generate(tokens, max_tokens, kwargs, req.stop_list(), special=True, client_gone=gone,
                                ignore_eos=req.ignore_eos, constraint=constraint, logprobs=n_top)

        runs = [run(kwargs, constraint) for kwargs, constraint in zip(choice_sampling(sampling, req.n), constraints)]
        reasoning = (req.reasoning_format or settings.reasoning_format) != "none"
        texts = TokenTexts(state.tokenizer, special=True)

        def reason_for(finish: Finish, n_calls: int) -> str:
            return "tool_calls" if n_calls and finish.reason == "stop" else finish.reason

        def logprobs_of(pieces) -> Optional[dict]:
            return None if n_top is None else {"content": chat_content([t for p in pieces for t in p.tokens], texts)}

        if not req.stream:
            results = await collect_all(runs)
            if any(finish is None for _, finish in results):
                return Response(status_code=499)
            choices = []
            for i, (items, finish) in enumerate(results):
                parsed = parse("".join(text_of(item) for item in items), tools, reasoning)
                calls = openai_tool_calls(parsed.tool_calls)
                message = {"role": "assistant", "content": parsed.content if parsed.content or not calls else None}
                if parsed.reasoning:
                    message["reasoning_content"] = parsed.reasoning
                if calls:
                    message["tool_calls"] = calls
                choices.append({"index": i, "message": message, "logprobs": logprobs_of(items),
                                "finish_reason": reason_for(finish, len(parsed.tool_calls))})
            finishes = [finish for _, finish in results]
            return dict(base, choices=choices, usage=total_usage(finishes), timings=finishes[0].timings)

        chunk = dict(base, object="chat.completion.chunk")

        def delta(index, d, reason=None, logprobs=None):
            return dict(chunk, choices=[{"index": index, "delta": d, "logprobs": logprobs, "finish_reason": reason}])

        async def events():
            parsers = [StreamParser(tools, reasoning) for _ in runs]
            unsent: List[list] = [[] for _ in runs]  # per choice, the pieces whose logprobs no chunk carried yet

            def take_logprobs(i):
                pieces, unsent[i] = unsent[i], []
                return logprobs_of(pieces) if pieces else None

            def deltas(i, ds):
                # The last chunk of a piece carries its tokens' logprobs; tokens whose text the parser
                # holds back go with the next chunk.
                return [delta(i, d, None, take_logprobs(i) if k == len(ds) - 1 else None) for k, d in enumerate(ds)]

            for i in range(req.n):
                yield delta(i, {"role": "assistant", "content": ""})
            finishes = []
            async for i, item in merged(runs):
                if isinstance(item, Finish):
                    finishes.append(item)
                    for d in deltas(i, parsers[i].finish()):
                        yield d
                    reason = reason_for(item, parsers[i].n_tool_calls)
                    yield dict(delta(i, {}, reason, take_logprobs(i)), timings=item.timings)
                else:
                    unsent[i].append(item)
                    for d in deltas(i, parsers[i].feed(text_of(item))):
                        yield d
            if req.include_usage:
                yield dict(chunk, choices=[], usage=total_usage(finishes))

        return _stream(events())

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        # Any length the body limit lets through (llama.cpp tokenizes what it is given), off the loop.
        data = check_length(req.content, "content", state.max_body_bytes)
        ids = await run_in_threadpool(state.tokenizer.tokenize, data, add_bos=req.add_special, special=True)
        if not req.with_pieces:
            return {"tokens": ids}
        tok = state.tokenizer
        return {"tokens": [{"id": t, "piece": token_piece(tok, t)} for t in ids]}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_ids(req.tokens, "tokens")
        return {"content": state.tokenizer.detokenize(req.tokens, special=True).decode("utf-8", errors="replace")}

    @app.get("/metrics")
    async def prometheus():
        stats = state.generator.engine.stats()
        return PlainTextResponse(metrics.render(state.http, stats, state.generator.waiting_here),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/slots")
    async def slots():
        return state.generator.engine.slots()

    native.register(app, state, settings, tokenize_prompt, chat_prompt, client_gone)
    anthropic.register(app, state, settings, tokenize_prompt, chat_prompt)

    return app

