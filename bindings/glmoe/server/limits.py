"""Bounds on a request's work, checked before the work: body size (chunked bodies too), prompt
length against what a slot can hold, lone surrogates, and a chat template that loops or balloons
(rendered in its own thread under a time limit and an output cap, in a sandbox that refuses
oversized allocations).

The length bound: GLM's tokenizer is byte-level BPE with no normalizer, so the tokens of a text
spell its UTF-8 bytes exactly and no token is longer than the vocabulary's longest piece. A text
of more than n_ctx_slot * longest_piece bytes is therefore more than n_ctx_slot tokens and can
never run; every text that can run is under the bound, so the bound never refuses one that fits."""
from __future__ import annotations

import asyncio
import ctypes
import functools
import json
import re
import threading
from typing import Any, Callable, Optional

from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..chat import _raise_exception, _tojson
from .errors import APIError, bad_request

# A JSON string escape makes one byte of text at most 6 bytes of body ("\u0001"); plus room for the
# rest of the request (tool definitions, dropped reasoning, field names).
BODY_PER_PROMPT_BYTE = 6
BODY_SLACK_BYTES = 1 << 20
MAX_BODY_CEILING = 32 << 20  # whatever the context: larger bodies are refused (413)
BODY_READ_TIMEOUT_S = 600.0  # a body that trickles in slower than this is refused (408); llama-server's --timeout
TEMPLATE_TIMEOUT_S = 5.0
MAX_TEMPLATE_VALUE = 1 << 24  # the largest string / list / width a template may build in one operation


def longest_piece(tokenizer) -> int:
    """The longest token (with control tokens' text), in bytes: at least 1."""
    return max([1] + [len(tokenizer.token_to_piece(t, special=True)) for t in range(tokenizer.n_vocab)])


def max_body_bytes(max_prompt_bytes: int) -> int:
    return min(MAX_BODY_CEILING, BODY_PER_PROMPT_BYTE * max_prompt_bytes + BODY_SLACK_BYTES)


def too_long(n_bytes: int, max_prompt_bytes: int, n_ctx_slot: int, param: str) -> APIError:
    return bad_request(f"the prompt is {n_bytes} bytes; no text over {max_prompt_bytes} bytes fits the "
                       f"{n_ctx_slot} tokens of a slot's context", param, "context_length_exceeded")


def set_body_read_timeout(seconds: float) -> None:
    global BODY_READ_TIMEOUT_S
    BODY_READ_TIMEOUT_S = float(seconds)


class BodyTooLarge(Exception):
    def __init__(self, ended: bool):
        super().__init__()
        self.ended = ended  # the body's last bytes were read too


async def read_body(receive, limit: int) -> Optional[bytes]:
    """The whole request body, counted as it arrives (Content-Length or chunked); BodyTooLarge past
    limit, None when the client went away. TimeoutError when it takes over BODY_READ_TIMEOUT_S."""

    async def read():
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                raise BodyTooLarge(ended=not message.get("more_body", False))
            chunks.append(body)
            if not message.get("more_body", False):
                return b"".join(chunks)

    return await asyncio.wait_for(read(), BODY_READ_TIMEOUT_S)


DRAIN_MAX_BYTES = 64 << 20  # what is read and dropped of a refused body, at most
DRAIN_IDLE_S = 1.0          # ... while it keeps coming


async def drain(receive) -> bool:
    """Reads and drops the rest of a refused request's body while it keeps coming (up to
    DRAIN_MAX_BYTES), so that the refusal reaches the client: a server that closes a connection with
    unread bytes resets it, and the client loses the response. False: the body did not end (the
    connection must close)."""
    size = 0
    while size <= DRAIN_MAX_BYTES:
        try:
            message = await asyncio.wait_for(receive(), DRAIN_IDLE_S)
        except asyncio.TimeoutError:
            return False
        if message["type"] != "http.request":
            return False
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
    return False


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate_path(body: bytes) -> Optional[str]:
    """The dotted path of the first string (value or key) of a JSON body holding a lone surrogate
    ("\\ud800": valid JSON, not text), or None. Parses only bodies that contain such an escape."""
    if not _SURROGATE_ESCAPE.search(body):
        return None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None  # the app answers malformed JSON
    stack = [(doc, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _LONE_SURROGATE.search(value):
                return path or "body"
        elif isinstance(value, dict):
            for k, v in value.items():
                sub = f"{path}.{k}" if path else str(k)
                if _LONE_SURROGATE.search(k):
                    return path or "body"
                stack.append((v, sub))
        elif isinstance(value, list):
            stack.extend((v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(value))
    return None


class TemplateStopped(Exception):
    pass


class RenderedTooLong(TemplateStopped):
    pass


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """chat.py's sandbox, refusing any one operation that would build a value over
    MAX_TEMPLATE_VALUE ('x' * 10**10, 'x'.ljust(10**10), '%10000000000s' % x, ...)."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_TEMPLATE_VALUE:
                    raise SecurityError("the template builds a value that is too large")
        elif operator == "**":
            if isinstance(left, (int, float)) and isinstance(right, (int, float)) and abs(right) > 1024:
                raise SecurityError("the template raises to too large a power")
        elif operator == "%" and isinstance(left, str):
            _check_format(left)
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            if len(left) + len(right) > MAX_TEMPLATE_VALUE:
                raise SecurityError("the template builds a value that is too large")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's spelling)
        _check_args(args, kwargs)
        wrapped = getattr(__obj, "__wrapped__", __obj)
        if getattr(wrapped, "__name__", "") in ("format", "format_map") and isinstance(
                getattr(wrapped, "__self__", None), str):
            _check_format(wrapped.__self__)
        return super().call(__context, __obj, *args, **kwargs)


def _check_args(args, kwargs):
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_TEMPLATE_VALUE:
            raise SecurityError("the template passes too large a number")


_BIG_WIDTH = re.compile(r"\d{%d,}" % len(str(MAX_TEMPLATE_VALUE)))


def _check_format(fmt: str):
    if "*" in fmt or _BIG_WIDTH.search(fmt):
        raise SecurityError("the template formats with too large a width")


def _checked_filter(f):
    @functools.wraps(f)
    def checked(*args, **kwargs):
        _check_args(args, kwargs)
        if f.__name__ in ("do_format",) and args and isinstance(args[0], str):
            _check_format(args[0])
        return f(*args, **kwargs)

    return checked


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)
    env.filters = {name: _checked_filter(f) for name, f in env.filters.items()}
    env.filters["tojson"] = _tojson
    from datetime import datetime
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _render(template: str, max_chars: int, context: dict) -> str:
    parts, n = [], 0
    for piece in _compiled(template).generate(**context):
        n += len(piece)
        if n > max_chars:
            raise RenderedTooLong(f"the rendered prompt is over {max_chars} characters; no text that long fits "
                                  f"a slot's context")
        parts.append(piece)
    return "".join(parts)


class _Timeout(BaseException):
    """Raised inside a template's thread when its time is up (a BaseException: the template's own
    code cannot catch it)."""


def _interrupt(thread: threading.Thread, lock: threading.Lock, done: list) -> None:
    with lock:
        if not done[0] and thread.ident is not None:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(_Timeout))


async def run_bounded(fn: Callable[[], Any], timeout_s: float) -> Any:
    """fn() in a thread of its own; past timeout_s an exception is raised inside that thread (pure
    Python code such as a template stops at its next bytecode) and this raises TemplateStopped."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    lock, done = threading.Lock(), [False]

    def settle(ok, value):
        if not future.done():
            (future.set_result if ok else future.set_exception)(value)

    def target():
        try:
            try:
                result = fn()
                outcome = (True, result)
            except _Timeout:
                outcome = (False, TemplateStopped(f"took over {timeout_s:g} s"))
            except BaseException as e:  # noqa: BLE001 - anything the template raised
                outcome = (False, e)
            with lock:
                done[0] = True
            loop.call_soon_threadsafe(settle, *outcome)
        except BaseException:  # noqa: BLE001 - a late _Timeout
            with lock:
                done[0] = True
            loop.call_soon_threadsafe(settle, False, TemplateStopped(f"took over {timeout_s:g} s"))

    thread = threading.Thread(target=target, name="glmoe-template", daemon=True)
    thread.start()
    handle = loop.call_later(timeout_s, _interrupt, thread, lock, done)
    try:
        # A thread stuck in one C call past the deadline cannot be interrupted: the client is
        # answered anyway, and the thread ends when that call returns.
        return await asyncio.wait_for(asyncio.shield(future), timeout_s + 1.0)
    except asyncio.TimeoutError:
        raise TemplateStopped(f"took over {timeout_s:g} s") from None
    finally:
        handle.cancel()


async def render_bounded(template: str, max_chars: int, timeout_s: float = TEMPLATE_TIMEOUT_S, **context) -> str:
    """The chat template rendered with a time limit and an output cap: a 400 when either is hit or
    the template fails on this request's data."""
    try:
        return await run_bounded(lambda: _render(template, max_chars, context), timeout_s)
    except RenderedTooLong as e:
        raise bad_request(str(e), "messages", "context_length_exceeded") from e
    except TemplateStopped as e:
        raise bad_request(f"chat template stopped: {e}", "messages") from e
    except MemoryError as e:
        raise bad_request("chat template stopped: out of memory", "messages") from e
    except Exception as e:  # noqa: BLE001 - a template failing on the request's data is the request's error
        raise bad_request(f"chat template error: {type(e).__name__}: {e}", "messages") from e
