"""Bounds on a request's work, checked before the work: body size (chunked bodies too), prompt
length against what a slot can hold, lone surrogates, and a chat template that loops or balloons
(rendered under template_limits' bounds: its own thread, a time limit, an output cap, a sandbox
that refuses oversized allocations).

The length bound: GLM's tokenizer is byte-level BPE with no normalizer, so the tokens of a text
spell its UTF-8 bytes exactly and no token is longer than the vocabulary's longest piece. A text
of more than n_ctx_slot * longest_piece bytes is therefore more than n_ctx_slot tokens and can
never run; every text that can run is under the bound, so the bound never refuses one that fits."""
from __future__ import annotations

import asyncio
import json
import re
from typing import Optional

from ..template_limits import TEMPLATE_TIMEOUT_S, RenderedTooLong, TemplateStopped, render_capped, run_bounded
from .errors import APIError, bad_request

# A JSON string escape makes one byte of text at most 6 bytes of body ("\u0001"); plus room for the
# rest of the request (tool definitions, dropped reasoning, field names).
BODY_PER_PROMPT_BYTE = 6
BODY_SLACK_BYTES = 1 << 20
MAX_BODY_CEILING = 32 << 20  # whatever the context: larger bodies are refused (413)
BODY_READ_TIMEOUT_S = 600.0  # a body that trickles in slower than this is refused (408); llama-server's --timeout


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


async def render_bounded(template: str, max_chars: int, timeout_s: float = TEMPLATE_TIMEOUT_S, **context) -> str:
    """The chat template rendered with a time limit and an output cap: a 400 when either is hit or
    the template fails on this request's data."""
    try:
        return await run_bounded(lambda: render_capped(template, max_chars, context), timeout_s)
    except RenderedTooLong as e:
        raise bad_request(str(e), "messages", "context_length_exceeded") from e
    except TemplateStopped as e:
        raise bad_request(f"chat template stopped: {e}", "messages") from e
    except MemoryError as e:
        raise bad_request("chat template stopped: out of memory", "messages") from e
    except Exception as e:  # noqa: BLE001 - a template failing on the request's data is the request's error
        raise bad_request(f"chat template error: {type(e).__name__}: {e}", "messages") from e
