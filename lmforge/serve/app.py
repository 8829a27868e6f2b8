"""`create_app`: the OpenAI-compatible FastAPI app over one engine (see docs/serve.md for the endpoints).

```python
app = create_app(LLMEngine(model, tokenizer), tokenizer, "tiny", api_key="secret")
uvicorn.run(app, host="127.0.0.1", port=8000)
```

Every error, ours or the framework's (bad JSON, validation, unknown route), leaves as an OpenAI error
body `{"error": {"message", "type", "param", "code"}}`; nothing a client sends reaches the engine thread
unchecked, so a bad request costs one 4xx and never the engine.
"""
from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from pathlib import Path

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.errors import LMForgeError
from ..infer.engine import LLMEngine
from .async_engine import AsyncLLMEngine, EngineClosedError
from .chat import create_chat_completion
from .completions import create_completion
from .guard import GuardMiddleware, ServeLimits
from .metrics import ServerMetrics
from .params import EventStream, ModelRegistry, ServeContext, check_tokens, now
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, EmbeddingRequest, LoadLoraRequest,
                       UnloadLoraRequest, error_body)


class SSEResponse(StreamingResponse):
    """Server-sent events that always watch for a client disconnect and then close the generator (which
    aborts its engine requests), whatever ASGI spec version the server speaks."""

    media_type = "text/event-stream"

    def __init__(self, content, on_close: Callable[[], Awaitable[None]] | None = None, **kwargs: Any):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()
            if self.on_close is not None:
                await self.on_close()


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None, str]:
    """(message, param, code) for the first pydantic error; malformed JSON gets its own code."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None, \
            "invalid_json"
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return f"{param or 'body'}: {first.get('msg', 'invalid value')}", param, "invalid_value"


def _embed(engine: LLMEngine, inputs: list[list[int]]) -> list[list[float]]:
    """Mean of the last hidden states over each input's tokens, L2-normalised (runs in the engine thread)."""
    vectors = []
    with torch.inference_mode():
        for ids in inputs:
            hidden = engine.model.hidden_states(torch.tensor([ids], dtype=torch.long, device=engine.device))
            vector = hidden[0].float().mean(dim=0)
            vectors.append((vector / vector.norm().clamp_min(1e-12)).tolist())
    return vectors


def create_app(engine: LLMEngine | AsyncLLMEngine, tokenizer, model_name: str, api_key: str | None = None,
               limits: ServeLimits | None = None, allow_runtime_lora: bool = False) -> FastAPI:
    """The app. An `LLMEngine` is wrapped (and owned: shut down with the app); an `AsyncLLMEngine` passed in
    stays the caller's to shut down, but the app drains it on shutdown all the same. allow_runtime_lora
    adds POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's API): they read server-side paths,
    so they exist only when asked for (and sit behind the API key like every /v1 route)."""
    limits = limits or ServeLimits()
    async_engine = engine if isinstance(engine, AsyncLLMEngine) else AsyncLLMEngine(engine)
    metrics = ServerMetrics(model_name, lambda: async_engine.snapshot)
    async_engine.on_finished = metrics.observe_finished
    ctx = ServeContext(async_engine, tokenizer, ModelRegistry(model_name, async_engine), limits)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        async_engine.start()
        yield
        await async_engine.shutdown_async(drain=True, timeout=limits.drain_timeout)

    app = FastAPI(title="lmforge", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ctx = ctx
    app.state.metrics = metrics
    app.state.async_engine = async_engine

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        message, param, code = _validation_message(list(error.errors()))
        return JSONResponse(error_body(message, "invalid_request_error", param, code), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if error.status_code == 404 else None
        return JSONResponse(error_body(str(error.detail), "invalid_request_error", None, code),
                            status_code=error.status_code)

    @app.exception_handler(EngineClosedError)
    async def _closed(_request: Request, error: EngineClosedError) -> JSONResponse:
        return JSONResponse(error_body(str(error), "server_error", None, "shutting_down"), status_code=503)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, error: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(error).__name__}: {error}", "server_error"),
                            status_code=500)

    def respond(result: dict[str, Any] | EventStream) -> Response:
        if isinstance(result, dict):
            return JSONResponse(result)
        return SSEResponse(result.events, on_close=result.close,
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return respond(await create_completion(ctx, body, request))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return respond(await create_chat_completion(ctx, body, request))

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        if ctx.models.resolve(body.model):
            raise APIError(400, "embeddings come from the base model only", param="model")
        if body.dimensions is not None:
            raise APIError(400, "dimensions (truncated embeddings) is not supported", param="dimensions",
                           code="unsupported_parameter")
        inputs = body.input
        if isinstance(inputs, str) or (inputs and all(isinstance(t, int) for t in inputs)):
            inputs = [inputs]
        if not inputs or len(inputs) > limits.max_prompts:
            raise APIError(400, f"input must hold 1..{limits.max_prompts} items", param="input")
        longest = min(limits.max_prompt_tokens or ctx.max_model_len, ctx.engine.config.max_position_embeddings)
        batch = []
        for i, item in enumerate(inputs):
            ids = tokenizer.encode(item) if isinstance(item, str) else check_tokens(ctx, item, f"input[{i}]")
            if not ids or len(ids) > longest:
                raise APIError(400, f"input[{i}] has {len(ids)} tokens; 1..{longest} are accepted", param="input",
                               code="context_length_exceeded" if ids else None)
            batch.append(ids)
        vectors = await async_engine.call(lambda eng: _embed(eng, batch))
        data = []
        for i, vector in enumerate(vectors):
            value: Any = vector
            if body.encoding_format == "base64":
                value = base64.b64encode(torch.tensor(vector, dtype=torch.float32).numpy().tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(len(ids) for ids in batch)
        return {"object": "list", "data": data, "model": body.model or model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    if allow_runtime_lora:
        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(body: LoadLoraRequest) -> dict[str, Any]:
            name = body.lora_name
            if name in ctx.models.names():
                raise APIError(400, f"a model named {name!r} is already served", param="lora_name")
            if not Path(body.lora_path).is_dir():
                raise APIError(400, f"adapter directory not found: {body.lora_path}", param="lora_path")
            try:
                await async_engine.call(lambda eng: eng.add_lora(name, body.lora_path))
            except (LMForgeError, OSError, ValueError, KeyError, RuntimeError) as e:  # not a LoRA dir, wrong shapes
                raise APIError(400, f"cannot load {body.lora_path!r} as a LoRA adapter: {e}",
                               param="lora_path") from None
            return {"object": "lora_adapter", "id": name, "status": "loaded"}

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(body: UnloadLoraRequest) -> dict[str, Any]:
            name = body.lora_name
            if name not in ctx.models.adapters():
                raise APIError(404, f"no LoRA adapter named {name!r}; loaded: {ctx.models.adapters()}",
                               param="lora_name", code="model_not_found")
            try:
                await async_engine.call(lambda eng: eng.remove_lora(name))
            except LMForgeError as e:  # requests still use it
                raise APIError(409, str(e), param="lora_name", code="adapter_in_use") from None
            return {"object": "lora_adapter", "id": name, "status": "unloaded"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = now()
        data = [{"id": model_name, "object": "model", "created": created, "owned_by": "lmforge", "root": model_name,
                 "parent": None, "max_model_len": ctx.max_model_len}]
        data += [{"id": name, "object": "model", "created": created, "owned_by": "lmforge", "root": name,
                  "parent": model_name, "max_model_len": ctx.max_model_len} for name in ctx.models.adapters()]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> Response:
        snap = async_engine.snapshot
        ok = async_engine.healthy
        body = {"status": "ok" if ok else "unavailable", "running": snap.num_running, "waiting": snap.num_waiting}
        if async_engine.crashed:
            body["error"] = async_engine.crashed
        return Response(json.dumps(body), status_code=200 if ok else 503, media_type="application/json")

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    app.add_middleware(GuardMiddleware, api_key=api_key, limits=limits, on_error=metrics.observe_error)
    return app


__all__ = ["create_app", "ServeLimits", "SSEResponse"]
