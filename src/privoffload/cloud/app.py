"""The service: small FastAPI routers for the Open Inference Protocol v2 REST API.

    health      GET  /v2/health/live, /v2/health/ready                 (open)
    server      GET  /v2                                               (inference token)
    models      GET  /v2/models/{name}[/versions/{v}][/ready]          (inference token)
                POST /v2/models/{name}[/versions/{v}]/infer
                GET  /v2/models/{name}/versions/{v}/weights            (only with serve_weights)
    repository  POST /v2/repository/index                              (inference token)
                POST /v2/repository/models/{name}/load                 (admin token)
    metrics     GET  /metrics                                          (admin token)

Every error is `{"error": "..."}` with a 4xx status; a 5xx only ever means a bug.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from contextlib import asynccontextmanager
from typing import Annotated

import torch
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Header, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from .. import __version__, oip
from ..config import ServeConfig
from ..errors import UserError
from ..runtime import pick_device
from . import schemas, tensors
from .auth import AuthError, Tokens, admin_access, inference_access
from .batching import VersionGone
from .repository import LoadedModel, Repository, parse_version
from .store import ModelStore
from .telemetry import Metrics, Observe, event, setup_logging

EXTENSIONS = ["binary_tensor_data", "model_repository"]
PARSE_INLINE_BYTES = 256 * 1024
Name = Annotated[str, Path(description="model name", examples=["cifar10-resnet18"])]
Version = Annotated[str, Path(description="version number", examples=["1"])]


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


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


async def read_body(request: Request) -> bytes:
    """The request body, refused with 413 beyond the limit (also after gzip/deflate decompression)."""
    limit = int(config_of(request).max_body_mb * 2**20)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "the client went away mid-request") from None
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("gzip", "deflate"):
        try:
            inflater = zlib.decompressobj(zlib.MAX_WBITS | (16 if encoding == "gzip" else 0))
            body = inflater.decompress(body, limit + 1)
        except zlib.error as e:
            raise ApiError(400, f"body is not valid {encoding} data ({e})") from None
        if len(body) > limit:
            raise ApiError(413, f"decompressed request body exceeds the limit of {limit} bytes")
        if not inflater.eof:
            raise ApiError(400, f"{encoding} body is truncated")
    elif encoding != "identity":
        raise ApiError(415, f"Content-Encoding {encoding[:20]!r} is not supported; use gzip, deflate or none")
    return body


def json_object(body: bytes) -> dict:
    return oip.split_body(body, None)[0]


# ---------------------------------------------------------------- routers

health = APIRouter(tags=["health"])


@health.get("/v2/health/live", response_model=schemas.Live)
def live():
    return {"live": True}


@health.get("/v2/health/ready", response_model=schemas.Ready, responses={503: {"model": schemas.ErrorBody}})
def ready(request: Request):
    store: ModelStore | None = getattr(request.app.state, "store", None)
    if store is None or not store.batchers:
        return JSONResponse({"error": "no model loaded yet"}, status_code=503)
    return {"ready": True}


server = APIRouter(tags=["server"], dependencies=[Depends(inference_access)], responses=schemas.ERRORS)


@server.get("/v2", response_model=schemas.ServerMetadata)
def server_metadata():
    return {"name": "privoffload", "version": __version__, "extensions": EXTENSIONS}


models = APIRouter(tags=["models"], dependencies=[Depends(inference_access)], responses=schemas.ERRORS)


def model_metadata(request: Request, name: str, version: int | None) -> dict:
    store = store_of(request)
    current = store.current.get(name)
    versions = store.repo.versions(name)
    if not versions:
        raise ApiError(404, f"no model named {name[:64]!r}")
    manifest = store.repo.manifest(name, version if version is not None else versions[-1])
    inputs, outputs = tensors.metadata(len(manifest.classes), manifest.shape)
    listed = [str(version)] if version is not None else [str(current.version)] if current else []
    return {"name": name, "versions": listed, "platform": "pytorch", "inputs": inputs, "outputs": outputs}


@models.get("/v2/models/{name}", response_model=schemas.ModelMetadata)
def metadata(request: Request, name: Name):
    """Inputs, outputs and the version being served."""
    return model_metadata(request, name, None)


@models.get("/v2/models/{name}/versions/{version}", response_model=schemas.ModelMetadata)
def version_metadata(request: Request, name: Name, version: Version):
    return model_metadata(request, name, existing_version(request, name, version))


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
    model = served(request, name)
    pinned = existing_version(request, name, version) if version is not None else None
    if pinned is not None and pinned != model.version:
        raise ApiError(400, f"version {pinned} of {name!r} is not loaded; version {model.version} is serving")
    body = await read_body(request)

    def parse():
        header, tail = oip.split_body(body, header_length)
        return tensors.parse_request(header, tail, config_of(request).max_request_images, model.manifest.shape)

    # big bodies (JSON tensors) are decoded off the event loop, like the model runs
    x, outputs, request_id = parse() if len(body) < PARSE_INLINE_BYTES else await asyncio.to_thread(parse)
    request.state.model, request.state.images = name, len(x)
    store = store_of(request)
    try:
        probs, used = await store.batchers[name].submit(x, pinned)
    except VersionGone as e:
        raise ApiError(400, str(e)) from None
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


@models.get("/v2/models/{name}/versions/{version}/weights",
            responses={200: {"content": {"application/octet-stream": {}}, "description": "safetensors file"}})
def weights(request: Request, name: Name, version: Version):
    """A version's weights as safetensors (no pickle), when the server publishes them."""
    if not config_of(request).serve_weights:
        raise ApiError(404, "this server does not publish weights (start it with --serve-weights)")
    v = existing_version(request, name, version)
    repo = store_of(request).repo
    return FileResponse(repo.weights_path(name, v), media_type="application/octet-stream",
                        headers={"X-Model-Sha256": repo.manifest(name, v).sha256})


repository = APIRouter(tags=["repository"], responses=schemas.ERRORS)


@repository.post("/v2/repository/index", response_model=list[schemas.IndexEntry],
                 dependencies=[Depends(inference_access)], openapi_extra=schemas.INDEX_OPENAPI)
async def index(request: Request):
    """Every model and version in the repository; READY marks the ones being served."""
    ready_only = json_object(await read_body(request)).get("ready", False)
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
    params = json_object(await read_body(request)).get("parameters", {})
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


metrics_router = APIRouter(tags=["metrics"], dependencies=[Depends(admin_access)], responses=schemas.ERRORS)


@metrics_router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(request: Request):
    """Prometheus metrics: requests, latency, batch sizes, images, model versions, loads."""
    return Response(generate_latest(store_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


# ---------------------------------------------------------------- the app

def _error(request: Request, status: int, message: str, headers: dict | None = None) -> JSONResponse:
    request.state.error = message
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(cfg: ServeConfig, tokens: Tokens, store: ModelStore | None = None) -> FastAPI:
    """The app; `store` may be opened beforehand (the CLI does, to report a bad repository in one line)."""
    metrics_ = store.metrics if store else Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if app.state.store is None:
            app.state.store = await asyncio.to_thread(ModelStore.open, Repository(cfg.repo), pick_device(cfg.device), metrics_)
        app.state.store.start(cfg.batch_window_ms / 1000, cfg.max_batch_images)
        event("serving", models={n: m.version for n, m in app.state.store.current.items()},
              batch_window_ms=cfg.batch_window_ms, auth=tokens.enabled, serve_weights=cfg.serve_weights)
        yield
        await app.state.store.stop()

    app = FastAPI(title="privoffload cloud", version=__version__, lifespan=lifespan,
                  description="Open Inference Protocol v2 service for the cloud's CIFAR-10 classifier.")
    app.state.config, app.state.tokens, app.state.store = cfg, tokens, store
    for router in (health, server, models, repository, metrics_router):
        app.include_router(router)
    app.add_middleware(Observe, metrics=metrics_)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return _error(request, e.status, str(e))

    @app.exception_handler(oip.WireError)
    async def wire_error(request: Request, e: oip.WireError):
        return _error(request, 400, str(e))

    @app.exception_handler(AuthError)
    async def auth_error(request: Request, e: AuthError):
        return _error(request, e.status, str(e), {"WWW-Authenticate": "Bearer"} if e.status == 401 else None)

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


def serve(cfg: ServeConfig) -> None:
    """`privoffload serve`: check tokens and the repository (one-line errors), then run uvicorn."""
    tokens = Tokens.from_env(cfg.no_auth)
    setup_logging(cfg.log_level)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    store = ModelStore.open(Repository(cfg.repo), pick_device(cfg.device))
    if not tokens.enabled:
        event("authentication is off (--no-auth): anyone who reaches this port can use and swap models", logging.WARNING)
    app = create_app(cfg, tokens, store)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_config=None, access_log=False,
                timeout_graceful_shutdown=10)
