"""`Llama`: llama-cpp-python's class, on the glmoe engine."""
from __future__ import annotations

import contextlib
import os
import random
import sys
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np

from . import _core
from .chat_tools import ToolCallGrammar
from .grammar import TokenConstraint, as_grammar
from .llama_options import SPEED_ONLY_DEFAULTS, check_init_options, kv_type_id
from .tokenizer import GGUFTokenizer

LLAMA_DEFAULT_SEED = 0xFFFFFFFF
LLAMA_POOLING_TYPE_NONE = 0  # llama.cpp's enum value: one output per token
MAX_THREADS = 4096  # the engine's limit (kMaxThreads in src/thread_pool.h)


class _LlamaLock:
    """The reentrant lock of one Llama, held by a thread or by an open stream.

    Unlike threading.RLock it may be released by any thread and a stream carries its hold from
    thread to thread (adopt()): a stream may be stepped by a thread pool, and one that is closed
    or garbage-collected in another thread must still release it."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._owner: Optional[int] = None
        self._depth = 0

    def acquire(self) -> None:
        me = threading.get_ident()
        with self._cond:
            while self._depth and self._owner != me:
                self._cond.wait()
            self._owner = me
            self._depth += 1

    def release(self) -> None:
        with self._cond:
            if self._depth == 0:
                raise RuntimeError("Llama lock released more often than acquired")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    def adopt(self) -> None:
        """Makes the calling thread the owner: only for a stream that holds the lock."""
        with self._cond:
            self._owner = threading.get_ident()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


@dataclass
class LlamaState:
    """What save_state() captures: evaluated tokens, their logits, the KV cache and the seed."""

    input_ids: np.ndarray
    scores: np.ndarray
    n_tokens: int
    kv_state: bytes
    seed: int


class Llama:
    """A GLM4-MoE GGUF model with its context, shaped like llama_cpp.Llama.

    One Llama may be shared between threads: every call that touches the context or its state
    (eval, generate, sample, create_completion / __call__, create_chat_completion, embed,
    save_state / load_state, reset) takes the object's lock, so concurrent calls run one after
    the other and each gets what it would get alone. A stream (generate(), or stream=True) holds
    the lock from its first step until it ends, is closed, or is garbage-collected: while a
    stream is open, other threads' calls wait, so exhaust or close() streams you abandon. Within
    one thread, interleaving an open stream with other calls is not isolated (as before).
    After close() every method raises ValueError("Llama is closed").

    llama-cpp-python's constructor options glmoe has no counterpart for either change nothing but
    speed (accepted, with a warning when set) or are refused with NotImplementedError unless at a
    value that means what glmoe does (llama_options.py; docs/LLAMA_API.md lists them all).
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
        embedding: bool = False,
        draft_model=None,
        n_ubatch: int = 512,
        tensor_overrides: Union[str, Sequence[str], None] = None,
        n_cpu_moe: int = 0,
        cpu_moe: bool = False,
        gpu_expert_share: Optional[float] = None,
        type_k: Optional[int] = None,
        type_v: Optional[int] = None,
        use_mmap: bool = True,
        use_mlock: bool = False,
        last_n_tokens_size: int = 64,
        chat_format: Optional[str] = None,
        verbose: bool = True,
        **kwargs,
    ):
        self._lock = _LlamaLock()
        self._closed = False
        self._ctx = self._model = None
        speed_only_changed = check_init_options(kwargs)
        kv_type_ids = kv_type_id("type_k", type_k), kv_type_id("type_v", type_v)
        if chat_format is not None and not (isinstance(chat_format, str) and chat_format.startswith("chat_template.")):
            raise NotImplementedError(f"chat_format={chat_format!r} is not supported by glmoe: chats are formatted by "
                                      "the GGUF's own template ('chat_template.default', or 'chat_template.NAME' "
                                      "for the file's tokenizer.chat_template.NAME)")
        if isinstance(last_n_tokens_size, bool) or not isinstance(last_n_tokens_size, int) or last_n_tokens_size < -1:
            raise ValueError(f"last_n_tokens_size must be -1 (all), 0 (off) or positive; got {last_n_tokens_size!r}")
        if draft_model is not None and not callable(draft_model):
            raise TypeError("draft_model must be a glmoe.SuffixDecoding or a llama-cpp-python LlamaDraftModel "
                            "(called with the token ids, returning draft ids)")
        if n_batch < 1:
            raise ValueError("n_batch must be at least 1")
        if n_ctx < 0:
            raise ValueError("n_ctx must be 0 (the model's) or positive")
        self.model_path = model_path
        self.verbose = verbose
        self.n_batch = n_batch
        self.n_gpu_layers = n_gpu_layers
        self._logits_all = logits_all
        self._embedding = embedding
        # A SuffixDecoding (run inside the engine) or any llama-cpp-python LlamaDraftModel.
        self.draft_model = draft_model
        # Of the last generate() with a draft model: steps (forwards after the prompt), drafted, accepted.
        self.last_draft_stats: Optional[Dict[str, int]] = None
        if n_threads is None or n_threads == -1:
            n_threads = max((os.cpu_count() or 1) // 2, 1)  # llama-cpp-python's default: physical cores
        if isinstance(n_threads, bool) or not isinstance(n_threads, int) or not 0 <= n_threads <= MAX_THREADS:
            raise ValueError(f"n_threads must be None, -1 or 0 (the default), or 1 to {MAX_THREADS}; got {n_threads!r}")
        self.n_threads = n_threads
        # The penalties' window, as llama-cpp-python's penalty_last_n.
        self.last_n_tokens_size = last_n_tokens_size
        if speed_only_changed:
            warnings.warn(f"glmoe accepts but does not use {', '.join(speed_only_changed)}: "
                          "they change speed or memory use, not results", stacklevel=2)

        t0 = time.perf_counter()
        for name, value in (("use_mmap", use_mmap), ("use_mlock", use_mlock)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False; got {value!r}")
        if verbose and use_mmap:  # read into memory, the file is read once anyway
            _warm_page_cache(model_path)
        # use_mlock: the file's bytes are locked in RAM (a warning on stderr where mlock fails, as llama.cpp's).
        self._model = _core.Model(model_path, use_mmap=use_mmap, use_mlock=use_mlock)
        if n_ctx == 0:  # as llama-cpp-python: the model's context_length, and batches no bigger than it
            n_ctx = self._model.n_ctx_train
            self.n_batch = n_batch = min(n_ctx, n_batch)
            n_ubatch = min(n_batch, n_ubatch)
        if n_ubatch < 1:
            raise ValueError("n_ubatch must be at least 1")
        # llama.cpp's -ot values (each "PATTERN=BUFFER[,PATTERN=BUFFER...]"), --cpu-moe, --n-cpu-moe.
        self.tensor_overrides = _override_list(tensor_overrides)
        if n_cpu_moe < 0:
            raise ValueError("n_cpu_moe must be at least 0")
        self.n_cpu_moe = n_cpu_moe
        self.cpu_moe = cpu_moe
        # glmoe's own: of each small step's routed experts in RAM, the share the GPU runs
        # (None: the default; 0: the CPU runs them all).
        self.gpu_expert_share = gpu_expert_share
        # llama-cpp-python's KV cache types, GGML ids (llama.cpp's -ctk/-ctv); None: f32 on the CPU, f16 on the GPU.
        self.type_k, self.type_v = type_k, type_v
        self._ctx = _core.Context(self._model, n_ctx, n_threads, embedding, n_gpu_layers=n_gpu_layers,
                                  n_ubatch=n_ubatch, tensor_overrides=self.tensor_overrides,
                                  n_cpu_moe=n_cpu_moe, cpu_moe=cpu_moe, type_k=kv_type_ids[0], type_v=kv_type_ids[1],
                                  gpu_expert_share=-1.0 if gpu_expert_share is None else float(gpu_expert_share))
        self.tokenizer_ = GGUFTokenizer.from_gguf(model_path)
        self.metadata: Dict[str, str] = self._model.metadata()
        self.chat_format, self.chat_template = _chat_template(self.metadata, chat_format)
        self.chat_handler = None
        self._n_ctx = n_ctx
        self._n_vocab = self._model.n_vocab
        self.n_tokens = 0
        self.input_ids = np.zeros((n_ctx,), dtype=np.intc)
        # llama-cpp-python's sizes: a row per position with logits_all, else n_batch rows, so that a
        # long context does not cost n_ctx x n_vocab floats. Without logits_all the logits of
        # position p are in row p % n_batch (_score_row): the last position's are always there.
        self.scores = np.zeros((n_ctx if logits_all else n_batch, self._n_vocab), dtype=np.single)
        self.set_seed(seed)
        # What __getstate__ gives back: the constructor's arguments, as llama-cpp-python pickles.
        self._init_args = dict(
            model_path=model_path, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
            logits_all=logits_all, embedding=embedding, draft_model=draft_model, n_ubatch=n_ubatch,
            tensor_overrides=list(self.tensor_overrides), n_cpu_moe=n_cpu_moe, cpu_moe=cpu_moe,
            gpu_expert_share=gpu_expert_share, type_k=type_k, type_v=type_v, use_mmap=use_mmap,
            use_mlock=use_mlock, last_n_tokens_size=last_n_tokens_size,
            chat_format=chat_format, verbose=verbose, **kwargs)
        if verbose:
            print(f"glmoe: loaded {model_path}: {self._model.description}", file=sys.stderr)
            print(
                f"glmoe: n_ctx = {n_ctx}, n_batch = {n_batch}, n_threads = {self._ctx.n_threads}, "
                f"load time = {1000 * (time.perf_counter() - t0):.1f} ms",
                file=sys.stderr,
            )
            unused = sorted(set(kwargs) & set(SPEED_ONLY_DEFAULTS))
            if unused:
                print(f"glmoe: ignoring llama-cpp-python options glmoe does not have: {', '.join(unused)}",
                      file=sys.stderr)
            for line in self._ctx.placement_summary().splitlines():
                print("glmoe: " + line, file=sys.stderr)

    # ---- sizes and vocabulary -------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("Llama is closed")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Holds the lock for a with-block; raises ValueError if the Llama is closed."""
        self._lock.acquire()
        try:
            self._check_open()
            yield
        finally:
            self._lock.release()

    def _held_stream(self, make: Callable[[], Iterator]) -> Iterator:
        """A generator over make()'s items that holds the lock from its first step to its end
        (or close / garbage collection), carrying it to whichever thread steps it."""
        lock = self._lock

        def steps():
            lock.acquire()
            try:
                self._check_open()
                it = make()
                try:
                    while True:
                        lock.adopt()
                        self._check_open()
                        try:
                            item = next(it)
                        except StopIteration:
                            return
                        yield item
                finally:
                    close = getattr(it, "close", None)
                    if close is not None:
                        close()
            finally:
                lock.release()

        return steps()

    def n_ctx(self) -> int:
        self._check_open()
        return self._n_ctx

    def n_vocab(self) -> int:
        self._check_open()
        return self._n_vocab

    def n_embd(self) -> int:
        self._check_open()
        return self._model.n_embd

    def token_bos(self) -> int:
        self._check_open()
        return self.tokenizer_.bos_id

    def token_eos(self) -> int:
        self._check_open()
        return self.tokenizer_.eos_id

    def token_nl(self) -> int:
        return self.tokenize(b"\n", add_bos=False)[0]

    def pooling_type(self) -> int:
        """llama.cpp's pooling type: always none (0), as embed() returns each token's state."""
        self._check_open()
        return LLAMA_POOLING_TYPE_NONE

    def set_cache(self, cache) -> None:
        """Accepted for llama-cpp-python code; glmoe reuses the prompt prefix already in its KV cache
        itself, so a LlamaCache is not used (it would only have saved time)."""
        self._check_open()
        if cache is not None:
            warnings.warn("glmoe does not use set_cache's cache: it reuses the evaluated prompt prefix itself",
                          stacklevel=2)
        self.cache = cache

    def close(self) -> None:
        """Frees the context and the model (the object is unusable afterwards: every method
        raises ValueError("Llama is closed")). Waits for a running call or open stream of another
        thread; closing twice is fine."""
        with self._lock:
            self._closed = True
            self._ctx = self._model = None

    @staticmethod
    def logits_to_logprobs(logits: np.ndarray, axis: int = -1) -> np.ndarray:
        from .completion import logits_to_logprobs

        return logits_to_logprobs(logits) if axis == -1 else np.moveaxis(
            logits_to_logprobs(np.moveaxis(logits, axis, -1)), -1, axis)

    @staticmethod
    def longest_token_prefix(a: Sequence[int], b: Sequence[int]) -> int:
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n

    def tokenizer(self) -> GGUFTokenizer:
        self._check_open()
        return self.tokenizer_

    # The tokenizer has its own lock: these need not wait for the context.
    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> List[int]:
        self._check_open()
        return self.tokenizer_.tokenize(text, add_bos, special)

    def detokenize(self, tokens: List[int], prev_tokens: Optional[List[int]] = None, special: bool = False) -> bytes:
        self._check_open()
        return self.tokenizer_.detokenize(tokens, prev_tokens=prev_tokens, special=special)

    # ---- evaluation ----------------------------------------------------------------------

    @property
    def _input_ids(self) -> np.ndarray:
        return self.input_ids[: self.n_tokens]

    def _score_row(self, position: int) -> int:
        """The row of scores that holds position's logits (the identity with logits_all)."""
        return position % len(self.scores)

    def _last_logits(self) -> np.ndarray:
        return self.scores[self._score_row(self.n_tokens - 1)]

    @property
    def _scores(self) -> np.ndarray:
        return self.scores[: self.n_tokens, :]

    @property
    def eval_tokens(self) -> Deque[int]:
        return deque(self.input_ids[: self.n_tokens].tolist(), maxlen=self._n_ctx)

    @property
    def eval_logits(self) -> Deque[List[float]]:
        if self._logits_all or self.n_tokens == 0:
            return deque(self.scores[: self.n_tokens, :].tolist(), maxlen=self._n_ctx if self._logits_all else 1)
        return deque([self._last_logits().tolist()], maxlen=1)  # only the last position's logits are kept

    def set_seed(self, seed: int):
        with self._locked():
            self._seed = seed

    def reset(self):
        """Forget the evaluated tokens; the next eval() starts at position 0."""
        with self._locked():
            self.n_tokens = 0

    def eval(self, tokens: Sequence[int]):
        """Evaluate tokens after the n_tokens already evaluated, in chunks of n_batch.

        With logits_all every position's logits land in scores; otherwise only the last one's.
        Too many tokens for the context raise ValueError before anything is evaluated.
        """
        with self._locked():
            self._eval(tokens)

    def _eval(self, tokens: Sequence[int], sampler: Optional[_core.Sampler] = None) -> Optional[int]:
        """With a sampler (one _samples_on_device takes), the last token's row is sampled on the GPU
        inside its step and the token returned; its logits never reach the host, so scores keep
        the previous row there."""
        if self._embedding:
            raise ValueError("eval() needs logits: this Llama was created with embedding=True")
        tokens = self._checked_tokens(tokens)
        # Positions past n_tokens (left by reset() or a shorter re-eval) are stale.
        self._ctx.kv_seq_rm(-1, self.n_tokens, -1)
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            n_past, n = self.n_tokens, len(chunk)
            want = np.ones(n, dtype=np.uint8) if self._logits_all else np.eye(1, n, n - 1, dtype=np.uint8)[0]
            pos = np.arange(n_past, n_past + n, dtype=np.int32)
            if sampler is not None and start + n == len(tokens):
                self.input_ids[n_past : n_past + n] = chunk  # the history the penalties read, this chunk included
                token = self._ctx.decode_sample_with(chunk, pos, np.zeros(n, np.int32), want, sampler,
                                                     self.input_ids[: n_past + n])
                self.n_tokens += n
                return token
            logits = self._ctx.decode(chunk, pos, np.zeros(n, np.int32), want)
            self.input_ids[n_past : n_past + n] = chunk
            if self._logits_all:
                self.scores[n_past : n_past + n, :] = logits
            else:
                self.scores[self._score_row(n_past + n - 1), :] = logits[0]
            self.n_tokens += n

    def _samples_on_device(self, sampler: _core.Sampler, constraint) -> bool:
        """Whether generation samples on the GPU inside the decode step (only ids come back): the
        output head is there, the parameters fit its chain, and nothing needs each token's logits
        on the host (a grammar's mask, logits_all's scores)."""
        return constraint is None and not self._logits_all and self._ctx.samples_with(sampler)

    def _checked_tokens(self, tokens: Sequence[int]) -> np.ndarray:
        """tokens as int32, if they fit in the context after n_tokens and are in the vocabulary."""
        tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
        if self.n_tokens + len(tokens) > self._n_ctx:
            raise ValueError(
                f"Requested tokens ({self.n_tokens + len(tokens)}) exceed context window of {self._n_ctx}"
            )
        bad = (tokens < 0) | (tokens >= self._n_vocab)
        if bad.any():
            raise ValueError(f"token id {int(tokens[bad][0])} out of range [0, {self._n_vocab})")
        return tokens

    # ---- sampling and generation ---------------------------------------------------------

    def _resolve_seed(self, seed: Optional[int]) -> int:
        if seed is None:
            seed = self._seed
        if seed == LLAMA_DEFAULT_SEED:
            seed = random.getrandbits(32) & 0xFFFFFFFE  # the default seed asks for a fresh random one
        return seed

    def _sampler(self, *, temp: float, logit_bias: Optional[Dict[int, float]], seed: Optional[int] = None,
                 **same_named) -> _core.Sampler:
        """A Sampler from llama-cpp-python's argument names (only temp and logit_bias differ)."""
        return _core.Sampler(self._n_vocab, seed=self._resolve_seed(seed), temperature=temp,
                             logit_bias=_bias_map(logit_bias), repeat_last_n=self.last_n_tokens_size, **same_named)

    def sample(
        self,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        temp: float = 0.80,
        repeat_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        logit_bias: Optional[Dict[int, float]] = None,
        idx: Optional[int] = None,
        **unsupported,
    ) -> int:
        """Sample the next token from the logits of position idx (default: the last one)."""
        with self._locked():
            return self._sample(top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p, temp=temp,
                                repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                                presence_penalty=presence_penalty, logit_bias=logit_bias, idx=idx, **unsupported)

    def _sample(self, *, top_k, top_p, min_p, typical_p, temp, repeat_penalty, frequency_penalty, presence_penalty,
                logit_bias, idx, **unsupported) -> int:
        _reject_unsupported(unsupported)
        if self.n_tokens == 0:
            raise ValueError("sample() needs at least one evaluated token")
        sampler = self._sampler(temp=temp, logit_bias=logit_bias, top_k=top_k, top_p=top_p, min_p=min_p,
                                typical_p=typical_p, repeat_penalty=repeat_penalty,
                                frequency_penalty=frequency_penalty, presence_penalty=presence_penalty)
        row = self.n_tokens - 1 if idx is None else idx
        history = self.input_ids[: row + 1].astype(np.int32, copy=False)
        return sampler.sample(self.scores[self._score_row(row)], history)

    def _prefix_reuse(self, tokens: List[int]) -> List[int]:
        """Keeps the evaluated prefix that tokens share and returns what is left to evaluate.

        At least one token is always left, so that fresh logits exist for the next sample."""
        common = min(self.longest_token_prefix(self.input_ids[: self.n_tokens], tokens), len(tokens) - 1)
        if self.verbose and common > 0:
            print(f"glmoe: {common} prompt tokens reused from the cache", file=sys.stderr)
        self.n_tokens = max(common, 0)
        return tokens[self.n_tokens :]

    def generate(
        self,
        tokens: Sequence[int],
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        temp: float = 0.80,
        repeat_penalty: float = 1.0,
        reset: bool = True,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        logit_bias: Optional[Dict[int, float]] = None,
        seed: Optional[int] = None,
        grammar=None,
        **unsupported,
    ) -> Iterator[int]:
        """Yields sampled tokens after the prompt, forever; the caller stops iterating.

        With reset (the default) the evaluated tokens that start the prompt are kept in the KV
        cache and only the rest is evaluated (llama-cpp-python's prefix reuse). The generator
        holds this Llama's lock from its first step until it is exhausted or closed. grammar (a
        LlamaGrammar) allows only tokens that continue it, and end-of-generation once complete."""
        if isinstance(grammar, ToolCallGrammar):  # a forced tool call (create_chat_completion's)
            grammar = grammar.for_prompt(self.tokenizer_, tokens)
        grammar = None if grammar is None else as_grammar(grammar)
        return self._held_stream(lambda: self._generate(
            tokens, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p, temp=temp,
            repeat_penalty=repeat_penalty, reset=reset, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty, logit_bias=logit_bias, seed=seed, grammar=grammar, **unsupported))

    def _generate(self, tokens, *, top_k, top_p, min_p, typical_p, temp, repeat_penalty, reset, frequency_penalty,
                  presence_penalty, logit_bias, seed, grammar=None, **unsupported) -> Iterator[int]:
        _reject_unsupported(unsupported)
        constraint = None if grammar is None else TokenConstraint(grammar, self.tokenizer_)
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("generate() needs at least one prompt token")
        todo = self._prefix_reuse(tokens) if reset else tokens
        sampler = self._sampler(temp=temp, logit_bias=logit_bias, seed=seed, top_k=top_k, top_p=top_p, min_p=min_p,
                                typical_p=typical_p, repeat_penalty=repeat_penalty,
                                frequency_penalty=frequency_penalty, presence_penalty=presence_penalty)
        # Drafts would need a grammar mask per drafted position: constrained runs decode plainly
        # (the same tokens, as drafting never changes them).
        if self.draft_model is not None and constraint is None:
            yield from self._generate_drafted(todo, sampler)
            return
        self.last_draft_stats = None
        if self._samples_on_device(sampler, constraint):
            if self._ctx.overlaps_with(sampler):
                yield from self._generate_overlapped(todo, sampler)
                return
            while True:
                todo = [self._eval(todo, sampler)]
                yield todo[0]
        while True:
            self._eval(todo)
            history = self.input_ids[: self.n_tokens].astype(np.int32, copy=False)
            logits = self._last_logits()
            if constraint is not None:
                # Serially for now: the mask is computed after the forward, not while it runs.
                logits = constraint.apply(logits)
            token = sampler.sample(logits, history)
            if constraint is not None:
                constraint.accept(token)
            yield token
            todo = [token]

    def _generate_overlapped(self, todo: List[int], sampler: _core.Sampler) -> Iterator[int]:
        """generate() with the whole model on the GPU: the step that evaluates a token (and samples
        the next) is begun before the token is yielded, and each next step before the host has read
        the token it evaluates, so that the GPU runs while the caller and Python take their turn.
        The same tokens as stepping one at a time; a step begun for a token the caller never asks
        past is dropped with its cache cell when the generator closes."""
        token = self._eval(todo, sampler)
        from_device = _core.sampled_token(0)
        try:
            if self.n_tokens < self._n_ctx:
                self._ctx.begin_sampled_with(token, self.n_tokens, 0, sampler)
                while True:
                    yield token  # its step runs meanwhile
                    self.input_ids[self.n_tokens] = token
                    self.n_tokens += 1
                    if self.n_tokens >= self._n_ctx:
                        token = self._ctx.end_sampled_one()
                        break
                    self._ctx.begin_sampled_with(from_device, self.n_tokens, 0, sampler)
                    token = self._ctx.end_sampled_one()
        finally:
            while self._ctx.n_pending:  # a dropped step: its token is never used
                try:
                    self._ctx.end_sampled_one()
                except ValueError:
                    pass
            self._ctx.kv_seq_rm(-1, self.n_tokens, -1)
        while True:  # the context is full: eval() refuses the next token as it would stepping singly
            yield token
            token = self._eval([token], sampler)

    def _generate_drafted(self, todo: List[int], sampler: _core.Sampler) -> Iterator[int]:
        """generate() with speculative drafts: each step evaluates the sampled token and a draft to
        follow it in one batch, keeps the draft's longest prefix the target accepts (the engine's
        verify_draft: standard speculative sampling, so the output distribution is unchanged;
        greedy output is identical) and rolls the KV cache back past the rest."""
        from .draft import SuffixDecoding

        self._eval(todo)
        n_prompt = self.n_tokens
        drafter = self.draft_model.drafter() if isinstance(self.draft_model, SuffixDecoding) else None
        if drafter is not None:
            drafter.append(self.input_ids[:n_prompt].astype(np.int32, copy=False))
            drafter.mark_prompt_end()
        stats = self.last_draft_stats = {"steps": 0, "drafted": 0, "accepted": 0}

        def step_costs(max_extra: int) -> List[float]:  # asked only when there is a draft to size
            return self._ctx.relative_step_costs(1, max_extra)

        n_yielded = 0
        token = sampler.sample(self._last_logits(), self.input_ids[:n_prompt].astype(np.int32, copy=False))
        try:
            while True:
                n_yielded += 1  # before the yield: the caller may close the generator there
                yield token
                n = self.n_tokens
                # Draft tokens that fit after `token`, in a step whose logits match a plain decode's.
                room = min(self._n_ctx - n, self.n_batch, self._ctx.invariant_batch) - 1
                if drafter is not None:
                    drafter.append(np.array([token], np.int32))
                    draft = drafter.propose(max(room, 0), step_costs)
                else:
                    context = np.append(self.input_ids[:n], token).astype(np.intc)
                    draft = np.asarray(self.draft_model(context), dtype=np.int32).reshape(-1)[: max(room, 0)]
                if len(draft) == 0:  # nothing to verify (e.g. drafting paused): a plain step
                    self._eval([token])
                    token = sampler.sample(self._last_logits(), self.input_ids[: n + 1].astype(np.int32, copy=False))
                    stats["steps"] += 1
                    continue
                batch = self._checked_tokens(np.append(np.int32(token), draft))
                logits = self._decode_extra(batch)
                history = self.input_ids[: n + 1].astype(np.int32, copy=False)
                verified = _core.verify_draft(sampler, logits, history, draft.astype(np.int32, copy=False))
                *accepted, token = verified.tolist()
                n_accepted = len(accepted)
                self._rollback(n + 1 + n_accepted)
                if drafter is not None:
                    drafter.append(draft[:n_accepted])
                    drafter.record(len(draft), n_accepted)
                stats["steps"] += 1
                stats["drafted"] += len(draft)
                stats["accepted"] += n_accepted
                for drafted in accepted:
                    n_yielded += 1
                    yield drafted
        finally:
            # Leave the state plain generation leaves: all but the last yielded token evaluated.
            self._rollback(min(self.n_tokens, n_prompt + max(n_yielded - 1, 0)))
            if drafter is not None:
                drafter.finish()

    def _decode_extra(self, tokens: np.ndarray) -> np.ndarray:
        """Evaluates tokens after n_tokens in one batch, with logits for each (rows of scores)."""
        n, k = self.n_tokens, len(tokens)
        self._ctx.kv_seq_rm(-1, n, -1)
        logits = self._ctx.decode(tokens, np.arange(n, n + k, dtype=np.int32), np.zeros(k, np.int32),
                                  np.ones(k, np.uint8))
        self.input_ids[n : n + k] = tokens
        self.scores[self._score_row(np.arange(n, n + k)), :] = logits  # k <= n_batch: distinct rows
        self.n_tokens += k
        return logits

    def _rollback(self, n_tokens: int) -> None:
        if n_tokens < self.n_tokens:
            self.n_tokens = n_tokens
            self._ctx.kv_seq_rm(0, n_tokens, -1)

    # ---- completion API ------------------------------------------------------------------

    def create_completion(self, prompt: Union[str, List[int]], **kwargs):
        """llama-cpp-python's create_completion: a response dict, or with stream=True an
        iterator of chunks."""
        from .completion import create_completion

        with self._locked():
            result = create_completion(self, prompt, **kwargs)
        return self._held_stream(lambda: result) if kwargs.get("stream") else result

    def __call__(self, prompt: Union[str, List[int]], **kwargs):
        return self.create_completion(prompt, **kwargs)

    def create_chat_completion(self, messages: List[dict], **kwargs):
        from .chat import create_chat_completion

        with self._locked():
            result = create_chat_completion(self, messages, **kwargs)
        return self._held_stream(lambda: result) if kwargs.get("stream") else result

    def create_chat_completion_openai_v1(self, *args, **kwargs):
        """create_chat_completion's answer as the openai package's ChatCompletion (or, with
        stream=True, an iterator of ChatCompletionChunk)."""
        try:
            from openai.types.chat import ChatCompletion, ChatCompletionChunk
        except ImportError:
            raise ImportError("create_chat_completion_openai_v1 needs the openai package: pip install openai") from None
        if kwargs.get("stream", False):
            return (ChatCompletionChunk(**chunk) for chunk in self.create_chat_completion(*args, **kwargs))
        return ChatCompletion(**self.create_chat_completion(*args, **kwargs))

    @classmethod
    def from_pretrained(cls, repo_id: str, filename: Optional[str], additional_files: Optional[List[str]] = None,
                        local_dir: Optional[Union[str, os.PathLike]] = None, local_dir_use_symlinks="auto",
                        cache_dir: Optional[Union[str, os.PathLike]] = None, **kwargs) -> "Llama":
        """A Llama of the file in Hugging Face Hub repository repo_id that filename (a name or glob
        pattern, matched against paths in the repository) matches; kwargs go to the constructor.
        Needs huggingface-hub. With HF_HUB_OFFLINE=1 the cached snapshot is used. local_dir_use_symlinks
        is accepted and ignored (huggingface_hub no longer uses it)."""
        from .hub import download_model

        path = download_model(repo_id, filename, additional_files, local_dir=local_dir, cache_dir=cache_dir)
        return cls(model_path=path, **kwargs)

    # ---- pickling: the constructor's arguments, loaded again (llama-cpp-python's way) ---------

    def __getstate__(self) -> dict:
        self._check_open()
        return dict(self._init_args, seed=self._seed)

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    # ---- state ---------------------------------------------------------------------------

    def save_state(self) -> LlamaState:
        with self._locked():
            return self._save_state()

    def _save_state(self) -> LlamaState:
        # The logits of the last positions scores keeps (all with logits_all), in position order.
        positions = np.arange(max(self.n_tokens - len(self.scores), 0), self.n_tokens)
        return LlamaState(
            input_ids=self.input_ids[: self.n_tokens].copy(),
            scores=self.scores[self._score_row(positions)].copy(),
            n_tokens=self.n_tokens,
            kv_state=self._ctx.kv_state(),
            seed=self._seed,
        )

    def load_state(self, state: LlamaState) -> None:
        with self._locked():
            self._load_state(state)

    def _load_state(self, state: LlamaState) -> None:
        n_rows = len(state.scores)
        if state.scores.ndim != 2 or state.scores.shape[1] != self._n_vocab or n_rows > state.n_tokens:
            raise ValueError(f"state.scores must have at most n_tokens rows of {self._n_vocab} logits")
        self._ctx.kv_load_state(state.kv_state)  # validates before changing anything
        self.input_ids[: state.n_tokens] = state.input_ids
        # The saved rows are the last positions' logits; this Llama keeps as many of them as fit.
        kept = min(n_rows, len(self.scores))
        positions = np.arange(state.n_tokens - kept, state.n_tokens)
        self.scores[self._score_row(positions)] = state.scores[n_rows - kept :]
        self.n_tokens = state.n_tokens
        self._seed = state.seed

    # ---- embeddings ----------------------------------------------------------------------

    def embed(
        self,
        input: Union[str, List[str]],
        normalize: bool = False,
        truncate: bool = True,
        return_count: bool = False,
    ):
        """Per-token final hidden states (after output_norm) of each input, as llama.cpp gives
        for a causal model without pooling: a list of [n_tokens][n_embd] per input."""
        with self._locked():
            return self._embed(input, normalize=normalize, truncate=truncate, return_count=return_count)

    def _embed(self, input, *, normalize: bool, truncate: bool, return_count: bool):
        if not self._embedding:
            raise RuntimeError("Llama model must be created with embedding=True to call this method")
        inputs = [input] if isinstance(input, str) else list(input)
        out, total = [], 0
        for seq, text in enumerate(inputs):
            tokens = self.tokenize(text.encode("utf-8"), add_bos=True, special=False)
            if len(tokens) > self._n_ctx:
                if not truncate:
                    raise ValueError(f"Requested tokens ({len(tokens)}) exceed context window of {self._n_ctx}")
                tokens = tokens[: self._n_ctx]
            self._ctx.kv_clear()
            rows = []
            for start in range(0, len(tokens), self.n_batch):
                chunk = np.asarray(tokens[start : start + self.n_batch], dtype=np.int32)
                n = len(chunk)
                rows.append(self._ctx.decode(chunk, np.arange(start, start + n, dtype=np.int32), np.zeros(n, np.int32),
                                             np.ones(n, np.uint8)))
            emb = np.concatenate(rows) if rows else np.zeros((0, self.n_embd()), np.float32)
            if normalize:
                emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            out.append(emb.tolist())
            total += len(tokens)
        self._ctx.kv_clear()
        result = out[0] if isinstance(input, str) else out
        return (result, total) if return_count else result

    def create_embedding(self, input: Union[str, List[str]], model: Optional[str] = None):
        self._check_open()
        embeds, n = self.embed(input, return_count=True)
        if isinstance(input, str):
            embeds = [embeds]
        return {
            "object": "list",
            "data": [{"object": "embedding", "embedding": e, "index": i} for i, e in enumerate(embeds)],
            "model": model or self.model_path,
            "usage": {"prompt_tokens": n, "total_tokens": n},
        }


def _warm_page_cache(path: str, chunk: int = 64 << 20) -> None:
    """Reads a large file once with a progress line on stderr, so the first forward does not
    stall on page faults of the memory-mapped weights while the user sees nothing."""
    size = os.path.getsize(path)
    if size < 256 << 20:
        return
    buf = bytearray(chunk)
    done = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            done += n
            print(f"\rglmoe: loading {os.path.basename(path)}: {100 * done // size:3d}%", end="", file=sys.stderr)
    print(file=sys.stderr)


def _override_list(tensor_overrides: Union[str, Sequence[str], None]) -> List[str]:
    """-ot values as a list: None, one "PATTERN=BUFFER[,...]" string, or a sequence of them."""
    if tensor_overrides is None:
        return []
    if isinstance(tensor_overrides, str):
        return [tensor_overrides]
    values = list(tensor_overrides)
    if not all(isinstance(v, str) for v in values):
        raise TypeError("tensor_overrides must be a string in -ot syntax or a list of such strings")
    return values


def _bias_map(logit_bias: Optional[Dict[int, float]]) -> Dict[int, float]:
    return {int(k): float(v) for k, v in (logit_bias or {}).items()}


def _chat_template(metadata: Dict[str, str], chat_format: Optional[str]):
    """(chat_format, template): llama-cpp-python's names for the GGUF's templates ("chat_template.default"
    for tokenizer.chat_template, "chat_template.NAME" for tokenizer.chat_template.NAME)."""
    if chat_format is None:
        template = metadata.get("tokenizer.chat_template")
        return ("chat_template.default" if template is not None else None), template
    key = "tokenizer.chat_template" if chat_format == "chat_template.default" else "tokenizer." + chat_format
    if key not in metadata:
        raise NotImplementedError(f"chat_format={chat_format!r} is not supported by glmoe: the model file has no "
                                  f"{key}, and glmoe formats chats with the GGUF's own templates only")
    return chat_format, metadata[key]


# llama-cpp-python arguments that glmoe accepts at their no-op values only.
_NOOP_ARGS = {"tfs_z": 1.0, "mirostat_mode": 0, "mirostat_tau": 5.0, "mirostat_eta": 0.1, "penalize_nl": True,
              "logits_processor": None, "stopping_criteria": None, "grammar": None}


def _reject_unsupported(args: dict) -> None:
    for name, value in args.items():
        if name not in _NOOP_ARGS:
            raise TypeError(f"unexpected keyword argument '{name}'")
        if value != _NOOP_ARGS[name]:
            raise NotImplementedError(f"{name}={value!r} is not supported by glmoe yet")
