"""Request bodies, with OpenAI's field names (and llama.cpp's sampling extensions). Anything a
field's type or range rejects becomes an HTTP 400 with OpenAI's error body (see app.py).

Value policy: OpenAI's ranges where OpenAI defines them (temperature 0..2, top_p 0..1,
presence/frequency penalty -2..2, logit_bias -100..100, max_tokens >= 1); llama.cpp's
extensions get ranges that keep the sampler meaningful (top_k >= 0 with 0 = off, min_p and
typical_p 0..1, repeat_penalty 0 < x <= 10, seed -1 (random) .. 2^32-1). NaN and infinities
are refused everywhere; temperature 0 is greedy."""
from __future__ import annotations

from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

Finite = Annotated[float, Field(allow_inf_nan=False)]


def _finite(lo: float, hi: float, default: float, gt: bool = False):
    bound = {"gt": lo} if gt else {"ge": lo}
    return Field(default, allow_inf_nan=False, le=hi, **bound)


class StreamOptions(BaseModel):
    include_usage: bool = False


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
    n: Annotated[int, Field(ge=1, le=1)] = 1  # one choice per request: the engine has no forking
    user: Optional[str] = None

    def sampling_kwargs(self) -> Dict[str, Any]:
        """The engine's submit() keywords."""
        kw = dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                  typical_p=self.typical_p, repeat_penalty=self.repeat_penalty, repeat_last_n=self.repeat_last_n,
                  presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty)
        if self.seed is not None and self.seed >= 0:
            kw["seed"] = self.seed
        return kw

    def stop_list(self) -> List[str]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: Union[str, List[Annotated[int, Field(ge=0)]], Annotated[List[str], Field(min_length=1, max_length=1)]]
    max_tokens: Optional[Annotated[int, Field(ge=1)]] = 16  # OpenAI's default for legacy completions
    echo: bool = False
    suffix: Optional[str] = None
    logprobs: Optional[int] = None


class ChatMessage(BaseModel):
    # Extra keys (name, tool_call_id, reasoning_content, ...) go to the chat template as they are.
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, List[Dict[str, Any]]]] = None
    tool_calls: Optional[List[Dict[str, Any]]] = None


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: Annotated[str, Field(min_length=1)]
    description: Optional[str] = None
    parameters: Optional[Dict[str, Any]] = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[List[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Optional[Annotated[int, Field(ge=1)]] = None  # OpenAI's newer name
    tools: Optional[List[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], Dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[Dict[str, Any]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    chat_template_kwargs: Optional[Dict[str, Any]] = None
    reasoning_format: Literal["auto", "deepseek", "none"] = "auto"  # llama.cpp's: "none" keeps <think> in content


class TokenizeRequest(BaseModel):
    content: str
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeRequest(BaseModel):
    tokens: List[Annotated[int, Field(ge=0)]]
