"""`lmforge serve`: a model behind a web page that collects human feedback, and behind an
OpenAI-compatible API.

Routes:
- `GET /`, `GET /judgements`: the feedback web app (static files, no build step);
- `GET /api/config`, `POST /api/respond` (streams NDJSON), `POST /api/judgements`,
  `GET /api/judgements`: what the page uses; responses and judgements go to SQLite;
- `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`: the OpenAI API
  (streaming as server-sent events), stateless.

Every error is `{"error": {"message", "type"}}` with a 4xx status, raised before anything is
stored. With a token, every /api and /v1 route but /api/config needs `Authorization: Bearer`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from lmforge.io import load_model_dir, sha256_file
from lmforge.serve.engine import Engine, Event, Sampling
from lmforge.serve.engine import Request as EngineRequest
from lmforge.serve.store import Conflict, FeedbackStore, NotFound
from lmforge.tokenizer import Tokenizer

STATIC = Path(__file__).parent / "static"
# scripts and styles only from this server: model or user text that slipped into the DOM as
# HTML still could not run
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; frame-ancestors 'none'"  # no framing: no clickjacked judgements
)


@dataclass
class Limits:
    max_tokens: int = 512  # per answer
    max_prompt_tokens: int = 0  # 0: the model's context less one token
    max_body_bytes: int = 256 * 1024
    max_k: int = 8  # answers per prompt in the web app (ranking K, n)
    default_max_tokens: int = 128
    default_temperature: float = 0.8
    default_top_p: float = 0.95


class ApiError(HTTPException):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(status, message)
        self.kind = kind


# ---- request bodies ------------------------------------------------------------------------
def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode text (a lone surrogate)") from None
    return text


def _not_blank(name: str) -> str:
    if not name.strip():
        raise ValueError("must not be blank")
    return name.strip()


Text = Annotated[str, AfterValidator(_utf8)]
AnnotatorName = Annotated[Text, Field(min_length=1, max_length=64), AfterValidator(_not_blank)]
RowId = Annotated[int, Field(ge=1, le=2**63 - 1)]  # SQLite's integer range


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: Text


class RespondBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[Message] = []
    n: int = Field(1, ge=1)
    prompt_id: RowId | None = None  # regenerate: more answers to a stored prompt
    conversation_id: RowId | None = None
    annotator: AnnotatorName
    mode: Literal["chat", "side_by_side", "ranking"] = "chat"
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)


class JudgementBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["pair", "ranking"]
    response_ids: list[RowId]
    choice: Literal["a", "b", "tie"] | None = None
    annotator: AnnotatorName
    source: Literal["regenerate", "side_by_side", "ranking", "api"] = "api"
    request_id: Text | None = Field(None, min_length=1, max_length=128)

    @model_validator(mode="after")
    def _shape(self) -> JudgementBody:
        if len(set(self.response_ids)) != len(self.response_ids):
            raise ValueError("response_ids must be distinct")
        if self.kind == "pair" and (len(self.response_ids) != 2 or self.choice is None):
            raise ValueError("a pair judgement needs 2 response_ids and a choice (a, b or tie)")
        if self.kind == "ranking" and (len(self.response_ids) < 2 or self.choice is not None):
            raise ValueError("a ranking needs 2 or more response_ids, best first, and no choice")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[dict]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if any(part.get("type") != "text" for part in self.content):
            raise ApiError(400, "only text content parts are supported")
        return _utf8("".join(str(part.get("text", "")) for part in self.content))


class OpenAISampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send options we do not use
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with usage

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 4 or not all(stops):
            raise ApiError(400, "stop: at most 4 non-empty strings")
        return tuple(stops)


class ChatCompletionBody(OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionBody(OpenAISampling):
    prompt: Text
    max_tokens: int | None = Field(16, ge=1)  # the OpenAI default for completions


# ---- the app --------------------------------------------------------------------------------
class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, by declared length or as they stream."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > self.limit:
            response = _error(413, f"request body over {self.limit} bytes", "request_too_large")
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, f"request body over {self.limit} bytes", "request_too_large")
            return message

        return await self.app(scope, counted, send)


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "malformed JSON body: " + "; ".join(
            f"{e.get('msg')} at character {e['loc'][-1]}" for e in errors
        )
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return 422, "; ".join(parts)


class Service:
    """What the routes share: the engine, the store, the tokenizer and the limits."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        store: FeedbackStore,
        model_name: str,
        context: int,
        limits: Limits,
        model_id: str | None = None,
    ):
        self.engine, self.tokenizer, self.store = engine, tokenizer, store
        self.model_name, self.context, self.limits = model_name, context, limits
        self.model_id = model_id or model_name  # stored with each response
        self.max_prompt_tokens = limits.max_prompt_tokens or context - 1

    def budget(self, prompt: list[int], requested: int | None) -> int:
        """Tokens this prompt may be answered with; a 400 when it does not fit."""
        if len(prompt) > self.max_prompt_tokens:
            raise ApiError(
                400,
                f"the prompt is {len(prompt)} tokens; this server takes at most "
                f"{self.max_prompt_tokens} (the model's context is {self.context})",
                "context_length_exceeded",
            )
        requested = requested or self.limits.default_max_tokens
        if requested > self.limits.max_tokens:
            raise ApiError(
                400,
                f"max_tokens {requested} is over this server's limit of {self.limits.max_tokens}",
            )
        return min(requested, self.context - len(prompt))

    def check_n(self, n: int, most: int) -> None:
        if n > most:
            raise ApiError(400, f"n={n}: at most {most} answers per request")

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        if not messages:
            raise ApiError(422, "messages: at least one message is needed")
        try:
            return self.tokenizer.render_chat(messages, add_generation_prompt=True)[0]
        except ValueError as e:
            raise ApiError(422, f"messages: {e}") from None

    async def events(
        self,
        prompt: list[int],
        n: int,
        max_tokens: int,
        sampling: Sampling,
        stops=(),
        client: Request | None = None,
    ) -> AsyncIterator[Event]:
        """The engine's events for one request, until all n answers have ended. Leaving early
        (a streaming client that hung up) cancels the request in the engine; so does `client`
        disconnecting, checked while no event comes (for replies that are not streamed)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        request = EngineRequest(
            prompt,
            n,
            max_tokens,
            sampling,
            lambda e: loop.call_soon_threadsafe(events.put_nowait, e),
            stops,
        )
        self.engine.submit(request)
        ended = 0
        try:
            while ended < n:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if client is not None and await client.is_disconnected():
                        return
                    continue
                if event.error:
                    raise RuntimeError(event.error)
                ended += event.finish_reason is not None
                yield event
        finally:
            request.cancelled.set()


def create_app(
    service: Service,
    token: str | None = None,
    on_shutdown: Callable[[], None] | None = None,
    allowed_hosts: Sequence[str] = ("127.0.0.1", "localhost", "[::1]"),
) -> FastAPI:
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=service.limits.max_body_bytes)
    # a page elsewhere that rebinds its DNS name to 127.0.0.1 sends its own Host: refuse it
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    if on_shutdown is not None:
        app.router.on_shutdown.append(on_shutdown)

    @app.exception_handler(StarletteHTTPException)  # the router's 404 and 405 too
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {401: "unauthorized", 404: "not_found", 409: "conflict", 413: "request_too_large"}
        kind = getattr(exc, "kind", None) or kinds.get(exc.status_code, "invalid_request_error")
        response = _error(exc.status_code, str(exc.detail), kind)
        if exc.status_code == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = _validation_message(exc)
        return _error(status, message, "invalid_request_error")

    def authorised(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ApiError(
                401, "missing or wrong access token (Authorization: Bearer ...)", "unauthorized"
            )

    page_headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=page_headers)

    @app.get("/judgements", include_in_schema=False)
    def judgements_page() -> FileResponse:
        return FileResponse(STATIC / "judgements.html", headers=page_headers)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    limits = service.limits

    @app.get("/api/config")
    def config() -> dict:
        return {
            "model": service.model_name,
            "auth_required": token is not None,
            "max_tokens_limit": limits.max_tokens,
            "max_prompt_tokens": service.max_prompt_tokens,
            "max_k": limits.max_k,
            "defaults": {
                "temperature": limits.default_temperature,
                "top_p": limits.default_top_p,
                "max_tokens": limits.default_max_tokens,
            },
        }

    api = APIRouter(prefix="/api", dependencies=[Depends(authorised)])

    @api.post("/respond")
    async def respond(body: RespondBody) -> StreamingResponse:
        service.check_n(body.n, limits.max_k)
        if body.prompt_id is not None:
            conversation_id, messages = await run_in_threadpool(
                service.store.prompt, body.prompt_id
            )
        else:
            messages = [m.model_dump() for m in body.messages]
            if not messages or messages[-1]["role"] != "user":
                raise ApiError(422, "messages: the last message must be the user's turn to answer")
        prompt = service.chat_prompt(messages)
        max_tokens = service.budget(prompt, body.max_tokens)
        sampling = Sampling(
            body.temperature if body.temperature is not None else limits.default_temperature,
            body.top_p if body.top_p is not None else limits.default_top_p,
        )
        if body.prompt_id is None:
            prompt_id, conversation_id = await run_in_threadpool(
                service.store.add_prompt, body.conversation_id, body.annotator, messages, body.mode
            )
        else:
            prompt_id = body.prompt_id
        settings = {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
        settings |= {"max_tokens": max_tokens, "seed": None}

        async def lines() -> AsyncIterator[str]:
            stored = 0
            yield _line(type="prompt", prompt_id=prompt_id, conversation_id=conversation_id)
            try:
                async for e in service.events(prompt, body.n, max_tokens, sampling):
                    if e.delta:
                        yield _line(type="delta", index=e.index, text=e.delta)
                    if e.finish_reason:
                        rid = await run_in_threadpool(
                            service.store.add_response,
                            prompt_id,
                            e.text,
                            e.finish_reason,
                            service.model_id,
                            settings,
                        )
                        stored += 1
                        yield _line(
                            type="response",
                            index=e.index,
                            response_id=rid,
                            text=e.text,
                            finish_reason=e.finish_reason,
                        )
            except RuntimeError as e:
                yield _line(type="error", message=str(e))
                return
            finally:
                if not stored and body.prompt_id is None:  # failed, or the client left
                    service.store.discard_prompt(prompt_id)
            yield _line(type="done")

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @api.post("/judgements")
    def judge(body: JudgementBody) -> dict:
        if len(body.response_ids) > limits.max_k:
            raise ApiError(422, f"response_ids: a ranking holds at most {limits.max_k} answers")
        jid, duplicate = service.store.add_judgement(
            body.kind, body.source, body.response_ids, body.choice, body.annotator, body.request_id
        )
        return {"id": jid, "duplicate": duplicate}

    @api.get("/stats")
    def stats() -> dict:
        """How much batching the engine did: decoded batches and the rows in them."""
        return {"batches": service.engine.batches, "rows": service.engine.rows}

    @api.get("/judgements")
    def list_judgements(limit: int = 200) -> dict:
        if not 1 <= limit <= 10_000:
            raise ApiError(422, "limit: between 1 and 10000")
        return service.store.judgements(limit)

    app.include_router(api)
    app.include_router(openai_routes(service, authorised))

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
        return _error(404, str(exc), "not_found")

    @app.exception_handler(Conflict)
    async def _conflict(request: Request, exc: Conflict) -> JSONResponse:
        return _error(409, str(exc), "conflict")

    return app


# Streamed JSON is ASCII: a sampled U+2028, U+2029 or U+0085 would otherwise end
# the line for clients that split with str.splitlines (httpx's iter_lines does).
def _line(**fields) -> str:
    return json.dumps(fields) + "\n"


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


# ---- the OpenAI API ---------------------------------------------------------------------------
def openai_routes(service: Service, authorised: Callable) -> APIRouter:
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorised)])
    created = int(time.time())

    def check_model(name: str) -> None:
        if name != service.model_name:
            raise ApiError(
                404,
                f"model {name!r} is not served here (GET /v1/models: {service.model_name!r})",
                "model_not_found",
            )

    @v1.get("/models")
    def models() -> dict:
        card = {
            "id": service.model_name,
            "object": "model",
            "created": created,
            "owned_by": "lmforge",
        }
        return {"object": "list", "data": [card]}

    async def complete(
        body: OpenAISampling, prompt: list[int], requested: int | None, kind: str, client: Request
    ):
        """One OpenAI completion, whole or as server-sent events; `kind` is "chat" or "text"."""
        check_model(body.model)
        service.check_n(body.n, service.engine.max_batch)
        max_tokens = service.budget(prompt, requested)
        sampling = Sampling(body.temperature, body.top_p, 0, body.seed)
        stops = body.stops()
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        obj = "chat.completion" if kind == "chat" else "text_completion"
        head = {"id": rid, "object": obj, "created": int(time.time()), "model": service.model_name}

        def choice(index: int, text: str, finish: str | None, delta: bool) -> dict:
            if kind == "text":
                return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
            key = "delta" if delta else "message"
            content = {"content": text} if delta else {"role": "assistant", "content": text}
            return {
                "index": index,
                key: content if text or not delta else {},
                "finish_reason": finish,
            }

        if not body.stream:
            texts, finishes, used = [""] * body.n, [None] * body.n, 0
            try:
                events = service.events(prompt, body.n, max_tokens, sampling, stops, client)
                async for e in events:
                    if e.finish_reason:
                        texts[e.index], finishes[e.index] = e.text, e.finish_reason
                        used += e.tokens
            except RuntimeError as e:
                raise ApiError(500, str(e), "server_error") from None
            usage = {"prompt_tokens": len(prompt), "completion_tokens": used}
            usage["total_tokens"] = len(prompt) + used
            choices = [choice(i, texts[i], finishes[i], False) for i in range(body.n)]
            return {**head, "choices": choices, "usage": usage}

        async def stream() -> AsyncIterator[str]:
            chunk = {**head, "object": "chat.completion.chunk"} if kind == "chat" else head
            if kind == "chat":
                for i in range(body.n):
                    start = {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                    }
                    yield _sse({**chunk, "choices": [start]})
            used = 0
            try:
                async for e in service.events(prompt, body.n, max_tokens, sampling, stops):
                    if e.delta:
                        yield _sse({**chunk, "choices": [choice(e.index, e.delta, None, True)]})
                    if e.finish_reason:
                        used += e.tokens
                        yield _sse(
                            {**chunk, "choices": [choice(e.index, "", e.finish_reason, True)]}
                        )
            except RuntimeError as e:
                yield _sse({"error": {"message": str(e), "type": "server_error"}})
            if (body.stream_options or {}).get("include_usage"):
                usage = {"prompt_tokens": len(prompt), "completion_tokens": used}
                usage["total_tokens"] = len(prompt) + used
                yield _sse({**chunk, "choices": [], "usage": usage})
            yield _sse("[DONE]")

        return StreamingResponse(stream(), media_type="text/event-stream")

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionBody, request: Request):
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in body.messages
        ]
        prompt = service.chat_prompt(messages)
        requested = body.max_completion_tokens or body.max_tokens
        return await complete(body, prompt, requested, "chat", request)

    @v1.post("/completions")
    async def completions(body: CompletionBody, request: Request):
        prompt = [service.tokenizer.bos_id, *service.tokenizer.encode(body.prompt)]
        return await complete(body, prompt, body.max_tokens, "text", request)

    return v1


# ---- starting the server ------------------------------------------------------------------------
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def model_directory(path: Path) -> tuple[Path, Path | None]:
    """The model directory to load for PATH (a model directory, a stage directory holding
    model/, or a Hugging Face export, imported into a temporary directory), and that
    temporary directory if one was made."""
    if (path / "model" / "model.json").exists():
        return path / "model", None
    if not (path / "model.json").exists() and (path / "config.json").exists():
        from lmforge.model.hf import import_hf

        imported = Path(tempfile.mkdtemp(prefix="lmforge-serve-"))
        import_hf(path, imported)
        return imported, imported
    return path, None


def serve(
    path: Path,
    host: str,
    port: int,
    token: str | None,
    db: Path,
    name: str | None,
    limits: Limits,
    max_batch: int,
    device: str,
    access_log: bool,
) -> None:
    import uvicorn

    from lmforge.train_utils import setup_device

    if host not in LOOPBACK and not token:
        raise ValueError(
            f"--host {host} opens the server beyond this machine: give an access token "
            "(--token or LMFORGE_TOKEN)"
        )
    model_dir, temporary = model_directory(path)
    dev = setup_device(device).device
    model, tokenizer = load_model_dir(model_dir, dev)
    if dev.type == "cuda":
        model = model.to(torch.bfloat16)
    engine = Engine(model, tokenizer, max_batch)
    store = FeedbackStore(db)
    name = name or (path.parent.name if path.name == "model" else path.name)
    # the name says what the API serves; the weights' hash which checkpoint answered
    model_id = f"{name}@{sha256_file(model_dir / 'model.safetensors')[:12]}"
    service = Service(engine, tokenizer, store, name, model.cfg.max_seq_len, limits, model_id)

    def shutdown() -> None:
        engine.close()
        store.close()
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)

    wildcard = host in ("0.0.0.0", "::")  # any name reaches it; the token guards it
    hosts = ["*"] if wildcard else sorted({host, "127.0.0.1", "localhost", "[::1]"})
    app = create_app(service, token, shutdown, hosts)
    print(f"serving {name} ({path}) at http://{host}:{port}/ ; feedback in {db}", flush=True)
    uvicorn.run(app, host=host, port=port, access_log=access_log, log_level="warning")
