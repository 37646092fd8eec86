"""Embeddings for llama-server's --embedding: a context of its own that returns final hidden states
(after output_norm, as llama.cpp's embeddings of a causal model), made when the first embedding
request comes and shared by all of them, one input at a time. The BatchEngine's context returns
logits only, so it cannot serve these."""
from __future__ import annotations

import threading
from typing import List, Optional

import numpy as np

from .. import _core
from .errors import APIError, bad_request

# llama.cpp's --pooling values (LLAMA_POOLING_TYPE_*) and GGUF `{arch}.pooling_type` numbers.
POOLING_NAMES = {0: "none", 1: "mean", 2: "cls", 3: "last"}
RANK_POOLING = 4


def model_pooling(metadata: dict) -> str:
    """The GGUF's `{arch}.pooling_type` as a --pooling name; "none" when it has none (GLM's
    files do not), as llama.cpp takes it."""
    arch = metadata.get("general.architecture", "")
    value = metadata.get(f"{arch}.pooling_type")
    if value is None:
        return "none"
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{arch}.pooling_type: not a number: {value!r}") from None
    if number not in POOLING_NAMES:
        raise ValueError(f"{arch}.pooling_type {number}: glmoe pools with none, mean, cls or last (not rank)")
    return POOLING_NAMES[number]


def normalize(vector: np.ndarray, embd_normalize: int) -> np.ndarray:
    """llama.cpp's embd_normalize: -1 none, 0 max absolute (scaled to the int16 range), 1 taxicab,
    2 Euclidean, p > 2 the p-norm."""
    v = vector.astype(np.float64)
    if embd_normalize == -1:
        scale = 1.0
    elif embd_normalize == 0:
        scale = float(np.max(np.abs(v))) / 32760.0 if v.size else 0.0
    elif embd_normalize == 2:
        scale = float(np.sqrt(np.sum(v * v)))
    else:
        scale = float(np.sum(np.abs(v) ** embd_normalize) ** (1.0 / embd_normalize))
    return (v * (1.0 / scale if scale > 0 else 0.0)).astype(np.float32)


def pool(rows: np.ndarray, pooling: str) -> np.ndarray:
    """One vector from the [n_tokens, n_embd] rows of an input, as llama.cpp's pooling types."""
    if pooling == "mean":
        return rows.mean(axis=0, dtype=np.float64).astype(np.float32)
    if pooling == "cls":
        return rows[0]
    if pooling == "last":
        return rows[-1]
    raise ValueError(f"no pooled vector with pooling {pooling!r}")


class EmbeddingContext:
    """The embeddings context, made on first use with the server's placement and threads, and
    its lock (a Context runs one batch at a time). A failure to make it is kept and reported
    (501) to every later request rather than retried at each one."""

    def __init__(self, model, n_ctx: int, n_batch: int, settings):
        self.model, self.n_ctx, self.n_batch, self.settings = model, n_ctx, n_batch, settings
        self._lock = threading.Lock()
        self._ctx = None
        self._error: Optional[str] = None

    def _context(self):
        if self._ctx is None and self._error is None:
            s = self.settings
            try:
                self._ctx = _core.Context(self.model, self.n_ctx, s.n_threads, True, n_gpu_layers=s.n_gpu_layers,
                                          tensor_overrides=list(s.tensor_overrides), n_cpu_moe=s.n_cpu_moe,
                                          cpu_moe=s.cpu_moe)
            except (ValueError, RuntimeError, MemoryError) as e:  # placement, memory: the server goes on
                self._error = f"{type(e).__name__}: {e}"
        if self._error is not None:
            raise APIError(501, f"embeddings are not available: their context could not be made ({self._error})")
        return self._ctx

    def check_length(self, tokens: List[int], index: int) -> None:
        if not tokens:
            raise bad_request("Input content cannot be empty", "input")
        if len(tokens) > self.n_ctx:
            raise bad_request(f"input {index} has {len(tokens)} tokens; an embedding input holds at most "
                              f"{self.n_ctx} (a slot's context)", "input", "context_length_exceeded")

    def rows(self, tokens: List[int]) -> np.ndarray:
        """The [n_tokens, n_embd] final hidden states of one input. Blocks: call it off the loop."""
        with self._lock:
            ctx = self._context()
            ctx.kv_clear()
            try:
                out = []
                for start in range(0, len(tokens), self.n_batch):
                    chunk = np.asarray(tokens[start:start + self.n_batch], dtype=np.int32)
                    n = len(chunk)
                    out.append(ctx.decode(chunk, np.arange(start, start + n, dtype=np.int32),
                                          np.zeros(n, np.int32), np.ones(n, np.uint8)))
            finally:
                ctx.kv_clear()
        return np.concatenate(out)
