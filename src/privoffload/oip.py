"""The wire format of the Open Inference Protocol v2 (KServe / Triton REST), shared by cloud and client.

A body is a JSON object, optionally followed by raw tensor bytes (the binary tensor data
extension): the header `Inference-Header-Content-Length` gives the JSON's length, and each
binary tensor's `parameters.binary_data_size` its share of the tail, in order. Binary data is
little-endian, row-major; a BYTES element is a 4-byte little-endian length and the bytes.

Everything here is strict and total: malformed input raises `WireError` (a 400), never anything
else, so that neither side can be crashed by what the other sends. Nothing here knows models.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"

# datatype -> numpy dtype of its binary form (BYTES is length-prefixed and handled apart)
DTYPES = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
DATATYPES = (*DTYPES, "BYTES")


class WireError(ValueError):
    """The body does not follow the protocol; the message says how (answered with 400)."""


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---------------------------------------------------------------- bodies

def split_body(body: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    """(JSON header object, binary tail) of a request or response body."""
    if header_length is None:
        head, tail = body, memoryview(b"")
    else:
        try:
            n = int(header_length.strip())
        except ValueError:
            raise WireError(f"{HEADER_LENGTH} must be an integer, got {header_length[:40]!r}") from None
        if not 0 <= n <= len(body):
            raise WireError(f"{HEADER_LENGTH} is {n} but the body has {len(body)} bytes")
        head, tail = body[:n], memoryview(body)[n:]
    try:
        obj = json.loads(head) if head else {}
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise WireError(f"body is not valid JSON ({str(e)[:120]})") from None
    if not isinstance(obj, dict):
        raise WireError("body must be a JSON object")
    return obj, tail


def join_body(header: dict, chunks: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """Body and HTTP headers for a JSON header followed by binary chunks (none: plain JSON)."""
    head = json.dumps(header, separators=(",", ":")).encode()
    if not chunks:
        return head, {"Content-Type": "application/json"}
    return b"".join([head, *chunks]), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


# ---------------------------------------------------------------- tensors out

def encode_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def tensor(name: str, array: np.ndarray | list[bytes], datatype: str, binary: bool) -> tuple[dict, bytes | None]:
    """A tensor object and, when binary, its raw bytes (the caller appends them in order)."""
    if datatype == "BYTES":
        items = [b if isinstance(b, bytes) else str(b).encode() for b in array]
        spec = {"name": name, "datatype": "BYTES", "shape": [len(items)]}
        if binary:
            raw = encode_bytes(items)
            return {**spec, "parameters": {"binary_data_size": len(raw)}}, raw
        return {**spec, "data": [b.decode("utf-8", "replace") for b in items]}, None
    arr = np.ascontiguousarray(array, dtype=DTYPES[datatype])
    spec = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
    if binary:
        raw = arr.tobytes()
        return {**spec, "parameters": {"binary_data_size": len(raw)}}, raw
    return {**spec, "data": arr.reshape(-1).tolist()}, None


# ---------------------------------------------------------------- tensors in

def read_shape(spec: dict) -> list[int]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise WireError(f"tensor {spec.get('name')!r}: shape must be a list of non-negative integers, got {str(shape)[:80]}")
    return shape


def read_tensor(spec: Any, tail: memoryview, offset: int) -> tuple[np.ndarray | list[bytes], int]:
    """Decode one tensor object (JSON `data` or binary `binary_data_size` at `offset` of the tail).

    Returns the array (a list of bytes for BYTES) and the offset after its binary data.
    """
    if not isinstance(spec, dict):
        raise WireError("each tensor must be a JSON object")
    name = spec.get("name")
    if not isinstance(name, str):
        raise WireError("each tensor needs a string 'name'")
    datatype = spec.get("datatype")
    if datatype not in DATATYPES:
        raise WireError(f"tensor {name!r}: datatype {str(datatype)[:40]!r} is not one of {', '.join(DATATYPES)}")
    shape = read_shape(spec)
    count = math.prod(shape)
    params = spec.get("parameters", {})
    if not isinstance(params, dict):
        raise WireError(f"tensor {name!r}: parameters must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in spec:
            raise WireError(f"tensor {name!r} has both data and binary_data_size")
        if not is_int(size) or size < 0:
            raise WireError(f"tensor {name!r}: binary_data_size must be a non-negative integer")
        if size > len(tail) - offset:
            raise WireError(f"tensor {name!r}: binary_data_size is {size} but only {len(tail) - offset} bytes of binary data remain")
        raw = tail[offset:offset + size]
        offset += size
        if datatype == "BYTES":
            return _decode_bytes(name, raw, count), offset
        dtype = DTYPES[datatype]
        if size != count * dtype.itemsize:
            raise WireError(f"tensor {name!r}: shape {shape} of {datatype} needs {count * dtype.itemsize} bytes, got {size}")
        return np.frombuffer(raw, dtype=dtype).reshape(shape).copy(), offset
    if "data" not in spec:
        raise WireError(f"tensor {name!r} has neither data nor parameters.binary_data_size")
    return _from_json(name, spec["data"], datatype, shape, count), offset


def _decode_bytes(name: str, raw: memoryview, count: int) -> list[bytes]:
    items, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise WireError(f"tensor {name!r}: BYTES data is truncated")
        (n,) = struct.unpack_from("<I", raw, i)
        if i + 4 + n > len(raw):
            raise WireError(f"tensor {name!r}: BYTES element is truncated")
        items.append(bytes(raw[i + 4:i + 4 + n]))
        i += 4 + n
    if len(items) != count:
        raise WireError(f"tensor {name!r}: {len(items)} BYTES elements for a shape of {count}")
    return items


def _from_json(name: str, data: Any, datatype: str, shape: list[int], count: int) -> np.ndarray | list[bytes]:
    """JSON data (flat or nested, row-major) -> array; element kinds must fit the datatype."""
    if not isinstance(data, list):
        raise WireError(f"tensor {name!r}: data must be a list")
    # count first (flat: every element; nested: the rows), so that a wrong body is refused before it is converted
    nested = bool(data) and isinstance(data[0], list)
    if len(data) != (shape[0] if nested and shape else count):
        raise WireError(f"tensor {name!r}: shape {shape} has {count} elements, data has "
                        f"{'another number of rows' if nested else len(data)}")
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, RecursionError, OverflowError):
        raise WireError(f"tensor {name!r}: data is not a rectangular array of numbers") from None
    if arr.size != count:
        raise WireError(f"tensor {name!r}: shape {shape} has {count} elements, data has {arr.size}")
    if datatype == "BYTES":
        if count and arr.dtype.kind != "U":
            raise WireError(f"tensor {name!r}: BYTES data must be strings")
        return [str(s).encode() for s in arr.reshape(-1)]
    dtype = DTYPES[datatype]
    kinds = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}[dtype.kind]
    if count and arr.dtype.kind not in kinds:
        want = {"b": "booleans", "u": "integers", "i": "integers", "f": "numbers"}[dtype.kind]
        raise WireError(f"tensor {name!r}: {datatype} data must be {want}")
    if count and dtype.kind in "iu":
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise WireError(f"tensor {name!r}: values outside the range of {datatype}")
    with np.errstate(over="ignore", invalid="ignore"):
        return arr.astype(dtype).reshape(shape)
