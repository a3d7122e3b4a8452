"""The classifier's tensors in protocol terms: check an inference request, build its response.

Input `images`: UINT8 pixels 0..255 or FP32 in [0, 1], shape [N, C, H, W], the model's own (its manifest's
`shape`); `parameters.obfuscator_version` optionally announces the client's obfuscator version ("3" or 3). Outputs: `probabilities` FP32 [N, classes], `class` INT64 [N], `label` BYTES [N] (the model's class
names). Nothing here imports torch: large JSON bodies are parsed by `parse_body` in other processes
(cloud/app.py), which import only this module and numpy.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

from .. import oip
from ..oip import WireError

INPUT = "images"
INPUT_DATATYPES = ("UINT8", "FP32")
OUTPUTS = ("probabilities", "class", "label")
Parsed = tuple[np.ndarray, list[tuple[str, bool]], "str | None", "int | None"]


def metadata(classes: int, shape: tuple[int, int, int]) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) of the model metadata. UINT8 is the canonical input; FP32 is accepted too."""
    inputs = [{"name": INPUT, "datatype": "UINT8", "shape": [-1, *shape]}]
    outputs = [{"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
               {"name": "class", "datatype": "INT64", "shape": [-1]},
               {"name": "label", "datatype": "BYTES", "shape": [-1]}]
    return inputs, outputs


def parser_process(nice: int) -> None:
    """Set up a parser process: a lower priority than the server's, and an exit as soon as the server that started
    it is gone, however it went (a parser must never outlive its server)."""
    os.nice(nice)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def parse_body(body: bytes, header_length: str | None, max_images: int, shape: tuple[int, int, int]) -> Parsed:
    """An (uncompressed) inference body -> `parse_request`'s answer. WireError if malformed."""
    header, tail = oip.split_body(body, header_length)
    return parse_request(header, tail, max_images, shape)


def parse_request(header: dict, tail: memoryview, max_images: int, shape: tuple[int, int, int]) -> Parsed:
    """-> (float32 images [N, *shape] in [0, 1], [(output, binary)], request id, announced obfuscator version or
    None). WireError if malformed."""
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise WireError("id must be a string")
    params = header.get("parameters", {})
    if not isinstance(params, dict):
        raise WireError("parameters must be an object")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise WireError(f"inputs must be a list with exactly one tensor, {INPUT!r}")
    spec = inputs[0]
    if spec.get("name") != INPUT:
        raise WireError(f"unknown input {str(spec.get('name'))[:40]!r}; the model takes {INPUT!r}")
    if spec.get("datatype") not in INPUT_DATATYPES:
        raise WireError(f"input datatype must be UINT8 (pixels 0..255) or FP32 (in [0, 1]), got {str(spec.get('datatype'))[:20]!r}")
    got = oip.read_shape(spec)
    if len(got) != 4 or got[1:] != list(shape) or not 1 <= got[0] <= max_images:
        raise WireError(f"input shape must be [N, {', '.join(map(str, shape))}] with 1 <= N <= {max_images}, got {got[:6]}")
    arr, used = oip.read_tensor(spec, tail, 0)
    if used != len(tail):
        raise WireError(f"{len(tail) - used} bytes of binary data belong to no input")
    if arr.dtype == np.uint8:
        x = arr.astype(np.float32) / np.float32(255)
    else:
        if not np.isfinite(arr).all():
            raise WireError("input holds NaN or infinite values")
        if arr.min() < 0 or arr.max() > 1:
            raise WireError("FP32 pixels must lie in [0, 1]")
        x = arr
    return x, _outputs(header, params), request_id, _obfuscator_version(params)


def _obfuscator_version(params: dict) -> int | None:
    v = params.get("obfuscator_version")
    if v is None:
        return None
    text = str(v) if oip.is_int(v) else v
    if not isinstance(text, str) or not text.isascii() or not text.isdigit() or text.startswith("0") or len(text) > 9:
        raise WireError("parameters.obfuscator_version must be a version number such as \"1\"")
    return int(text)


def _outputs(header: dict, params: dict) -> list[tuple[str, bool]]:
    default = params.get("binary_data_output", False)
    if not isinstance(default, bool):
        raise WireError("parameters.binary_data_output must be a boolean")
    asked = header.get("outputs")
    if asked is None:
        return [(name, default) for name in OUTPUTS]
    if not isinstance(asked, list) or not asked:
        raise WireError(f"outputs must be a non-empty list of objects naming {', '.join(OUTPUTS)}")
    out = []
    for o in asked:
        if not isinstance(o, dict) or o.get("name") not in OUTPUTS:
            raise WireError(f"each output must be an object naming one of {', '.join(OUTPUTS)}")
        p = o.get("parameters", {})
        if not isinstance(p, dict) or not isinstance(p.get("binary_data", default), bool):
            raise WireError("output parameters.binary_data must be a boolean")
        out.append((o["name"], p.get("binary_data", default)))
    if len({n for n, _ in out}) != len(out):
        raise WireError("an output is asked for twice")
    return out


def build_response(model: str, version: int, request_id: str | None, probs: np.ndarray, classes: tuple[str, ...],
                   outputs: list[tuple[str, bool]]) -> tuple[bytes, dict[str, str]]:
    cls = probs.argmax(1)
    values = {"probabilities": (probs, "FP32"), "class": (cls, "INT64"),
              "label": ([classes[i].encode() for i in cls], "BYTES")}
    header: dict = {"model_name": model, "model_version": str(version)}
    if request_id is not None:
        header["id"] = request_id
    header["outputs"], chunks = [], []
    for name, binary in outputs:
        spec, raw = oip.tensor(name, *values[name], binary)
        header["outputs"].append(spec)
        if raw is not None:
            chunks.append(raw)
    return oip.join_body(header, chunks)
