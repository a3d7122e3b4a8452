"""Settings in one place: dataclasses, loaded from TOML, overridden by `key=value` strings.

Every trainer takes one of these dataclasses and saves it, resolved, as `config.toml` beside its
outputs, so a run folder always says how it was made. Unknown keys and values of the wrong type
are errors, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from .errors import UserError


@dataclass
class OptimConfig:
    """One optimiser and its schedule (per step: linear warm-up, then `schedule` down to 0)."""

    name: str = "sgd"  # sgd (Nesterov momentum) | adam
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "linear"  # linear | cosine | constant
    warmup_epochs: float = 1.0

    def validate(self, where: str) -> None:
        _choice(f"{where}.name", self.name, ("sgd", "adam"))
        _choice(f"{where}.schedule", self.schedule, ("linear", "cosine", "constant"))
        _positive(f"{where}.lr", self.lr)
        if self.weight_decay < 0 or self.warmup_epochs < 0:
            raise UserError(f"{where}: weight_decay and warmup_epochs must be >= 0")


@dataclass
class ClassifierConfig:
    """Training of the cloud classifier C (a CIFAR ResNet18)."""

    width: int = 64  # channels of the first stage; 64 is the real ResNet18
    epochs: int = 50
    batch_size: int = 128
    subset: str = "first:20000"  # all | first:N | random:N | range:A:B
    flip: bool = False  # random horizontal flips
    test_subset: str = "all"
    init: str = ""  # run folder whose classifier weights to start from ("" = random init)
    eval_every: int = 5  # epochs between test evaluations (the last epoch is always evaluated)
    seed: int = 0
    precision: str = "auto"  # auto | bf16 | fp32
    channels_last: bool = True
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> None:
        for name in ("width", "epochs", "batch_size", "eval_every"):
            _positive(name, getattr(self, name))
        _choice("precision", self.precision, ("auto", "bf16", "fp32"))
        from .data import parse_subset

        parse_subset(self.subset)
        parse_subset(self.test_subset)
        self.optim.validate("optim")


def _adam(lr: float) -> OptimConfig:
    """The obfuscation game's optimiser: Adam at a constant rate, no weight decay (docs/method-decisions.md)."""
    return OptimConfig(name="adam", lr=lr, weight_decay=0.0, schedule="constant", warmup_epochs=0.0)


@dataclass
class ObfuscatorConfig:
    """Training of the obfuscator O and its co-trained deobfuscator D against a frozen classifier C.

    O minimises CE(C(O(x)), y) - lam * R(D(O(x)), x); D minimises R(D(O(x)), x).
    """

    classifier: str = ""  # run folder holding classifier.safetensors (C, kept frozen)
    width: int = 32  # codec width of O and D; 32 is Table I
    epochs: int = 100
    batch_size: int = 64
    subset: str = "first:20000"
    flip: bool = False
    test_subset: str = "all"
    lam: float = 4.0  # weight of D's reconstruction loss in O's objective (chosen by a sweep, docs/method-decisions.md)
    recon_loss: str = "mse"  # mse | l1: R, the reconstruction loss
    init: str = ""  # obfuscator run folder whose O and D to continue from ("" = random init)
    # drift robustness (docs/drift-robustness.md): O must also stay readable for these extra classifiers
    ensemble: list[str] = field(default_factory=list)  # classifier run folders or .safetensors files
    ensemble_weight: float = 1.0  # weight of each extra classifier's loss; C's weight is 1
    ensemble_per_step: int = 0  # extras drawn at random per step (0 = all of them, every step)
    eval_every: int = 5
    seed: int = 0
    precision: str = "auto"  # auto (bf16 where use_bf16 finds it fast) | bf16 | fp32
    channels_last: bool = True
    optim_o: OptimConfig = field(default_factory=lambda: _adam(3e-3))
    optim_d: OptimConfig = field(default_factory=lambda: _adam(1e-3))

    def validate(self) -> None:
        if not self.classifier:
            raise UserError("config: classifier is required: the run folder of the classifier to obfuscate for (--classifier RUN)")
        for name in ("width", "epochs", "batch_size", "eval_every"):
            _positive(name, getattr(self, name))
        if not self.lam >= 0:
            raise UserError(f"config: lam = {self.lam!r} must be >= 0")
        if not self.ensemble_weight >= 0:
            raise UserError(f"config: ensemble_weight = {self.ensemble_weight!r} must be >= 0")
        if not 0 <= self.ensemble_per_step <= len(self.ensemble):
            raise UserError(f"config: ensemble_per_step = {self.ensemble_per_step} must be between 0 (all) and "
                            f"the {len(self.ensemble)} ensemble classifiers")
        _choice("recon_loss", self.recon_loss, ("mse", "l1"))
        _choice("precision", self.precision, ("auto", "bf16", "fp32"))
        from .data import parse_subset

        parse_subset(self.subset)
        parse_subset(self.test_subset)
        self.optim_o.validate("optim_o")
        self.optim_d.validate("optim_d")


@dataclass
class AttackConfig:
    """A fresh deobfuscator trained on (quantised O(x), x) pairs with O frozen: the privacy number that counts."""

    obfuscator: str = ""  # run folder holding obfuscator.safetensors (kept frozen)
    arch: str = "unet"  # unet (the stronger decoder, skip connections) | codec (the Table I layout)
    width: int = 32
    epochs: int = 20
    batch_size: int = 128
    subset: str = "first:20000"  # training images whose originals the attacker knows
    flip: bool = False
    test_subset: str = "all"
    recon_loss: str = "mse"  # mse | l1
    eval_every: int = 5
    seed: int = 0
    precision: str = "auto"  # auto (bf16 where use_bf16 finds it fast) | bf16 | fp32
    channels_last: bool = True
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adam", lr=1e-3, weight_decay=0.0,
                                                                   schedule="cosine", warmup_epochs=0.0))

    def validate(self) -> None:
        if not self.obfuscator:
            raise UserError("config: obfuscator is required: the run folder of the obfuscator to attack (--obfuscator RUN)")
        for name in ("width", "epochs", "batch_size", "eval_every"):
            _positive(name, getattr(self, name))
        _choice("arch", self.arch, ("codec", "unet"))
        _choice("recon_loss", self.recon_loss, ("mse", "l1"))
        _choice("precision", self.precision, ("auto", "bf16", "fp32"))
        from .data import parse_subset

        parse_subset(self.subset)
        parse_subset(self.test_subset)
        self.optim.validate("optim")


@dataclass
class ResyncConfig:
    """Re-syncing an obfuscator O (and its D) to a classifier that changed, within budgets (client/resync.py).

    White-box (the cloud publishes the new weights): `steps` steps of the game against them. Black-box (only
    the API's probabilities): `rounds` rounds, each uploading max_queries/rounds obfuscated images, distilling
    a local surrogate of the new classifier from the answers, then steps/rounds steps of the game against it.
    """

    mode: str = "auto"  # auto (white-box where the server publishes weights, else black-box) | white-box | black-box
    steps: int = 200  # steps of O and D, either mode
    batch_size: int = 64
    lam: float = 1.0  # the game's lambda; keep the obfuscator's own
    flip: bool = True
    max_queries: int = 4096  # black-box: images uploaded to the API, at most
    rounds: int = 4  # black-box: query rounds
    surrogate_steps: int = 50  # black-box: distillation steps of the surrogate per round
    eval_every: int = 50  # steps between evaluations (in the protocol)
    subset: str = "first:20000"  # in the protocol: the client's own labelled images
    test_subset: str = "all"
    seed: int = 0
    precision: str = "auto"  # auto | bf16 | fp32
    optim_o: OptimConfig = field(default_factory=lambda: _adam(3e-3))
    optim_d: OptimConfig = field(default_factory=lambda: _adam(1e-3))
    optim_surrogate: OptimConfig = field(default_factory=lambda: OptimConfig(name="adam", lr=3e-4, weight_decay=0.0,
                                                                             schedule="constant", warmup_epochs=0.0))

    def validate(self) -> None:
        _choice("mode", self.mode, ("auto", "white-box", "black-box"))
        for name in ("steps", "batch_size", "max_queries", "rounds", "eval_every"):
            _positive(name, getattr(self, name))
        if self.surrogate_steps < 0 or not self.lam >= 0:
            raise UserError("config: surrogate_steps and lam must be >= 0")
        if self.max_queries < self.rounds:
            raise UserError(f"config: max_queries = {self.max_queries} leaves no query for each of {self.rounds} rounds")
        _choice("precision", self.precision, ("auto", "bf16", "fp32"))
        from .data import parse_subset

        parse_subset(self.subset)
        parse_subset(self.test_subset)
        for name in ("optim_o", "optim_d", "optim_surrogate"):
            getattr(self, name).validate(name)


@dataclass
class DriftConfig:
    """When the client re-syncs by itself (client/drift.py); every check and decision is logged."""

    on_version_change: bool = True  # re-sync when the cloud answers with another model version
    canary_threshold: float = 0.0  # re-sync when accuracy on the labelled canary images falls below this (0 = off)
    canary_every: int = 50  # classify calls between canary checks
    reclassify: bool = True  # after a re-sync, classify the call's images again with the new obfuscator
    retry_after_calls: int = 1  # a failed re-sync is tried again after this many classify calls, doubling each failure

    def validate(self) -> None:
        if not 0 <= self.canary_threshold <= 1:
            raise UserError(f"config: canary_threshold = {self.canary_threshold} must be an accuracy in [0, 1]")
        _positive("canary_every", self.canary_every)
        _positive("retry_after_calls", self.retry_after_calls)


@dataclass
class SweepConfig:
    """One obfuscator per lambda, each followed by a fresh attack: the privacy-utility frontier."""

    lams: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0])
    obfuscator: ObfuscatorConfig = field(default_factory=ObfuscatorConfig)  # its lam is set per point
    attack: AttackConfig = field(default_factory=AttackConfig)  # its obfuscator is set per point

    def validate(self) -> None:
        if not self.lams:
            raise UserError("config: lams is empty; give at least one lambda, e.g. --lams 0,1,4")
        if len(set(self.lams)) != len(self.lams):
            raise UserError(f"config: lams {self.lams} repeats a value")
        for lam in self.lams:
            dataclasses.replace(self.obfuscator, lam=lam).validate()
        dataclasses.replace(self.attack, obfuscator="(each obfuscator of the sweep)").validate()


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"config: {name} = {value!r} is not one of {', '.join(allowed)}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise UserError(f"config: {name} = {value!r} must be > 0")


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise UserError(f"config: {where or 'top level'} must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(
            f"config: unknown key {where + '.' if where else ''}{unknown[0]}; known keys: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"config: {where} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool, float) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise UserError(f"config: {where} must be {tp.__name__}, got {value!r}")
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=0.1` -> (["optim", "lr"], 0.1); the value is read as TOML, else as a string."""
    if "=" not in text:
        raise UserError(f"override {text!r} is not key=value (for example optim.lr=0.1)")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def load(cls: type, path: str | Path | None = None, overrides: dict[str, Any] | None = None,
         sets: list[str] | None = None) -> Any:
    """Defaults <- TOML file <- `sets` ("a.b=v") <- `overrides` (CLI options that were given)."""
    data: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UserError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"config file {path} is not valid TOML: {e}") from None
    for text in sets or []:
        keys, value = parse_override(text)
        _set(data, keys, value)
    for key, value in (overrides or {}).items():
        if value is not None:
            _set(data, key.split("."), value)
    cfg = from_dict(cls, data)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def _set(data: dict[str, Any], keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        data = data.setdefault(k, {})
        if not isinstance(data, dict):
            raise UserError(f"config: {'.'.join(keys)} goes through a key that is not a table")
    data[keys[-1]] = value


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Any) -> str:
    return tomli_w.dumps(to_dict(cfg))


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
    max_connections: int = 256  # open connections and requests at once; beyond, 503 (uvicorn's limit_concurrency)
    header_timeout_s: float = 10.0  # a connection must send a request's headers within this, or is closed
    body_timeout_s: float = 30.0  # and the request's body within this (408)
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    allowed_hosts: list[str] = field(default_factory=list)  # Host headers accepted with no_auth ([] = loopback names)

    def validate(self) -> None:
        for name in ("max_batch_images", "max_request_images", "max_body_mb", "max_queue_images", "queue_timeout_s",
                     "max_connections", "header_timeout_s", "body_timeout_s", "keep_alive_s"):
            _positive(name, getattr(self, name))
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
        _choice("log_level", self.log_level, ("debug", "info", "warning", "error"))
