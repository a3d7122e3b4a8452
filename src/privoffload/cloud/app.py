"""The service: small FastAPI routers for the Open Inference Protocol v2 REST API.

    health      GET  /v2/health/live, /v2/health/ready                 (open)
    server      GET  /v2                                               (inference token)
    models      GET  /v2/models/{name}[/versions/{v}][/ready]          (inference token)
                POST /v2/models/{name}[/versions/{v}]/infer
                GET  /v2/models/{name}/versions/{v}/weights, .../manifest   (only with serve_weights)
    repository  POST /v2/repository/index                              (inference token)
                POST /v2/repository/models/{name}/load                 (admin token)
    metrics     GET  /metrics                                          (metrics token, else inference token)

Every error is `{"error": "..."}` with a 4xx status, or 503 with Retry-After when overloaded; a
500 only ever means a bug. No request can stall the others: bodies are bounded by what their
route needs, large ones are decoded one at a time off the event loop, and inference waits in a
bounded queue with a deadline (cloud/batching.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import zlib
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
from .repository import LoadedModel, Manifest, Repository, parse_version
from .schemas import ApiError
from .store import ModelStore
from .telemetry import Metrics, Observe, event

EXTENSIONS = ["binary_tensor_data", "model_repository"]
PARSE_INLINE_BYTES = 256 * 1024  # bodies below this are decoded on the event loop (about a millisecond)
SMALL_BODY = 4096  # index and load take a few parameters
CLOSE = {"Connection": "close"}
Name = Annotated[str, Path(description="model name", examples=["cifar10-resnet18"])]
Version = Annotated[str, Path(description="version number", examples=["1"])]


# ---------------------------------------------------------------- helpers for the routes

def store_of(request: Request) -> ModelStore:
    return request.app.state.store


def config_of(request: Request) -> ServeConfig:
    return request.app.state.config


def served(request: Request, name: str) -> LoadedModel:
    store = store_of(request)
    if name not in store.current:
        if store.repo.versions(name):
            raise ApiError(400, f"model {name!r} is in the repository but not loaded; an admin can load it")
        raise ApiError(404, f"no model named {name[:64]!r}; POST /v2/repository/index lists them")
    return store.current[name]


def existing_version(request: Request, name: str, version: str) -> int:
    v = parse_version(version)
    if v is None or v not in store_of(request).repo.versions(name):
        raise ApiError(404, f"model {name[:64]!r} has no version {version[:20]!r}")
    return v


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


async def answer_or_hangup(request: Request, future: asyncio.Future):
    """The job's result; if the client hangs up first, the job is withdrawn (it will not run) and so is the request."""
    hangup = asyncio.ensure_future(request.receive())  # after the body, receive() returns only on disconnect
    try:
        await asyncio.wait({future, hangup}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hangup.cancel()
    if not future.done():
        future.cancel()
        raise ApiError(400, "the client went away before its images were classified")
    return future.result()


# ---------------------------------------------------------------- routers

health = APIRouter(tags=["health"])


@health.get("/v2/health/live", response_model=schemas.Live)
def live():
    return {"live": True}


@health.get("/v2/health/ready", response_model=schemas.Ready, responses={503: {"model": schemas.ErrorBody}})
def ready(request: Request):
    store: ModelStore | None = getattr(request.app.state, "store", None)
    if store is None or not store.ready:
        return JSONResponse({"error": "no model loaded yet" if store is None or not store.batchers
                             else "a batching worker is not running"}, status_code=503)
    return {"ready": True}


server = APIRouter(tags=["server"], dependencies=[Depends(inference_access)], responses=schemas.ERRORS)


@server.get("/v2", response_model=schemas.ServerMetadata)
def server_metadata():
    return {"name": "privoffload", "version": __version__, "extensions": EXTENSIONS}


models = APIRouter(tags=["models"], dependencies=[Depends(inference_access)], responses=schemas.ERRORS)


def model_metadata(m: Manifest, name: str, version: int) -> dict:
    """A manifest's tensors: its input shape and classes (their names in `parameters`)."""
    inputs, outputs = tensors.metadata(len(m.classes), m.shape)
    return {"name": name, "versions": [str(version)], "platform": "pytorch", "inputs": inputs, "outputs": outputs,
            "parameters": {"classes": list(m.classes)}}


@models.get("/v2/models/{name}", response_model=schemas.ModelMetadata)
def metadata(request: Request, name: Name):
    """Inputs, outputs and the version being served."""
    m = served(request, name).manifest
    return model_metadata(m, name, m.version)


@models.get("/v2/models/{name}/versions/{version}", response_model=schemas.ModelMetadata)
def version_metadata(request: Request, name: Name, version: Version):
    v = existing_version(request, name, version)
    return model_metadata(store_of(request).repo.manifest(name, v), name, v)


@models.get("/v2/models/{name}/ready", response_model=schemas.ModelReady)
def model_ready(request: Request, name: Name):
    return {"name": name, "version": str(served(request, name).version), "ready": True}


@models.get("/v2/models/{name}/versions/{version}/ready", response_model=schemas.ModelReady)
def version_ready(request: Request, name: Name, version: Version):
    v = existing_version(request, name, version)
    current = served(request, name)
    if current.version != v:
        raise ApiError(400, f"version {v} of {name!r} is not loaded; version {current.version} is serving")
    return {"name": name, "version": str(v), "ready": True}


HeaderLength = Annotated[str | None, Header(alias=oip.HEADER_LENGTH, description="length of the JSON part (binary extension)")]


async def infer(request: Request, name: str, version: str | None, header_length: str | None) -> Response:
    cfg, store = config_of(request), store_of(request)
    model = served(request, name)
    pinned = existing_version(request, name, version) if version is not None else None
    if pinned is not None and pinned != model.version:
        raise ApiError(400, f"version {pinned} of {name!r} is not loaded; version {model.version} is serving")
    if header_length is None:
        check_json_type(request)
    encoding, limit = encoding_of(request), infer_limit(cfg, model.manifest.shape)
    body = await read_body(request, limit)

    def parse():
        header, tail = oip.split_body(inflate(body, encoding, limit), header_length)
        return tensors.parse_request(header, tail, cfg.max_request_images, model.manifest.shape)

    if len(body) < PARSE_INLINE_BYTES and encoding == "identity":
        x, outputs, request_id = parse()
    else:  # off the event loop, one at a time: JSON parsing holds the GIL, so more threads would only queue for it
        async with request.app.state.parsing:
            x, outputs, request_id = await asyncio.to_thread(parse)
    request.state.model, request.state.images = name, len(x)
    try:
        probs, used = await answer_or_hangup(request, store.batchers[name].submit(x, pinned))
    except VersionGone as e:
        raise ApiError(400, str(e)) from None
    except Overloaded as e:
        raise ApiError(503, str(e), {"Retry-After": str(e.retry_after)}) from None
    request.state.model_version = used
    store.metrics.images.labels(name).inc(len(x))
    content, headers = tensors.build_response(name, used, request_id, probs, store.current[name].manifest.classes, outputs)
    return Response(content, headers=headers)


@models.post("/v2/models/{name}/infer", openapi_extra=schemas.INFER_OPENAPI)
async def infer_latest(request: Request, name: Name, length: HeaderLength = None):
    """Classify a batch of (obfuscated) images with the version being served."""
    return await infer(request, name, None, length)


@models.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=schemas.INFER_OPENAPI)
async def infer_version(request: Request, name: Name, version: Version, length: HeaderLength = None):
    """Classify with one version; refused (400) once that version is no longer served."""
    return await infer(request, name, version, length)


def published(request: Request, name: str, version: str) -> int:
    """A version whose weights this server hands out: served with --serve-weights, and verified by a load here."""
    if not config_of(request).serve_weights:
        raise ApiError(404, "this server does not publish weights (start it with --serve-weights)")
    v = existing_version(request, name, version)
    if (name, v) not in store_of(request).verified:
        raise ApiError(404, f"version {v} of {name!r} has not been verified by a load on this server; "
                            f"its weights are not published")
    return v


@models.get("/v2/models/{name}/versions/{version}/weights",
            responses={200: {"content": {"application/octet-stream": {}}, "description": "safetensors file"}})
def weights(request: Request, name: Name, version: Version):
    """A version's weights as safetensors (no pickle), when the server publishes them."""
    v = published(request, name, version)
    repo = store_of(request).repo
    return FileResponse(repo.weights_path(name, v), media_type="application/octet-stream",
                        headers={"X-Model-Sha256": repo.manifest(name, v).sha256})


@models.get("/v2/models/{name}/versions/{version}/manifest", response_model=schemas.SignedManifest)
def signed_manifest(request: Request, name: Name, version: Version):
    """A version's manifest.json as published, and the publisher's signature of it: clients configured with
    the publisher's public key check downloaded weights against its sha256, whoever sent them."""
    v = published(request, name, version)
    repo = store_of(request).repo
    return {"manifest": repo.manifest_text(name, v), "signature": repo.signature(name, v)}


repository = APIRouter(tags=["repository"], responses=schemas.ERRORS)


@repository.post("/v2/repository/index", response_model=list[schemas.IndexEntry],
                 dependencies=[Depends(inference_access)], openapi_extra=schemas.INDEX_OPENAPI)
async def index(request: Request):
    """Every model and version in the repository; READY marks the ones being served."""
    ready_only = (await json_object(request)).get("ready", False)
    if not isinstance(ready_only, bool):
        raise ApiError(400, "ready must be a boolean")
    store = store_of(request)
    entries = []
    for name in store.repo.names():
        current = store.current.get(name)
        for v in store.repo.versions(name):
            serving = current is not None and current.version == v
            if serving or not ready_only:
                entries.append({"name": name, "version": str(v), "state": "READY" if serving else "UNAVAILABLE",
                                "reason": "" if serving else store.failures.get((name, v), "not loaded")})
    return entries


@repository.post("/v2/repository/models/{name}/load", response_model=schemas.LoadResult,
                 dependencies=[Depends(admin_access)], openapi_extra=schemas.LOAD_OPENAPI)
async def load(request: Request, name: Name):
    """Load a version (`{"parameters": {"version": "3"}}`, default the newest) and swap it in."""
    params = (await json_object(request)).get("parameters", {})
    if not isinstance(params, dict) or set(params) - {"version"}:
        raise ApiError(400, "the only load parameter is 'version' (models are never uploaded, only published on disk)")
    version = None
    if "version" in params:
        raw = params["version"]
        version = parse_version(str(raw)) if oip.is_int(raw) or isinstance(raw, str) else None
        if version is None:
            raise ApiError(400, "parameters.version must be a version number")
    store = store_of(request)
    if not store.repo.versions(name):
        raise ApiError(404, f"no model named {name[:64]!r} in the repository")
    if version is not None and version not in store.repo.versions(name):
        raise ApiError(404, f"model {name!r} has no version {version}")
    try:
        old, new = await store.swap(name, version)
    except UserError as e:
        raise ApiError(400, f"refused, version {store.current[name].version if name in store.current else 'none'} "
                            f"keeps serving: {e}") from None
    return {"name": name, "version": str(new.version), "previous_version": str(old.version) if old else None}


metrics_router = APIRouter(tags=["metrics"], dependencies=[Depends(metrics_access)], responses=schemas.ERRORS)


@metrics_router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(request: Request):
    """Prometheus metrics: requests, latency, batch sizes, images, drops, model versions, loads."""
    return Response(generate_latest(store_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


# ---------------------------------------------------------------- the app

def _error(request: Request, status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """The one error answer. A request whose body was refused or left unread closes its connection, so that a
    client cannot make the server read (and discard) a large body after the answer."""
    request.state.error = message
    has_body = request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers
    if status in (401, 408, 413) or (has_body and not getattr(request.state, "body_read", False)):
        headers = {**(headers or {}), **CLOSE}
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(cfg: ServeConfig, tokens: Tokens, store: ModelStore | None = None) -> FastAPI:
    """The app; `store` may be opened beforehand (the CLI does, to report a bad repository in one line)."""
    metrics_ = store.metrics if store else Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if app.state.store is None:
            app.state.store = await asyncio.to_thread(ModelStore.open, Repository(cfg.repo), pick_device(cfg.device), metrics_)
        app.state.store.start(cfg)
        event("serving", models={n: m.version for n, m in app.state.store.current.items()},
              batch_window_ms=cfg.batch_window_ms, auth=tokens.enabled, tls=bool(cfg.ssl_certfile),
              serve_weights=cfg.serve_weights)
        yield
        await app.state.store.stop()

    app = FastAPI(title="privoffload cloud", version=__version__, lifespan=lifespan,
                  description="Open Inference Protocol v2 service for the cloud's CIFAR-10 classifier.")
    app.state.config, app.state.tokens, app.state.store = cfg, tokens, store
    app.state.parsing = asyncio.Semaphore(1)
    for router in (health, server, models, repository, metrics_router):
        app.include_router(router)
    if cfg.web:  # the browser client (cloud/web.py)
        app.include_router(web.router(cfg.web))
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
        return _error(request, 400, str(e))

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
