"""The FastAPI app: routes, the API key, body size and JSON checks, and errors in OpenAI's shape.

Request bodies are read and validated here rather than by FastAPI, so that a bad body gets OpenAI's 400 (not
FastAPI's 422) and an oversized one a 413 before it is all read.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.staticfiles import StaticFiles

from perfxllm.server.async_engine import AsyncEngine
from perfxllm.server.disconnect import CLIENT_CLOSED_REQUEST, cancel_on_disconnect
from perfxllm.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, validation_error
from perfxllm.server.serving import OpenAIServing

M = TypeVar("M", bound=BaseModel)
STATIC_DIR = Path(__file__).parent / "static"  # PerfXChat in the browser: plain HTML, JS and CSS


@dataclass
class ServerConfig:
    api_key: str | None = None  # None: no authentication
    max_body_bytes: int = 4 * 2**20


def create_app(async_engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    """The app owns the engine from here on: it starts reading it at start-up and ends it at shutdown."""
    info, metrics = async_engine.info, async_engine.metrics
    model_name = info.model_name
    serving = OpenAIServing(async_engine, info.tokenizer, model_name, info.max_model_len, info.vocab_size)
    model_card = {
        "id": model_name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "perfxllm",
        "max_model_len": info.max_model_len,
    }

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await async_engine.start()
        yield
        await async_engine.close()

    app = FastAPI(title="perfxllm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.async_engine = async_engine

    async def api_error(_: Request, e: APIError) -> Response:
        metrics.rejected[e.status] += 1
        return JSONResponse(e.body(), status_code=e.status)

    async def http_error(request: Request, e: HTTPException) -> Response:  # unknown route, wrong method
        return await api_error(
            request, APIError(e.status_code, f"{e.detail}: {request.method} {request.url.path}")
        )

    async def bug(request: Request, e: Exception) -> Response:  # logged with its traceback by Starlette
        return await api_error(request, APIError(500, f"Internal error: {e!r}", type="server_error"))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, bug)

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/")  # the chat page and its files need no API key: the page asks for it when the API does
    async def webchat() -> Response:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    api = APIRouter(dependencies=[Depends(_authorize(config.api_key))] if config.api_key else [])

    @api.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card]}

    @api.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        if model != model_name:
            raise APIError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")
        return model_card

    @api.get("/metrics")
    async def prometheus() -> Response:
        return PlainTextResponse(metrics.render(async_engine.stats), media_type="text/plain; version=0.0.4")

    def accepting() -> bool:
        return async_engine.alive

    @api.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await read_json(request, CompletionRequest, config.max_body_bytes, accepting)
        return await cancel_on_disconnect(request, serving.completions(req))

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await read_json(request, ChatCompletionRequest, config.max_body_bytes, accepting)
        return await cancel_on_disconnect(request, serving.chat(req))

    app.include_router(api)
    return app


def _authorize(api_key: str) -> Callable[[Request], Awaitable[None]]:
    expected = f"Bearer {api_key}".encode()

    async def check(request: Request) -> None:
        if not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
            raise APIError(
                401,
                "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'.",
                code="invalid_api_key",
            )

    return check


async def read_json(request: Request, model: type[M], limit: int, accepting: Callable[[], bool]) -> M:
    """The body, validated. accepting: whether the server still takes requests (at shutdown, a read that a
    silent client holds up is cancelled after the grace period; it is answered, not logged as a crash)."""
    too_large = APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:  # gone before its body was all sent: nobody to answer
        raise APIError(CLIENT_CLOSED_REQUEST, "The client closed the request.") from None
    except asyncio.CancelledError:
        if accepting():
            raise
        asyncio.current_task().uncancel()
        raise APIError(503, "The server is shutting down.", type="server_error", code="unavailable") from None
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise validation_error(e) from None
