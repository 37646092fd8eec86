"""llama.cpp's own llama-server endpoints beside the OpenAI ones (tools/server/README.md): POST
/completion and /completions (its native completion, streamed as llama.cpp streams it, n_cmpl choices
per prompt), GET and POST /props, POST /apply-template, chat token counting, the embeddings endpoints
(with --embedding), CORS as llama.cpp answers it, and a 501 naming what is missing for llama.cpp's
endpoints glmoe lacks (/infill, /rerank, /v1/responses ...); slot actions are in slots.py.
Completions run through the same Generator as /v1/completions, chat prompts through the same
template path as /v1/chat/completions; fields are checked in native_fields.py."""
from __future__ import annotations

import asyncio
import base64
import json
from typing import Callable, List

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..chat import token_piece
from . import embeddings, limits, slots
from .cli import glmoe_version
from .errors import APIError, bad_request
from .choices import check_n, choice_sampling, merged, text_of
from .constraints import constraints_for
from .generation import Finish
from .logprobs import TokenTexts, completion_probabilities
from .native_fields import (EmbeddingRequest, NativeCompletionRequest, bias_pairs, check_samplers,
                            generation_settings, pick_fields, prompt_list, refuse_unsupported)
from .schemas import ChatCompletionRequest

# llama.cpp's endpoints that glmoe does not implement: a 501 that says so (rather than a 404).
NO_RESPONSES = "OpenAI's Responses API is not supported yet: use /v1/chat/completions"
NO_RERANK = "This server does not support reranking (glmoe has no reranking; llama-server --reranking is refused)"
UNSUPPORTED = {
    "/infill": "/infill (fill-in-the-middle) is not supported by glmoe",
    "/rerank": NO_RERANK, "/reranking": NO_RERANK, "/v1/rerank": NO_RERANK, "/v1/reranking": NO_RERANK,
    "/responses": NO_RESPONSES, "/v1/responses": NO_RESPONSES, "/responses/input_tokens": NO_RESPONSES,
    "/v1/responses/input_tokens": NO_RESPONSES,
    "/audio/transcriptions": "audio input is not supported",
    "/v1/audio/transcriptions": "audio input is not supported",
    "/v1/chat/completions/control": "controlling a running chat completion is not supported",
    "/lora-adapters": "LoRA adapters are not supported (GET /lora-adapters lists none)",
    "/v1/streams/lookup": "resumable streams are not supported",
}
# Refused for GET too (and DELETE for /v1/stream).
UNSUPPORTED_ANY_METHOD = {
    "/v1/stream": "resumable streams are not supported",
    "/tools": "server-side tools are not supported", "/cors-proxy": "the web UI's CORS proxy is not supported",
}
INPUT_TOKENS = ("/chat/completions/input_tokens", "/v1/chat/completions/input_tokens")
ROUTES = {"/completion", "/completions", "/props", "/apply-template", "/embedding", "/embeddings", "/v1/embeddings",
          *INPUT_TOKENS, *UNSUPPORTED, *UNSUPPORTED_ANY_METHOD}
NO_PROPS = ("This server does not support changing global properties (llama.cpp's --props): glmoe has none "
            "that can change while it runs")
NO_EMBEDDINGS = "This server does not support embeddings. Start it with `--embeddings`"
NO_POST_SAMPLING = ("post_sampling_probs: not supported; n_probs reports the model's own probabilities (before "
                    "logit bias and the samplers), as llama.cpp does without it")


class Cors:
    """llama.cpp's CORS (pure ASGI, outside the API key and loading checks): any origin may call, so
    every response allows the request's Origin (or *), and an OPTIONS preflight is answered at once
    with llama.cpp's headers, without a key."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        origin = dict(scope["headers"]).get(b"origin", b"*")
        if scope["method"] == "OPTIONS":
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"access-control-allow-origin", origin), (b"access-control-allow-credentials", b"true"),
                (b"access-control-allow-methods", b"GET, POST"), (b"access-control-allow-headers", b"*"),
                (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return

        async def send_allowing_origin(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=list(message.get("headers", [])) +
                               [(b"access-control-allow-origin", origin)])
            await send(message)

        await self.app(scope, receive, send_allowing_origin)


def _sse_stream(events) -> StreamingResponse:
    """llama.cpp's native stream: a `data:` line per chunk, no [DONE]; a failure after the headers
    went out is an `error:` line."""

    async def body():
        try:
            async for obj in events:
                yield f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
        except APIError as e:
            yield f"error: {json.dumps(e.body(), ensure_ascii=False)}\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _no_generation(n_prompt: int) -> Finish:
    """n_predict 0: llama.cpp evaluates the prompt and generates nothing; glmoe keeps no cache
    between requests, so there is nothing to run."""
    timings = {"prompt_n": 0, "prompt_ms": 0.0, "prompt_per_token_ms": 0.0, "prompt_per_second": 0.0,
               "predicted_n": 0, "predicted_ms": 0.0, "predicted_per_token_ms": 0.0, "predicted_per_second": 0.0}
    return Finish("length", n_prompt, 0, timings)


def register(app, state, settings, tokenize_prompt: Callable, chat_prompt: Callable, client_gone: Callable) -> None:
    """Adds the routes and the CORS middleware to create_app's app. tokenize_prompt(text, add_bos,
    param) and chat_prompt(ChatCompletionRequest) -> (prompt, tools) are create_app's own."""
    app.add_middleware(Cors)
    # "context": the EmbeddingContext, "pooling": the pooling in use (both made on first use); "turn": one
    # request at a time takes a worker thread to run the context, so waiting ones hold none.
    embedding_state = {"turn": asyncio.Lock()}

    def mixed_tokens(prompt: list, param: str) -> List[int]:
        """llama.cpp's mixed prompt: ids as they are, strings tokenized (BOS only before a leading one)."""
        tok, out = state.tokenizer, []
        for j, part in enumerate(prompt):
            if isinstance(part, str):
                out += tok.tokenize(part.encode("utf-8"), add_bos=j == 0, special=True)
            elif not 0 <= part < tok.n_vocab:
                raise bad_request(f"token id {part} out of range [0, {tok.n_vocab})", param)
            else:
                out.append(part)
        return out

    async def tokens_of(prompt, param: str = "prompt") -> List[int]:
        if isinstance(prompt, str):
            return await tokenize_prompt(prompt, True, param)
        n_text = sum(len(part.encode("utf-8")) for part in prompt if isinstance(part, str))
        if n_text > state.max_prompt_bytes:
            raise limits.too_long(n_text, state.max_prompt_bytes, state.generator.n_ctx_slot, param)
        return await run_in_threadpool(mixed_tokens, prompt, param)

    def sampling_for(req: NativeCompletionRequest) -> dict:
        """The engine's sampling keywords. Blocks (tokenizes logit_bias text): call it off the loop."""
        sampling = req.sampling_kwargs(settings.sampling_defaults)
        bias, tok = {}, state.tokenizer
        for token, value in bias_pairs(req.logit_bias):
            # Text is biased token by token, as llama.cpp does (its tokens, without BOS or control tokens).
            if isinstance(token, str) and len(token) > state.max_prompt_bytes:
                raise bad_request("logit_bias: a text longer than any prompt", "logit_bias")
            ids = [token] if isinstance(token, int) else tok.tokenize(token.encode("utf-8"), add_bos=False)
            for t in ids:
                if not 0 <= t < tok.n_vocab:
                    raise bad_request(f"logit_bias: token id {t} out of range [0, {tok.n_vocab})", "logit_bias")
                bias[t] = value
        if bias:
            sampling["logit_bias"] = bias
        return sampling

    def final_chunk(index: int, prompt_text: str, content: str, ids: List[int], finish: Finish, params: dict):
        stop_type = "limit" if finish.reason == "length" else "word" if finish.stop_word else "eos"
        return {"index": index, "content": content, "tokens": ids, "stop": True, "model": settings.model_name,
                "tokens_predicted": finish.n_generated, "tokens_evaluated": finish.n_prompt,
                "generation_settings": params, "prompt": prompt_text, "has_new_line": "\n" in content,
                "truncated": False, "stop_type": stop_type, "stopping_word": finish.stop_word,
                "tokens_cached": finish.timings.get("cache_n", 0), "timings": {"cache_n": 0, **finish.timings}}

    @app.post("/completion")
    @app.post("/completions")  # llama.cpp's own, as /completion (OpenAI's is /v1/completions)
    async def completion(req: NativeCompletionRequest, request: Request):
        refuse_unsupported(req.model_extra or {})
        n = req.n_cmpl if req.n_cmpl is not None else req.n
        check_n(n, settings.n_parallel, "n_cmpl" if req.n_cmpl is not None else "n")
        n_probs = req.logprobs if "n_probs" not in req.model_fields_set and req.logprobs is not None \
            else req.n_probs
        if n_probs > 0 and req.post_sampling_probs:
            raise bad_request(NO_POST_SAMPLING, "post_sampling_probs")
        if req.samplers is not None:
            check_samplers(req.samplers)
        prompts = prompt_list(req.prompt)
        if req.stream and len(prompts) > 1:
            raise bad_request("streaming several prompts in one request is not supported: send one request "
                              "per prompt, or leave stream off", "prompt")
        sampling = await run_in_threadpool(sampling_for, req)
        constraints = iter(await constraints_for(req, state.tokenizer, len(prompts) * n))
        stops, gen = req.stop_list(), state.generator
        wanted = req.requested_max_tokens(settings.n_predict)
        # As llama.cpp orders them: each prompt's n completions in turn (index = prompt * n + choice),
        # choice j's seed advanced by j.
        runs = []
        for prompt in prompts:
            tokens = await tokens_of(prompt)
            max_tokens = gen.check_prompt(tokens, wanted)
            runs += [(tokens, max_tokens, kwargs, next(constraints)) for kwargs in choice_sampling(sampling, n)]
        texts = TokenTexts(state.tokenizer, special=False)

        def params_of(kwargs) -> dict:
            return generation_settings(kwargs, wanted, stops, req.ignore_eos, req.stream, gen.n_ctx_slot, n_probs)

        async def prompt_text(tokens):
            data = await run_in_threadpool(state.tokenizer.detokenize, tokens, special=True)
            return data.decode("utf-8", errors="replace")

        def generate(tokens, max_tokens, kwargs, constraint, on_tokens, gone):
            return gen.generate(tokens, max_tokens, kwargs, stops, special=False, client_gone=gone,
                                ignore_eos=req.ignore_eos, on_tokens=on_tokens, constraint=constraint,
                                logprobs=n_probs or None)

        def probabilities(items) -> list:
            return completion_probabilities([t for item in items for t in item.tokens], texts)

        if req.stream:
            tokens, max_tokens = runs[0][:2]

            async def events():
                text = await prompt_text(tokens)
                if max_tokens == 0:
                    for i, (_, _, kwargs, _) in enumerate(runs):
                        yield final_chunk(i, text, "", [], _no_generation(len(tokens)), params_of(kwargs))
                    return
                pending, counted = [[] for _ in runs], [0] * len(runs)

                def took(i):
                    def record(ids):
                        pending[i].extend(ids)
                        counted[i] += len(ids)
                    return record

                streams = [generate(tokens, max_tokens, kwargs, constraint, took(i), None)
                           for i, (_, _, kwargs, constraint) in enumerate(runs)]
                async for i, item in merged(streams):
                    if isinstance(item, Finish):
                        yield final_chunk(i, text, "", [], item, params_of(runs[i][2]))
                    else:
                        chunk = {"index": i, "content": text_of(item), "tokens": list(pending[i]), "stop": False,
                                 "tokens_predicted": counted[i], "tokens_evaluated": len(tokens)}
                        if n_probs:
                            chunk["completion_probabilities"] = probabilities([item])
                        yield chunk
                        pending[i].clear()

            return _sse_stream(events())

        async def one(index, tokens, max_tokens, kwargs, constraint):
            ids, parts, finish = [], [], None
            if max_tokens == 0:
                finish = _no_generation(len(tokens))
            else:
                async for item in generate(tokens, max_tokens, kwargs, constraint, ids.extend, client_gone(request)):
                    if isinstance(item, Finish):
                        finish = item
                    else:
                        parts.append(item)
                if finish is None:
                    return None
            body = final_chunk(index, await prompt_text(tokens), "".join(text_of(p) for p in parts),
                               ids if req.return_tokens else [], finish, params_of(kwargs))
            if n_probs:
                body["completion_probabilities"] = probabilities(parts)
            return pick_fields(body, req.response_fields) if req.response_fields else body

        tasks = [asyncio.ensure_future(one(i, *run)) for i, run in enumerate(runs)]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # one failed: the others stop too
                task.cancel()
            raise
        if any(r is None for r in results):
            return Response(status_code=499)  # nobody is listening
        return results[0] if len(results) == 1 else results

    @app.get("/props")
    async def props():
        unset = NativeCompletionRequest(prompt="")
        sampling = unset.sampling_kwargs(settings.sampling_defaults)
        n_ctx, tok = state.generator.n_ctx_slot, state.tokenizer
        defaults = {"n_ctx": n_ctx, "speculative": settings.spec_suffix, "is_processing": False,
                    "params": generation_settings(sampling, unset.requested_max_tokens(settings.n_predict), [],
                                                  False, False, n_ctx), "prompt": ""}
        return {"default_generation_settings": defaults, "total_slots": settings.n_parallel,
                "model_alias": settings.model_name, "model_path": settings.model_path,
                "modalities": {"vision": False, "audio": False}, "chat_template": state.chat_template or "",
                "bos_token": token_piece(tok, tok.bos_id), "eos_token": token_piece(tok, tok.eos_id),
                "build_info": f"glmoe {glmoe_version()}", "endpoint_slots": True, "endpoint_props": False,
                "endpoint_metrics": True, "is_sleeping": False,
                # glmoe's own: the KV cache's element types (-ctk/-ctv) and its bytes on every device.
                "kv_cache": {"type_k": state.generator.engine.kv_type_k, "type_v": state.generator.engine.kv_type_v,
                             "bytes": state.generator.engine.kv_bytes}}

    @app.post("/props")
    async def change_props():
        raise APIError(501, NO_PROPS)

    @app.post("/apply-template")
    async def apply_template(req: ChatCompletionRequest):
        prompt, _ = await chat_prompt(req)
        return {"prompt": prompt}

    async def input_tokens(req: ChatCompletionRequest):
        prompt, _ = await chat_prompt(req)
        tokens = await tokenize_prompt(prompt, False, "messages")
        return {"object": "response.input_tokens", "input_tokens": len(tokens)}

    for path in INPUT_TOKENS:
        app.post(path)(input_tokens)

    def refuse(message: str):
        async def not_supported():
            raise APIError(501, message)
        return not_supported

    for path, message in UNSUPPORTED.items():
        app.post(path)(refuse(message))
    for path, message in UNSUPPORTED_ANY_METHOD.items():
        app.api_route(path, methods=["GET", "POST", "DELETE"])(refuse(message))
    slots.register(app, state, settings)

    @app.get("/lora-adapters")
    async def lora_adapters():
        return []  # none can be loaded

    def pooling() -> str:
        if "pooling" not in embedding_state:
            try:
                embedding_state["pooling"] = settings.pooling or embeddings.model_pooling(state.model.metadata())
            except ValueError as e:
                raise APIError(501, f"embeddings are not available: {e}") from None
        return embedding_state["pooling"]

    async def embed(req: EmbeddingRequest, request: Request, openai_shape: bool):
        if not settings.embedding:
            raise APIError(501, NO_EMBEDDINGS)
        pool = pooling()
        if openai_shape and pool == "none":
            raise bad_request("Pooling type 'none' is not OAI compatible. Please use a different pooling type "
                              "(llama-server --pooling mean, cls or last)")
        if req.dimensions is not None:
            raise bad_request("dimensions: glmoe does not shorten embeddings", "dimensions")
        if req.input is not None:
            inputs = req.input
        elif req.content is not None:
            inputs, openai_shape = req.content, False  # "content" is llama.cpp's field: its own shape
        else:
            raise bad_request('"input" or "content" must be provided')
        if pool == "none" and req.embd_normalize not in (None, -1):
            raise bad_request("embd_normalize: normalization is for pooled embeddings; this server's pooling is "
                              "none (per-token embeddings, unnormalized)", "embd_normalize")
        if req.encoding_format == "base64" and not openai_shape:
            raise bad_request("encoding_format: base64 is for /v1/embeddings' OpenAI response", "encoding_format")
        if "context" not in embedding_state:
            embedding_state["context"] = embeddings.EmbeddingContext(
                state.model, state.generator.n_ctx_slot, settings.n_batch, settings)
        context = embedding_state["context"]
        token_lists = [await tokens_of(p, "input") for p in prompt_list(inputs, "input")]
        for i, tokens in enumerate(token_lists):
            context.check_length(tokens, i)
        norm = 2 if req.embd_normalize is None else req.embd_normalize
        vectors = []
        for tokens in token_lists:
            async with embedding_state["turn"]:
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody is listening
                rows = await run_in_threadpool(context.rows, tokens)
            vectors.append(rows if pool == "none" else embeddings.normalize(embeddings.pool(rows, pool), norm)[None])
        if not openai_shape:
            return [{"index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]
        n_tokens = sum(len(t) for t in token_lists)

        def encoded(v):
            return base64.b64encode(v[0].astype("<f4").tobytes()).decode("ascii") \
                if req.encoding_format == "base64" else v[0].tolist()

        return {"model": settings.model_name, "object": "list",
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
                "data": [{"embedding": encoded(v), "index": i, "object": "embedding"} for i, v in enumerate(vectors)]}

    @app.post("/embedding")
    @app.post("/embeddings")
    async def native_embeddings(req: EmbeddingRequest, request: Request):
        return await embed(req, request, openai_shape=False)

    @app.post("/v1/embeddings")
    async def openai_embeddings(req: EmbeddingRequest, request: Request):
        return await embed(req, request, openai_shape=True)
