"""Chat templates rendered with bounds, for Llama.create_chat_completion and llama-server alike: in
a sandbox that refuses any one operation building an oversized value, in a thread of its own under
a time limit, with the output capped as it grows. A template is model-file data: one that loops or
balloons must end in an error, not a hang or a MemoryError. Imports neither FastAPI nor the server."""
from __future__ import annotations

import asyncio
import ctypes
import functools
import json
import re
import threading
from datetime import datetime
from typing import Any, Callable, Optional

from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_TIMEOUT_S = 5.0
MAX_TEMPLATE_VALUE = 1 << 24  # the largest string / list / width a template may build in one operation


class TemplateStopped(Exception):
    pass


class RenderedTooLong(TemplateStopped):
    pass


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Chat templates call tojson with Python's json.dumps keywords (transformers' convention).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, refusing any one operation that would build a value over
    MAX_TEMPLATE_VALUE ('x' * 10**10, 'x'.ljust(10**10), '%10000000000s' % x, ...)."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_TEMPLATE_VALUE:
                    raise SecurityError(f"the template builds a value over {MAX_TEMPLATE_VALUE} items")
        elif operator == "**":
            if isinstance(left, (int, float)) and isinstance(right, (int, float)) and abs(right) > 1024:
                raise SecurityError("the template raises to a power over 1024")
        elif operator == "%" and isinstance(left, str):
            _check_format(left)
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            if len(left) + len(right) > MAX_TEMPLATE_VALUE:
                raise SecurityError(f"the template builds a value over {MAX_TEMPLATE_VALUE} items")
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
            raise SecurityError(f"the template passes a number over {MAX_TEMPLATE_VALUE}")


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
def compiled(template: str):
    """The template compiled in the bounded sandbox (a TemplateError when it does not compile)."""
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)
    env.filters = {name: _checked_filter(f) for name, f in env.filters.items()}
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_capped(template: str, max_chars: int, context: dict) -> str:
    """The template's text for context; RenderedTooLong as soon as it passes max_chars."""
    parts, n = [], 0
    for piece in compiled(template).generate(**context):
        n += len(piece)
        if n > max_chars:
            raise RenderedTooLong(f"the rendered prompt is over {max_chars} characters; no text that long fits "
                                  "the context")
        parts.append(piece)
    return "".join(parts)


class _Timeout(BaseException):
    """Raised inside a template's thread when its time is up (a BaseException: the template's own
    code cannot catch it)."""


def _start(fn: Callable[[], Any], timeout_s: float, settle: Callable[[bool, Any], None]) -> Callable[[], None]:
    """Runs fn() in a thread of its own, which calls settle(True, result) or settle(False, exception)
    when it ends. Returns interrupt(): it raises an exception inside that thread (pure Python code
    such as a template stops at its next bytecode), which then settles with TemplateStopped."""
    lock, done = threading.Lock(), [False]
    stopped = f"took over {timeout_s:g} s (the time limit of a chat template)"

    def target():
        try:
            try:
                outcome = (True, fn())
            except _Timeout:
                outcome = (False, TemplateStopped(stopped))
            except BaseException as e:  # noqa: BLE001 - anything the template raised
                outcome = (False, e)
            with lock:
                done[0] = True
            settle(*outcome)
        except BaseException:  # noqa: BLE001 - a _Timeout that arrived after fn() ended
            with lock:
                done[0] = True
            settle(False, TemplateStopped(stopped))

    thread = threading.Thread(target=target, name="glmoe-template", daemon=True)
    thread.start()

    def interrupt():
        with lock:
            if not done[0] and thread.ident is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                                           ctypes.py_object(_Timeout))

    return interrupt


def run_bounded_sync(fn: Callable[[], Any], timeout_s: float) -> Any:
    """fn() in a thread of its own, stopped past timeout_s (TemplateStopped); what it raises is raised."""
    finished, box = threading.Event(), []

    def settle(ok, value):
        box.append((ok, value))
        finished.set()

    interrupt = _start(fn, timeout_s, settle)
    if not finished.wait(timeout_s):
        interrupt()
        # A thread stuck in one C call cannot be interrupted: the caller is answered anyway, and
        # the thread ends when that call returns.
        finished.wait(1.0)
    if not box:
        raise TemplateStopped(f"took over {timeout_s:g} s (the time limit of a chat template)")
    ok, value = box[0]
    if ok:
        return value
    raise value


async def run_bounded(fn: Callable[[], Any], timeout_s: float) -> Any:
    """run_bounded_sync for an event loop: the loop goes on while fn() runs."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle_future(ok, value):
        if not future.done():
            (future.set_result if ok else future.set_exception)(value)

    interrupt = _start(fn, timeout_s, lambda ok, value: loop.call_soon_threadsafe(settle_future, ok, value))
    handle = loop.call_later(timeout_s, interrupt)
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout_s + 1.0)
    except asyncio.TimeoutError:
        raise TemplateStopped(f"took over {timeout_s:g} s (the time limit of a chat template)") from None
    finally:
        handle.cancel()


def render_bounded_sync(template: str, context: dict, max_chars: int, timeout_s: Optional[float] = None) -> str:
    """The template rendered under the bounds; a ValueError naming the bound it hit or the
    template's own error."""
    timeout_s = TEMPLATE_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        return run_bounded_sync(lambda: render_capped(template, max_chars, context), timeout_s)
    except RenderedTooLong as e:
        raise ValueError(f"chat template stopped: {e}") from e
    except TemplateStopped as e:
        raise ValueError(f"chat template stopped: it {e}") from e
    except MemoryError as e:
        raise ValueError("chat template stopped: out of memory") from e
    except Exception as e:  # noqa: BLE001 - a template failing on this data (jinja's errors, the sandbox's)
        raise ValueError(f"chat template error: {e}") from e
