"""The OpenAI wire format: request validation and response objects, no I/O.

Requests are checked field by field so a bad one gets a 400 whose ``param`` names the field,
as OpenAI's API answers. Supported: ``/v1/completions`` (a prompt string or one list of token
ids) and ``/v1/chat/completions`` (text messages through the byte tokenizer's template), with
``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop`` (strings, matched on the text),
``stream`` and ``stream_options.include_usage``; vLLM's extensions ``ignore_eos``,
``stop_token_ids`` and ``return_token_ids`` (each choice then carries its ``token_ids``, which
is how the tests compare tokens exactly). Fields that would change the output and are not
implemented (``n`` > 1, ``logprobs``, ``echo``, ...) are refused rather than ignored.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kleave.workers.serve.http import ApiError, field
from kleave.workers.serve.sampling import SamplingError, SamplingParams
from kleave.workers.tokenizer import EOS, ByteTokenizer, ChatTemplateError, parse_chat_messages

MAX_STOP_STRINGS = 4  # as OpenAI


@dataclass(frozen=True)
class GenerationRequest:
    """One validated completion or chat request."""

    kind: str  # "completion" | "chat"
    id: str
    model: str
    prompt_tokens: list[int]
    params: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    return_token_ids: bool
    created: int


def _check_unsupported(body: Mapping[str, Any]) -> None:
    n = body.get("n", 1)
    if n not in (1, None):
        raise ApiError(400, "n must be 1: the bundled workers return one choice", "n")
    for name in ("logprobs", "top_logprobs", "echo", "best_of", "suffix", "tools", "functions"):
        allowed: tuple[object, ...] = (None, 1) if name == "best_of" else (None, False, 0, [])
        if body.get(name) not in allowed:
            raise ApiError(400, f"{name} is not supported by the bundled workers", name)
    fmt = body.get("response_format")
    if isinstance(fmt, Mapping) and fmt.get("type", "text") != "text":
        raise ApiError(400, "response_format must be text", "response_format")


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a non-empty string or a list of them", "stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop may hold at most {MAX_STOP_STRINGS} strings", "stop")
    return tuple(stop)


def _sampling(
    body: Mapping[str, Any], *, max_tokens: int, tokenizer: ByteTokenizer
) -> SamplingParams:
    stop_ids = field(body, "stop_token_ids", list, [])
    ignore_eos = field(body, "ignore_eos", bool, False)
    ids = tokenizer.validate(stop_ids, "stop_token_ids") if stop_ids else []
    stops = tuple(ids) if ignore_eos else (EOS, *ids)
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=float(field(body, "temperature", (int, float), 1.0)),
            top_p=float(field(body, "top_p", (int, float), 1.0)),
            seed=field(body, "seed", int, None),
            stop_token_ids=stops,
        )
    except SamplingError as error:
        raise ApiError(400, str(error), error.field) from None


def _common(body: Mapping[str, Any], served_model: str) -> tuple[str, bool, bool]:
    model = field(body, "model", str)
    if model != served_model:
        raise ApiError(
            404, f"The model `{model}` does not exist; this router serves `{served_model}`", "model"
        )
    stream = field(body, "stream", bool, False)
    options = field(body, "stream_options", dict, {})
    include_usage = bool(options.get("include_usage", False))
    if options and not stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", "stream_options")
    _check_unsupported(body)
    return model, stream, include_usage


def _prompt_tokens(raw: Any, tokenizer: ByteTokenizer) -> list[int]:
    """A string, one list of token ids, or a one-element batch of either."""
    if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str | list):
        raw = raw[0]
    if isinstance(raw, str):
        if not raw:
            raise ApiError(400, "prompt must not be empty", "prompt")
        return tokenizer.encode(raw)
    if (
        isinstance(raw, list)
        and raw
        and all(isinstance(t, int) and not isinstance(t, bool) for t in raw)
    ):
        try:
            return tokenizer.validate(raw, "prompt")
        except ValueError as error:
            raise ApiError(400, str(error), "prompt") from None
    if isinstance(raw, list) and len(raw) > 1 and all(isinstance(p, str | list) for p in raw):
        raise ApiError(400, "prompt holds several prompts; send one request per prompt", "prompt")
    raise ApiError(400, "prompt must be a string or a non-empty list of token ids", "prompt")


def _max_tokens(body: Mapping[str, Any], names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = field(body, name, int, None)
        if value is not None:
            if value < 1:
                raise ApiError(400, f"{name} must be at least 1, got {value}", name)
            return int(value)
    return default


def parse_completion(
    body: Mapping[str, Any], *, served_model: str, tokenizer: ByteTokenizer
) -> GenerationRequest:
    model, stream, include_usage = _common(body, served_model)
    if "prompt" not in body:
        raise ApiError(400, "prompt is required", "prompt")
    tokens = _prompt_tokens(body["prompt"], tokenizer)
    max_tokens = _max_tokens(body, ("max_tokens",), 16)  # OpenAI's default for completions
    return GenerationRequest(
        kind="completion",
        id=f"cmpl-{uuid.uuid4().hex}",
        model=model,
        prompt_tokens=tokens,
        params=_sampling(body, max_tokens=max_tokens, tokenizer=tokenizer),
        stop=_stop(body),
        stream=stream,
        include_usage=include_usage,
        return_token_ids=field(body, "return_token_ids", bool, False),
        created=int(time.time()),
    )


def parse_chat(
    body: Mapping[str, Any], *, served_model: str, tokenizer: ByteTokenizer, default_max_tokens: int
) -> GenerationRequest:
    model, stream, include_usage = _common(body, served_model)
    if "messages" not in body:
        raise ApiError(400, "messages is required", "messages")
    try:
        tokens = tokenizer.apply_chat_template(parse_chat_messages(body["messages"]))
    except ChatTemplateError as error:
        raise ApiError(400, str(error), "messages") from None
    max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"), default_max_tokens)
    return GenerationRequest(
        kind="chat",
        id=f"chatcmpl-{uuid.uuid4().hex}",
        model=model,
        prompt_tokens=tokens,
        params=_sampling(body, max_tokens=max_tokens, tokenizer=tokenizer),
        stop=_stop(body),
        stream=stream,
        include_usage=include_usage,
        return_token_ids=field(body, "return_token_ids", bool, False),
        created=int(time.time()),
    )


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _envelope(request: GenerationRequest, *, chunk: bool) -> dict[str, Any]:
    if request.kind == "chat":
        kind = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        kind = "text_completion"
    return {"id": request.id, "object": kind, "created": request.created, "model": request.model}


def chunk(
    request: GenerationRequest,
    text: str,
    *,
    finish_reason: str | None = None,
    first: bool = False,
    token_ids: list[int] | None = None,
) -> dict[str, Any]:
    """One streamed choice delta, as OpenAI streams them."""
    choice: dict[str, Any]
    if request.kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text or first:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if request.return_token_ids and token_ids is not None:
        choice["token_ids"] = token_ids
    return {**_envelope(request, chunk=True), "choices": [choice]}


def usage_chunk(request: GenerationRequest, completion_tokens: int) -> dict[str, Any]:
    """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
    return {
        **_envelope(request, chunk=True),
        "choices": [],
        "usage": usage(len(request.prompt_tokens), completion_tokens),
    }


def response(
    request: GenerationRequest, text: str, token_ids: list[int], finish_reason: str
) -> dict[str, Any]:
    """The whole answer of a non-streaming request."""
    choice: dict[str, Any]
    if request.kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if request.return_token_ids:
        choice["token_ids"] = token_ids
    body = {
        **_envelope(request, chunk=False),
        "choices": [choice],
        "usage": usage(len(request.prompt_tokens), len(token_ids)),
    }
    if request.return_token_ids:
        body["prompt_token_ids"] = request.prompt_tokens
    return body


def models_list(model: str, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": created, "owned_by": "kleave"}],
    }


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back what could start one.

    Text that might be the beginning of a stop string is not sent until the next pieces show
    whether it is, so a client never sees part of a stop string.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self._pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """The text that is safe to send now; sets `stopped` when a stop string appeared."""
        if self.stopped:
            return ""
        if not self.stops:
            return piece
        self._pending += piece
        hits = [i for i in (self._pending.find(stop) for stop in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self._pending = self._pending[: min(hits)], ""
            return out
        keep = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(self._pending)), keep, -1):
                if self._pending.endswith(stop[:length]):
                    keep = length
                    break
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def flush(self) -> str:
        """What was held back, once the stream ended without a stop string."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out
