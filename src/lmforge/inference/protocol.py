"""The OpenAI HTTP API's request bodies, as validated dataclasses (the server answers 400 for anything else)."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import Field
from pydantic.dataclasses import dataclass as api_model

MAX_N = 16  # most choices (`n`) per request
MAX_LOGPROBS = 20  # most alternatives per token in `logprobs` / `top_logprobs`

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Choices = Annotated[int, Field(ge=1, le=MAX_N)]
MaxTokens = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=0, le=2**62)]
NumLogprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]
TopK = Annotated[int, Field(ge=-1)]
RepetitionPenalty = Annotated[float, Field(gt=0.0, le=10.0)]


@api_model
class StreamOptions:
    include_usage: bool = False


@api_model(kw_only=True)
class GenerationRequest:
    """Fields shared by completions and chat completions. Unknown fields are ignored, as OpenAI does."""

    model: str
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: Choices = 1
    stop: str | list[str] | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, float] | None = None
    top_k: TopK = 0
    repetition_penalty: RepetitionPenalty = 1.0
    ignore_eos: bool = False


@api_model(kw_only=True)
class CompletionRequest(GenerationRequest):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: MaxTokens | None = 16
    logprobs: NumLogprobs | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


@api_model
class ChatMessage:
    role: str
    content: str | list[dict[str, Any]] | None = None


@api_model(kw_only=True)
class ChatCompletionRequest(GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: NumLogprobs | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None


@api_model
class EmbeddingRequest:
    """POST /v1/embeddings."""

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


@api_model
class ClassifyRequest:
    """POST /v1/classify: a text, or a list of texts, to label."""

    input: str | list[str]
    model: str | None = None


@api_model
class QAItem:
    """A question about a context; the answer is a span of the context."""

    question: str
    context: str


@api_model
class QARequest:
    """POST /v1/qa: one {question, context}, or a list of them, for a model with a span head."""

    input: QAItem | list[QAItem]
    model: str | None = None
    max_answer_length: Annotated[int, Field(ge=1, le=512)] = 30
    """Longest answer in tokens."""
    null_threshold: float | None = None
    """SQuAD v2.0 models: answer "" when the no-answer score beats the best span by more than this; None never."""


@api_model
class ErrorDetail:
    message: str
    type: str
    param: str | None = None
    code: str | None = None


@api_model
class ErrorResponse:
    """Every error the server answers, in OpenAI's shape."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": what} for status, what in [
        (400, "Invalid request: a body that does not validate, invalid JSON or Unicode, an unsupported parameter"),
        (401, "Missing or incorrect API key"), (404, "Unknown model or path"),
        (405, "Method not allowed (the Allow header lists the allowed ones)"), (413, "Request body too large"),
        (429, "The request queue is full"), (500, "Internal error"), (503, "The server is shutting down")]}
"""The error responses every route may answer, as listed in the OpenAPI document."""

_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89abcdefABCDEF][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(body: bytes) -> str | None:
    """The field (e.g. ``messages[0].content``) of a JSON body whose text holds a lone UTF-16 surrogate such as
    "\\ud800" (valid JSON, but not Unicode any tokenizer can encode), or None. Bodies without an escaped
    surrogate are not parsed; pairs (an escaped emoji) decode to one character and pass."""
    if not _ESCAPED_SURROGATE.search(body):
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None  # FastAPI answers invalid JSON itself
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str) and _SURROGATE.search(value):
            return path or "body"
        if isinstance(value, dict):
            stack += [(k, path or "body") for k in value]
            stack += [(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return None
