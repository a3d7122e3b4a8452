"""The obfuscating client: obfuscate on the device, upload only O(x) as 8-bit pixels, read the classes.

It speaks the Open Inference Protocol v2 (binary tensor data by default), remembers the model
version the cloud answered with, and calls `on_version_change(old, new)` when that changes: the
cloud retrained its classifier, and the obfuscator may need re-syncing (client/drift.py decides,
client/resync.py does it; `download_weights` fetches a version's weights where the cloud publishes them).

It trusts the server with nothing it cannot check: the token goes over plain http only to this
machine (or when told to), to the server and to a proxy alike; proxy settings in the environment are
ignored (a proxy is used only when given); answers are read with a size cap and a deadline and must be
the protocol's tensors with a plain version number, no older than `min_version`; and downloaded weights
must match the manifest the publisher signed (with `publisher_key`), whatever server or proxy sent them.
Without the key, weights are refused unless the caller says it trusts the server's own hash (`unsigned`).
The model's name defaults to the one its obfuscator's data set is published under (`config.model_name`);
its class count and names come from the served model (its metadata and answers), never from here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import math
import random
import re
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import httpx
import numpy as np
import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .. import ldp, oip
from ..config import model_name
from ..errors import UserError
from ..runtime import atomic_path
from .images import read_images
from .obfuscator import Obfuscate, dataset_of, load_obfuscator, quantize, shape_of

DEFAULT_MODEL = model_name("cifar10")  # for an obfuscator given as a function, which names no data set
VERSION = re.compile(r"[1-9][0-9]{0,8}")
SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_RETRY_AFTER = 60.0  # seconds; a server asking for longer is waited for this long
VersionHook = Callable[[str | None, str], None]
UploadHook = Callable[[int, int], None]  # (images, attempt) before each upload; may raise to stop it


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


class Reply(NamedTuple):
    status: int
    headers: httpx.Headers
    content: bytes


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_publisher_key(path: str | Path) -> Ed25519PublicKey:
    """The publisher's Ed25519 public key, PEM (`openssl pkey -in publisher.pem -pubout`)."""
    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except OSError as e:
        raise UserError(f"cannot read the publisher key {path} ({e.strerror})") from None
    except ValueError as e:
        raise UserError(f"{path} is not a PEM public key ({str(e)[:80]})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UserError(f"{path} is not an Ed25519 public key")
    return key


class Client:
    """`Client(url, obfuscator=RUN)`; then `classify(images)` or `classify_files(paths)`.

    `model`: the model's name on the server (default: the obfuscator's data set's, `config.model_name`).
    `ca_cert`: the CA (PEM) that signed the server's certificate, for a private or self-signed one.
    `allow_http`: send the token over plain http to another machine. `proxy`: an HTTP(S) proxy URL to go
    through (the environment's HTTP_PROXY and the like are ignored). `publisher_key`: the PEM public key
    whose signature downloaded weights must carry. `min_version`: answers and weights of an older version
    of the model are refused (a server rolled back, or one replaying an old signed version).
    `obfuscator_version`: the version under which the cloud registered this obfuscator; announced with every
    request, so that a cloud whose newest classifier breaks it answers with an older one that does not.
    `uploaded` counts the images sent, retries included.
    """

    def __init__(self, server: str, obfuscator: str | Path | Obfuscate, *, token: str | None = None,
                 model: str | None = None, timeout: float = 30.0, retries: int = 3, backoff: float = 0.25,
                 binary: bool = True, images_per_request: int = 256, model_version: str | None = None,
                 on_version_change: VersionHook | None = None, ca_cert: str | Path | None = None,
                 allow_http: bool = False, proxy: str | None = None, publisher_key: str | Path | None = None,
                 min_version: int = 0, max_download_mb: float = 512.0, ldp_epsilon: float = float("inf"),
                 ldp_delta: float = 1e-5, ldp_clip: float = 0.0, obfuscator_version: int | None = None):
        try:
            url = httpx.URL(server)
            valid = server.startswith(("http://", "https://")) and bool(url.host)
        except httpx.InvalidURL:
            valid = False
        if not valid:
            raise ClientError(f"server {server!r} must be a URL like https://host:8000")
        if token and url.scheme == "http" and not is_loopback(url.host) and not allow_http:
            raise ClientError(f"refusing to send the token to {server} over plain http, where anyone on the way can "
                              f"read it; use https, or allow_http (--allow-http) on a network you trust")
        if proxy is not None:
            check_proxy(proxy, url, bool(token), allow_http)
        self.publisher_key = load_publisher_key(publisher_key) if publisher_key else None
        self.min_version = min_version
        if obfuscator_version is not None and (isinstance(obfuscator_version, bool) or
                                               not isinstance(obfuscator_version, int) or obfuscator_version < 1):
            raise ClientError(f"obfuscator_version {obfuscator_version!r} must be a version number, 1 or more")
        self.obfuscator_version = obfuscator_version
        self.obfuscate = obfuscator if callable(obfuscator) else load_obfuscator(obfuscator)
        model = model or (DEFAULT_MODEL if callable(obfuscator) else model_name(dataset_of(obfuscator)))
        # local DP (opt-in): every upload clipped and noised, fresh noise from the OS's entropy; inf = none
        mech = ldp.mechanism(ldp_epsilon, ldp_delta, shape_of(self.obfuscate), ldp_clip)
        self.noise = ldp.Noisy(mech) if mech else None
        self.server, self.model = server.rstrip("/"), model
        self.url = f"{self.server}/v2/models/{model}/infer"
        self.timeout, self.retries, self.backoff, self.binary = timeout, retries, backoff, binary
        self.images_per_request = images_per_request
        self.max_download = int(max_download_mb * 2**20)
        self.last_version = model_version
        self.on_version_change = on_version_change
        self.uploaded = 0
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # trust_env=False: no HTTP_PROXY (the token would go to whoever it names), no netrc, no SSL_CERT_FILE
        self.http = httpx.Client(timeout=timeout, headers=headers, verify=_trust(ca_cert), proxy=proxy, trust_env=False)

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

    def send(self, pixels: np.ndarray, on_upload: UploadHook | None = None) -> Result:
        """Upload already-obfuscated uint8 pixels [N, C, H, W], in requests of `images_per_request`.

        `on_upload(images, attempt)` is called before every upload, retries included (a query budget)."""
        if len(pixels) == 0:  # nothing to upload: the served model's metadata says how many classes there would be
            return Result(np.zeros(0, np.int64), [], np.zeros((0, self.class_count()), np.float32), [])
        parts = [self._infer(pixels[i:i + self.images_per_request], on_upload)
                 for i in range(0, len(pixels), self.images_per_request)]
        return Result(np.concatenate([p.classes for p in parts]), [lab for p in parts for lab in p.labels],
                      np.concatenate([p.probabilities for p in parts]), [v for p in parts for v in p.versions])

    def metadata(self) -> dict:
        """The served model's metadata (Open Inference Protocol): its version, inputs and outputs."""
        url = f"{self.server}/v2/models/{self.model}"
        try:
            with self.http.stream("GET", url) as response:
                reply = self._check(self._read(response, 64 * 1024, self.timeout), url)
            meta = json.loads(reply.content)
            if not isinstance(meta, dict) or not isinstance(meta.get("outputs"), list):
                raise ValueError("no outputs")
            return meta
        except httpx.HTTPError as e:
            raise ServerUnavailable(f"cannot reach {self.server} ({type(e).__name__}: {str(e)[:80]})") from None
        except ValueError as e:
            raise BadServer(f"{self.server} sent no model metadata ({str(e)[:80]})") from None

    def class_count(self) -> int:
        """How many classes the served model tells apart (its `probabilities` output's second dimension)."""
        for out in self.metadata()["outputs"]:
            shape = out.get("shape") if isinstance(out, dict) else None
            if out.get("name") == "probabilities" and isinstance(shape, list) and len(shape) == 2 \
                    and oip.is_int(shape[1]) and shape[1] > 0:
                return shape[1]
        raise BadServer(f"{self.server}'s metadata of {self.model} has no probabilities output [N, classes]")

    def download_weights(self, version: str, path: str | Path, unsigned: bool = False) -> Path:
        """Fetch a version's classifier weights (safetensors) into `path`, atomically and durably, streamed
        with a size cap. Their sha256 must be the one the publisher signed (with `publisher_key`). Without the
        key they are refused, unless `unsigned`: then the sha256 is the one the server itself announces
        (X-Model-Sha256), which catches damage on the way and nothing else: whoever answers chose both."""
        version = self._version(version)
        if self.publisher_key is None and not unsigned:
            raise ClientError(f"refusing weights nobody signed: without the publisher's key (publisher_key) the "
                              f"weights of {self.model} version {version} can only be checked against the server's "
                              f"own hash; pass unsigned=True to trust the server that far")
        expected = self._signed_sha256(version) if self.publisher_key else None
        url = f"{self.server}/v2/models/{self.model}/versions/{version}/weights"
        try:
            with self.http.stream("GET", url) as response, atomic_path(path) as tmp:
                if response.status_code == 404:
                    raise WeightsUnavailable(f"{self.server} does not publish the weights of {self.model} version {version}")
                if response.status_code != 200:
                    self._check(self._read(response, 64 * 1024, self.timeout), url)
                announced = response.headers.get("x-model-sha256", "")
                if expected is None and not SHA256.fullmatch(announced):
                    raise BadServer(f"{self.server} sent weights without a valid X-Model-Sha256 header")
                digest = hashlib.sha256()
                with open(tmp, "wb") as f:
                    for chunk in self._chunks(response, self.max_download, self.timeout + self.max_download / 2**20):
                        digest.update(chunk)
                        f.write(chunk)
                if digest.hexdigest() != (expected or announced):
                    raise BadServer(f"{self.server} sent weights of {self.model} version {version} whose sha256 "
                                    f"{digest.hexdigest()[:12]}... is not the {'signed' if expected else 'announced'} one")
        except httpx.HTTPError as e:
            raise ServerUnavailable(f"cannot fetch weights from {self.server} ({type(e).__name__}: {str(e)[:80]})") from None
        return Path(path)

    # ---- one request

    def _infer(self, pixels: np.ndarray, on_upload: UploadHook | None) -> Result:
        spec, raw = oip.tensor("images", pixels, "UINT8", self.binary)
        header = {"inputs": [spec], "parameters": {"binary_data_output": self.binary}}
        if self.obfuscator_version is not None:
            header["parameters"]["obfuscator_version"] = str(self.obfuscator_version)
        body, headers = oip.join_body(header, [raw] if raw is not None else [])
        reply = self._post(body, headers, len(pixels), on_upload)
        n = len(pixels)
        try:
            head, tail = oip.split_body(reply.content, reply.headers.get(oip.HEADER_LENGTH))
            if not isinstance(head.get("outputs"), list):
                raise oip.WireError("no outputs")
            outputs, offset = {}, 0
            for spec in head["outputs"]:
                outputs[spec.get("name") if isinstance(spec, dict) else None], offset = oip.read_tensor(spec, tail, offset)
            probs, classes, labels = outputs["probabilities"], outputs["class"], outputs["label"]
            if not (isinstance(probs, np.ndarray) and probs.dtype.kind == "f" and probs.ndim == 2 and len(probs) == n
                    and np.isfinite(probs).all()):
                raise oip.WireError("probabilities are not finite numbers [N, classes]")
            if not (isinstance(classes, np.ndarray) and classes.dtype.kind in "iu" and classes.shape == (n,)
                    and ((0 <= classes) & (classes < probs.shape[1])).all()):
                raise oip.WireError("class is not N class numbers")
            if not (isinstance(labels, list) and len(labels) == n):
                raise oip.WireError("label is not N strings")
            labels = [b.decode() for b in labels]
        except (oip.WireError, KeyError, UnicodeDecodeError) as e:
            raise BadServer(f"{self.server} answered, but not with this model's outputs ({str(e)[:100]})") from None
        version = head.get("model_version")
        if not isinstance(version, str) or not VERSION.fullmatch(version):
            raise BadServer(f"{self.server} answered with the model version {str(version)[:20]!r}, not a version number")
        self._not_older(version)
        self._saw(version)
        return Result(classes.astype(np.int64), labels, probs.astype(np.float32), [version] * n)

    def _saw(self, version: str) -> None:
        old, self.last_version = self.last_version, version
        if old is not None and old != version and self.on_version_change is not None:
            self.on_version_change(old, version)

    def _post(self, body: bytes, headers: dict[str, str], images: int, on_upload: UploadHook | None) -> Reply:
        """POST with retries (exponential backoff with jitter, or the server's Retry-After) where the request
        could not be answered: no connection, a dropped connection, 503. Not after a timeout: the server has the
        images and may be working on them; sending them again would upload them twice and add to its load."""
        cap = 64 * 1024 + 4096 * images  # an answer is a few hundred bytes per image
        for attempt in range(self.retries + 1):
            last, wait = attempt == self.retries, 0.0
            if on_upload is not None:
                on_upload(images, attempt)
            self.uploaded += images
            try:
                with self.http.stream("POST", self.url, content=body, headers=headers) as response:
                    reply = self._read(response, cap, self.timeout)
            except httpx.ConnectTimeout:
                if last:
                    raise ServerUnavailable(f"cannot connect to {self.server} within {self.timeout} s "
                                            f"({attempt + 1} tries); is it reachable?") from None
            except httpx.TimeoutException:
                raise ServerUnavailable(f"{self.server} did not answer within {self.timeout} s "
                                        f"({attempt + 1} tries); is it overloaded?") from None
            except httpx.TransportError as e:
                if _untrusted_certificate(e):
                    raise ClientError(f"the certificate of {self.server} is not trusted ({str(e)[:120]}); give the CA "
                                      f"that signed it (ca_cert, --ca-cert)") from None
                if last:
                    raise ServerUnavailable(f"cannot reach {self.server} ({type(e).__name__}: {str(e)[:80]}) "
                                            f"after {attempt + 1} tries; is the server running?") from None
            except httpx.HTTPError as e:  # e.g. an undecodable response
                raise BadServer(f"{self.server} sent a broken response ({type(e).__name__}: {str(e)[:80]})") from None
            else:
                if reply.status != 503 or last:
                    return self._check(reply, self.url)
                wait = _retry_after(reply.headers)
            time.sleep(max(wait, self.backoff * 2**attempt * (0.5 + random.random())))
        raise AssertionError("unreachable")

    def _read(self, response: httpx.Response, cap: int, seconds: float) -> Reply:
        return Reply(response.status_code, response.headers, b"".join(self._chunks(response, cap, seconds)))

    def _chunks(self, response: httpx.Response, cap: int, seconds: float) -> Iterator[bytes]:
        """The body, decoded, refused past `cap` bytes or `seconds` in all (a hostile server may send forever)."""
        deadline, size = time.monotonic() + seconds, 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > cap:
                raise BadServer(f"{self.server} sent more than {cap} bytes where far fewer were due")
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"{self.server} took over {seconds:g} s to send its answer")
            yield chunk

    def _check(self, reply: Reply, url: str) -> Reply:
        if reply.status == 200:
            return reply
        status = reply.status
        if status == 503:
            raise ServerUnavailable(f"{self.server} is unavailable (503) after {self.retries + 1} tries; it is "
                                    f"overloaded or restarting, try again later")
        try:
            message = str(json.loads(reply.content)["error"])[:300]
        except (ValueError, KeyError, TypeError):
            raise BadServer(f"{self.server} does not answer like an inference server (HTTP {status} on {url})") from None
        if status in (401, 403):
            raise AuthError(f"{self.server} refused the token ({status}: {message}); set PRIVOFFLOAD_TOKEN to the inference token")
        if 400 <= status < 500:
            raise RequestRejected(f"{self.server} refused the request ({status}: {message})", status)
        raise BadServer(f"{self.server} failed ({status}: {message})")

    # ---- verifying what the server says

    def _version(self, version: str) -> str:
        if not isinstance(version, str) or not VERSION.fullmatch(version):
            raise ClientError(f"{str(version)[:20]!r} is not a model version number")
        return self._not_older(version)

    def _not_older(self, version: str) -> str:
        if int(version) < self.min_version:
            raise BadServer(f"{self.server} offers {self.model} version {version}, older than version {self.min_version}, "
                            f"the oldest this client accepts (min_version): a rollback it does not trust")
        return version

    def _signed_sha256(self, version: str) -> str:
        """The sha256 of a version's weights from its manifest, once the publisher's signature of it checks out."""
        url = f"{self.server}/v2/models/{self.model}/versions/{version}/manifest"
        try:
            with self.http.stream("GET", url) as response:
                reply = self._read(response, 64 * 1024, self.timeout)
        except httpx.HTTPError as e:
            raise ServerUnavailable(f"cannot fetch the manifest from {self.server} ({type(e).__name__}: {str(e)[:80]})") from None
        if reply.status == 404:
            raise WeightsUnavailable(f"{self.server} does not publish the weights of {self.model} version {version}")
        self._check(reply, url)
        try:
            signed = json.loads(reply.content)
            text, signature = signed["manifest"], signed["signature"]
            if signature is None:
                raise BadServer(f"{self.model} version {version} on {self.server} is not signed; the publisher must "
                                f"publish with --signing-key")
            self.publisher_key.verify(base64.b64decode(signature, validate=True), text.encode())
            manifest = json.loads(text)
            ok = (manifest["name"], str(manifest["version"])) == (self.model, version)
            sha256 = manifest["sha256"]
        except InvalidSignature:
            raise BadServer(f"the manifest of {self.model} version {version} from {self.server} does not carry the "
                            f"publisher's signature: refusing its weights") from None
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as e:
            raise BadServer(f"{self.server} sent no valid signed manifest ({type(e).__name__})") from None
        if not ok or not isinstance(sha256, str) or not SHA256.fullmatch(sha256):
            raise BadServer(f"{self.server} sent the signed manifest of another version, or one without a sha256")
        return sha256


def check_proxy(proxy: str, server: httpx.URL, token: bool, allow_http: bool) -> None:
    """The plain-http rule for a proxy: to a plain-http server, the proxy reads every request, the token included,
    so it must be on this machine (or allow_http). An https server is reached through a tunnel the proxy cannot read."""
    try:
        url = httpx.URL(proxy)
        valid = url.scheme in ("http", "https") and bool(url.host)
    except httpx.InvalidURL:
        valid = False
    if not valid:
        raise ClientError(f"proxy {proxy!r} must be a URL like http://proxy.example:3128")
    if token and server.scheme == "http" and url.scheme == "http" and not is_loopback(url.host) and not allow_http:
        raise ClientError(f"refusing to send the token through the proxy {proxy} over plain http, where it can read "
                          f"it; use an https server, a proxy on this machine, or allow_http on a network you trust")


def _trust(ca_cert: str | Path | None) -> ssl.SSLContext | bool:
    if ca_cert is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(ca_cert))
    except (OSError, ssl.SSLError) as e:
        raise UserError(f"cannot use the CA certificate {ca_cert} ({getattr(e, 'strerror', None) or e})") from None


def _untrusted_certificate(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, ssl.SSLCertVerificationError):
            return True
        e = e.__cause__ or e.__context__
    return False


def _retry_after(headers: httpx.Headers) -> float:
    """The server's Retry-After in seconds (0 if absent or an HTTP date), at most MAX_RETRY_AFTER."""
    try:
        seconds = float(headers.get("retry-after", ""))
    except ValueError:
        return 0.0
    return min(max(seconds, 0.0), MAX_RETRY_AFTER) if math.isfinite(seconds) else 0.0
