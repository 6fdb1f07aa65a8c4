"""The OpenAI wire format: request bodies, response and chunk objects, errors.

Requests are validated here (a wrong field is a 400 naming it); what a request asks for becomes
`Row`s for the engine in app.py. Fields beyond OpenAI's: `mode` ("story" | "raw", see the README),
and `top_k` and `min_tokens`, as other OpenAI-compatible servers (vLLM, llama.cpp) accept them.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field, field_validator

MAX_STOP = 4  # OpenAI's limit on stop sequences


class APIError(Exception):
    """Answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        return error_body(self.message, self.TYPES.get(self.status, "invalid_request_error"), self.code, self.param)


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """What completions and chat completions share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    n: int = Field(1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[int, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    mode: Literal["story", "raw"] | None = None
    min_tokens: int | None = Field(None, ge=0)  # vLLM's extension; default: SamplingConfig's

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v and any(not -100 <= b <= 100 for b in v.values()):
            raise ValueError("biases must be in [-100, 100]")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, v):
        if v:
            raise ValueError("presence and frequency penalties are not supported; leave them at 0")
        return v


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    logprobs: None = None  # not supported: anything but null is a 400
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("give at least one prompt")
        return v


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: Literal[False] | None = None
    tools: None = None  # no tool calling

    def story_prompt(self) -> str:
        """The last user message is what the story is about."""
        for m in reversed(self.messages):
            if m.role == "user":
                return m.text()
        raise APIError(400, "messages: there is no user message to write a story about", param="messages")


# ---------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(id_: str, model: str, texts: list[str], finish: list[str | None], use: dict) -> dict:
    return {"id": id_, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                        for i, (t, f) in enumerate(zip(texts, finish))],
            "usage": use}


def chat_completion(id_: str, model: str, texts: list[str], finish: list[str | None], use: dict) -> dict:
    return {"id": id_, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                         "finish_reason": f} for i, (t, f) in enumerate(zip(texts, finish))],
            "usage": use}


def completion_chunk(id_: str, model: str, index: int, text: str, finish: str | None) -> dict:
    return {"id": id_, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}


def chat_chunk(id_: str, model: str, index: int, delta: dict, finish: str | None) -> dict:
    return {"id": id_, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(id_: str, model: str, obj: str, use: dict) -> dict:
    return {"id": id_, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": use}
