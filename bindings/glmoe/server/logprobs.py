"""Token logprobs in the three shapes clients read (generation.Piece's tokens in, JSON out):
OpenAI chat's logprobs.content, OpenAI legacy completions' logprobs object, and llama.cpp's
completion_probabilities (/completion's n_probs).

Every value is the model's own: log-softmax of the raw logits, before logit bias, penalties,
sampler filters and grammar masks (OpenAI reports the model's distribution; llama.cpp's server
does the same unless post_sampling_probs is set, which glmoe refuses)."""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

from .generation import TokenLogprob

LOWEST_LOGPROB = -9999.0  # OpenAI's floor for a token whose probability underflows: JSON has no -inf


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) and logprob > LOWEST_LOGPROB else LOWEST_LOGPROB


class TokenTexts:
    """Each token's bytes as the response's text renders it (special tokens as text or not) and
    its text: the bytes that make whole UTF-8 characters, as llama.cpp's server reports a token
    that holds part of one. Cached: the same tokens come back again and again."""

    def __init__(self, tokenizer, special: bool):
        self._tokenizer, self._special = tokenizer, special
        self._cache: Dict[int, Tuple[bytes, str]] = {}

    def get(self, token: int) -> Tuple[bytes, str]:
        entry = self._cache.get(token)
        if entry is None:
            data = self._tokenizer.token_to_piece(token, special=self._special)
            entry = self._cache[token] = (data, data.decode("utf-8", errors="ignore"))
        return entry


def chat_content(tokens: List[TokenLogprob], texts: TokenTexts) -> List[dict]:
    """OpenAI chat's logprobs.content entries."""
    def entry(token: int, logprob: float) -> dict:
        data, text = texts.get(token)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(data)}

    return [dict(entry(t.id, t.logprob), top_logprobs=[entry(i, lp) for i, lp in t.top]) for t in tokens]


def legacy_block(tokens: List[TokenLogprob], texts: TokenTexts, prompt_chars: int) -> dict:
    """OpenAI legacy completions' logprobs object for a run of one choice's tokens: text_offset is
    where a token's text starts, in characters from the start of the prompt (the completion follows
    it), and each top_logprobs object holds the sampled token besides the most likely ones, as
    llama-cpp-python (and glmoe's Llama) write them."""
    out = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
    for t in tokens:
        text = texts.get(t.id)[1]
        top = {texts.get(i)[1]: _finite(lp) for i, lp in t.top}
        top[text] = _finite(t.logprob)
        out["tokens"].append(text)
        out["text_offset"].append(prompt_chars + t.text_offset)
        out["token_logprobs"].append(_finite(t.logprob))
        out["top_logprobs"].append(top)
    return out


def completion_probabilities(tokens: List[TokenLogprob], texts: TokenTexts) -> List[dict]:
    """llama.cpp's completion_probabilities (n_probs) entries."""
    def entry(token: int, logprob: float) -> dict:
        data, text = texts.get(token)
        return {"id": token, "token": text, "bytes": list(data), "logprob": _finite(logprob)}

    return [dict(entry(t.id, t.logprob), top_logprobs=[entry(i, lp) for i, lp in t.top]) for t in tokens]
