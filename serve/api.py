"""The OpenAI API subset clients use, for every size of one family: /v1/models, /v1/chat/completions,
/v1/completions (streamed as server-sent events or whole), /health.

Completions take a prompt as text, as token ids, or a list of either (one choice per prompt), and answer
`logprobs: N` (the chosen token's log-probability and the N most likely, N <= 5) and `echo` (the prompt
returned before the completion, scored too), which is what scoring harnesses such as lm-eval's
`local-completions` send: `echo, logprobs: 1, max_tokens: 0 or 1` on token ids.

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a bad parameter
(named in `param`), 401 for a missing or wrong key, 404 for an unknown model, 429 when the queue is
full, 503 while the family is loading.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from boomerang.errors import BoomerangError, excerpt
from boomerang.generation import Sampling, prompt_ids
from serve.family import ServedFamily
from serve.scheduler import Job, QueueFull, Scheduler


@dataclass
class ServerState:
    """What the routes read; `family` and `scheduler` are set once loading has finished."""

    api_key: str | None = None
    family: ServedFamily | None = None
    scheduler: Scheduler | None = None
    error: str | None = None
    """Why loading failed, if it did."""
    started: float = field(default_factory=time.time)


class ApiError(Exception):
    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             405: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def make_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="Boomerang Studio: every size of a family through the OpenAI API", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # an unknown path, a wrong method
        what = {404: f"no route {request.url.path}: the API serves /v1/models, /v1/completions and "
                     "/v1/chat/completions", 405: f"{request.method} is not allowed on {request.url.path}"}
        return ApiError(exc.status_code, what.get(exc.status_code, str(exc.detail))).response()

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if state.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not given.startswith("Bearer "):
                return ApiError(401, "missing API key: send 'Authorization: Bearer KEY'", code="missing_api_key").response()
            if given.removeprefix("Bearer ").strip() != state.api_key:
                return ApiError(401, "wrong API key", code="invalid_api_key").response()
        return await call_next(request)

    @app.get("/health")
    async def health():
        if state.error:
            return JSONResponse({"status": "error", "error": state.error}, status_code=503)
        if state.scheduler is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "family": state.family.name, "sizes": len(state.family.sizes),
                **state.scheduler.load()}

    @app.get("/v1/models")
    async def models():
        family = ready(state)
        created = int(state.started)
        data = [{"id": s.name, "object": "model", "created": created, "owned_by": "boomerang", "layers": n,
                 "parameters": s.params, "kind": s.kind, "prefill_ms": family.latency_ms.get(n)}
                for n, s in sorted(family.sizes.items())]
        data += [{"id": alias, "object": "model", "created": created, "owned_by": "boomerang", "layers": n,
                  "parameters": family.sizes[n].params, "alias_of": family.sizes[n].name}
                 for alias, n in family.aliases().items()]
        data.append({"id": f"{family.name}-auto", "object": "model", "created": created, "owned_by": "boomerang",
                     "budget": "max_params | max_latency_ms: the largest size that fits"})
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        family = ready(state)
        prompt = prompt_ids(family.tokenizer, parse_messages(body))[0].tolist()
        return await complete(request, state, body, prompt, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        family = ready(state)
        prompts = parse_prompts(body.get("prompt"), family)
        if len(prompts) == 1:
            return await complete(request, state, body, prompts[0], chat=False)
        if body.get("stream"):
            raise ApiError(400, "stream takes one prompt: send the prompts as separate requests", param="stream")
        answers = await asyncio.gather(*(complete(request, state, body, p, chat=False) for p in prompts))
        if any(isinstance(a, JSONResponse) for a in answers):  # the client went away
            return JSONResponse({}, status_code=499)
        usage = {k: sum(a["usage"][k] for a in answers) for k in answers[0]["usage"]}
        choices = [{**a["choices"][0], "index": i} for i, a in enumerate(answers)]
        return {**answers[0], "choices": choices, "usage": usage}

    return app


MAX_PROMPTS = 64
"""Prompts in one completions request."""


def parse_prompts(prompt, family: ServedFamily) -> list[list[int]]:
    """A completions `prompt` (text, token ids, or a list of either) as token ids, one list per prompt."""
    def ids_of(p, where: str) -> list[int]:
        if isinstance(p, str) and p:
            return family.tokenizer(p).input_ids
        vocab = family.family.teacher.config.vocab_size
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if not all(0 <= t < vocab for t in p):
                raise ApiError(400, f"{where}: token ids must lie in [0, {vocab})", param="prompt")
            return list(p)
        raise ApiError(400, f"{where} must be a non-empty string or a non-empty list of token ids", param="prompt")

    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > MAX_PROMPTS:
            raise ApiError(400, f"at most {MAX_PROMPTS} prompts per request, got {len(prompt)}", param="prompt")
        return [ids_of(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    return [ids_of(prompt, "prompt")]


def ready(state: ServerState) -> ServedFamily:
    if state.error:
        raise ApiError(503, f"the family failed to load: {state.error}", code="load_failed")
    if state.scheduler is None:
        raise ApiError(503, "the family is still loading; try again in a few seconds", code="loading")
    return state.family


async def read_body(request: Request) -> dict:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise ApiError(400, f"messages[{i}] needs a role: system, user or assistant", param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text parts are understood
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", param=f"messages[{i}].content")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def number(body: dict, name: str, kind: type, default):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise ApiError(400, f"{name} must be {'an integer' if kind is int else 'a number'}, got {excerpt(value, 40)}",
                       param=name)
    return kind(value)


UNSUPPORTED = ("logprobs", "top_logprobs")
"""Chat parameters that change what a reply holds and that this server does not compute (completions answer
`logprobs` and `echo`)."""
MAX_LOGPROBS = 5
"""The most alternatives `logprobs` may ask for (OpenAI's limit)."""


@dataclass(frozen=True)
class Scoring:
    """What a completion returns besides its text: `logprobs` alternatives per token (None: no logprobs) and
    whether the prompt is echoed (and scored) before it."""

    logprobs: int | None = None
    echo: bool = False


def parse_scoring(body: dict, chat: bool) -> Scoring:
    if chat:
        for name in UNSUPPORTED + ("echo",):  # asked for and silently left out, a harness would score garbage
            if body.get(name) not in (None, False, 0):
                raise ApiError(400, f"{name} is not supported on chat completions: use /v1/completions", param=name,
                               code="unsupported_parameter")
        return Scoring()
    if body.get("top_logprobs") not in (None, 0):
        raise ApiError(400, "top_logprobs belongs to chat completions; on completions, logprobs: N gives the N most "
                            "likely tokens", param="top_logprobs", code="unsupported_parameter")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise ApiError(400, f"echo must be true or false, got {excerpt(echo, 40)}", param="echo")
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = number(body, "logprobs", int, None)
        if not 0 <= logprobs <= MAX_LOGPROBS:
            raise ApiError(400, f"logprobs must be between 0 and {MAX_LOGPROBS}, got {logprobs}", param="logprobs")
    if body.get("stream") and (echo or logprobs is not None):
        raise ApiError(400, "echo and logprobs are answered on whole replies: leave out stream", param="stream",
                       code="unsupported_parameter")
    return Scoring(logprobs, echo)


def parse_request(body: dict, family: ServedFamily, *, scoring_only: bool = False) -> tuple[int, Sampling, list[str]]:
    """(layers, sampling, stop strings) from a completion request; ApiError names the bad parameter.

    `scoring_only`: an echoed prompt with max_tokens 0 (nothing is generated; the sampling is not used)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required: one of GET /v1/models", param="model")
    if number(body, "n", int, 1) != 1:
        raise ApiError(400, "n must be 1 (one choice per request)", param="n")
    budget = {k: number(body, k, float, None) for k in ("max_params", "max_latency_ms")}
    try:
        n_layers = family.resolve(model, **budget)
    except LookupError:
        raise ApiError(404, f"the model {excerpt(model, 80)} does not exist: GET /v1/models lists this family's sizes",
                       param="model", code="model_not_found") from None
    except BoomerangError as exc:
        raise ApiError(400, str(exc), param="max_params" if budget["max_params"] is not None else "max_latency_ms") from None
    max_tokens = number(body, "max_completion_tokens", int, None) or number(body, "max_tokens", int, 256)
    if scoring_only:
        max_tokens = 1
    values = {"max_new_tokens": max_tokens, "temperature": number(body, "temperature", float, 1.0),
              "top_p": number(body, "top_p", float, 1.0), "seed": number(body, "seed", int, 0)}
    try:
        sampling = Sampling(**values)
    except BoomerangError as exc:
        param = next((k for k in values if str(exc).startswith(k)), None)
        raise ApiError(400, str(exc).replace("max_new_tokens", "max_tokens"),
                       param="max_tokens" if param == "max_new_tokens" else param) from None
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", param="stop")
    return n_layers, sampling, stop


class Reply:
    """One request's text as it grows: decoded incrementally, cut at a stop string, handed to the event loop."""

    DONE = object()

    def __init__(self, tokenizer, stop: list[str], loop: asyncio.AbstractEventLoop):
        self.tokenizer, self.stop, self.loop = tokenizer, stop, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ids: list[int] = []
        self.text, self.sent, self.finish = "", 0, None
        self.hold = max((len(s) for s in stop), default=1) - 1  # a stop string may still be forming

    def on_token(self, token: int) -> bool:
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.finish = self.text[:min(hits)], "stop"
            self._push(len(self.text))
            return False
        if not self.text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            self._push(len(self.text) - self.hold)
        return True

    def kept_ids(self) -> list[int]:
        """The generated ids behind the text kept: a stop string cuts the text, and its tokens are not kept."""
        if self.finish != "stop" or not self.stop:
            return list(self.ids)
        for k in range(len(self.ids) + 1):
            if len(self.tokenizer.decode(self.ids[:k], skip_special_tokens=True)) >= len(self.text):
                return self.ids[:k]
        return list(self.ids)

    def on_done(self, job: Job) -> None:
        if job.error:
            self.finish = "error"
        elif self.finish is None:
            self.finish = "length" if job.row is not None and job.row.reason == "length" else "stop"
        self._push(len(self.text))
        self.loop.call_soon_threadsafe(self.queue.put_nowait, self.DONE)

    def _push(self, end: int) -> None:
        if end > self.sent:
            delta, self.sent = self.text[self.sent:end], end
            self.loop.call_soon_threadsafe(self.queue.put_nowait, delta)


async def complete(request: Request, state: ServerState, body: dict, prompt: list[int], *, chat: bool):
    family = ready(state)
    scoring = parse_scoring(body, chat)
    score_only = scoring.echo and body.get("max_tokens") == 0
    n_layers, sampling, stop = parse_request(body, family, scoring_only=score_only)
    new_tokens = 0 if score_only else sampling.max_new_tokens
    context = getattr(family.family.teacher.config, "max_position_embeddings", None)
    if context and len(prompt) + new_tokens > context:
        raise ApiError(400, f"the prompt ({len(prompt)} tokens) and max_tokens ({new_tokens}) exceed the "
                            f"context of {context} tokens", param="messages" if chat else "prompt",
                       code="context_length_exceeded")
    meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": family.sizes[n_layers].name}
    if score_only:
        choice = {"index": 0, "text": family.tokenizer.decode(prompt), "finish_reason": "length",
                  "logprobs": await score(family, n_layers, prompt, [], scoring)}
        return {**meta, "object": "text_completion", "choices": [choice],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": 0, "total_tokens": len(prompt)}}
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, "ignore_eos must be true or false", param="ignore_eos")
    reply = Reply(family.tokenizer, stop, asyncio.get_running_loop())
    job = Job(n_layers, prompt, sampling, reply.on_token, reply.on_done, ignore_eos=ignore_eos)
    try:
        state.scheduler.submit(job)
    except QueueFull as exc:
        raise ApiError(429, str(exc), code="queue_full") from None
    if body.get("stream"):
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(stream(reply, job, meta, prompt, chat, usage), media_type="text/event-stream")
    answer = await whole(request, reply, job, meta, prompt, chat)
    if isinstance(answer, dict) and (scoring.echo or scoring.logprobs is not None):
        choice = answer["choices"][0]
        if scoring.echo:
            choice["text"] = family.tokenizer.decode(prompt) + choice["text"]
        if scoring.logprobs is not None:
            choice["logprobs"] = await score(family, n_layers, prompt, reply.kept_ids(), scoring)
    return answer


async def score(family: ServedFamily, n_layers: int, prompt: list[int], generated: list[int], scoring: Scoring) -> dict:
    """OpenAI's completions `logprobs` object for the generated tokens (and the prompt's, if echoed): one
    forward pass of the size over prompt + generated, in a thread (the event loop stays free)."""
    def run() -> dict:
        model = family.build(n_layers)
        ids = prompt + generated
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        first = 0 if scoring.echo else len(prompt)
        tokens, token_logprobs, top, offsets, at = [], [], [], [], 0
        for i in range(first, len(ids)):
            piece = family.tokenizer.decode([ids[i]])
            tokens.append(piece)
            offsets.append(at)
            at += len(piece)
            if i == 0:  # the first token has no context to be scored on
                token_logprobs.append(None)
                top.append(None)
                continue
            token_logprobs.append(float(logp[i - 1, ids[i]]))
            if scoring.logprobs:
                values, idx = logp[i - 1].topk(scoring.logprobs)
                top.append({family.tokenizer.decode([int(t)]): float(v) for v, t in zip(values, idx, strict=True)})
            else:
                top.append(None)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    return await asyncio.to_thread(run)


def usage_of(prompt: list[int], job: Job) -> dict:
    done = job.row.generated if job.row is not None else 0
    return {"prompt_tokens": len(prompt), "completion_tokens": done, "total_tokens": len(prompt) + done}


async def whole(request: Request, reply: Reply, job: Job, meta: dict, prompt: list[int], chat: bool):
    text = []
    while True:
        try:
            item = await asyncio.wait_for(reply.queue.get(), timeout=0.1)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()  # nobody will read the answer: stop making it
                return JSONResponse({}, status_code=499)
            continue
        if item is Reply.DONE:
            break
        text.append(item)
    if job.error:
        raise ApiError(500, f"generation failed: {job.error}", code="generation_failed")
    content = "".join(text)
    choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": reply.finish}
              if chat else {"index": 0, "text": content, "finish_reason": reply.finish, "logprobs": None})
    return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
            "usage": usage_of(prompt, job)}


async def stream(reply: Reply, job: Job, meta: dict, prompt: list[int], chat: bool, usage: bool):
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish: str | None = None, first: bool = False) -> str:
        if chat:
            d = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta is not None else {})
            choice = {"index": 0, "delta": d, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        return f"data: {json.dumps({**meta, 'object': kind, 'choices': [choice]})}\n\n"

    try:
        if chat:
            yield chunk(None, first=True)
        while (item := await reply.queue.get()) is not Reply.DONE:
            yield chunk(item)
        if job.error:
            yield f"data: {json.dumps({'error': {'message': job.error, 'type': 'server_error'}})}\n\n"
        yield chunk(None, reply.finish)
        if usage:
            yield f"data: {json.dumps({**meta, 'object': kind, 'choices': [], 'usage': usage_of(prompt, job)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # the client went away (or the stream ended): the row leaves its batch


def load_in_background(state: ServerState, load) -> threading.Thread:
    """Run `load()` (-> (family, scheduler)) in a thread; the routes answer 503 until it is done."""

    def run():
        try:
            state.family, scheduler = load()
            state.scheduler = scheduler
        except Exception as exc:  # reported by /health and every route
            state.error = str(exc) if isinstance(exc, BoomerangError) else f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=run, daemon=True, name="load-family")
    thread.start()
    return thread
