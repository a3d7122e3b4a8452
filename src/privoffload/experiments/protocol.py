"""The paper's protocol as stages in order, each one a run folder inside the protocol's folder.

    c0        baseline classifier C0 (first N images, no augmentation)
    o0        baseline obfuscator O0 and deobfuscator D0 against frozen C0
    drift     experiment 1: C goes on from C0 (all images, flips); O0 measured on the current C
    recovery  experiment 2: O and D go on from O0 against the final C
    attack    a fresh attacker against the final obfuscator: the privacy number that counts

Giving the same command again continues: finished stages are reused (each stage checks that its
saved config still matches), and the interrupted stage resumes from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from .. import config as config_mod
from .. import nets
from ..config import AttackConfig, ClassifierConfig, ObfuscatorConfig
from ..data import load_cifar10
from ..errors import UserError
from ..train.common import atomic_write_bytes, is_done, pick_device

PROFILES = ("smoke", "quick", "paper")


@dataclass
class ProtocolConfig:
    """A whole reproduction. Each stage's `classifier`/`init`/`obfuscator` links are filled in here."""

    profile: str = "paper"
    baseline_classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    baseline_obfuscator: ObfuscatorConfig = field(default_factory=ObfuscatorConfig)
    drift: ClassifierConfig = field(default_factory=lambda: ClassifierConfig(subset="all", flip=True))
    recovery: ObfuscatorConfig = field(default_factory=lambda: ObfuscatorConfig(subset="all", flip=True))
    attack: AttackConfig = field(default_factory=AttackConfig)


def profile_path(name: str) -> Path:
    if name not in PROFILES:
        raise UserError(f"profile {name!r} is not one of {', '.join(PROFILES)}")
    return Path(str(resources.files("privoffload.experiments") / "profiles" / f"{name}.toml"))


def auto_profile(device: str = "auto") -> str:
    """The profile that suits this machine: the paper's on CUDA, the 10-minute one on a CPU."""
    return "paper" if pick_device(device).type == "cuda" else "quick"


def load_profile(name: str, sets: list[str] | None = None) -> ProtocolConfig:
    return config_mod.load(ProtocolConfig, profile_path(name), sets=sets, overrides={"profile": name})


def stage_configs(cfg: ProtocolConfig, out: Path) -> dict[str, Any]:
    """The five stage configs with their links to earlier stages, each validated."""
    stages = {
        "c0": cfg.baseline_classifier,
        "o0": replace(cfg.baseline_obfuscator, classifier=str(out / "c0")),
        "drift": replace(cfg.drift, init=str(out / "c0")),
        "recovery": replace(cfg.recovery, classifier=str(out / "drift"), init=str(out / "o0")),
        "attack": replace(cfg.attack, obfuscator=str(out / "recovery")),
    }
    for name, stage_cfg in stages.items():
        try:
            stage_cfg.validate()
        except UserError as e:
            raise UserError(f"stage {name}: {e}") from None
    return stages


def reproduce(cfg: ProtocolConfig, out: str | Path, *, data_root: str | None = None, device: str = "auto",
              only: str | None = None) -> Path:
    """Run (or continue) every stage, then draw the figures and write report.md. Returns the report's path."""
    from ..privacy.attack import train_attack
    from ..train.classifier import train_classifier
    from ..train.obfuscator import train_obfuscator
    from .report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "config.toml"
    text = config_mod.to_toml(cfg)
    if saved.exists() and saved.read_text() != text:
        raise UserError(f"{out} was made with another protocol config (see {saved}); "
                        "give the same --profile and --set options, or choose a new --out")
    atomic_write_bytes(saved, text.encode())
    stages = stage_configs(cfg, out)
    data = load_cifar10(data_root)
    atomic_write_bytes(out / "data.txt", data.source.encode())

    def o0_probe() -> dict[str, Any]:
        return {"O0": nets.load(out / "o0" / "obfuscator.safetensors", expect="codec")}

    runners: dict[str, Callable[[], Any]] = {
        "c0": lambda: train_classifier(stages["c0"], out / "c0", resume=True, data=data, device=device),
        "o0": lambda: train_obfuscator(stages["o0"], out / "o0", resume=True, data=data, device=device),
        "drift": lambda: train_classifier(stages["drift"], out / "drift", resume=True, data=data, device=device,
                                          probes=o0_probe()),
        "recovery": lambda: train_obfuscator(stages["recovery"], out / "recovery", resume=True, data=data, device=device),
        "attack": lambda: train_attack(stages["attack"], out / "attack", resume=True, data=data, device=device),
    }
    for name, run in runners.items():
        was_done = is_done(out / name)
        t0 = time.perf_counter()
        print(f"== stage {name}{' (finished earlier, checking it)' if was_done else ''}", flush=True)
        run()
        if not was_done:
            add_wall_time(out, name, time.perf_counter() - t0)
        if only == name:
            break
    return write_report(out)


def add_wall_time(out: Path, stage: str, seconds: float) -> None:
    """Wall time per stage, summed over interrupted and resumed pieces."""
    path = out / "timings.json"
    times = json.loads(path.read_text()) if path.exists() else {}
    times[stage] = times.get(stage, 0.0) + seconds
    atomic_write_bytes(path, json.dumps(times, indent=1).encode())


def as_dict(cfg: ProtocolConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
