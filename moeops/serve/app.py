"""The HTTP face of the server: OpenAI-compatible completions and chat completions (streamed as server-sent
events or not), /v1/models, health, /version and /metrics. Torch-free.

What a client can count on:
- Errors are OpenAI error objects `{"error": {"message", "type", "param", "code"}}`: 400 for a bad request
  (FastAPI's validation errors and malformed JSON included, never its 422 shape), 401 `invalid_api_key` when
  the server has tenants (serve.tenants) and the request has no or a wrong `Authorization: Bearer <key>`,
  404 `model_not_found`, 429 `rate_limit_exceeded` + Retry-After when the engine's queue is full or the tenant
  is over a limit (plus `x-should-retry: false` when the request can never pass its quota), 503 + Retry-After
  while loading or draining, 504 when a request runs past serve.request_timeout_s, 500 with a generic message
  (the traceback goes to the log). /health, /version and /metrics need no key.
- Every /v1 response for which a model version was chosen (errors too) says which in `x-moeops-model-version`.
  `model: "moeops"` goes to the champion, or to the challenger for the canary's share of the callers, sticky
  per caller (tenant + `user`, or the `x-moeops-session` header); `moeops@vN` pins a loaded version.
- Prompts and outputs are never logged.
- Length limits are refused, not clamped (as OpenAI and vLLM do): a prompt longer than the context (or
  serve.max_prompt_tokens) is a 400 on `prompt`; prompt + max_tokens beyond the context, or max_tokens above
  serve.max_new_tokens, is a 400 on `max_tokens`. Without max_tokens, completions default to 16 new tokens
  (OpenAI's default) and chat to what fits (at most serve.max_new_tokens).
- `echo: true, logprobs: N, max_tokens: 0` scores a text: the legacy logprobs object {tokens, token_logprobs
  (the first None), top_logprobs, text_offset}, as lm-evaluation-harness `local-completions` reads it. Token
  strings concatenate to the text (a token that ends inside a UTF-8 character shows as "" and the next one
  carries the character); text_offset counts characters of the choice's text. Prompts may be token-id lists.
- Chat turns messages into one plain prompt for this base LM, one line per message and an open assistant
  turn, and stops at the next "\\nuser:":

      system: You are terse.
      user: Hi
      assistant:

Each sequence of a request is driven by one task of its own from its first Delta to its last (the engine's
generator never changes task), and the response reads from that task's queue: the first Delta of every
sequence is awaited before the status line goes out, so admission errors (full, closed, too long) are real
HTTP statuses even when streaming; a client that goes away cancels the tasks, which cancels the sequences.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from moeops.serve import metrics
from moeops.serve.engine import Delta, EngineClosed, EngineFull, InjectedFault, SamplingParams, TokenLogprob
from moeops.serve.router import Router
from moeops.serve.tenants import RateLimited, Tenant, Tenants

log = logging.getLogger("moeops.serve")

CHAT_STOP = "\nuser:"  # a base LM keeps writing the dialogue; the next user turn ends the answer
MIN_LOGPROB = -1e4  # JSON has no -inf; a logprob this low is "impossible" to any client


# ----------------------------------------------------------------- request and response schemas


class _Strict(BaseModel):
    """JSON types as documented: 0 is not false and "5" is not 5 (OpenAI refuses them too). Unknown fields are
    ignored, as vLLM does (clients send extras)."""

    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool | None = False


class _Params(_Strict):
    """What completions and chat share."""

    model: str = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0, description="overrides max_tokens when given")
    temperature: float | None = Field(None, ge=0, le=2, description="default 1.0; 0 = greedy")
    top_p: float | None = Field(None, gt=0, le=1, description="default 1.0")
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, description="same seed, same tokens (alone or batched)")
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1, le=1, description="only 1 is supported")
    ignore_eos: bool | None = Field(False, description="vLLM extension: keep generating past end-of-text")
    user: str | None = None


class CompletionRequest(_Params):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, a list of strings (one choice each), or token ids (a list, or a list of lists)",
        examples=["def add(a, b):\n    return"])
    max_tokens: int | None = Field(16, ge=0, description="new tokens; 0 with echo + logprobs scores the prompt")
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ChatRequest(_Params):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=5)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatOutMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatOutMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class VersionInfo(BaseModel):
    model: str
    version: str = Field(description="the champion")
    challenger: str | None = Field(description="the challenger loaded beside the champion (canary), if any")
    challenger_weight: float = Field(description="the share of callers routed to the challenger, 0..1")
    variant: str
    sha256: str
    max_seq_len: int
    ort_version: str
    provider: str
    cache_hit: bool
    load_seconds: float
    warmup_seconds: float


class Health(BaseModel):
    status: str
    version: str | None = None


_ERROR = {"model": ErrorResponse}
_UNAUTHORIZED = {"model": ErrorResponse, "description": "no or a wrong API key (only when the server has tenants)"}
ERRORS: dict[int | str, dict[str, Any]] = {400: _ERROR, 401: _UNAUTHORIZED, 404: _ERROR, 429: _ERROR, 500: _ERROR,
                                           503: _ERROR, 504: _ERROR}
VERSION_HEADER = "x-moeops-model-version"
SESSION_HEADER = "x-moeops-session"


def _generation_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    # stream: true answers text/event-stream; its schema describes one event (OpenAPI 3.1 has no itemSchema):
    # `data` is a chunk as JSON, an error object, or the final [DONE]
    event = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string", "description": "a chunk (JSON) ... then [DONE]"},
                            "event": {"type": "string"}}}
    sse = {"text/event-stream": {"schema": event}}
    return {200: {"model": model, "content": sse}, **ERRORS}


def document_server_limits(components: dict[str, Any], model_name: str, max_new_tokens: int) -> None:
    """What this server's settings add to the request schemas: the model it serves (as an example) and the
    most new tokens a request may ask for, so that clients and schema-driven tests see the real limits."""
    for name in ("CompletionRequest", "ChatRequest"):
        props = components.get(name, {}).get("properties", {})
        if "model" in props:
            props["model"]["examples"] = [model_name]
        for key in ("max_tokens", "max_completion_tokens"):
            for branch in props.get(key, {}).get("anyOf", []):
                if branch.get("type") == "integer":
                    branch["maximum"] = max_new_tokens


# ----------------------------------------------------------------- errors


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def engine_error(e: Exception) -> APIError:
    """The HTTP answer to what engine.generate (or a tenant's admission) raises before (or while) it yields."""
    if isinstance(e, RateLimited):
        headers = {"Retry-After": str(math.ceil(e.retry_after_s)), "retry-after-ms": str(math.ceil(e.retry_after_s
                                                                                               * 1000))}
        if e.hard:
            headers["x-should-retry"] = "false"  # over the whole quota: retrying cannot help (openai clients obey)
        return APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded", headers=headers)
    if isinstance(e, InjectedFault):  # MOEOPS_FAULTS (chaos testing of the canary): what a broken version answers
        return APIError(500, "internal server error (injected fault)", type="server_error", code="internal_error")
    if isinstance(e, EngineFull):
        wait = max(float(getattr(e, "retry_after_s", 1.0)), 0.001)
        return APIError(429, f"the server's queue is full; retry after {wait:.3g} s", type="rate_limit_error",
                        code="rate_limit_exceeded",
                        headers={"Retry-After": str(math.ceil(wait)), "retry-after-ms": str(math.ceil(wait * 1000))})
    if isinstance(e, EngineClosed):
        return APIError(503, f"no model available right now ({e}); retry shortly", type="server_error",
                        code="unavailable", headers={"Retry-After": "1"})
    if isinstance(e, TimeoutError):
        return APIError(504, "the request ran past the server's time limit (serve.request_timeout_s)",
                        type="server_error", code="timeout")
    if isinstance(e, ValueError):
        return APIError(400, f"prompt: {e}", param="prompt")
    # a bug: answered here (not by the outermost handler) so that the response still names its version
    log.error("unexpected error while generating", exc_info=e)
    return APIError(500, "internal server error", type="server_error", code="internal_error")


def _is_type_tag(part: object) -> bool:
    """pydantic puts the union member it tried into an error's location ('str', 'list[int]', 'ContentPart')."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool") or part[:1].isupper())


def validation_error(exc: RequestValidationError) -> APIError:
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", err["msg"])
        return APIError(400, f"malformed JSON body: {detail}")
    loc = [str(p) for p in err["loc"][1:] if not _is_type_tag(p)]  # loc[0] is "body" / "query"
    param = loc[0] if loc else None
    where = ".".join(loc) or "body"
    return APIError(400, f"{where}: {err['msg']}", param=param)


# ----------------------------------------------------------------- tokens as text


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet shows every byte as a printable character; this maps them back."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shown = {b: chr(b) for b in bs}
    for b in range(256):  # the other bytes (controls, space, ...) are shown as chr(256), chr(257), ... in order
        if b not in shown:
            shown[b] = chr(256 + len(shown) - len(bs))
    return {c: b for b, c in shown.items()}


@functools.lru_cache(maxsize=4)  # one per loaded tokenizer; hot reload holds two at once
def vocab_bytes(tokenizer) -> tuple[bytes, ...]:
    """The bytes each token id stands for (a byte-level BPE token may be part of a UTF-8 character)."""
    decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
    byte_level = decoder.get("type") == "ByteLevel"
    added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
    table = _byte_decoder()
    out = []
    for i in range(tokenizer.get_vocab_size()):
        tok = tokenizer.id_to_token(i)
        if i in added:
            out.append(added[i].encode())
        elif byte_level and tok is not None and all(c in table for c in tok):
            out.append(bytes(table[c] for c in tok))
        else:
            out.append(tokenizer.decode([i]).encode())
    return tuple(out)


class Detok:
    """Token ids -> text pieces whose concatenation is the decoded text, fed incrementally (streams)."""

    def __init__(self, tokenizer) -> None:
        self.vocab = vocab_bytes(tokenizer)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.vocab[token_id] if 0 <= token_id < len(self.vocab) else b""

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.utf8.decode(self.token_bytes(i)) for i in ids]


# ----------------------------------------------------------------- one request's sequences


_END = object()


class Generation:
    """The sequences of one request, each driven by its own task (an engine generator never changes task);
    their items meet in one queue as (choice index, Delta | exception | _END). The queue is unbounded but a
    sequence's Deltas are bounded by its max_tokens, and a reader that stalls never stalls the engine."""

    def __init__(self, engine, plans: list[tuple[list[int], SamplingParams]], tenant: str = "") -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.n = len(plans)
        self.buffered: list[tuple[int, Any]] = []
        self.tasks = [asyncio.create_task(self._pump(i, engine.generate(ids, p, tenant=tenant)))
                      for i, (ids, p) in enumerate(plans)]

    async def _pump(self, i: int, agen) -> None:
        try:
            async for delta in agen:
                self.queue.put_nowait((i, delta))
        except Exception as e:  # EngineFull / EngineClosed / ValueError / TimeoutError: the reader decides
            self.queue.put_nowait((i, e))
            return
        finally:
            await agen.aclose()
        self.queue.put_nowait((i, _END))

    async def started(self) -> None:
        """Wait until every sequence has produced its first item; raise what any one raised before that."""
        seen: set[int] = set()
        while len(seen) < self.n:
            i, item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            seen.add(i)
            self.buffered.append((i, item))

    async def deltas(self) -> AsyncIterator[tuple[int, Delta]]:
        """(index, Delta) in arrival order until every sequence has ended; raises a sequence's exception."""
        open_ = self.n
        while open_:
            i, item = self.buffered.pop(0) if self.buffered else await self.queue.get()
            if item is _END:
                open_ -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item

    def cancel(self) -> None:
        for t in self.tasks:
            t.cancel()


# ----------------------------------------------------------------- requests against the engine


@dataclass
class Choice:
    """One prompt's sequence as the response builds it."""

    index: int
    prompt_text: str
    prompt_ids: list[int]
    tokenizer: Any
    started: bool = False
    completion_tokens: int = 0
    offset: int = 0  # characters of the choice's text so far (text_offset)
    finish_reason: str | None = None
    detok: Detok = field(init=False)

    def __post_init__(self) -> None:
        self.detok = Detok(self.tokenizer)


def requested_tokens(body: CompletionRequest | ChatRequest, max_new_tokens: int) -> tuple[int | None, str]:
    """(new tokens asked for, the field that asked): max_completion_tokens wins over max_tokens, and both are
    held to serve.max_new_tokens when given."""
    for param in ("max_tokens", "max_completion_tokens"):
        value = getattr(body, param)
        if value is not None and value > max_new_tokens:
            raise APIError(400, f"{param}: {value} is more than this server's limit of {max_new_tokens} new tokens",
                           param=param)
    if body.max_completion_tokens is not None:
        return body.max_completion_tokens, "max_completion_tokens"
    return body.max_tokens, "max_tokens"


def new_tokens(requested: int | None, prompt_len: int, context: int, max_new_tokens: int, param: str) -> int:
    """How many tokens a sequence may generate: what was asked if it fits, else a 400 on `param`."""
    room = context - prompt_len
    if requested is None:
        return min(max_new_tokens, room)
    if requested > room:
        raise APIError(400, f"{param}: this model's context is {context} tokens and the prompt takes {prompt_len}, "
                            f"so at most {room} new tokens fit, not {requested}", param=param)
    return requested


def check_prompt(ids: list[int], context: int, max_prompt_tokens: int, which: str, param: str) -> None:
    limit = min(max_prompt_tokens or context, context)
    if not ids:
        raise APIError(400, f"{param}: {which}is empty", param=param)
    if len(ids) > limit:
        raise APIError(400, f"{param}: {which}is {len(ids)} tokens; this server takes at most {limit} "
                            f"(model context {context})", param=param)


def prompt_ids(prompt: str | list, tokenizer) -> list[tuple[str, list[int]]]:
    """(text, token ids) of each prompt of a completions request."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt: an empty list", param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    vocab = tokenizer.get_vocab_size()
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append((p, tokenizer.encode(p).ids))
            continue
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                           param="prompt")
        out.append((tokenizer.decode(p, skip_special_tokens=False), list(p)))
    return out


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The documented plain template (module docstring): 'role: content' lines and an open assistant turn."""
    lines = []
    for m in messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
        lines.append(f"{m.role}: {content}\n")
    return "".join(lines) + "assistant:"


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    return tuple(s for s in stops if s)  # an empty stop string would end every sequence at once


def sampling(body: _Params, max_tokens: int, stop: tuple[str, ...], logprobs: int | None,
             prompt_logprobs: bool) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=None if body.seed is None else body.seed % 2**64,  # numpy seeds are unsigned
        stop=stop, logprobs=logprobs, prompt_logprobs=prompt_logprobs, ignore_eos=bool(body.ignore_eos))


def check_common(body: _Params) -> None:
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options: only allowed when stream is true", param="stream_options")


# ----------------------------------------------------------------- response pieces


def _lp(x: float) -> float:
    return max(float(x), MIN_LOGPROB) if x == x else MIN_LOGPROB


def _top_dict(tl: TokenLogprob) -> dict[str, float]:
    """The alternatives and the chosen token itself (as vLLM does), so `max(top.values())` tells greedy."""
    top = {tok: _lp(lp) for tok, lp in tl.top}
    top.setdefault(tl.token, _lp(tl.logprob))
    return top


def legacy_logprobs(c: Choice, d: Delta, with_prompt: bool) -> dict[str, list]:
    """The completions logprobs object for one Delta (and the prompt's tokens first, when echoed)."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    if with_prompt:
        for piece, entry in zip(Detok(c.tokenizer).pieces(c.prompt_ids), d.prompt_logprobs or [], strict=False):
            tokens.append(piece)
            token_logprobs.append(None if entry is None else _lp(entry.logprob))
            top_logprobs.append(None if entry is None else _top_dict(entry))
    for piece, tl in zip(c.detok.pieces(d.token_ids), d.logprobs, strict=False):
        tokens.append(piece)
        token_logprobs.append(_lp(tl.logprob))
        top_logprobs.append(_top_dict(tl))
    text_offset = []
    for piece in tokens:
        text_offset.append(c.offset)
        c.offset += len(piece)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def completion_piece(c: Choice, d: Delta, echo: bool, logprobs: bool) -> dict[str, Any] | None:
    """One Delta as a completions choice (a stream chunk's, or a part of the whole answer); None: nothing new."""
    first, c.started = not c.started, True
    text = (c.prompt_text if first and echo else "") + d.text
    c.completion_tokens += len(d.token_ids)
    c.finish_reason = d.finish_reason or c.finish_reason
    lp = legacy_logprobs(c, d, with_prompt=first and echo) if logprobs else None
    if not text and d.finish_reason is None and not (lp and lp["tokens"]):
        return None
    return {"index": c.index, "text": text, "logprobs": lp, "finish_reason": d.finish_reason}


def _chat_logprob(c: Choice, tl: TokenLogprob) -> dict[str, Any]:
    return {"token": tl.token, "logprob": _lp(tl.logprob), "bytes": list(c.detok.token_bytes(tl.token_id)),
            "top_logprobs": [{"token": t, "logprob": _lp(lp), "bytes": list(t.encode())} for t, lp in tl.top]}


def chat_piece(c: Choice, d: Delta, logprobs: bool) -> dict[str, Any] | None:
    first, c.started = not c.started, True
    c.completion_tokens += len(d.token_ids)
    c.finish_reason = d.finish_reason or c.finish_reason
    lp = {"content": [_chat_logprob(c, tl) for tl in d.logprobs]} if logprobs else None
    if not first and not d.text and d.finish_reason is None and not (lp and lp["content"]):
        return None
    delta = {"role": "assistant", "content": d.text} if first else {"content": d.text}
    return {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": d.finish_reason}


def usage(choices: list[Choice]) -> dict[str, int]:
    prompt = sum(len(c.prompt_ids) for c in choices)
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


def error_body(e: Exception) -> dict[str, Any]:
    """An exception as an error object; an unexpected one is logged and becomes a generic 500."""
    if isinstance(e, APIError):
        return e.body()
    return engine_error(e).body()


async def _until_disconnected(request: Request) -> None:
    # the body has been read: the next message is http.disconnect (client gone, or the response is done)
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ----------------------------------------------------------------- the app


class CountRequests:
    """ASGI middleware over every /v1/ request: adds `x-moeops-model-version` to the response when a version was
    chosen (the route records it in the request state; errors and streams included), and counts the request into
    moeops_requests_total{model_version, status, tenant} with the version from that header (the engine that
    answered, not whichever is current now; "none" when no version was chosen) and the tenant's name ("" without
    tenants or without a valid key). Probes and scrapes are not counted: they would drown the traffic a canary is
    judged on."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        status, version = 500, "none"

        async def send_(message) -> None:
            nonlocal status, version
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                named = [v.decode("latin-1") for k, v in headers if k.lower() == VERSION_HEADER.encode()]
                if not named and state.get("model_version"):
                    named = [state["model_version"]]
                    headers.append((VERSION_HEADER.encode(), named[0].encode("latin-1")))
                    message = {**message, "headers": headers}
                version = named[0] if named else "none"
            await send(message)

        try:
            await self.app(scope, receive, send_)
        finally:
            tenant = state.get("tenant")
            metrics.REQUESTS.labels(version, str(status), tenant.name if tenant is not None else "").inc()


class Authenticate:
    """ASGI middleware, only when the server has tenants: every /v1/ request needs a tenant's
    `Authorization: Bearer <key>` (else 401 before anything else is read), and the tenant goes into the request
    state; a request the route admitted against the tenant's limits is released here when it ends, whatever the
    outcome (answered, streamed to the end, failed, or the client went away)."""

    def __init__(self, app, tenants: Tenants) -> None:
        self.app, self.tenants = app, tenants

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        auth = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"authorization"), "")
        scheme, _, key = auth.strip().partition(" ")
        tenant = self.tenants.authenticate(key.strip() if scheme.lower() == "bearer" else None)
        if tenant is None:
            why = "a wrong API key" if auth else "no API key (Authorization: Bearer <key>)"
            error = APIError(401, f"Incorrect API key provided: the request has {why}", code="invalid_api_key",
                             headers={"WWW-Authenticate": "Bearer"})
            await error.response()(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["tenant"] = tenant
        try:
            await self.app(scope, receive, send)
        finally:
            if state.get("admitted"):
                self.tenants.release(tenant)


def create_app(router: Router, *, max_prompt_tokens: int, max_new_tokens: int,
               tenants: Tenants | None = None) -> FastAPI:
    """The FastAPI app over `router`. max_prompt_tokens: 0 = the model's context; max_new_tokens: the most
    tokens one sequence may ask for; tenants: None = an open API (no keys, no limits)."""
    app = FastAPI(title="moeops", version="1", summary="OpenAI-compatible serving of the moeops registry's model",
                  description=__doc__)
    app.state.draining = False
    app.state.router = router
    started_at = int(time.time())
    if tenants is not None:
        app.add_middleware(Authenticate, tenants=tenants)
    app.add_middleware(CountRequests)  # added last: the outermost, so that 401s are counted too

    def openapi() -> dict[str, Any]:
        # answers are 400 with an error object, never FastAPI's 422: drop it from the documented responses
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                                 description=app.description, routes=app.routes)
            for ops in schema["paths"].values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            components = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            document_server_limits(components, router.model_name, max_new_tokens)
            if tenants is not None:  # the same key for every /v1 route; health, version and metrics stay open
                schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                for path, ops in schema["paths"].items():
                    if path.startswith("/v1/"):
                        for op in ops.values():
                            op["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> Response:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> Response:
        return validation_error(e).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> Response:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, str(e.detail), type=kind, headers=e.headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> Response:
        # uvicorn logs the traceback (Starlette re-raises after this answer): one line here names the route
        log.error("unexpected error answering %s %s: %s: %s", request.method, request.url.path, type(e).__name__, e)
        return APIError(500, "internal server error", type="server_error", code="internal_error").response()

    def route(model: str, request: Request, user: str | None):
        if app.state.draining:
            raise engine_error(EngineClosed("the server is shutting down"))
        caller = user or request.headers.get(SESSION_HEADER)
        tenant: Tenant | None = getattr(request.state, "tenant", None)
        key = None if not caller else f"{tenant.name if tenant else ''}\0{caller}"  # sticky per tenant + caller
        try:
            engine = router.get(model, key)
        except KeyError:
            raise APIError(404, f"The model `{model}` does not exist; this server serves "
                                f"{', '.join(router.served_models())}", param="model",
                           code="model_not_found") from None
        except EngineClosed as e:
            raise engine_error(e) from None
        request.state.model_version = engine.version
        return engine

    def admit(request: Request, plans: list[tuple[list[int], SamplingParams]]) -> None:
        """Count the request against its tenant's limits (prompt + max new tokens), once; released when the
        request ends (Authenticate)."""
        tenant: Tenant | None = getattr(request.state, "tenant", None)
        if tenants is None or tenant is None or getattr(request.state, "admitted", False):
            return
        try:
            tenants.admit(tenant, sum(len(ids) + p.max_tokens for ids, p in plans))
        except RateLimited as e:
            raise engine_error(e) from None
        request.state.admitted = True

    async def open_generation(request: Request, model: str, user: str | None, plan
                              ) -> tuple[Any, list[Choice], Generation]:
        """Route, validate against the engine, admit, start every sequence and wait for their first Deltas. A
        hot reload (or a retired challenger) may close the routed engine in between: then the request is routed
        again."""
        tenant: Tenant | None = getattr(request.state, "tenant", None)
        for attempt in range(3):
            engine = route(model, request, user)
            choices, plans = plan(engine)
            admit(request, plans)
            gen = Generation(engine, plans, tenant.name if tenant is not None else "")
            try:
                await gen.started()
                return engine, choices, gen
            except EngineClosed as e:
                gen.cancel()
                if attempt == 2 or router.current is None or router.serves(engine):
                    raise engine_error(e) from None
            except BaseException as e:
                gen.cancel()
                if isinstance(e, Exception) and not isinstance(e, APIError):
                    raise engine_error(e) from None
                raise
        raise AssertionError("unreachable")

    async def answer(request: Request, gen: Generation, choices: list[Choice], head: dict[str, Any], piece,
                     stream: bool, include_usage: bool, merge) -> Response:
        if stream:
            return StreamingResponse(_sse(gen, choices, head, piece, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        parts: dict[int, dict[str, Any]] = {}

        async def collect() -> None:
            async for i, d in gen.deltas():
                p = piece(choices[i], d)
                if p is not None:
                    parts[i] = merge(parts.get(i), p)

        work = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_until_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            client_left = not work.done()
            if client_left:  # stop generating for nobody
                work.cancel()
            gen.cancel()
        if client_left:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        e = work.exception()
        if e is not None:
            raise e if isinstance(e, APIError) else engine_error(e)
        return JSONResponse({**head, "choices": [parts[c.index] for c in choices], "usage": usage(choices)})

    @app.post("/v1/completions", responses=_generation_responses(CompletionResponse), response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """OpenAI's (legacy) completions."""
        check_common(body)
        echo = bool(body.echo)
        want_logprobs = body.logprobs is not None
        requested, param = requested_tokens(body, max_new_tokens)
        stop = stop_strings(body.stop)

        def plan(engine):
            choices, plans = [], []
            prompts = prompt_ids(body.prompt, engine.tokenizer)
            for i, (text, ids) in enumerate(prompts):
                which = f"prompt {i} " if len(prompts) > 1 else "the prompt "
                check_prompt(ids, engine.max_seq_len, max_prompt_tokens, which, "prompt")
                n = new_tokens(requested, len(ids), engine.max_seq_len, max_new_tokens, param)
                choices.append(Choice(i, text, ids, engine.tokenizer))
                plans.append((ids, sampling(body, n, stop, body.logprobs, echo and want_logprobs)))
            return choices, plans

        engine, choices, gen = await open_generation(request, body.model, body.user, plan)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model, "system_fingerprint": f"{router.model_name}@{engine.version}"}

        def merge(acc: dict[str, Any] | None, p: dict[str, Any]) -> dict[str, Any]:
            if acc is None:
                return p
            acc["text"] += p["text"]
            if p["logprobs"] is not None:
                for k, v in p["logprobs"].items():
                    acc["logprobs"][k].extend(v)
            acc["finish_reason"] = p["finish_reason"] or acc["finish_reason"]
            return acc

        return await answer(request, gen, choices, head, lambda c, d: completion_piece(c, d, echo, want_logprobs),
                            bool(body.stream), bool(body.stream_options and body.stream_options.include_usage),
                            merge)

    @app.post("/v1/chat/completions", responses=_generation_responses(ChatCompletionResponse), response_model=None)
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        """OpenAI's chat completions over the plain template (module docstring)."""
        check_common(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        want_logprobs = bool(body.logprobs)
        requested, param = requested_tokens(body, max_new_tokens)
        stop = (*stop_strings(body.stop), CHAT_STOP)
        text = chat_prompt(body.messages)

        def plan(engine):
            ids = engine.tokenizer.encode(text).ids
            check_prompt(ids, engine.max_seq_len, max_prompt_tokens, "the conversation ", "messages")
            if len(ids) >= engine.max_seq_len:
                raise APIError(400, f"messages: the conversation is {len(ids)} tokens and fills the model's context "
                                    f"({engine.max_seq_len}); no room for an answer", param="messages")
            n = new_tokens(requested, len(ids), engine.max_seq_len, max_new_tokens, param)
            top = (body.top_logprobs or 0) if want_logprobs else None
            return [Choice(0, text, ids, engine.tokenizer)], [(ids, sampling(body, n, stop, top, False))]

        engine, choices, gen = await open_generation(request, body.model, body.user, plan)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model,
                "system_fingerprint": f"{router.model_name}@{engine.version}"}

        def merge(acc: dict[str, Any] | None, p: dict[str, Any]) -> dict[str, Any]:
            if acc is None:
                acc = {"index": p["index"], "message": {"role": "assistant", "content": ""},
                       "logprobs": {"content": []} if want_logprobs else None, "finish_reason": None}
            acc["message"]["content"] += p["delta"]["content"]
            if p["logprobs"] is not None:
                acc["logprobs"]["content"].extend(p["logprobs"]["content"])
            acc["finish_reason"] = p["finish_reason"] or acc["finish_reason"]
            return acc

        stream = bool(body.stream)
        head["object"] = "chat.completion.chunk" if stream else "chat.completion"
        return await answer(request, gen, choices, head, lambda c, d: chat_piece(c, d, want_logprobs), stream,
                            bool(body.stream_options and body.stream_options.include_usage), merge)

    def model_card(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": started_at, "owned_by": "moeops"}

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(m) for m in router.served_models()]}

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses=ERRORS)
    async def model(model_id: str) -> dict[str, Any]:
        if model_id not in router.served_models():
            raise APIError(404, f"The model `{model_id}` does not exist", param="model", code="model_not_found")
        return model_card(model_id)

    @app.get("/health/live", response_model=Health)
    async def live() -> dict[str, Any]:
        return {"status": "live"}

    @app.get("/health/ready", response_model=Health, responses={503: _ERROR})
    async def ready() -> Response:
        engine = router.current
        if app.state.draining or engine is None:
            why = "draining" if app.state.draining else "loading"
            return APIError(503, f"not ready: {why}", type="server_error", code=why).response()
        return JSONResponse({"status": "ready", "version": engine.version})

    @app.get("/version", response_model=VersionInfo, responses={503: _ERROR})
    async def version() -> dict[str, Any]:
        e, challenger, weight = router.current, router.challenger, router.weight
        if e is None:
            raise engine_error(EngineClosed("no model version loaded yet"))
        return {"model": router.model_name, "version": e.version,
                "challenger": challenger.version if challenger is not None else None,
                "challenger_weight": weight if challenger is not None else 0.0,
                "variant": e.variant, "sha256": e.sha256,
                "max_seq_len": e.max_seq_len, "ort_version": e.ort_version, "provider": e.provider,
                "cache_hit": bool(e.cache_hit), "load_seconds": float(e.load_seconds),
                "warmup_seconds": float(e.warmup_seconds)}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _sse(gen: Generation, choices: list[Choice], head: dict[str, Any], piece, include_usage: bool
               ) -> AsyncIterator[str]:
    """The OpenAI chunk stream; a client that goes away cancels this, and the finally cancels the sequences."""
    extra = {"usage": None} if include_usage else {}
    try:
        async for i, d in gen.deltas():
            p = piece(choices[i], d)
            if p is not None:
                yield _event({**head, "choices": [p], **extra})
        if include_usage:
            yield _event({**head, "choices": [], "usage": usage(choices)})
    except Exception as e:  # the status line is out: the error goes in the stream, as OpenAI's does
        yield _event(error_body(e))
    finally:
        gen.cancel()
    yield "data: [DONE]\n\n"
