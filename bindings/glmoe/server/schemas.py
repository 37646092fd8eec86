"""Request bodies, with OpenAI's field names (and llama.cpp's sampling extensions). Anything a
field's type or range rejects becomes an HTTP 400 with OpenAI's error body (see app.py).

Value policy: OpenAI's ranges where OpenAI defines them (temperature 0..2, top_p 0..1,
presence/frequency penalty -2..2, logit_bias -100..100, max_tokens >= 1); llama.cpp's
extensions get ranges that keep the sampler meaningful (top_k >= 0 with 0 = off, min_p and
typical_p 0..1, repeat_penalty 0 < x <= 10, seed -1 (random) .. 2^32-1). NaN and infinities
are refused everywhere; temperature 0 is greedy."""
from __future__ import annotations

from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

Finite = Annotated[float, Field(allow_inf_nan=False)]
MAX_TOP_LOGPROBS = 20  # the engine's limit, OpenAI's for top_logprobs


def _finite(lo: float, hi: float, default: float, gt: bool = False):
    bound = {"gt": lo} if gt else {"ge": lo}
    return Field(default, allow_inf_nan=False, le=hi, **bound)


class StreamOptions(BaseModel):
    include_usage: bool = False


SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "repeat_last_n",
                   "presence_penalty", "frequency_penalty", "seed")


class SamplingFields(BaseModel):
    """Fields that /v1/completions and /v1/chat/completions share."""

    model_config = ConfigDict(extra="ignore")  # clients send vendor fields we do not use

    model: Optional[str] = None
    max_tokens: Optional[Annotated[int, Field(ge=1)]] = None
    temperature: float = _finite(0.0, 2.0, 1.0)
    top_p: float = _finite(0.0, 1.0, 1.0)
    top_k: Annotated[int, Field(ge=0, le=1 << 30)] = 0
    min_p: float = _finite(0.0, 1.0, 0.0)
    typical_p: float = _finite(0.0, 1.0, 1.0)
    repeat_penalty: float = _finite(0.0, 10.0, 1.0, gt=True)
    repeat_last_n: Annotated[int, Field(ge=-1, le=1 << 20)] = 64
    presence_penalty: float = _finite(-2.0, 2.0, 0.0)
    frequency_penalty: float = _finite(-2.0, 2.0, 0.0)
    seed: Optional[Annotated[int, Field(ge=-1, le=(1 << 32) - 1)]] = None
    logit_bias: Optional[Dict[str, Annotated[float, Field(allow_inf_nan=False, ge=-100, le=100)]]] = None
    stop: Optional[Union[str, List[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = False  # llama.cpp's: generate through end-of-generation tokens (benchmarks)
    n: Annotated[int, Field(ge=1, le=128)] = 1  # choices; at most one per slot (choices.check_n)
    user: Optional[str] = None

    # llama.cpp's name for max_tokens (-1: no limit)
    n_predict: Optional[Union[Literal[-1], Annotated[int, Field(ge=1)]]] = None

    def sampling_kwargs(self, defaults: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """The engine's submit() keywords. defaults (the server's --temp, --seed ...) replace the
        fields this request left unset."""
        given = self.model_fields_set
        values = {name: getattr(self, name) for name in SAMPLING_FIELDS}
        for name, value in (defaults or {}).items():
            if name not in given or values[name] is None:
                values[name] = value
        seed = values.pop("seed")
        if seed is not None and seed >= 0:
            values["seed"] = seed
        return values

    def requested_max_tokens(self, n_predict: int = -1) -> Optional[int]:
        """The request's token limit (None: until the slot's context is full), as llama.cpp's
        server takes it: n_predict, else max_tokens (max_completion_tokens for chat), else the
        server's -n; a server -n > 0 also caps what a request asks."""
        given = self.model_fields_set
        if "n_predict" in given and self.n_predict is not None:
            want = self.n_predict
        elif getattr(self, "max_completion_tokens", None) is not None:
            want = self.max_completion_tokens
        elif "max_tokens" in given or n_predict < 0:
            want = self.max_tokens  # the field's default when the server has no -n
        else:
            want = n_predict
        if want is None or want < 0:
            want = None
        if n_predict > 0:
            want = n_predict if want is None else min(want, n_predict)
        return want

    def stop_list(self) -> List[str]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class OutputConstraintFields(BaseModel):
    """Constrained output (server/constraints.py): llama.cpp's GBNF `grammar` and `json_schema`,
    and OpenAI's `response_format`; at most one of them."""

    grammar: Optional[str] = None
    json_schema: Optional[Union[Dict[str, Any], bool]] = None
    response_format: Optional[Dict[str, Any]] = None


class CompletionRequest(SamplingFields, OutputConstraintFields):
    prompt: Union[str, List[Annotated[int, Field(ge=0)]], Annotated[List[str], Field(min_length=1, max_length=1)]]
    max_tokens: Optional[Annotated[int, Field(ge=1)]] = 16  # OpenAI's default for legacy completions
    echo: bool = False
    suffix: Optional[str] = None
    logprobs: Optional[Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]] = None  # how many top tokens; 0: none


class ChatMessage(BaseModel):
    # Extra keys (name, tool_call_id, reasoning_content, ...) go to the chat template as they are.
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, List[Dict[str, Any]]]] = None
    tool_calls: Optional[List[Dict[str, Any]]] = None


def _check_schema(schema: Any, where: str, depth: int = 0) -> None:
    """The parts of a JSON Schema that the template and the tool-call parser read: an object, "type" a
    string or a list of strings, "properties" an object of schemas, "required" a list of strings."""
    if depth > 64:
        raise ValueError(f"{where}: nested too deep")
    if not isinstance(schema, dict):
        if isinstance(schema, bool):  # JSON Schema's true / false
            return
        raise ValueError(f"{where}: a JSON Schema is an object")
    kind = schema.get("type")
    if kind is not None and not (isinstance(kind, str) or (isinstance(kind, list)
                                                           and all(isinstance(k, str) for k in kind))):
        raise ValueError(f"{where}.type: a string or a list of strings")
    props = schema.get("properties")
    if props is not None:
        if not isinstance(props, dict):
            raise ValueError(f"{where}.properties: an object of schemas")
        for key, sub in props.items():
            _check_schema(sub, f"{where}.properties.{key}", depth + 1)
    required = schema.get("required")
    if required is not None and not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
        raise ValueError(f"{where}.required: a list of strings")
    if "items" in schema:
        _check_schema(schema["items"], f"{where}.items", depth + 1)


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: Annotated[str, Field(min_length=1)]
    description: Optional[str] = None
    parameters: Optional[Dict[str, Any]] = None

    @field_validator("parameters")
    @classmethod
    def _schema(cls, value):
        if value is not None:
            _check_schema(value, "parameters")
        return value


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class ChatCompletionRequest(SamplingFields, OutputConstraintFields):
    messages: Annotated[List[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Optional[Annotated[int, Field(ge=1)]] = None  # OpenAI's newer name
    tools: Optional[List[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], Dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]] = None  # needs logprobs true
    chat_template_kwargs: Optional[Dict[str, Any]] = None
    # llama.cpp's: "none" keeps <think> in content; unset: the server's --reasoning-format
    reasoning_format: Optional[Literal["auto", "deepseek", "none"]] = None
    # llama.cpp's per-request --reasoning-budget: -1 (or unset) the server's; 0 is refused (app.py)
    reasoning_budget_tokens: Optional[Annotated[int, Field(ge=-1)]] = None
    # llama.cpp's text before the forced </think>: glmoe forces </think> alone, so only "" is accepted
    reasoning_budget_message: Optional[str] = None


class TokenizeRequest(BaseModel):
    content: str
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeRequest(BaseModel):
    tokens: List[Annotated[int, Field(ge=0)]]
