"""Several choices from one request (OpenAI's n): the prompt is tokenized once and submitted n
times. The engine keeps no cache shared between requests, so each choice prefills the prompt in a
slot of its own (n prefills, run in the same steps when slots are free).

Choices are generate()'s runs, consumed together: collect_all() waits for every one; merged()
interleaves their items as they come, tagged with the choice's index."""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Dict, List, Optional, Tuple

from .errors import bad_request
from .generation import Finish, Piece

RANDOM_SEED = 0xFFFFFFFF  # the engine's "draw a random seed"; no choice's seed may land on it


def check_n(n: int, n_parallel: int, param: str = "n") -> None:
    """As llama.cpp: at most one choice per slot, so that a request's choices run side by side."""
    if n > n_parallel:
        raise bad_request(f"{param}: {n} choices, but the server has {n_parallel} slots (llama-server -np); "
                          f"ask for at most {n_parallel}", param)


def choice_sampling(sampling: dict, n: int) -> List[dict]:
    """Each choice's sampling keywords. A given seed is advanced by the choice's index, so that
    choices differ at temperature > 0 (and choice 0 is what n = 1 gives); without one, each
    choice draws its own random seed."""
    if "seed" not in sampling:
        return [sampling] * n
    return [dict(sampling, seed=(sampling["seed"] + i) % RANDOM_SEED) for i in range(n)]


def text_of(item) -> str:
    return item.text if isinstance(item, Piece) else item


async def collect(run) -> Tuple[List, Optional[Finish]]:
    """A run's text items and its Finish (None when the client went away)."""
    items, finish = [], None
    async with contextlib.aclosing(run):
        async for item in run:
            if isinstance(item, Finish):
                finish = item
            else:
                items.append(item)
    return items, finish


async def collect_all(runs) -> List[Tuple[List, Optional[Finish]]]:
    tasks = [asyncio.ensure_future(collect(run)) for run in runs]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:  # one failed (or the request was cancelled): the others stop too
            task.cancel()


_END = object()


async def merged(runs) -> AsyncIterator[Tuple[int, object]]:
    """(choice index, item) for every item of every run, in the order they come; a run's error
    is raised here. Leaving early (a gone client) cancels the runs that are left."""
    if len(runs) == 1:  # no tasks to manage
        async with contextlib.aclosing(runs[0]):
            async for item in runs[0]:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index, run):
        try:
            async with contextlib.aclosing(run):
                async for item in run:
                    await queue.put((index, item))
            await queue.put((index, _END))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((index, e))

    tasks = [asyncio.ensure_future(pump(i, run)) for i, run in enumerate(runs)]
    try:
        left = len(runs)
        while left:
            index, item = await queue.get()
            if item is _END:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def total_usage(finishes: List[Finish]) -> Dict[str, int]:
    """OpenAI's usage over choices: the prompt counted once, every choice's completion tokens."""
    n_prompt = finishes[0].n_prompt
    n_generated = sum(f.n_generated for f in finishes)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_generated, "total_tokens": n_prompt + n_generated}
