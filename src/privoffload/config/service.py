"""The cloud service's settings (`privoffload serve`). Tokens are not settings: they come from the environment."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError
from .loader import choice, positive


@dataclass
class ServeConfig:
    """The cloud service (`privoffload serve`). Tokens are not settings: they come from the environment."""

    repo: str = "models"  # the model repository folder
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"  # auto | cpu | cuda
    batch_window_ms: float = 2.0  # how long a batch waits for more requests; 0 = no micro-batching
    max_batch_images: int = 256  # images per forward pass
    max_request_images: int = 256  # images per request (an inference body may be as large as these need, no larger)
    max_body_mb: float = 16.0  # no request body is larger (413), whatever the other limits allow
    threads: int = 0  # CPU threads for the model (0 = torch's default); fewer than cores when the CPU is shared
    serve_weights: bool = False  # let clients download each version's weights (white-box re-sync)
    no_auth: bool = False  # serve without tokens (trusted networks and tests only)
    log_level: str = "info"
    ssl_certfile: str = ""  # PEM certificate (chain): with ssl_keyfile, the service speaks only https
    ssl_keyfile: str = ""  # PEM private key of the certificate
    max_queue_images: int = 1024  # images waiting for a forward pass; more are refused with 503 and Retry-After
    queue_timeout_s: float = 10.0  # a request still waiting for its forward pass after this is dropped (503)
    max_requests: int = 256  # requests being handled at once (health routes aside); more wait request_wait_s, then 503
    request_wait_s: float = 2.0  # how long a request beyond max_requests waits for a slot before its 503
    max_connections: int = 1024  # open connections; beyond, the oldest idle one of the client with the most is cut
    max_idle_per_client: int = 32  # idle or half-sent-head connections of one client address beyond which its
    #                               idle ones get only idle_grace_s to send a complete request head
    idle_grace_s: float = 1.0
    max_headers: int = 100  # header lines in a request head; more: 431, unparsed
    max_head_kb: float = 16.0  # bytes of a request head; more: 431, unparsed
    parse_processes: int = 1  # processes that parse large JSON bodies (JSON parsing holds the GIL: not on the loop)
    header_timeout_s: float = 10.0  # a connection must send a request's headers within this, or is closed
    body_timeout_s: float = 30.0  # and the request's body within this (408)
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    allowed_hosts: list[str] = field(default_factory=list)  # Host headers accepted with no_auth ([] = loopback names)
    web: str = ""  # folder of the browser client's exported models (obfuscator.onnx, attack.onnx): served at /web/

    def validate(self) -> None:
        for name in ("max_batch_images", "max_request_images", "max_body_mb", "max_queue_images", "queue_timeout_s",
                     "max_requests", "request_wait_s", "max_connections", "max_idle_per_client", "idle_grace_s",
                     "max_headers", "max_head_kb", "parse_processes", "header_timeout_s", "body_timeout_s",
                     "keep_alive_s"):
            positive(name, getattr(self, name))
        if self.threads < 0:
            raise UserError(f"config: threads = {self.threads} must be >= 0")
        if self.batch_window_ms < 0:
            raise UserError(f"config: batch_window_ms = {self.batch_window_ms} must be >= 0")
        if not 0 <= self.port < 65536:
            raise UserError(f"config: port = {self.port} is not a TCP port")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise UserError("config: give both ssl_certfile and ssl_keyfile (or neither, for plain http)")
        if self.max_request_images > self.max_batch_images:
            raise UserError(f"config: max_request_images = {self.max_request_images} exceeds max_batch_images = "
                            f"{self.max_batch_images}: a request must fit one forward pass")
        if self.max_queue_images < self.max_request_images:
            raise UserError(f"config: max_queue_images = {self.max_queue_images} cannot hold one request of "
                            f"max_request_images = {self.max_request_images}")
        choice("log_level", self.log_level, ("debug", "info", "warning", "error"))
