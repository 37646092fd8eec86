"""A FastAPI route class doing the JSON work of big requests and answers in a thread. FastAPI parses
a body (json.loads) and encodes an endpoint's returned dict (jsonable_encoder, then json.dumps) on
the event loop: a 1 MB /tokenize, whose answer holds a million token ids, stalled every other
client, /health included, for 0.5 s, nearly all of it jsonable_encoder."""
from __future__ import annotations

import email.message
import functools
import inspect
import json

from fastapi.datastructures import DefaultPlaceholder
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

PARSE_IN_THREAD_BYTES = 64 << 10  # bodies over this are parsed in a thread (a thread hop costs ~0.1 ms)
ENCODE_IN_THREAD_ITEMS = 4096     # answers with more items (or long strings) are encoded in a thread


def _is_json(content_type: str) -> bool:
    """FastAPI's own test of a body it parses as JSON."""
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def larger_than(value, n_items: int) -> bool:
    """Whether value holds more than n_items list items and dict entries (a long string counts one
    item per 256 characters), counted without walking more than that."""
    stack, count = [value], 0
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            count += len(v)
            if count <= n_items:
                stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            count += len(v)
            if count <= n_items:
                stack.extend(v)
        elif isinstance(v, str):
            count += len(v) >> 8
        if count > n_items:
            return True
    return False


# JSONResponse's encoding; jsonable_encoder only for what json cannot encode itself (it walks every
# item in Python: 0.5 s for a million token ids, where json.dumps takes 0.07 s).
_dumps = functools.partial(json.dumps, ensure_ascii=False, allow_nan=False, separators=(",", ":"),
                           default=jsonable_encoder)
PIECE_ITEMS = 4096  # one json.dumps call at most this big: the loop's thread gets the GIL between calls


def _encode_in_pieces(value, out: list) -> None:
    """Appends the JSON text of value to out, as JSONResponse writes it, in calls of json.dumps no
    bigger than PIECE_ITEMS (one C call holds the GIL throughout)."""
    if isinstance(value, dict) and all(isinstance(k, str) for k in value) and larger_than(value, PIECE_ITEMS):
        out.append("{")
        for i, (k, v) in enumerate(value.items()):
            out.append(("," if i else "") + _dumps(k) + ":")
            _encode_in_pieces(v, out)
        out.append("}")
    elif isinstance(value, (list, tuple)) and larger_than(value, PIECE_ITEMS):
        out.append("[")
        for start in range(0, len(value), PIECE_ITEMS):
            piece = list(value[start:start + PIECE_ITEMS])
            if start:
                out.append(",")
            if larger_than(piece, 4 * PIECE_ITEMS):
                for i, v in enumerate(piece):
                    if i:
                        out.append(",")
                    _encode_in_pieces(v, out)
            else:
                out.append(_dumps(piece)[1:-1])
        out.append("]")
    else:
        out.append(_dumps(value))


def json_bytes(value) -> bytes:
    out: list = []
    _encode_in_pieces(value, out)
    return "".join(out).encode("utf-8")


def _encoding_big_answers_in_thread(endpoint):
    @functools.wraps(endpoint)  # FastAPI reads the parameters through __wrapped__
    async def answer(*args, **kwargs):
        result = await endpoint(*args, **kwargs)
        if isinstance(result, (dict, list)) and larger_than(result, ENCODE_IN_THREAD_ITEMS):
            body = await run_in_threadpool(json_bytes, result)
            return Response(body, media_type="application/json")
        return result

    return answer


class OffLoopJSONRoute(APIRoute):
    """An APIRoute whose big JSON bodies are parsed, and whose big dict / list answers encoded, in a
    thread (set as app.router.route_class before the routes are added). Endpoints that declare a
    status code, a response model or a return type keep FastAPI's own encoding."""

    def __init__(self, path, endpoint, **kwargs):
        model = kwargs.get("response_model")
        plain = kwargs.get("status_code") is None and (model is None or isinstance(model, DefaultPlaceholder)) \
            and inspect.signature(endpoint).return_annotation is inspect.Signature.empty
        if plain and inspect.iscoroutinefunction(endpoint):
            endpoint = _encoding_big_answers_in_thread(endpoint)
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self):
        handle = super().get_route_handler()
        if self.body_field is None:
            return handle  # FastAPI reads no body for this route: neither does this

        async def parse_big_body_in_thread(request):
            body = await request.body()
            if len(body) > PARSE_IN_THREAD_BYTES and _is_json(request.headers.get("content-type", "")):
                try:
                    request._json = await run_in_threadpool(json.loads, body)  # what Request.json() caches
                except json.JSONDecodeError as e:  # FastAPI's own error for it
                    raise RequestValidationError(
                        [{"type": "json_invalid", "loc": ("body", e.pos), "msg": "JSON decode error", "input": {},
                          "ctx": {"error": e.msg}}], body=e.doc) from None
                except (ValueError, RecursionError):
                    pass  # not UTF-8, nested too deep: FastAPI meets it again and answers as it does
            return await handle(request)

        return parse_big_body_in_thread
