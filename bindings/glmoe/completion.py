"""create_completion: llama-cpp-python's text-completion API (responses and stream chunks as
OpenAI's legacy completions), on Llama.generate()."""
from __future__ import annotations

import bisect
import sys
import time
import uuid
from typing import Dict, Iterator, List, Optional, Union

import numpy as np


def logits_to_logprobs(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(axis=-1, keepdims=True))).astype(np.float32)


def _utf8_complete_prefix(data: bytes) -> int:
    """Length of the longest prefix of data that does not end inside a UTF-8 sequence."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        byte = data[n - back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII)
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            return n if need <= back else n - back
    return n


def held_back_for_stop(text, stops) -> int:
    """How many trailing bytes of text could be the start of a stop string (works alike on str
    text with str stops; the server holds back streamed text with it)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


class _Logprobs:
    """OpenAI legacy-completions logprobs for a run of tokens."""

    def __init__(self, llm, n_top: int):
        self.llm, self.n_top = llm, n_top

    def entry(self, position: int, token: int, prev_tokens: List[int]):
        """(token text, its logprob, top dict) for the token at `position` of the context,
        predicted by the logits of position - 1; None for position 0."""
        text = self.llm.detokenize([token], prev_tokens=prev_tokens).decode("utf-8", errors="ignore")
        if position == 0:
            return text, None, None
        lp = logits_to_logprobs(self.llm.scores[position - 1])
        top_ids = np.argsort(-lp, kind="stable")[: self.n_top]
        top = {self.llm.detokenize([int(i)]).decode("utf-8", errors="ignore"): float(lp[i]) for i in top_ids}
        top[text] = float(lp[token])
        return text, float(lp[token]), top

    def block(self, positions: List[int], tokens: List[int], context: List[int], text_offset: int):
        out = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
        offset = text_offset
        for pos, tok in zip(positions, tokens):
            text, lp, top = self.entry(pos, tok, context[:pos])
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(top)
            offset += len(text)
        return out


def create_completion(
    llm,
    prompt: Union[str, List[int]],
    suffix: Optional[str] = None,
    max_tokens: Optional[int] = 16,
    temperature: float = 0.8,
    top_p: float = 0.95,
    min_p: float = 0.05,
    typical_p: float = 1.0,
    logprobs: Optional[int] = None,
    echo: bool = False,
    stop: Optional[Union[str, List[str]]] = None,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    repeat_penalty: float = 1.0,
    top_k: int = 40,
    stream: bool = False,
    seed: Optional[int] = None,
    model: Optional[str] = None,
    logit_bias: Optional[Dict[int, float]] = None,
    special: bool = True,
    eog_tokens: Optional[List[int]] = None,
    grammar=None,
    _decode_special: bool = False,
    **unsupported,
):
    # _decode_special: the chat path reads GLM's <think> / <tool_call> markup, special tokens in
    # its vocabulary, from the text, so it decodes them (as llama-server does).
    if suffix is not None:
        raise NotImplementedError("suffix (fill-in-the-middle) is not supported by glmoe")
    if isinstance(prompt, str):
        prompt_text = prompt
        prompt_tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=special)
    else:
        prompt_tokens = [int(t) for t in prompt]
        prompt_text = llm.detokenize(prompt_tokens).decode("utf-8", errors="ignore")
    if not prompt_tokens:
        raise ValueError("the prompt is empty")
    if len(prompt_tokens) >= llm.n_ctx():
        raise ValueError(f"Requested tokens ({len(prompt_tokens)}) exceed context window of {llm.n_ctx()}")
    if logprobs is not None and not llm._logits_all:
        raise ValueError("logprobs is not supported for models created with logits_all=False")
    room = llm.n_ctx() - len(prompt_tokens)
    max_tokens = room if max_tokens is None or max_tokens <= 0 else min(max_tokens, room)
    stops = [s.encode("utf-8") for s in ([stop] if isinstance(stop, str) else (stop or [])) if s]
    eog = set(eog_tokens if eog_tokens is not None else llm.tokenizer_.eog_ids)

    tokens_iter = llm.generate(
        prompt_tokens, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p, temp=temperature,
        repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
        logit_bias=logit_bias, seed=seed, grammar=grammar, **unsupported,
    )
    run = _Run(
        llm=llm, prompt_tokens=prompt_tokens, prompt_text=prompt_text, max_tokens=max_tokens, stops=stops, eog=eog,
        tokens_iter=tokens_iter, logprobs=logprobs, echo=echo,
        model=model or llm.model_path, decode_special=_decode_special,
    )
    return run.stream() if stream else run.complete()


class _Run:
    """One completion: generates, cuts at stop strings and end-of-generation tokens, and
    reports either all at once or as stream chunks."""

    def __init__(self, *, llm, prompt_tokens, prompt_text, max_tokens, stops, eog, tokens_iter, logprobs, echo, model,
                 decode_special=False):
        self.llm, self.prompt_tokens, self.prompt_text = llm, prompt_tokens, prompt_text
        self.decode_special = decode_special
        self.max_tokens, self.stops, self.eog, self.tokens_iter = max_tokens, stops, eog, tokens_iter
        self.logprobs = _Logprobs(llm, logprobs) if logprobs is not None else None
        self.echo, self.model = echo, model
        self.id = f"cmpl-{uuid.uuid4()}"
        self.created = int(time.time())
        self.completion_tokens: List[int] = []
        self.text = b""  # completion text so far (cut at a stop string once one is found)
        # The uncut text, grown a token's piece at a time (pieces are context-free), and where each
        # completion token's piece starts in it: a step costs its own piece, not the whole text.
        self._full = bytearray()
        self._starts: List[int] = []
        self._longest_stop = max((len(s) for s in stops), default=0)
        self.finish_reason: Optional[str] = None
        self.t_start = time.perf_counter()
        self.t_first_token: Optional[float] = None
        self.t_end: Optional[float] = None

    def _steps(self) -> Iterator[None]:
        """Advances one token per step until the completion is finished."""
        if self.max_tokens == 0:
            self.finish_reason = "length"
            return
        try:
            for token in self.tokens_iter:
                if self.t_first_token is None:
                    self.t_first_token = time.perf_counter()
                if token in self.eog:
                    self.finish_reason = "stop"
                    break
                self.completion_tokens.append(token)
                before = self._append_piece(token)
                # A stop string found now ends in the new piece (an earlier one would have stopped
                # an earlier step).
                start = max(0, before - self._longest_stop + 1)
                hits = [i for i in (self._full.find(s, start) for s in self.stops) if i >= 0]
                if hits:
                    self.text = bytes(self._full[: min(hits)])
                    self.finish_reason = "stop"
                    break
                self.text = bytes(self._full)
                if len(self.completion_tokens) >= self.max_tokens:
                    self.finish_reason = "length"
                    break
                yield
        finally:  # also when the caller closes the stream early: the generator's lock goes now
            self.tokens_iter.close()
        self.t_end = time.perf_counter()
        if self.llm.verbose:
            dt = time.perf_counter() - self.t_start
            n = len(self.completion_tokens)
            print(f"glmoe: {len(self.prompt_tokens)} prompt + {n} generated tokens in {1000 * dt:.1f} ms "
                  f"({n / max(dt, 1e-9):.1f} t/s overall)", file=sys.stderr)

    def _usage(self):
        n_prompt, n_gen = len(self.prompt_tokens), len(self.completion_tokens)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}

    def _timings(self) -> Optional[dict]:
        """llama.cpp server's timings, with its speculative-decoding counts; only when drafting."""
        stats = self.llm.last_draft_stats
        if self.llm.draft_model is None or stats is None:
            return None
        t_first = self.t_first_token or self.t_end
        n = len(self.completion_tokens)
        predicted_ms = 1000 * (self.t_end - t_first)
        return {
            "prompt_n": len(self.prompt_tokens), "prompt_ms": 1000 * (t_first - self.t_start),
            "predicted_n": n, "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / max(n - 1, 1),
            "draft_n": stats["drafted"], "draft_n_accepted": stats["accepted"], "draft_steps": stats["steps"],
        }

    def _chunk(self, text: str, logprobs, finish_reason):
        return {
            "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
            "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish_reason}],
        }

    def _append_piece(self, token: int) -> int:
        """Adds the newest completion token's bytes to the uncut text; returns its length before."""
        before = len(self._full)
        self._starts.append(before)
        if self.completion_tokens[0] == self.llm.token_bos():
            # The tokenizer's leading-BOS rule (one space dropped after it) spans pieces: whole text.
            self._full = bytearray(self.llm.detokenize(self.completion_tokens, prev_tokens=self.prompt_tokens,
                                                       special=self.decode_special))
        else:
            self._full += self.llm.detokenize([token], prev_tokens=self.prompt_tokens, special=self.decode_special)
        return before

    def _tokens_within(self, n_bytes: int) -> int:
        """How many completion tokens the first n_bytes of the text cover (partly or wholly)."""
        return bisect.bisect_left(self._starts, n_bytes)

    def complete(self):
        for _ in self._steps():
            pass
        text = self.text.decode("utf-8", errors="ignore")
        lp = None
        if self.logprobs is not None:
            n_prompt = len(self.prompt_tokens)
            n_kept = self._tokens_within(len(self.text))
            context = self.prompt_tokens + self.completion_tokens
            if self.echo:
                positions = list(range(n_prompt + n_kept))
                lp = self.logprobs.block(positions, context[: n_prompt + n_kept], context, 0)
            else:
                positions = list(range(n_prompt, n_prompt + n_kept))
                lp = self.logprobs.block(positions, self.completion_tokens[:n_kept], context, len(self.prompt_text))
        if self.echo:
            text = self.prompt_text + text
        response = self._chunk(text, lp, self.finish_reason)
        response["usage"] = self._usage()
        timings = self._timings()
        if timings is not None:
            response["timings"] = timings
        return response

    def stream(self):
        sent = 0  # bytes of self.text already yielded
        sent_tokens = 0
        context = lambda: self.prompt_tokens + self.completion_tokens  # noqa: E731
        steps = self._steps()
        try:
            if self.echo:
                yield self._chunk(self.prompt_text, None, None)
            for _ in steps:
                # Hold back what could still become a stop string, and any incomplete UTF-8 character.
                safe = len(self.text) - held_back_for_stop(self.text, self.stops)
                safe = _utf8_complete_prefix(self.text[:safe])
                if safe > sent:
                    lp = self._stream_logprobs(sent_tokens, self._tokens_within(safe), sent, context())
                    yield self._chunk(self.text[sent:safe].decode("utf-8", errors="ignore"), lp, None)
                    sent_tokens = self._tokens_within(safe)
                    sent = safe
        finally:
            steps.close()
            self.tokens_iter.close()  # also when the stream is closed before its first step
        if len(self.text) > sent:
            lp = self._stream_logprobs(sent_tokens, self._tokens_within(len(self.text)), sent, context())
            yield self._chunk(self.text[sent:].decode("utf-8", errors="ignore"), lp, None)
        last = self._chunk("", None, self.finish_reason)
        timings = self._timings()
        if timings is not None:
            last["timings"] = timings
        yield last

    def _stream_logprobs(self, first: int, end: int, byte_offset: int, context: List[int]):
        if self.logprobs is None or end <= first:
            return None
        n_prompt = len(self.prompt_tokens)
        positions = list(range(n_prompt + first, n_prompt + end))
        offset = len(self.prompt_text) + len(self.text[:byte_offset].decode("utf-8", errors="ignore"))
        return self.logprobs.block(positions, self.completion_tokens[first:end], context, offset)
