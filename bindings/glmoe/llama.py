"""`Llama`: the llama-cpp-python class, on the glmoe engine."""
from __future__ import annotations

import os
import sys
import time
from collections import deque
from typing import Deque, List, Optional, Sequence

import numpy as np

from . import _core

LLAMA_DEFAULT_SEED = 0xFFFFFFFF


class Llama:
    """A GLM4-MoE GGUF model with its context, shaped like llama_cpp.Llama.

    Only the evaluation part of llama-cpp-python's API is here so far: eval(), scores,
    n_tokens, input_ids, reset(), n_ctx(), n_vocab(), n_embd().
    """

    def __init__(
        self,
        model_path: str,
        *,
        n_gpu_layers: int = 0,
        seed: int = LLAMA_DEFAULT_SEED,
        n_ctx: int = 512,
        n_batch: int = 512,
        n_threads: Optional[int] = None,
        logits_all: bool = False,
        verbose: bool = True,
        **kwargs,
    ):
        if n_batch < 1:
            raise ValueError("n_batch must be at least 1")
        if n_ctx < 0:
            raise ValueError("n_ctx must be 0 (the model's) or positive")
        self.model_path = model_path
        self.verbose = verbose
        self.seed = seed
        self.n_batch = n_batch
        self.n_gpu_layers = n_gpu_layers
        self.logits_all = logits_all
        if n_threads is None:
            n_threads = max(os.cpu_count() // 2, 1)  # llama-cpp-python's default: physical cores
        self.n_threads = n_threads

        t0 = time.perf_counter()
        self._model = _core.Model(model_path)
        if n_ctx == 0:
            n_ctx = self._model.n_ctx_train
        self._ctx = _core.Context(self._model, n_ctx, n_threads)
        self._n_ctx = n_ctx
        self._n_vocab = self._model.n_vocab
        self.n_tokens = 0
        self.input_ids = np.zeros((n_ctx,), dtype=np.intc)
        # np.zeros is calloc'd: rows that are never written cost no memory.
        self.scores = np.zeros((n_ctx, self._n_vocab), dtype=np.single)
        if verbose:
            print(f"glmoe: loaded {model_path}: {self._model.description}", file=sys.stderr)
            print(
                f"glmoe: n_ctx = {n_ctx}, n_batch = {n_batch}, n_threads = {self._ctx.n_threads}, "
                f"load time = {1000 * (time.perf_counter() - t0):.1f} ms",
                file=sys.stderr,
            )
            if n_gpu_layers:
                if not _core.built_with_cuda():
                    reason = "this build has no CUDA backend"
                elif _core.cuda_device_count() == 0:
                    reason = "no CUDA device found"
                else:
                    reason = "the CUDA backend does not run layers yet"
                print(f"glmoe: n_gpu_layers = {n_gpu_layers} ignored ({reason}): running on the CPU", file=sys.stderr)

    def n_ctx(self) -> int:
        return self._n_ctx

    def n_vocab(self) -> int:
        return self._n_vocab

    def n_embd(self) -> int:
        return self._model.n_embd

    @property
    def _input_ids(self) -> np.ndarray:
        return self.input_ids[: self.n_tokens]

    @property
    def _scores(self) -> np.ndarray:
        return self.scores[: self.n_tokens, :]

    @property
    def eval_tokens(self) -> Deque[int]:
        return deque(self.input_ids[: self.n_tokens].tolist(), maxlen=self._n_ctx)

    @property
    def eval_logits(self) -> Deque[List[float]]:
        return deque(self.scores[: self.n_tokens, :].tolist(), maxlen=self._n_ctx if self.logits_all else 1)

    def reset(self):
        """Forget the evaluated tokens; the next eval() starts at position 0."""
        self.n_tokens = 0

    def eval(self, tokens: Sequence[int]):
        """Evaluate tokens after the n_tokens already evaluated, in chunks of n_batch.

        With logits_all every position's logits land in scores; otherwise only the last one's.
        Too many tokens for the context raise ValueError before anything is evaluated.
        """
        tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
        if self.n_tokens + len(tokens) > self._n_ctx:
            raise ValueError(
                f"Requested tokens ({self.n_tokens + len(tokens)}) exceed context window of {self._n_ctx}"
            )
        bad = (tokens < 0) | (tokens >= self._n_vocab)
        if bad.any():
            raise ValueError(f"token id {int(tokens[bad][0])} out of range [0, {self._n_vocab})")
        # Positions past n_tokens (left by reset() or a shorter re-eval) are stale.
        self._ctx.kv_seq_rm(0, self.n_tokens, -1)
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            n_past, n = self.n_tokens, len(chunk)
            want = np.ones(n, dtype=np.uint8) if self.logits_all else np.eye(1, n, n - 1, dtype=np.uint8)[0]
            logits = self._ctx.decode(
                chunk,
                np.arange(n_past, n_past + n, dtype=np.int32),
                np.zeros(n, dtype=np.int32),
                want,
            )
            self.input_ids[n_past : n_past + n] = chunk
            if self.logits_all:
                self.scores[n_past : n_past + n, :] = logits
            else:
                self.scores[n_past + n - 1, :] = logits[0]
            self.n_tokens += n
