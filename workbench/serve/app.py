"""The HTTP side: OpenAI's `/v1/chat/completions` and `/v1/models`, `/health`, the playground at `/`.

A request is read (bounded), validated (protocol.py), turned into a prompt and images in a worker
thread (messages.py, images.py), and queued on the engine as one row per choice; the engine
thread sends each row's text back through an asyncio queue. Every refusal is an `APIError` in
OpenAI's error shape; nothing a client sends produces a traceback in the response. A client that
goes away (a closed connection, streaming or not) has its rows cancelled.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from workbench.data.boxes import denormalize_box
from workbench.errors import nearest
from workbench.eval.parse import parse_boxes
from workbench.model.image_processing import preprocess
from workbench.prompt.chatml import DEFAULT_MAX_WINDOW_SIZE
from workbench.serve.engine import Engine, QueueFull, Row, Sampling
from workbench.serve.images import ImageError, ImageLimits, load_image_url
from workbench.serve.messages import PromptError, conversation_from_messages, encode_prompt
from workbench.serve.models import ServedModel
from workbench.serve.protocol import (
    APIError,
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    ModelCard,
    ModelList,
    unsupported,
    validation_error,
)

log = logging.getLogger("workbench.serve")
BOX_END = "</box>"


@dataclass(frozen=True)
class Settings:
    images: ImageLimits = field(default_factory=ImageLimits)
    api_key: str | None = None
    max_request_bytes: int = 64 * 2**20
    max_images: int = 8                  # per request; each is 258 prompt tokens and one ViT pass
    max_model_len: int | None = None     # prompt + answer; None: the tokenizer's model_max_length


@dataclass
class Prepared:
    """A validated request, ready for the engine."""

    ids: list[int]
    pixel_values: object                 # Tensor [k,3,S,S] or None
    image_size: tuple[int, int] | None   # (width, height) of the request's latest image
    sampling: Sampling
    adapter: str | None


def create_app(served: ServedModel, engine: Engine, settings: Settings | None = None) -> FastAPI:
    """The FastAPI app; the caller starts and stops the engine (server.py)."""
    settings = settings or Settings()
    started = int(time.time())
    app = FastAPI(title="workbench serve", description="OpenAI-compatible chat completions for Qwen-VL-Chat "
                  "and its adapters, with the boxes of each answer.", version="1")
    _install_error_handlers(app)
    context = settings.max_model_len or served.tokenizer.model_max_length

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        page = resources.files("workbench.serve").joinpath("static/playground.html").read_text(encoding="utf-8")
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": served.name, "adapters": list(served.adapters), "batching": served.mode,
                "queued": engine.queued, "running": engine.running, "stats": dict(engine.stats)}

    @app.get("/v1/models", response_model=ModelList)
    async def models(request: Request) -> ModelList:
        _authorize(request, settings.api_key)
        cards = [ModelCard(id=served.name, created=started)]
        cards += [ModelCard(id=name, created=started, parent=served.name) for name in served.adapters]
        return ModelList(data=cards)

    @app.post("/v1/chat/completions", response_model=ChatCompletion,
              responses={200: {"content": {"text/event-stream": {}}}})
    async def chat_completions(request: Request):
        _authorize(request, settings.api_key)
        body = await _read_body(request, settings.max_request_bytes)
        try:
            chat = ChatRequest.model_validate_json(body)
        except ValidationError as err:
            raise validation_error(err) from None
        if (refusal := unsupported(chat)) is not None:
            raise refusal
        try:
            adapter = served.adapter_of(chat.model)
        except KeyError:
            raise APIError(404, f"the model {chat.model!r} does not exist on this server; "
                                f"{nearest(chat.model, served.names)}", param="model", code="model_not_found") from None
        prepared = await run_in_threadpool(_prepare, chat, adapter, served, settings, context)
        return await _respond(request, chat, prepared, engine)

    return app


def _authorize(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key")


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _prepare(chat: ChatRequest, adapter: str | None, served: ServedModel, settings: Settings,
             context: int) -> Prepared:
    """Messages -> prompt ids, images -> pixels, and the sampling settings (in a worker thread)."""
    import torch

    try:
        conversation, urls = conversation_from_messages([m.model_dump() for m in chat.messages])
    except PromptError as err:
        raise APIError(400, str(err), param=err.param, code=err.code) from None
    if len(urls) > settings.max_images:
        raise APIError(400, f"{len(urls)} images in one request; this server takes at most {settings.max_images}",
                       param="messages", code="too_many_images")
    images = []
    for url, param in urls:
        try:
            images.append(load_image_url(url, settings.images))
        except ImageError as err:
            raise APIError(400, f"{param}: {err}", param=param, code="invalid_image") from None
    window = served.base.generation_config.max_window_size or DEFAULT_MAX_WINDOW_SIZE
    ids, order = encode_prompt(served.tokenizer, conversation, window)
    if len(ids) >= context:
        raise APIError(400, f"the prompt is {len(ids)} tokens (each image takes 258); this model's context is "
                            f"{context} tokens", param="messages", code="context_length_exceeded")
    gen = served.base.generation_config
    max_tokens = chat.requested_tokens
    if max_tokens is None:
        max_tokens = min(gen.max_new_tokens or 512, context - len(ids))
    elif len(ids) + max_tokens > context:
        raise APIError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) is more than this "
                            f"model's context of {context} tokens", param="max_tokens",
                       code="context_length_exceeded")
    # Unset sampling fields take the model's generation_config, as `workbench chat --sample` does.
    temperature = chat.temperature if chat.temperature is not None else (gen.temperature or 1.0) * bool(gen.do_sample)
    top_p = chat.top_p if chat.top_p is not None else (gen.top_p or 1.0)
    size = served.base.transformer.visual.image_size
    pixels = torch.stack([preprocess(images[k], size) for k in order]) if order else None
    return Prepared(ids, pixels, images[-1].size if images else None,
                    Sampling(max_tokens, temperature, top_p, chat.seed, chat.stops), adapter)


def boxes_of(text: str, image_size: tuple[int, int] | None) -> list[dict]:
    """The answer's usable boxes: ref, grid corners, and pixels on the image (grid / 1000, as chat draws them)."""
    return [{"ref": p.ref, "box": list(p.box),
             "pixels": [round(v, 2) for v in denormalize_box(p.box, *image_size)] if image_size else None}
            for p in parse_boxes(text) if p.problem is None]  # no cut, inverted or off-grid boxes


async def _respond(request: Request, chat: ChatRequest, prepared: Prepared, engine: Engine):
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emitter(index: int):
        def emit(event: tuple) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (index, event))
            except RuntimeError:  # the event loop is gone: the server is shutting down
                pass
        return emit

    rows = [Row(prepared.ids, prepared.pixel_values, prepared.adapter,
                _seeded(prepared.sampling, i), emitter(i)) for i in range(chat.n)]
    try:
        engine.submit(rows)
    except QueueFull as err:
        raise APIError(503, str(err), code="queue_full", type="server_error", headers={"Retry-After": "1"}) from None
    watcher = asyncio.create_task(_cancel_on_disconnect(request, engine, rows, events))
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": chat.model}
    if chat.stream:
        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
        return StreamingResponse(_stream(meta, rows, prepared, events, engine, watcher, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        finished = 0
        while finished < len(rows):
            index, event = await events.get()
            if event[0] == "gone":
                return JSONResponse({}, status_code=499)  # nobody is listening any more
            if event[0] == "error":
                raise APIError(500, event[1], code="generation_failed")
            finished += event[0] == "done"
    finally:
        watcher.cancel()
        engine.cancel(rows)
    choices = [{"index": i, "message": {"role": "assistant", "content": row.text}, "finish_reason": row.finish,
                "logprobs": None, "boxes": boxes_of(row.text, prepared.image_size)} for i, row in enumerate(rows)]
    return ChatCompletion(**meta, choices=choices, usage=_usage(prepared, rows))


async def _stream(meta: dict, rows: list[Row], prepared: Prepared, events: asyncio.Queue, engine: Engine,
                  watcher: asyncio.Task, include_usage: bool):
    def chunk(**fields) -> str:
        return f"data: {ChatCompletionChunk(**meta, **fields).model_dump_json(exclude_none=False)}\n\n"

    try:
        for i in range(len(rows)):
            yield chunk(choices=[{"index": i, "delta": {"role": "assistant", "content": ""}}])
        finished, texts = 0, [""] * len(rows)
        while finished < len(rows):
            index, event = await events.get()
            if event[0] == "gone":
                return
            if event[0] == "error":
                yield f"data: {json.dumps(APIError(500, event[1], code='generation_failed').body())}\n\n"
                return
            if event[0] == "delta":
                choice = {"index": index, "delta": {"content": event[1]}}
                texts[index] += event[1]
                if BOX_END in event[1]:  # boxes go out once complete: half a box parses to wrong numbers
                    complete = texts[index][:texts[index].rfind(BOX_END) + len(BOX_END)]
                    choice["boxes"] = boxes_of(complete, prepared.image_size)
                yield chunk(choices=[choice])
            else:
                finished += 1
                yield chunk(choices=[{"index": index, "delta": {}, "finish_reason": event[1],
                                      "boxes": boxes_of(texts[index], prepared.image_size)}])
        if include_usage:
            yield chunk(choices=[], usage=_usage(prepared, rows))
        yield "data: [DONE]\n\n"
    finally:
        watcher.cancel()
        engine.cancel(rows)  # only rows still queued or running: a client that left mid-answer


async def _cancel_on_disconnect(request: Request, engine: Engine, rows: list[Row], events: asyncio.Queue) -> None:
    """Wait for the client to go away (the body is read, so the next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            engine.cancel(rows)
            events.put_nowait((0, ("gone",)))
            return


def _seeded(sampling: Sampling, index: int) -> Sampling:
    if sampling.seed is None or index == 0:
        return sampling
    return Sampling(sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.seed + index, sampling.stop)


def _usage(prepared: Prepared, rows: list[Row]) -> dict:
    completion = sum(len(r.tokens) for r in rows)
    return {"prompt_tokens": len(prepared.ids), "completion_tokens": completion,
            "total_tokens": len(prepared.ids) + completion}


def _install_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: ours, FastAPI's validation, unknown routes, and bugs (500, logged)."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def request_validation(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body")
        e = APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param or None,
                     code=first["type"])
        return JSONResponse(e.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path} on this server (see /docs)",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(err.status_code, err.detail)
        e = APIError(err.status_code, message, code={404: "not_found", 405: "method_not_allowed"}.get(err.status_code))
        return JSONResponse(e.body(), status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def bug(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        e = APIError(500, "internal server error (the traceback is in the server's log)")
        return JSONResponse(e.body(), status_code=500)
