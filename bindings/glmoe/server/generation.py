"""Requests to the batching engine and back: submit, poll from a thread (poll releases the GIL),
turn tokens into text, cut at stop strings, cancel when the client goes away. A request that asks
for logprobs gets each token's logprob (and its most likely alternatives) beside the text it made."""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
from typing import AsyncIterator, Awaitable, Callable, Dict, List, Optional, Tuple, Union

from ..completion import held_back_for_stop
from ..grammar import TokenConstraint
from .constraints import poll_constrained
from .errors import APIError, bad_request

POLL_TIMEOUT_S = 0.1  # how often a quiet request wakes up to look for a gone client
DRAIN_POLLS = 600  # a cancelled request is polled until the engine reports it finished (and forgets it)


@dataclasses.dataclass
class Finish:
    reason: str  # "stop" | "length"
    n_prompt: int
    n_generated: int
    timings: Dict[str, float] = dataclasses.field(default_factory=dict)  # llama.cpp's "timings"
    stop_word: str = ""  # the stop string that ended the text ("" for an end-of-generation token or the limit)

    def usage(self) -> Dict[str, int]:
        return {"prompt_tokens": self.n_prompt, "completion_tokens": self.n_generated,
                "total_tokens": self.n_prompt + self.n_generated}


@dataclasses.dataclass
class TokenLogprob:
    """A generated token, its logprob and the most likely tokens at its position ((id, logprob),
    most likely first), all under the model's raw logits: before logit bias, penalties, the
    sampler's filters and grammar masks, as OpenAI reports the model's own distribution."""

    id: int
    logprob: float
    top: List[Tuple[int, float]]
    text_offset: int = 0  # where its text starts in the generation's text (characters)


@dataclasses.dataclass
class Piece:
    """What generate(..., logprobs=N) yields instead of bare text: text and the tokens that made
    it. A token is reported once all of its text has been (so text may be empty while a token's
    bytes do not yet make a character); tokens whose text a stop string cut away are not."""

    text: str
    tokens: List[TokenLogprob]


class Generator:
    """Owns the engine. At most `2 * n_parallel` requests are in the engine at once (enough to
    refill a slot the moment one frees); the rest wait here, costing no thread."""

    def __init__(self, engine, tokenizer, n_parallel: int, spec_suffix: bool = False):
        self.engine, self.tokenizer, self.spec_suffix = engine, tokenizer, spec_suffix
        self.eog = frozenset(tokenizer.eog_ids)
        self._admitted = asyncio.Semaphore(2 * n_parallel)
        self.waiting_here = 0  # requests queued in front of the engine (for /metrics)
        self._pool = concurrent.futures.ThreadPoolExecutor(2 * n_parallel + 2, thread_name_prefix="glmoe-poll")
        stats = engine.stats()
        self.n_ctx_slot = stats["n_ctx_slot"]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.engine.shutdown()

    def check_prompt(self, tokens: List[int], max_tokens: Optional[int]) -> int:
        """The max_tokens the request runs with: capped at the room its slot has left (as
        llama.cpp does), after a 400 for a prompt that does not fit at all."""
        if not tokens:
            raise bad_request("the prompt is empty", "prompt")
        if len(tokens) >= self.n_ctx_slot:
            raise bad_request(
                f"the prompt has {len(tokens)} tokens; the context of a slot holds {self.n_ctx_slot} "
                f"(prompt and completion together)", "messages", "context_length_exceeded")
        room = self.n_ctx_slot - len(tokens)
        return room if max_tokens is None else min(max_tokens, room)

    async def generate(
        self, tokens: List[int], max_tokens: int, sampling: dict, stops: List[str], special: bool,
        client_gone: Optional[Callable[[], Awaitable[bool]]] = None, ignore_eos: bool = False,
        on_tokens: Optional[Callable[[List[int]], None]] = None, constraint: Optional[TokenConstraint] = None,
        logprobs: Optional[int] = None,
    ) -> AsyncIterator[Union[str, Piece, Finish]]:
        """Yields text pieces, then one Finish. A stop string ends the text before it.
        max_tokens is check_prompt()'s answer (checked before a stream's headers go out).
        on_tokens gets the ids of each batch of generated tokens before their text is yielded.
        constraint (constraints.constraints_for's) allows each token only what its grammar allows.
        logprobs (0..20): yield Pieces, each token with that many most likely alternatives."""
        loop = asyncio.get_running_loop()
        self.waiting_here += 1
        try:
            await self._admitted.acquire()
        finally:
            self.waiting_here -= 1
        try:
            # A constrained request brings its first token's mask (computed already by constraints_for).
            rid = self.engine.submit(tokens, max_tokens, [] if ignore_eos else sorted(self.eog), **sampling,
                                     token_mask=None if constraint is None else constraint.next_mask(),
                                     top_logprobs=logprobs or 0)
        except ValueError as e:
            self._admitted.release()
            raise bad_request(str(e)) from e
        decoder = self.tokenizer.stream_decoder(special)
        poll = self.engine.poll if constraint is None else \
            functools.partial(poll_constrained, self.engine, constraint, constraint.n_accepted)
        text, sent, n_generated, done, stop_word = "", 0, 0, False, ""
        spans: List[Tuple[TokenLogprob, int, int]] = []  # unreported tokens and where their text lies in text
        try:
            while True:
                ev = await loop.run_in_executor(self._pool, poll, rid, POLL_TIMEOUT_S)
                n_generated += len(ev["tokens"])
                scanned = len(text)  # a stop string found below ends past here
                if on_tokens is not None and ev["tokens"]:
                    on_tokens(ev["tokens"])
                if logprobs is None:
                    text += "".join(decoder.feed(t) for t in ev["tokens"] if t not in self.eog)
                else:
                    tops = ev.get("top_logprobs") or [[]] * len(ev["tokens"])
                    for t, lp, top in zip(ev["tokens"], ev["logprobs"], tops):
                        start = len(text)
                        if t not in self.eog:
                            text += decoder.feed(t)
                        spans.append((TokenLogprob(t, lp, top, start), start, len(text)))
                reason = ev["finish_reason"] if ev["finished"] else None
                done = ev["finished"]
                if reason == "error":
                    raise APIError(500, f"generation failed: {ev.get('error', 'unknown error')}")
                if done:
                    text += decoder.flush()
                hits = [(i, s) for i, s in ((text.find(s, max(0, scanned - len(s) + 1)), s) for s in stops) if i >= 0]
                if hits:
                    cut, stop_word = min(hits, key=lambda hit: hit[0])
                    text, reason = text[:cut], "stop"
                safe = len(text) if reason else len(text) - held_back_for_stop(text, stops)
                if logprobs is not None:
                    if not reason:  # the tokens whose text is all out
                        ready = [s for s in spans if s[2] <= safe]
                    else:  # the end: every token that made some of the text (a stop string's own are cut away)
                        ready = [s for s in spans if s[1] < safe] if hits else spans
                    if safe > sent or ready:
                        yield Piece(text[sent:safe], [s[0] for s in ready])
                        sent = max(sent, safe)
                        spans = [] if reason else spans[len(ready):]
                elif safe > sent:
                    yield text[sent:safe]
                    sent = safe
                if reason:
                    n_out = ev.get("n_generated", n_generated) if done else n_generated
                    yield Finish("stop" if reason == "cancelled" else reason, len(tokens), n_out,
                                 self._timings(ev, len(tokens), n_out), stop_word)
                    return
                if client_gone is not None and await client_gone():
                    return
        finally:
            if done:
                self._admitted.release()
            else:  # stop string, gone client, error: cancel (it may wait for a decode step) off the loop
                try:
                    future = loop.run_in_executor(self._pool, self._cancel, rid)
                    future.add_done_callback(lambda _: self._admitted.release())
                except RuntimeError:  # the pool is shut down: the engine is going away too
                    self._admitted.release()

    def _timings(self, ev: dict, n_prompt: int, n_generated: int) -> Dict[str, float]:
        """llama.cpp server's timings object; draft_n / draft_n_accepted when drafting is on."""
        cache_n = ev.get("n_cached", 0)  # prompt tokens a kept slot cache held: not evaluated
        n_prompt -= cache_n
        t = {"cache_n": cache_n, "prompt_n": n_prompt, "prompt_ms": ev["t_prompt_ms"],
             "prompt_per_token_ms": ev["t_prompt_ms"] / max(n_prompt, 1),
             "prompt_per_second": 1000.0 * n_prompt / ev["t_prompt_ms"] if ev["t_prompt_ms"] > 0 else 0.0,
             "predicted_n": n_generated, "predicted_ms": ev["t_gen_ms"],
             "predicted_per_token_ms": ev["t_gen_ms"] / max(n_generated, 1),
             "predicted_per_second": 1000.0 * n_generated / ev["t_gen_ms"] if ev["t_gen_ms"] > 0 else 0.0}
        if self.spec_suffix:
            t["draft_n"], t["draft_n_accepted"] = ev["draft_n"], ev["draft_n_accepted"]
        return t

    def _cancel(self, rid: int) -> None:
        """Cancels, then polls until the engine reports the request finished, so that it forgets it."""
        self.engine.cancel(rid)
        for _ in range(DRAIN_POLLS):
            try:
                if self.engine.poll(rid, POLL_TIMEOUT_S)["finished"]:
                    return
            except KeyError:  # already forgotten
                return
