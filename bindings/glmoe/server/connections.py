"""llama-server's connections (uvicorn's h11 protocol, subclassed): read, write and idle timeouts,
a cap on open connections answered with OpenAI's 503 body, and a log that stays short when
clients misbehave or accept() runs out of file descriptors.

- idle: a connection that sends no byte of a request for KEEP_ALIVE_S is closed (uvicorn arms
  this only after a first response, so a connection that never spoke stayed open forever);
- read: once a request's first byte has come, its head must be whole within timeout_s (a
  slowloris sending a byte a second is dropped); its body is the app's (limits.read_body, a 408);
- write: a response the client stops reading (the transport's buffer full) is dropped after
  timeout_s, so that a stalled reader does not hold its slot for ever;
- cap: a connection opened while max_connections are open gets a 503 for its request and is
  closed, well before the process runs out of file descriptors."""
from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Optional

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from . import limits
from .errors import error_body

KEEP_ALIVE_S = 5.0  # as cpp-httplib's keep-alive timeout (llama.cpp's server)
LOG_INTERVAL_S = 5.0


class Throttle:
    """At most one log line per interval for each kind of event; the next line counts the ones
    skipped meanwhile."""

    MAX_KINDS = 256  # past this many kinds, those not heard of for an interval are forgotten

    def __init__(self, interval_s: float = LOG_INTERVAL_S, stream=None):
        self.interval_s, self.stream = interval_s, stream
        self._last: dict = {}
        self._skipped: dict = {}

    def allow(self, kind) -> Optional[int]:
        """None to stay quiet, else how many events of this kind were skipped since the last line."""
        now = time.monotonic()
        if now - self._last.get(kind, -self.interval_s) < self.interval_s:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return None
        if kind not in self._last and len(self._last) >= self.MAX_KINDS:
            for old in [k for k, t in self._last.items() if now - t >= self.interval_s]:
                del self._last[old]
                self._skipped.pop(old, None)
        self._last[kind] = now
        return self._skipped.pop(kind, 0)

    def __call__(self, kind: str, text: str) -> None:
        skipped = self.allow(kind)
        if skipped is not None:
            more = f" ({skipped} more since the last such line)" if skipped else ""
            print(f"llama-server: {text}{more}", file=self.stream or sys.stderr, flush=True)


class ThrottledLog(logging.Filter):
    """A logging filter passing each distinct message at most once per interval (uvicorn logs one
    warning per malformed request: a client sending garbage in a loop would flood the log)."""

    def __init__(self, throttle: Throttle):
        super().__init__()
        self.throttle = throttle

    def filter(self, record: logging.LogRecord) -> bool:
        # Keyed by the message's first line: asyncio's messages carry the object they are about after it.
        skipped = self.throttle.allow(("log", record.name, str(record.msg).split("\n", 1)[0][:80]))
        if skipped is None:
            return False
        if skipped:
            record.msg, record.args = f"{record.getMessage()} ({skipped} more since the last such line)", ()
        return True


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the timeouts and the cap above; configure with configured()."""

    timeout_s: float = 600.0  # llama.cpp's --timeout default
    max_connections: int = 4096
    throttle: Throttle = Throttle()

    @classmethod
    def configured(cls, timeout_s: float, max_connections: int, throttle: Throttle) -> type:
        return type(cls.__name__, (cls,), dict(timeout_s=timeout_s, max_connections=max_connections,
                                               throttle=throttle))

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._read_deadline: Optional[asyncio.TimerHandle] = None
        self._write_deadline: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self.app = self._refuse_over_cap  # this connection only (uvicorn runs self.app per request)
            self.throttle("cap", f"{len(self.connections)} connections open, over the cap of "
                                 f"{self.max_connections}: new ones are answered 503")
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._between_requests():
            self._cancel("_read_deadline")  # a head was whole: the app reads the body, with its own limit
        elif self._read_deadline is None and not self.transport.is_closing():
            self._read_deadline = self.loop.call_later(self.timeout_s, self._drop, "read")

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_deadline is None:
            self._write_deadline = self.loop.call_later(self.timeout_s, self._drop, "write")

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel("_write_deadline")

    def connection_lost(self, exc) -> None:
        self._cancel("_read_deadline")
        self._cancel("_write_deadline")
        super().connection_lost(exc)

    def _cancel(self, name: str) -> None:
        handle = getattr(self, name)
        if handle is not None:
            handle.cancel()
            setattr(self, name, None)

    def _drop(self, what: str) -> None:
        """The client did not send a request head (read) or take the response (write) in time."""
        setattr(self, f"_{what}_deadline", None)
        if self.transport.is_closing():
            return
        if what == "read" and not self._between_requests():
            return
        doing = "sent its request" if what == "read" else "read its response"
        self.throttle(f"timeout-{what}",
                      f"dropped a connection that {doing} slower than --timeout {self.timeout_s:g} s")
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:
            pass
        self.transport.abort()  # nothing useful is left to send

    async def _refuse_over_cap(self, scope, receive, send) -> None:
        await limits.drain(receive)  # read what comes of its body, so that the 503 is not lost to a reset
        body = json.dumps(error_body(503, f"the server has {self.max_connections} connections open, its limit; "
                                          "try again shortly", code="too_many_connections")).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close"), (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": body})


def max_connections() -> int:
    """Half the file descriptors the process may open (the rest: the model, the loop, threads'
    files), at least 32 and at most 4096."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY or soft <= 0:
            soft = 1 << 16
    except (ImportError, OSError, ValueError):
        soft = 1024
    return max(32, min(4096, soft // 2))


def accept_error_handler(throttle: Throttle):
    """The event loop's exception handler: accept() failing for want of file descriptors (asyncio
    logs a traceback per attempt, many a second) becomes one throttled line; the connection waits in
    the listen backlog and is accepted once descriptors are free again."""

    def handle(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and context.get("message", "").startswith("socket.accept() out of system"):
            throttle("accept", f"cannot accept connections: {exc.strerror or exc}; new ones wait until "
                               "descriptors are free")
            return
        loop.default_exception_handler(context)

    return handle


class GuardedServer(uvicorn.Server):
    """uvicorn's server, its event loop logging accept() failures through a throttle."""

    def __init__(self, config: uvicorn.Config, throttle: Throttle):
        super().__init__(config)
        self.throttle = throttle

    async def serve(self, sockets=None) -> None:
        asyncio.get_running_loop().set_exception_handler(accept_error_handler(self.throttle))
        await super().serve(sockets)


def server(app, *, timeout_s: float, verbose: bool, **uvicorn_kw) -> GuardedServer:
    """The uvicorn server for llama-server: h11 with the guards above, uvicorn's warnings throttled."""
    throttle = Throttle()
    protocol = GuardedH11Protocol.configured(timeout_s, max_connections(), throttle)
    config = uvicorn.Config(app, http=protocol, log_level="info" if verbose else "warning", access_log=verbose,
                            timeout_graceful_shutdown=5, timeout_keep_alive=min(KEEP_ALIVE_S, timeout_s),
                            limit_concurrency=None, **uvicorn_kw)
    for name in ("uvicorn.error", "asyncio"):  # after Config, which sets up uvicorn's logging
        logging.getLogger(name).addFilter(ThrottledLog(throttle))
    return GuardedServer(config, throttle)
