"""Speculative drafting for `Llama(draft_model=...)`, shaped like llama-cpp-python's
LlamaDraftModel (`__call__(input_ids) -> draft ids`)."""
from __future__ import annotations

import numpy as np

from . import _core


class SuffixDecoding:
    """Suffix decoding (SuffixDecoding, arXiv 2411.04975): model-free drafts from the text the
    sequence has seen and from earlier requests' outputs, run inside the engine.

    max_depth: longest context suffix matched; max_spec_factor: at most this many draft tokens
    per matched token; min_token_prob: stop where the continuation's empirical path
    probability falls below it; max_spec_tokens: hard cap on a draft; global_cache_bytes: memory
    for earlier outputs (oldest dropped first; 0: none); adaptive: stop drafting for a sequence
    whose drafts are mostly rejected, probing again now and then.
    """

    def __init__(
        self,
        max_depth: int = 64,
        max_spec_factor: float = 1.0,
        min_token_prob: float = 0.1,
        max_spec_tokens: int = 32,
        global_cache_bytes: int = 64 << 20,
        adaptive: bool = True,
    ):
        self._init_args = dict(max_depth=max_depth, max_spec_factor=max_spec_factor, min_token_prob=min_token_prob,
                               max_spec_tokens=max_spec_tokens, global_cache_bytes=global_cache_bytes,
                               adaptive=adaptive)
        self.params = dict(max_depth=max_depth, max_spec_factor=max_spec_factor, min_token_prob=min_token_prob,
                           max_spec_tokens=max_spec_tokens)
        self.adaptive = adaptive
        self.store = _core.SuffixStore(global_cache_bytes, max_depth + max_spec_tokens) if global_cache_bytes else None
        # For __call__: the drafter of the last input_ids, extended while they keep growing.
        self._called: _core.SuffixDrafter | None = None
        self._called_ids = np.zeros(0, np.int32)

    def drafter(self) -> _core.SuffixDrafter:
        """A fresh per-sequence drafter sharing this object's store of earlier outputs."""
        return _core.SuffixDrafter(**self.params, adaptive=self.adaptive, store=self.store)

    def __call__(self, input_ids: np.ndarray, /, **kwargs) -> np.ndarray:
        """LlamaDraftModel's interface: draft ids to follow input_ids (no adaptive pausing)."""
        ids = np.asarray(input_ids, dtype=np.int32).reshape(-1)
        n_old = len(self._called_ids)
        if self._called is None or len(ids) < n_old or not np.array_equal(ids[:n_old], self._called_ids):
            self._called, n_old = _core.SuffixDrafter(**self.params, adaptive=False, store=self.store), 0
        self._called.append(np.ascontiguousarray(ids[n_old:]))
        self._called_ids = ids.copy()
        return self._called.propose().astype(np.intc)

    # Pickled as its constructor's arguments (as Llama is): the engine's store cannot be pickled, so a
    # copy starts with an empty store of earlier outputs. Drafts only change speed, never the tokens.
    def __getstate__(self) -> dict:
        return dict(self._init_args)

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)
