"""The service: small FastAPI routers for the Open Inference Protocol v2 REST API. Routes parse and authorise;
every question about models goes to the data plane (cloud/dataplane.py).

    health      GET  /v2/health/live, /v2/health/ready                 (open, outside the request limit)
    server      GET  /v2, /openapi.json                                (inference token)
    models      GET  /v2/models/{name}[/versions/{v}][/ready]          (inference token)
                POST /v2/models/{name}[/versions/{v}]/infer
                GET  /v2/models/{name}/versions/{v}/weights, .../manifest   (only with serve_weights)
    repository  POST /v2/repository/index                              (inference token)
                POST /v2/repository/models/{name}/load                 (admin token)
    metrics     GET  /metrics                                          (metrics token, else inference token)

Every error is `{"error": "..."}` with a 4xx status, or 503 with Retry-After when overloaded; a
500 only ever means a bug. No request can stall the others: at most `max_requests` are handled at once
(`Admission`; the health routes are always answered), bodies are bounded by what their route needs, JSON
bodies beyond a few KiB are parsed in other processes (`Parser`: json.loads holds the GIL for the whole body),
and inference waits in a bounded queue with a deadline (cloud/batching.py). Connections and request heads are
bounded before any of this, in cloud/server.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import multiprocessing
import zlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect

from .. import __version__, oip
from ..config import ServeConfig
from ..errors import UserError
from ..runtime import pick_device
from . import schemas, tensors, web
from .auth import Tokens, admin_access, inference_access, metrics_access
from .batching import Overloaded, VersionGone
from .dataplane import DataPlane, NotFound
from .repository import Repository, parse_version
from .schemas import ApiError
from .telemetry import Metrics, Observe, event

EXTENSIONS = ["binary_tensor_data", "model_repository"]
INLINE_JSON_BYTES = 32 * 1024  # JSON up to this is parsed on the event loop (under a millisecond); more in a parser process
SMALL_BODY = 4096  # index and load take a few parameters
PARSER_NICE = 10  # parser processes yield the CPU to the event loop (and its health probes) and to the model
HEALTH = ("/v2/health/live", "/v2/health/ready")
CLOSE = {"Connection": "close"}
Name = Annotated[str, Path(description="model name", examples=["cifar10-resnet18"])]
Version = Annotated[str, Path(description="version number", examples=["1"])]


class Admission:
    """ASGI middleware: at most `limit` requests are handled at once; one beyond waits up to `wait_s` for a slot,
    then gets 503 with Retry-After (its body unread, its connection closed). The health routes are answered
    outside the limit, so that probes never fail because clients are busy."""

    def __init__(self, app, limit: int, wait_s: float):
        self.app, self.wait_s = app, wait_s
        self.slots = asyncio.Semaphore(limit)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in HEALTH:
            return await self.app(scope, receive, send)
        try:
            await asyncio.wait_for(self.slots.acquire(), self.wait_s)
        except asyncio.TimeoutError:
            body = json.dumps({"error": "the server is busy: too many requests at once; retry later"}).encode()
            scope.setdefault("state", {})["error"] = "too many requests at once"
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"retry-after", b"1"), (b"connection", b"close"),
                (b"content-length", str(len(body)).encode())]})
            return await send({"type": "http.response.body", "body": body})
        try:
            await self.app(scope, receive, send)
        finally:
            self.slots.release()


class Parser:
    """Parses large JSON inference bodies in `processes` other processes, one body each at a time. json.loads
    holds the GIL for the whole body (about 100 ms for 4.8 MB): in a thread of this process it would stall the
    event loop, health probes included, for as long. The processes start on the first large body (most clients
    send binary tensors, whose JSON part is small), import only numpy and cloud/tensors.py, and run at a lower
    priority, so that on a busy CPU the event loop and the model come first."""

    def __init__(self, processes: int):
        self.processes = processes
        self.slots = asyncio.Semaphore(processes)
        self.pool: ProcessPoolExecutor | None = None

    async def __call__(self, body: bytes, header_length: str | None, max_images: int, shape: tuple[int, int, int]):
        async with self.slots:
            if self.pool is None:
                self.pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=tensors.parser_process, initargs=(PARSER_NICE,))
            try:
                return await asyncio.get_running_loop().run_in_executor(
                    self.pool, tensors.parse_body, body, header_length, max_images, shape)
            except BrokenProcessPool:  # a parser process died (killed, out of memory): start afresh next time
                self.pool = None
                raise ApiError(503, "the request parser restarted; retry", {"Retry-After": "1"}) from None

    def close(self) -> None:
        """Stop the parser processes and wait for them to exit (they also exit by themselves if this process dies)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


# ---------------------------------------------------------------- helpers for the routes

def plane_of(request: Request) -> DataPlane:
    return request.app.state.plane


def config_of(request: Request) -> ServeConfig:
    return request.app.state.config


def infer_limit(cfg: ServeConfig, shape: tuple[int, int, int]) -> int:
    """The largest inference body `max_request_images` of the model's `shape` can need: JSON pixels of up to 6 bytes
    ("255, "), binary FP32 of 4, and room for the rest; never above max_body_mb. A larger body could only be slow
    to parse."""
    return min(int(cfg.max_body_mb * 2**20), cfg.max_request_images * math.prod(shape) * 6 + 64 * 1024)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body as sent (maybe compressed), refused with 413 beyond `limit` bytes and with 408 when
    it does not arrive within body_timeout_s."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} for this route")
    seconds = config_of(request).body_timeout_s

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes for this route")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        body = await asyncio.wait_for(read(), seconds)
    except ClientDisconnect:
        raise ApiError(400, "the client went away mid-request") from None
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {seconds:g} s") from None
    request.state.body_read = True  # errors answered from now on may keep the connection
    return body


def encoding_of(request: Request) -> str:
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", "deflate"):
        raise ApiError(415, f"Content-Encoding {encoding[:20]!r} is not supported; use gzip, deflate or none")
    return encoding


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """Decompress a gzip/deflate body, refusing more than `limit` bytes (bombs), truncation and trailing data."""
    if encoding == "identity":
        return body
    try:
        inflater = zlib.decompressobj(zlib.MAX_WBITS | (16 if encoding == "gzip" else 0))
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise ApiError(400, f"body is not valid {encoding} data ({e})") from None
    if len(out) > limit:
        raise ApiError(413, f"decompressed request body exceeds the limit of {limit} bytes")
    if not inflater.eof:
        raise ApiError(400, f"{encoding} body is truncated")
    if inflater.unused_data:
        raise ApiError(400, f"{len(inflater.unused_data)} bytes follow the end of the {encoding} data")
    return out


def check_json_type(request: Request) -> None:
    """A JSON body must say so, if it says anything (browsers send forms and text/plain across sites unasked;
    standard OIP clients send no Content-Type at all)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("", "application/json"):
        raise ApiError(415, f"send JSON bodies as Content-Type: application/json, not {kind[:40]!r}")


async def json_object(request: Request) -> dict:
    """The small JSON body of index and load."""
    check_json_type(request)
    body = inflate(await read_body(request, SMALL_BODY), encoding_of(request), SMALL_BODY)
    return oip.split_body(body, None)[0]


async def answer_or_hangup(request: Request, work):
    """The result of `work` (a coroutine); if the client hangs up first, the work is cancelled (a queued job is
    withdrawn and will not run) and so is the request."""
    task = asyncio.ensure_future(work)
    hangup = asyncio.ensure_future(request.receive())  # after the body, receive() returns only on disconnect
    try:
        await asyncio.wait({task, hangup}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hangup.cancel()
    if not task.done():
        task.cancel()
        raise ApiError(400, "the client went away before its images were classified")
    return task.result()


# ---------------------------------------------------------------- routers

health = APIRouter(tags=["health"])


@health.get("/v2/health/live", response_model=schemas.Live)
def live():
    return {"live": True}


@health.get("/v2/health/ready", response_model=schemas.Ready, responses={503: {"model": schemas.ErrorBody}})
def ready(request: Request):
    plane: DataPlane | None = getattr(request.app.state, "plane", None)
    why = "no model loaded yet" if plane is None else plane.ready
    return JSONResponse({"error": why}, status_code=503) if why else {"ready": True}


server = APIRouter(tags=["server"], dependencies=[Depends(inference_access)], responses=schemas.ERRORS)


@server.get("/v2", response_model=schemas.ServerMetadata)
def server_metadata():
    return {"name": "privoffload", "version": __version__, "extensions": EXTENSIONS}


@server.get("/openapi.json", include_in_schema=False)
def openapi(request: Request):
    """The OpenAPI schema, for tools and the fuzzing tests; behind the token like the routes it describes."""
    return JSONResponse(request.app.openapi())


models = APIRouter(tags=["models"], dependencies=[Depends(inference_access)], responses=schemas.ERRORS)


@models.get("/v2/models/{name}", response_model=schemas.ModelMetadata)
def metadata(request: Request, name: Name):
    """Inputs, outputs and the version being served."""
    return plane_of(request).metadata(name)


@models.get("/v2/models/{name}/versions/{version}", response_model=schemas.ModelMetadata)
def version_metadata(request: Request, name: Name, version: Version):
    return plane_of(request).metadata(name, version)


@models.get("/v2/models/{name}/ready", response_model=schemas.ModelReady)
def model_ready(request: Request, name: Name):
    return plane_of(request).model_ready(name)


@models.get("/v2/models/{name}/versions/{version}/ready", response_model=schemas.ModelReady)
def version_ready(request: Request, name: Name, version: Version):
    return plane_of(request).model_ready(name, version)


HeaderLength = Annotated[str | None, Header(alias=oip.HEADER_LENGTH, description="length of the JSON part (binary extension)")]


def json_length(body: bytes, header_length: str | None) -> int:
    """Bytes of JSON in an inference body (all of it without the binary extension)."""
    if header_length is None:
        return len(body)
    return int(header_length) if header_length.strip().isdigit() else 0  # a bad header fails fast on the loop


async def infer(request: Request, name: str, version: str | None, header_length: str | None) -> Response:
    cfg, plane = config_of(request), plane_of(request)
    choice = plane.choose(name, version)
    if header_length is None:
        check_json_type(request)
    encoding, limit = encoding_of(request), infer_limit(cfg, choice.shape)
    body = await read_body(request, limit)
    if encoding != "identity":  # zlib releases the GIL: a thread keeps the loop free
        body = await asyncio.to_thread(inflate, body, encoding, limit)
    if json_length(body, header_length) <= INLINE_JSON_BYTES:
        x, outputs, request_id, obfuscator = tensors.parse_body(body, header_length, cfg.max_request_images, choice.shape)
    else:
        x, outputs, request_id, obfuscator = await request.app.state.parser(body, header_length, cfg.max_request_images,
                                                                            choice.shape)
    request.state.model, request.state.images = name, len(x)
    if obfuscator is not None:
        if version is not None:
            raise ApiError(400, "a request pinned to a version cannot also announce an obfuscator version")
        choice = await plane.for_obfuscator(name, obfuscator)
    try:
        probs, used, classes = await answer_or_hangup(request, plane.infer(choice, x))
    except VersionGone as e:
        raise ApiError(400, str(e)) from None
    except Overloaded as e:
        raise ApiError(503, str(e), {"Retry-After": str(e.retry_after)}) from None
    request.state.model_version = used
    content, headers = tensors.build_response(name, used, request_id, probs, classes, outputs)
    return Response(content, headers=headers)


@models.post("/v2/models/{name}/infer", openapi_extra=schemas.INFER_OPENAPI)
async def infer_latest(request: Request, name: Name, length: HeaderLength = None):
    """Classify a batch of (obfuscated) images with the version being served."""
    return await infer(request, name, None, length)


@models.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=schemas.INFER_OPENAPI)
async def infer_version(request: Request, name: Name, version: Version, length: HeaderLength = None):
    """Classify with one version; refused (400) once that version is no longer served."""
    return await infer(request, name, version, length)


@models.get("/v2/models/{name}/versions/{version}/weights",
            responses={200: {"content": {"application/octet-stream": {}}, "description": "safetensors file"}})
def weights(request: Request, name: Name, version: Version):
    """A version's weights as safetensors (no pickle), when the server publishes them."""
    path, manifest, _, _ = plane_of(request).published(name, version)
    return FileResponse(path, media_type="application/octet-stream", headers={"X-Model-Sha256": manifest.sha256})


@models.get("/v2/models/{name}/versions/{version}/manifest", response_model=schemas.SignedManifest)
def signed_manifest(request: Request, name: Name, version: Version):
    """A version's manifest.json as published, and the publisher's signature of it: clients configured with
    the publisher's public key check downloaded weights against its sha256, whoever sent them."""
    _, _, text, signature = plane_of(request).published(name, version)
    return {"manifest": text, "signature": signature}


repository = APIRouter(tags=["repository"], responses=schemas.ERRORS)


@repository.post("/v2/repository/index", response_model=list[schemas.IndexEntry],
                 dependencies=[Depends(inference_access)], openapi_extra=schemas.INDEX_OPENAPI)
async def index(request: Request):
    """Every model and version in the repository; READY marks the ones being served."""
    ready_only = (await json_object(request)).get("ready", False)
    if not isinstance(ready_only, bool):
        raise ApiError(400, "ready must be a boolean")
    return plane_of(request).index(ready_only)


@repository.post("/v2/repository/models/{name}/load", response_model=schemas.LoadResult,
                 dependencies=[Depends(admin_access)], openapi_extra=schemas.LOAD_OPENAPI)
async def load(request: Request, name: Name):
    """Load a version (`{"parameters": {"version": "3"}}`, default the newest), record it as the one served (every
    replica that starts later serves it), and swap it in."""
    params = (await json_object(request)).get("parameters", {})
    if not isinstance(params, dict) or set(params) - {"version"}:
        raise ApiError(400, "the only load parameter is 'version' (models are never uploaded, only published on disk)")
    version = None
    if "version" in params:
        raw = params["version"]
        version = parse_version(str(raw)) if oip.is_int(raw) or isinstance(raw, str) else None
        if version is None:
            raise ApiError(400, "parameters.version must be a version number")
    old, new = await plane_of(request).load(name, version)
    return {"name": name, "version": str(new.version), "previous_version": str(old.version) if old else None}


metrics_router = APIRouter(tags=["metrics"], dependencies=[Depends(metrics_access)], responses=schemas.ERRORS)


@metrics_router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(request: Request):
    """Prometheus metrics: requests, latency, batch sizes, images, drops, model versions, loads."""
    return Response(generate_latest(plane_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


# ---------------------------------------------------------------- the app

def _error(request: Request, status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """The one error answer. A request whose body was refused or left unread closes its connection, so that a
    client cannot make the server read (and discard) a large body after the answer."""
    request.state.error = message
    has_body = request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers
    if status in (401, 408, 413) or (has_body and not getattr(request.state, "body_read", False)):
        headers = {**(headers or {}), **CLOSE}
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(cfg: ServeConfig, tokens: Tokens, plane: DataPlane | None = None) -> FastAPI:
    """The app; `plane` may be opened beforehand (the CLI does, to report a bad repository in one line)."""
    metrics_ = plane.metrics if plane else Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if app.state.plane is None:
            app.state.plane = await asyncio.to_thread(DataPlane.open, Repository(cfg.repo), pick_device(cfg.device), metrics_)
        app.state.plane.start(cfg)
        event("serving", models={e["name"]: int(e["version"]) for e in app.state.plane.index(ready_only=True)},
              batch_window_ms=cfg.batch_window_ms, auth=tokens.enabled, tls=bool(cfg.ssl_certfile),
              serve_weights=cfg.serve_weights)
        yield
        await app.state.plane.stop()
        await asyncio.to_thread(app.state.parser.close)

    app = FastAPI(title="privoffload cloud", version=__version__, lifespan=lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None, description="Open Inference Protocol v2 service for the classifiers of a model "
                                              "repository; each model's metadata gives its input shape and classes.")
    app.state.config, app.state.tokens, app.state.plane = cfg, tokens, plane
    app.state.parser = Parser(cfg.parse_processes)
    for router in (health, server, models, repository, metrics_router):
        app.include_router(router)
    if cfg.web:  # the browser client (cloud/web.py)
        app.include_router(web.router(cfg.web))
    app.add_middleware(Admission, limit=cfg.max_requests, wait_s=cfg.request_wait_s)
    app.add_middleware(Observe, metrics=metrics_)
    if not tokens.enabled:  # no token stands between a browser page and this port: refuse other Host names (DNS rebinding)
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=cfg.allowed_hosts or ["localhost", "127.0.0.1", cfg.host])

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return _error(request, e.status, str(e), e.headers)

    @app.exception_handler(oip.WireError)
    async def wire_error(request: Request, e: oip.WireError):
        return _error(request, 400, str(e))

    @app.exception_handler(UserError)
    async def user_error(request: Request, e: UserError):
        return _error(request, 404 if isinstance(e, NotFound) else 400, str(e))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(request, 400, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return _error(request, e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception):  # the net: a bug answers JSON, never a traceback
        event("internal error", logging.ERROR, error=f"{type(e).__name__}: {str(e)[:200]}")
        return JSONResponse({"error": "internal error"}, status_code=500)

    return app
