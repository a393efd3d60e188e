"""The OpenAI chat-completions request and response, as pydantic models, and OpenAI's error shape.

Requests are validated strictly (a string where a number belongs is an error, not coerced);
fields this server does not implement are refused with a message rather than ignored, except
those that do not change the answer (`user`, `metadata`, `store`...), which are ignored.
Responses are OpenAI's plus one field per choice, `boxes`: the boxes the answer writes, each with
its ref, its corners on Qwen-VL's [0,1000) grid and in pixels of the request's latest image.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_N = 8
MAX_STOP = 4          # OpenAI's limit on `stop` sequences


class ImageURL(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Known OpenAI fields this server cannot honour: refused (`unsupported`), never silently dropped.
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: Any = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: Any = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return value

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def unsupported(request: ChatRequest) -> APIError | None:
    """A 400 for the first field set that this server cannot honour."""
    for name in ("tools", "tool_choice", "functions", "function_call", "response_format", "logit_bias"):
        value = getattr(request, name)
        if value is not None and not (name == "response_format" and _is_text_format(value)):
            return APIError(400, f"{name} is not supported by this server (no tool calling or structured "
                                 "output for Qwen-VL-Chat)", param=name, code="unsupported_parameter")
    if request.logprobs or request.top_logprobs:
        return APIError(400, "logprobs are not supported by this server", param="logprobs",
                        code="unsupported_parameter")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(request, name):
            return APIError(400, f"{name} is not supported by this server (only 0)", param=name,
                            code="unsupported_parameter")
    return None


def _is_text_format(value) -> bool:
    return isinstance(value, dict) and value.get("type") == "text"


class Box(BaseModel):
    ref: str | None
    box: list[float] = Field(description="x1, y1, x2, y2 on Qwen-VL's [0,1000) grid, as the answer writes them")
    pixels: list[float] | None = Field(description="the same box in pixels of the request's latest image "
                                                   "(grid / 1000 x size); null without an image")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None
    boxes: list[Box]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None
    boxes: list[Box] | None = Field(None, description="all boxes so far; sent when a box is complete and "
                                                      "with the choice's last chunk")


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "workbench"
    parent: str | None = Field(None, description="for an adapter: the base model it runs on")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(err: ValidationError) -> APIError:
    """pydantic's first error as a 400 naming the field the way OpenAI does (`messages[0].content`)."""
    errors = err.errors()
    first = max(errors, key=lambda e: len(e["loc"]))  # in a union, the branch that got furthest
    param = _param(first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    more = f" (and {err.error_count() - 1} more errors)" if err.error_count() > 1 else ""
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first['ctx'].get('error', '')}".rstrip(": "),
                        code="invalid_json")
    text = f"{param}: {message}{more}" if param else f"{message}{more}"
    return APIError(400, text, param=param or None, code=first["type"])


def _param(loc) -> str:
    out, parts = "", list(loc)
    for i, part in enumerate(parts):
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _BRANCHES or any(c in part for c in "[(-"):
            continue  # the name of a union branch pydantic tried, not a field
        elif i and isinstance(parts[i - 1], int) and part in ("text", "image_url") and i + 1 < len(parts):
            continue  # the tag of a content part (`type`), followed by the field itself
        else:
            out += ("." if out else "") + part
    return out


_BRANCHES = {"str", "int", "float", "bool", "none", "list", "dict"}
