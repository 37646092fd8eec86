"""A token budget on GLM's `<think>` block (Anthropic's thinking.budget_tokens).

The engine cannot force a token in the middle of a request, so the budget is kept in two requests:
the first generates at most `budget` tokens. When it used them all with room left under max_tokens,
a second request continues from the prompt plus the very tokens generated (so greedy output is what
one request would give), with `</think>` appended when the thinking is still open. The thinking
comes first in GLM's output, so it can never have more than `budget` tokens. An answer that runs
past the budget costs the second request's prefill of what came before.

To the caller it is one generation: text pieces, then one Finish counting both requests' tokens. A
stop string is found even where it straddles the join. A constraint (a forced tool call) carries
across the join: it takes the first request's tokens and the appended `</think>` before the second
request starts from its state."""
from __future__ import annotations

from typing import AsyncIterator, Awaitable, Callable, List, Optional, Tuple, Union

from starlette.concurrency import run_in_threadpool

from ..completion import held_back_for_stop
from ..grammar import GrammarError, TokenConstraint
from .generation import Finish, Generator
from .tool_parsing import THINK_CLOSE, THINK_OPEN


def budget_that_applies(budget: Optional[int], prompt: str, max_tokens: int) -> Optional[int]:
    """budget (a request's or --reasoning-budget's; None or <= 0: none) where it can matter: the answer
    may think (the prompt does not close the <think> block itself) and may run past it."""
    if budget is None or budget <= 0 or budget >= max_tokens or prompt.rstrip().endswith(THINK_CLOSE):
        return None
    return budget


def thinking_open(text: str) -> bool:
    """Whether GLM's output so far is inside its <think> block."""
    return text.lstrip().startswith(THINK_OPEN) and THINK_CLOSE not in text


def _first_stop(text: str, start: int, stops: List[str]) -> Optional[Tuple[int, str]]:
    hits = [(i, len(s), s) for i, s in ((text.find(s, start), s) for s in stops) if i >= 0]
    return (min(hits)[0], min(hits)[2]) if hits else None


async def generate_within_budget(
    gen: Generator, tokenizer, tokens: List[int], max_tokens: int, budget: int, sampling: dict,
    stops: List[str], client_gone: Optional[Callable[[], Awaitable[bool]]] = None,
    constraint: Optional[TokenConstraint] = None,
) -> AsyncIterator[Union[str, Finish]]:
    """As gen.generate(tokens, max_tokens, ..., special=True), with at most `budget` thinking tokens.
    max_tokens is check_prompt()'s answer."""
    first_ids: List[int] = []
    first = gen.generate(tokens, min(budget, max_tokens), sampling, stops, special=True, client_gone=client_gone,
                         on_tokens=first_ids.extend, constraint=constraint)
    text, sent, finish = "", 0, None
    async for item in first:
        if isinstance(item, Finish):
            finish = item
            continue
        text += item
        # What could begin a stop string completed by the second request stays here until it is known.
        safe = len(text) - held_back_for_stop(text, stops)
        if safe > sent:
            yield text[sent:safe]
            sent = safe
    if finish is None:  # the client went away
        return
    closing = THINK_CLOSE if thinking_open(text) else ""
    prompt, left = tokens + first_ids, 0
    if finish.reason == "length" and finish.n_generated < max_tokens:
        forced = await run_in_threadpool(tokenizer.tokenize, closing.encode(), add_bos=False, special=True) \
            if closing else []
        if constraint is None or _continues(constraint, first_ids, forced):
            prompt += forced
            left = min(max_tokens - finish.n_generated, gen.n_ctx_slot - len(prompt))
    if left < 1:
        if len(text) > sent:
            yield text[sent:]
        yield finish
        return

    text += closing
    second_ids: List[int] = []
    second = gen.generate(prompt, left, sampling, stops, special=True, client_gone=client_gone,
                          on_tokens=second_ids.extend, constraint=constraint)
    last = None
    try:
        async for item in second:
            if isinstance(item, Finish):
                last = item
                continue
            text += item
            # The second request cuts at stops inside its own text; one that starts before it is found here.
            hit = _first_stop(text, sent, stops)
            if hit is not None:
                cut, stop = hit
                if cut > sent:
                    yield text[sent:cut]
                yield Finish("stop", len(tokens), finish.n_generated + len(second_ids), {}, stop)
                return
            safe = len(text) - held_back_for_stop(text, stops)
            if safe > sent:
                yield text[sent:safe]
                sent = safe
    finally:
        await second.aclose()  # cancels the request when it is left before its end
    if last is None:
        return
    if len(text) > sent:
        yield text[sent:]
    yield Finish(last.reason, len(tokens), finish.n_generated + last.n_generated, last.timings, last.stop_word)


def _continues(constraint: TokenConstraint, generated: List[int], forced: List[int]) -> bool:
    """Brings the constraint to the end of the generated tokens (the poll does not feed it the last
    ones) and through the forced ones; False when its grammar does not allow the forced ones."""
    try:
        for token in generated[constraint.n_accepted:] + forced:
            constraint.accept(token)
    except GrammarError:
        return False
    return True
