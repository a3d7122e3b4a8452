"""Typed request and response bodies of the REST API (Open Inference Protocol v2 shapes).

They drive the OpenAPI schema (`/openapi.json`) that clients and the fuzzing tests read. The
inference body is parsed by hand (it may be JSON followed by binary data), so its schema is
written out here once, as plain JSON Schema.
"""

from __future__ import annotations

from pydantic import BaseModel


class ApiError(Exception):
    """An error answer: its status, one line of message (`{"error": ...}`) and any headers (Retry-After, ...)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class ErrorBody(BaseModel):
    error: str


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]  # -1: any size


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, list[str]] = {}  # "classes": the class names, in the order of `probabilities`


class ModelReady(BaseModel):
    name: str
    version: str
    ready: bool


class IndexEntry(BaseModel):
    name: str
    version: str
    state: str  # READY | UNAVAILABLE
    reason: str


class LoadResult(BaseModel):
    name: str
    version: str
    previous_version: str | None


class SignedManifest(BaseModel):
    manifest: str  # manifest.json exactly as published: the signature covers these bytes (UTF-8)
    signature: str | None  # base64 Ed25519 signature by the publisher's key; None if published unsigned


ERRORS = {code: {"model": ErrorBody, "description": text} for code, text in (
    (400, "malformed request, or a model version that cannot be used"),
    (401, "missing or invalid bearer token"),
    (403, "the route needs the admin token"),
    (404, "no such model, version or route"),
    (408, "the request body did not arrive in time"),
    (413, "request body too large"),
    (415, "unsupported Content-Encoding or Content-Type"),
    (503, "overloaded: retry after the Retry-After header's seconds"),
)}

_PARAMETERS = {"type": "object", "additionalProperties": True}
_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "datatype": {"type": "string"},
        "parameters": _PARAMETERS,
        "data": {"type": "array"},
    },
}
INFER_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": _PARAMETERS,
        "inputs": {"type": "array", "items": _TENSOR},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"],
                                               "properties": {"name": {"type": "string"}, "parameters": _PARAMETERS}}},
    },
}
INFER_RESPONSE = {
    "type": "object",
    "required": ["model_name", "outputs"],
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {"type": "string"},
        "outputs": {"type": "array", "items": _TENSOR},
    },
}
INFER_EXAMPLE = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": [128] * 3072}],
                 "outputs": [{"name": "class"}, {"name": "label"}]}
INFER_OPENAPI = {
    "requestBody": {
        "required": True,
        "description": "JSON; or, with the header Inference-Header-Content-Length, JSON followed by binary tensor data",
        "content": {"application/json": {"schema": INFER_REQUEST, "example": INFER_EXAMPLE},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    "responses": {"200": {"description": "class probabilities, predicted class and label, with model_version",
                          "content": {"application/json": {"schema": INFER_RESPONSE},
                                      "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
}
LOAD_OPENAPI = {
    "requestBody": {
        "required": False,
        "content": {"application/json": {"schema": {"type": "object", "properties": {"parameters": {
            "type": "object", "properties": {"version": {"type": ["string", "integer"]}}}}}}},
    },
}
INDEX_OPENAPI = {
    "requestBody": {
        "required": False,
        "content": {"application/json": {"schema": {"type": "object", "properties": {"ready": {"type": "boolean"}}}}},
    },
}
