"""What llama.cpp's own endpoints take that the OpenAI ones do not: the /completion request and its
checks (llama.cpp's prompt shapes, its logit_bias forms, its sampler names, the fields glmoe cannot
honour), the embeddings request, and the generation settings llama.cpp reports back.

Defaults: a field a request leaves unset gets the server's flag (--temp, -n ...) or, without one,
llama.cpp's (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05; server/cli.py), the same on every
endpoint, so that they answer a prompt alike; /props reports them. n_predict unset means llama.cpp's -1 (until
the slot is full, capped by -n), not OpenAI's 16."""
from __future__ import annotations

import math
from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from .cli import NOT_SAMPLER
from .errors import bad_request
from .schemas import MAX_TOP_LOGPROBS, Finite, OutputConstraintFields, SamplingFields

LLAMA_RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED, which it reports for "random"

# glmoe's sampler chain (src/sampling.h) under llama.cpp's sampler names; logit bias comes first in both.
SAMPLER_CHAIN = ["penalties", "top_k", "typ_p", "top_p", "min_p", "temperature"]
# llama.cpp samplers glmoe lacks; allowed in a `samplers` list while their own fields leave them off.
OFF_SAMPLERS = {"dry", "top_n_sigma", "xtc"}
SAMPLER_LETTERS = {"e": "penalties", "d": "dry", "s": "top_n_sigma", "k": "top_k", "y": "typ_p", "p": "top_p",
                   "m": "min_p", "x": "xtc", "t": "temperature"}
SAMPLER_ALIASES = {"top-k": "top_k", "typical_p": "typ_p", "typical": "typ_p", "typ-p": "typ_p", "top-p": "top_p",
                   "nucleus": "top_p", "min-p": "min_p", "temp": "temperature", "top-n-sigma": "top_n_sigma"}


def _off(*neutral):
    """A check that a field is left off: absent, null or one of `neutral` (numbers or false)."""
    return lambda value: value is None or (isinstance(value, (int, float)) and value in neutral)


# llama.cpp /completion fields that change results and that glmoe does not implement: refused
# (400) unless they hold the value that leaves them off, which llama.cpp clients send by default.
REFUSED_FIELDS = {
    "mirostat": (_off(0), NOT_SAMPLER),
    "dynatemp_range": (_off(0), NOT_SAMPLER),
    "dry_multiplier": (_off(0), NOT_SAMPLER),
    "xtc_probability": (_off(0), NOT_SAMPLER),
    "top_n_sigma": (lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 0),
                    NOT_SAMPLER),
    "tfs_z": (_off(1), NOT_SAMPLER),
    "min_keep": (_off(0), "min_keep is not supported (glmoe's filters keep at least one token)"),
    "penalize_nl": (_off(False), "penalize_nl is not supported"),
    "n_indent": (_off(0), "n_indent (minimum indentation) is not supported"),
    "t_max_predict_ms": (_off(0), "t_max_predict_ms (a time limit on generation) is not supported"),
    "lora": (lambda v: v is None or v == [], "LoRA adapters are not supported"),
    "grammar_lazy": (_off(False), "lazy grammars (grammar_triggers) are not supported"),
    "multimodal_data": (lambda v: v is None or v == [], "multimodal input is not supported"),
}


def refuse_unsupported(extra: Dict[str, Any]) -> None:
    """A 400 naming the first field of `extra` (the request's fields glmoe has no field for) that
    would change the result."""
    for name, (is_off, reason) in REFUSED_FIELDS.items():
        if name in extra and not is_off(extra[name]):
            raise bad_request(f"{name}: {reason}", name)


def check_samplers(samplers: Union[str, List[str]]) -> None:
    """llama.cpp's `samplers` (names, or its letters as a string) is allowed when it is glmoe's
    chain in glmoe's order (penalties may be left out: older llama.cpp ran them outside the list)."""
    if isinstance(samplers, str):
        unknown = [c for c in samplers if c not in SAMPLER_LETTERS]
        names = [SAMPLER_LETTERS.get(c) for c in samplers]
    else:
        names = [SAMPLER_ALIASES.get(n, n) for n in samplers]
        unknown = [n for n in names if n not in SAMPLER_CHAIN and n not in OFF_SAMPLERS]
    if unknown:
        raise bad_request(f"samplers: unknown sampler {unknown[0]!r}", "samplers")
    active = [n for n in names if n not in OFF_SAMPLERS]
    if active not in (SAMPLER_CHAIN, SAMPLER_CHAIN[1:]):
        raise bad_request(f"samplers: glmoe's sampler order is fixed ({', '.join(SAMPLER_CHAIN)}); "
                          f"got {', '.join(active)}", "samplers")


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def prompt_list(prompt: Any, field: str = "prompt") -> List[Union[str, List[Union[int, str]]]]:
    """llama.cpp's prompt shapes as a list of prompts: a string, token ids, or token ids mixed with
    strings is one prompt; a list of strings or of such lists is several."""
    shape = (f"{field}: a string, a list of token ids (which may be mixed with strings), or a list of "
             f"strings and token lists")

    def one(value) -> bool:
        return isinstance(value, list) and bool(value) and all(_is_id(x) or isinstance(x, str) for x in value)

    if isinstance(prompt, str):
        return [prompt]
    if one(prompt) and any(_is_id(x) for x in prompt):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad_request(shape, field)
    for i, item in enumerate(prompt):
        if not (isinstance(item, str) or one(item)):
            raise bad_request(shape, f"{field}.{i}")
    return list(prompt)


def bias_pairs(logit_bias: Any) -> List[tuple]:
    """llama.cpp's logit_bias forms as (token id or text, bias) pairs: [[id or text, bias or false],
    ...] or OpenAI's {"id or text": bias}. false bans the token (-inf)."""
    if logit_bias is None:
        return []
    if isinstance(logit_bias, dict):
        items = [(int(k) if k.strip().lstrip("-").isdigit() else k, v) for k, v in logit_bias.items()]
    elif isinstance(logit_bias, list):
        items = []
        for i, pair in enumerate(logit_bias):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise bad_request("logit_bias: a list of [token id or text, bias] pairs", f"logit_bias.{i}")
            items.append(tuple(pair))
    else:
        raise bad_request("logit_bias: a list of [token id or text, bias] pairs or an object", "logit_bias")
    pairs = []
    for token, bias in items:
        if bias is False:
            bias = -math.inf
        elif isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
            raise bad_request(f"logit_bias: the bias of {token!r} must be a finite number or false", "logit_bias")
        if not (_is_id(token) or isinstance(token, str)):
            raise bad_request(f"logit_bias: {token!r} is neither a token id nor text", "logit_bias")
        pairs.append((token, float(bias)))
    return pairs


class NativeCompletionRequest(SamplingFields, OutputConstraintFields):
    """POST /completion. Fields glmoe has no field for stay in model_extra, where
    refuse_unsupported() looks for those that would change the result. grammar, json_schema and
    response_format constrain the output as on /v1/completions (constraints.py)."""

    model_config = ConfigDict(extra="allow")

    prompt: Any  # checked by prompt_list()
    # Completions per prompt (llama.cpp's; "n" is its fallback name): at most one per slot (choices.check_n).
    n_cmpl: Optional[Annotated[int, Field(ge=1, le=128)]] = None
    max_tokens: Optional[Annotated[int, Field(ge=-1)]] = None  # llama.cpp's other name for n_predict
    n_predict: Optional[Annotated[int, Field(ge=-1)]] = None  # -1: until the slot is full; 0: no generation
    # llama.cpp's ranges, wider than OpenAI's: temperature <= 0 is greedy, top_k <= 0 is off.
    temperature: Finite = 1.0
    top_k: Annotated[int, Field(ge=-(1 << 30), le=1 << 30)] = 0
    presence_penalty: Finite = 0.0
    frequency_penalty: Finite = 0.0
    logit_bias: Any = None  # checked by bias_pairs()
    n_probs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] = 0  # completion_probabilities' top tokens
    # llama.cpp takes OpenAI's name for n_probs when n_probs is not given.
    logprobs: Optional[Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)]] = None
    post_sampling_probs: bool = False  # refused with n_probs: glmoe reports the model's probabilities
    return_tokens: bool = False
    # glmoe's engine evaluates every prompt whole (a slot keeps no cache between requests), so
    # cache_prompt changes nothing: accepted either way. id_slot likewise (any slot gives the same).
    cache_prompt: bool = True
    id_slot: int = -1
    samplers: Optional[Union[str, List[str]]] = None
    response_fields: Optional[List[str]] = None


class EmbeddingRequest(BaseModel):
    """POST /embedding, /embeddings, /v1/embeddings (llama.cpp takes the same body on all three)."""

    model_config = ConfigDict(extra="ignore")

    input: Any = None
    content: Any = None  # llama.cpp's name; it makes /v1/embeddings answer in the native shape
    encoding_format: Literal["float", "base64"] = "float"
    embd_normalize: Optional[Annotated[int, Field(ge=-1, le=64)]] = None  # default 2 (Euclidean)
    model: Optional[str] = None
    dimensions: Optional[int] = None  # OpenAI's: refused, glmoe does not shorten embeddings


def generation_settings(sampling: dict, n_predict: Optional[int], stops: List[str], ignore_eos: bool,
                        stream: bool, n_ctx: int, n_probs: int = 0) -> dict:
    """llama.cpp's generation_settings (and /props' default_generation_settings.params) for the
    samplers glmoe runs."""
    bias = [[t, b if math.isfinite(b) else False] for t, b in sorted((sampling.get("logit_bias") or {}).items())]
    return {"n_ctx": n_ctx, "n_predict": -1 if n_predict is None else n_predict,
            "seed": sampling.get("seed", LLAMA_RANDOM_SEED),
            **{k: sampling[k] for k in ("temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_last_n",
                                        "repeat_penalty", "presence_penalty", "frequency_penalty")},
            "stop": stops, "max_tokens": -1 if n_predict is None else n_predict, "ignore_eos": ignore_eos,
            "stream": stream, "n_probs": n_probs, "logit_bias": bias, "samplers": list(SAMPLER_CHAIN)}


def pick_fields(body: dict, paths: List[str]) -> dict:
    """llama.cpp's response_fields: each "a/b" path that exists, under its path as the key."""
    out = {}
    for path in paths:
        value, found = body, True
        for key in path.split("/"):
            if isinstance(value, dict) and key in value:
                value = value[key]
            else:
                found = False
                break
        if found:
            out[path] = value
    return out
