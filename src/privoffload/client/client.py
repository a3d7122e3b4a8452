"""The obfuscating client: obfuscate on the device, upload only O(x) as 8-bit pixels, read the classes.

It speaks the Open Inference Protocol v2 (binary tensor data by default), remembers the model
version the cloud answered with, and calls `on_version_change(old, new)` when that changes: the
cloud retrained its classifier, and the obfuscator may need re-syncing (client/drift.py decides,
client/resync.py does it; `download_weights` fetches a version's weights where the cloud publishes them).
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx
import numpy as np
import torch

from .. import oip
from ..errors import UserError
from ..runtime import atomic_write_bytes
from .. import ldp
from .images import read_images
from .obfuscator import Obfuscate, load_obfuscator, quantize, shape_of

DEFAULT_MODEL = "cifar10-resnet18"
VersionHook = Callable[[str | None, str], None]


class ClientError(UserError):
    """Any failure to classify through the cloud; the message is one line that says what to do."""


class ServerUnavailable(ClientError):
    """No answer: the server is down, unreachable, too slow, or answered 503 on every try."""


class AuthError(ClientError):
    """The server refused the token (401 or 403)."""


class RequestRejected(ClientError):
    """The server refused the request as malformed or unservable (other 4xx)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class BadServer(ClientError):
    """The server answered, but not like an inference server (5xx, or a body that is not the protocol)."""


class WeightsUnavailable(ClientError):
    """The server does not publish this version's weights (404): only black-box re-sync is possible."""


@dataclass
class Result:
    classes: np.ndarray  # int64 [N]
    labels: list[str]
    probabilities: np.ndarray  # float32 [N, classes]
    versions: list[str]  # the model version that classified each image

    @property
    def model_version(self) -> str:
        """The version of the last answer (images of one call can straddle a swap)."""
        return self.versions[-1]


class Client:
    """`Client(url, obfuscator=RUN)`; then `classify(images)` or `classify_files(paths)`."""

    def __init__(self, server: str, obfuscator: str | Path | Obfuscate, *, token: str | None = None,
                 model: str = DEFAULT_MODEL, timeout: float = 30.0, retries: int = 3, backoff: float = 0.25,
                 binary: bool = True, images_per_request: int = 256, model_version: str | None = None,
                 on_version_change: VersionHook | None = None, transport: httpx.BaseTransport | None = None,
                 ldp_epsilon: float = float("inf"), ldp_delta: float = 1e-5, ldp_clip: float = 0.0):
        try:
            valid = server.startswith(("http://", "https://")) and bool(httpx.URL(server).host)
        except httpx.InvalidURL:
            valid = False
        if not valid:
            raise ClientError(f"server {server!r} must be a URL like http://host:8000")
        self.obfuscate = obfuscator if callable(obfuscator) else load_obfuscator(obfuscator)
        # local DP (opt-in): every upload clipped and noised, fresh noise from the OS's entropy; inf = none
        mech = ldp.mechanism(ldp_epsilon, ldp_delta, shape_of(self.obfuscate), ldp_clip)
        self.noise = ldp.Noisy(mech) if mech else None
        self.url = f"{server.rstrip('/')}/v2/models/{model}/infer"
        self.server, self.model = server, model
        self.retries, self.backoff, self.binary = retries, backoff, binary
        self.images_per_request = images_per_request
        self.last_version = model_version
        self.on_version_change = on_version_change
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(timeout=timeout, headers=headers, transport=transport)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the public calls

    def classify(self, images: np.ndarray) -> Result:
        """Images (uint8 [N, C, H, W] of the obfuscator's shape, or floats in [0, 1]) -> classes; only O(x) (with
        the local-DP noise where it is on) leaves the device."""
        return self.send(quantize(self.upload(images)))

    def upload(self, images: np.ndarray) -> np.ndarray:
        """O(x) as floats, with the local-DP noise where it is on (before the 8-bit rounding that clamps it)."""
        z = self.obfuscate(images)
        return z if self.noise is None else self.noise(torch.from_numpy(np.asarray(z, dtype=np.float32))).numpy()

    def classify_files(self, paths: list[str | Path]) -> Result:
        return self.classify(read_images(paths, shape_of(self.obfuscate)))

    def send(self, pixels: np.ndarray) -> Result:
        """Upload already-obfuscated uint8 pixels [N, C, H, W], in requests of `images_per_request`."""
        parts = [self._infer(pixels[i:i + self.images_per_request]) for i in range(0, len(pixels), self.images_per_request)]
        return Result(np.concatenate([p.classes for p in parts]), [lab for p in parts for lab in p.labels],
                      np.concatenate([p.probabilities for p in parts]), [v for p in parts for v in p.versions])

    def download_weights(self, version: str, path: str | Path) -> Path:
        """Fetch a version's classifier weights (safetensors) into `path`, atomically, checking their sha256."""
        url = f"{self.server.rstrip('/')}/v2/models/{self.model}/versions/{version}/weights"
        try:
            response = self.http.get(url)
        except httpx.HTTPError as e:
            raise ServerUnavailable(f"cannot fetch weights from {self.server} ({type(e).__name__}: {str(e)[:80]})") from None
        if response.status_code == 404:
            raise WeightsUnavailable(f"{self.server} does not publish the weights of {self.model} version {version}")
        response = self._check(response)
        digest = hashlib.sha256(response.content).hexdigest()
        if digest != response.headers.get("x-model-sha256", digest):
            raise BadServer(f"{self.server} sent weights whose sha256 {digest[:12]}... is not the one it announced")
        atomic_write_bytes(path, response.content)
        return Path(path)

    # ---- one request

    def _infer(self, pixels: np.ndarray) -> Result:
        spec, raw = oip.tensor("images", pixels, "UINT8", self.binary)
        header = {"inputs": [spec], "parameters": {"binary_data_output": self.binary}}
        body, headers = oip.join_body(header, [raw] if raw is not None else [])
        response = self._post(body, headers)
        try:
            head, tail = oip.split_body(response.content, response.headers.get(oip.HEADER_LENGTH))
            outputs, offset = {}, 0
            for spec in head.get("outputs", []):
                outputs[spec.get("name")], offset = oip.read_tensor(spec, tail, offset)
            probs = np.asarray(outputs["probabilities"], dtype=np.float32)
            classes = np.asarray(outputs["class"], dtype=np.int64)
            labels = [b.decode() for b in outputs["label"]]
            version = head["model_version"]
        except (oip.WireError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise BadServer(f"{self.server} answered, but not with this model's outputs ({str(e)[:100]})") from None
        if not (len(classes) == len(labels) == len(probs) == len(pixels)) or not isinstance(version, str):
            raise BadServer(f"{self.server} answered {len(classes)} results for {len(pixels)} images")
        self._saw(version)
        return Result(classes, labels, probs, [version] * len(pixels))

    def _saw(self, version: str) -> None:
        old, self.last_version = self.last_version, version
        if old is not None and old != version and self.on_version_change is not None:
            self.on_version_change(old, version)

    def _post(self, body: bytes, headers: dict[str, str]) -> httpx.Response:
        """POST with retries (exponential backoff with jitter) on connection errors, timeouts and 503."""
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self.http.post(self.url, content=body, headers=headers)
            except httpx.TimeoutException:
                if last:
                    raise ServerUnavailable(f"{self.server} did not answer within {self.http.timeout.read} s "
                                            f"({attempt + 1} tries); is it overloaded?") from None
            except httpx.TransportError as e:
                if last:
                    raise ServerUnavailable(f"cannot reach {self.server} ({type(e).__name__}: {str(e)[:80]}) "
                                            f"after {attempt + 1} tries; is the server running?") from None
            except httpx.HTTPError as e:  # e.g. an undecodable response
                raise BadServer(f"{self.server} sent a broken response ({type(e).__name__}: {str(e)[:80]})") from None
            else:
                if response.status_code != 503 or last:
                    return self._check(response)
            time.sleep(self.backoff * 2**attempt * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code == 200:
            return response
        status = response.status_code
        try:
            message = str(response.json()["error"])[:300]
        except (ValueError, KeyError, TypeError):
            raise BadServer(f"{self.server} does not answer like an inference server (HTTP {status} on {self.url})") from None
        if status in (401, 403):
            raise AuthError(f"{self.server} refused the token ({status}: {message}); set PRIVOFFLOAD_TOKEN to the inference token")
        if status == 503:
            raise ServerUnavailable(f"{self.server} is unavailable (503: {message}) after {self.retries + 1} tries")
        if 400 <= status < 500:
            raise RequestRejected(f"{self.server} refused the request ({status}: {message})", status)
        raise BadServer(f"{self.server} failed ({status}: {message})")
