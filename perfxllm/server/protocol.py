"""The OpenAI wire format: request models (validated strictly, so that `"max_tokens": "5"` is an error rather
than a guess), response models, and the error body every 4xx/5xx carries.

A field a request model does not declare is answered with a 400, as OpenAI does ("Unrecognized request
argument"): a client that sends vLLM's `stop_token_ids` or `min_tokens` learns that they are not honoured.
OpenAI's fields that change nothing here (`user`, `store`, `metadata`, ...) are declared and accepted; known
fields whose values would change the meaning of a request in a way this server does not implement (tools,
JSON mode, echo, ...) are rejected rather than ignored. Stop strings are bounded (MAX_STOP, MAX_STOP_CHARS):
they are matched against every generated token, on the engine's one thread.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from perfxllm.errors import RequestError
from perfxllm.sampling_params import SamplingParams

MAX_N = 16
MAX_STOP = 16  # stop strings a request (OpenAI: 4)
MAX_STOP_CHARS = 256


class APIError(Exception):
    """An error answered to the client as {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def invalid(cls, message: str, param: str | None = None) -> APIError:
        return cls(400, message, param=param)


# Pydantic names the member of a union in an error's location ("prompt", "list[int]", 0): not a field.
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|constrained-str|list\[.*\]|dict\[.*\]|[A-Z]\w*)$")


def validation_error(e: ValidationError) -> APIError:
    """The deepest error wins (in a union, the member that matched furthest is the one meant)."""
    errors = e.errors()
    if errors[0]["type"] == "json_invalid":
        return APIError.invalid(
            f"The request body is not valid JSON: {errors[0]['msg'].removeprefix('Invalid JSON: ')}."
        )
    if errors[0]["type"] == "model_type" and not errors[0]["loc"]:
        return APIError.invalid("The request body must be a JSON object.")
    unknown = [_param(x["loc"]) for x in errors if x["type"] == "extra_forbidden"]
    if unknown:
        return APIError.invalid(f"Unrecognized request argument supplied: {unknown[0]}.", unknown[0])
    depth = max(len(x["loc"]) for x in errors)
    deepest = [(_param(x["loc"]), x["msg"]) for x in errors if len(x["loc"]) == depth]
    param = deepest[0][0]
    messages = dict.fromkeys(msg for p, msg in deepest if p == param)
    return APIError.invalid(f"Invalid '{param}': {' or '.join(messages)}.", param or None)


def _param(loc: tuple[str | int, ...]) -> str:
    path = [p for p in loc if not (isinstance(p, str) and _UNION_MEMBER.match(p))]
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


Stop = Annotated[str, StringConstraints(max_length=MAX_STOP_CHARS)]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # extension, as in vLLM: 0 disables
    min_p: float = 0.0  # extension
    repetition_penalty: float = 1.0  # extension
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOP)] = Field(default_factory=list)
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension: generate exactly max_tokens tokens
    logit_bias: dict[str, float] | None = None
    # OpenAI's, accepted and without effect here
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    def check_supported(self) -> None:
        if self.logit_bias:
            raise APIError.invalid("logit_bias is not supported by this server.", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise APIError.invalid("stream_options is only allowed when stream is true.", "stream_options")

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_tokens: int, logprobs: int | None, choice: int) -> SamplingParams:
        """The engine's parameters for one choice; choice i of n draws from seed + i, so that n > 1 with a
        seed gives n different (and reproducible) samples."""
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=self.temperature,
                top_k=self.top_k,
                top_p=self.top_p,
                min_p=self.min_p,
                repetition_penalty=self.repetition_penalty,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                seed=None if self.seed is None else self.seed + choice,
                stop=self.stop,
                ignore_eos=self.ignore_eos,
                logprobs=logprobs,
            )
        except RequestError as e:
            raise APIError.invalid(f"{e}.") from None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = 16
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise APIError.invalid("echo is not supported by this server.", "echo")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError.invalid("best_of is not supported by this server (only best_of == n).", "best_of")
        if self.suffix:
            raise APIError.invalid("suffix is not supported by this server.", "suffix")


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: str


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # None: up to the end of the context
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools or self.functions or self.tool_choice not in (None, "none"):
            raise APIError.invalid("Tool calling is not supported by this server.", "tools")
        if self.function_call not in (None, "none"):
            raise APIError.invalid("Function calling is not supported by this server.", "function_call")
        if self.modalities not in (None, ["text"]):
            raise APIError.invalid("Only the text modality is supported by this server.", "modalities")
        if self.response_format is not None and self.response_format.type != "text":
            raise APIError.invalid(
                f"response_format {self.response_format.type!r} is not supported; only 'text' is.",
                "response_format",
            )
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError.invalid("top_logprobs needs logprobs set to true.", "top_logprobs")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# -- responses ----------------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """A whole completion, and also one streamed chunk of it (OpenAI uses the same object for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
