"""The paper's protocol as stages in order, each one a run folder inside the protocol's folder.

    c0        baseline classifier C0 (first N images, no augmentation)
    o0        baseline obfuscator O0 and deobfuscator D0 against frozen C0
    extra<s>  beyond the paper: C0 fine-tuned a little on other data (seed s), what an update looks like
    robust    beyond the paper: O0 and D0 trained further against C0 and the extras together (or from scratch)
    drift     experiment 1: C goes on from C0 (all images, flips); O0 (and the robust O) measured on the current C
    recovery  experiment 2: O and D go on from O0 against the final C
    privacy-o0, privacy   the attack suite (privacy/suite.py) on O0 and on the final O: the privacy numbers that count
    attack-o0, attack-robust   fresh attackers against O0 and the robust O: is their privacy the same?
    whitebox  beyond the paper: re-sync O0 to the final C from its published weights, in a budget of steps
    blackbox  beyond the paper: re-sync O0 from the final C's API answers alone, queries counted and capped

The extras and the robust obfuscator come before `drift` because experiment 1 measures both
obfuscators on the very same classifiers, as probes of that one run (docs/drift-robustness.md).

Giving the same command again continues: finished stages are reused (each stage checks that its
saved config still matches), and the interrupted stage resumes from its checkpoint.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch

from .. import config as config_mod
from .. import nets
from ..config import PROFILES, AttackConfig, ClassifierConfig, ObfuscatorConfig, ProtocolConfig, ResyncConfig, SuiteConfig
from ..data import Cifar10, DeviceData, load_cifar10, select
from ..errors import UserError
from ..metrics import obfuscation_scores
from ..privacy.attack import train_attack
from ..privacy.suite import run_suite
from ..runs import RunDir, is_done, load_classifier, load_codec
from ..runtime import atomic_write_text, frozen, pick_device, use_bf16
from ..train.classifier import train_classifier
from ..train.obfuscator import train_obfuscator
from ..train.resync import Budget, black_box, game_lambda, local_api, white_box
from .report import write_report


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
    """Every stage's config, in the order they run, with its links to earlier stages, each validated."""
    extras = {f"extra{s}": replace(cfg.robust.extra, init=str(out / "c0"), seed=s, width=cfg.baseline_classifier.width)
              for s in cfg.robust.seeds}
    o0 = replace(cfg.baseline_obfuscator, classifier=str(out / "c0"))
    r = cfg.robust
    robust = replace(o0, ensemble=[str(out / name) for name in extras], ensemble_weight=r.weight,
                     ensemble_per_step=r.per_step, lam=o0.lam if r.lam < 0 else r.lam,
                     init=str(out / "o0") if r.fine_tune else "", epochs=r.epochs or o0.epochs)
    stages = {
        "c0": cfg.baseline_classifier,
        "o0": o0,
        **extras,
        **({"robust": robust} if extras else {}),
        "drift": replace(cfg.drift, init=str(out / "c0")),
        "recovery": replace(cfg.recovery, classifier=str(out / "drift"), init=str(out / "o0")),
        "privacy-o0": replace(cfg.privacy, obfuscator=str(out / "o0")),
        "privacy": replace(cfg.privacy, obfuscator=str(out / "recovery")),
        **({"attack-o0": replace(cfg.robust.attack, obfuscator=str(out / "o0")),
            "attack-robust": replace(cfg.robust.attack, obfuscator=str(out / "robust"))} if extras else {}),
        "whitebox": replace(cfg.resync, mode="white-box"),
        "blackbox": replace(cfg.resync, mode="black-box"),
    }
    for name, stage_cfg in stages.items():
        try:
            stage_cfg.validate()
        except UserError as e:
            raise UserError(f"stage {name}: {e}") from None
    return stages


def reproduce(cfg: ProtocolConfig, out: str | Path, *, data_root: str | Path | None = None, device: str = "auto") -> Path:
    """Run (or continue) every stage, then draw the figures and write report.md. Returns the report's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "config.toml"
    text = config_mod.to_toml(cfg)
    if saved.exists() and saved.read_text() != text:
        raise UserError(f"{out} was made with another protocol config (see {saved}); "
                        "give the same --profile and --set options, or choose a new --out")
    atomic_write_text(saved, text)
    stages = stage_configs(cfg, out)
    data = load_cifar10(data_root)
    atomic_write_text(out / "data.txt", data.source)

    def drift_probes() -> dict[str, Any]:
        probes = {"O0": "o0", "robust": "robust"}
        return {k: load_codec(out / v) for k, v in probes.items() if v in stages}

    # each stage's config type says which trainer runs it; drift also measures the obfuscators made so far
    trainers = {ClassifierConfig: train_classifier, ObfuscatorConfig: train_obfuscator, AttackConfig: train_attack,
                SuiteConfig: run_suite, ResyncConfig: functools.partial(resync_stage, protocol=out)}
    runners: dict[str, Callable[[], Any]] = {
        name: functools.partial(trainers[type(stage)], stage, out / name, resume=True, data=data, device=device)
        for name, stage in stages.items()}
    runners["drift"] = lambda: train_classifier(stages["drift"], out / "drift", resume=True, data=data, device=device,
                                                probes=drift_probes())
    for name, run in runners.items():
        was_done = is_done(out / name)
        t0 = time.perf_counter()
        print(f"== stage {name}{' (finished earlier, checking it)' if was_done else ''}", flush=True)
        run()
        if not was_done:
            add_wall_time(out, name, time.perf_counter() - t0)
    return write_report(out, data=data)


def add_wall_time(out: Path, stage: str, seconds: float) -> None:
    """Wall time per stage, summed over interrupted and resumed pieces."""
    path = out / "timings.json"
    times = json.loads(path.read_text()) if path.exists() else {}
    times[stage] = times.get(stage, 0.0) + seconds
    atomic_write_text(path, json.dumps(times, indent=1))


def resync_stage(cfg: ResyncConfig, out: Path, *, protocol: Path, resume: bool = True, data: Cifar10 | None = None,
                 device: str = "auto") -> Path:
    """Re-sync O0 (and D0) to the drifted classifier, white-box (its weights) or black-box (its answers, through
    a counted API; the surrogate starts from C0), scoring O on the test images against the real drifted C.

    A re-sync is short: an interrupted one starts over; a finished one (DONE) is kept.
    """
    run = RunDir(out)
    run.start(cfg, resume)
    if is_done(out):
        return out / "obfuscator.safetensors"
    (out / "metrics.jsonl").unlink(missing_ok=True)
    dev = pick_device(device)
    data = data or load_cifar10()
    train = DeviceData(*select(data, cfg.subset, cfg.seed), dev)
    test = DeviceData(*select(data, cfg.test_subset, cfg.seed, split="test"), dev)
    obf, deobf = load_codec(protocol / "o0", device=dev), load_codec(protocol / "o0", "deobfuscator", device=dev)
    cfg = replace(cfg, lam=game_lambda(cfg, protocol / "o0" / "obfuscator.safetensors"))
    new = frozen(load_classifier(protocol / "drift", dev))
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()

    bf16 = use_bf16(cfg.precision, dev)

    def evaluate(step: int, queries: int) -> None:
        """Obfuscated accuracy on the real new C; at the end also the 8-bit accuracy and D's PSNR/SSIM."""
        t1 = time.perf_counter()
        record = {"stage": out.name, "step": step, "queries": queries}
        record.update(obfuscation_scores(new, obf, test, deobf=deobf if step == cfg.steps else None, bf16=bf16))
        record["eval_time_s"] = time.perf_counter() - t1
        record["time_s"] = t1 - t0
        run.log(record)
        print(f"{out.name} step {step}/{cfg.steps} queries {queries} obf {record['obfuscated_accuracy']:.4f}", flush=True)

    if cfg.mode == "white-box":
        white_box(obf, deobf, new, train, cfg, on_eval=evaluate)
    else:
        api = Budget(local_api(new, dev), cfg.max_queries)
        black_box(obf, deobf, api, train, cfg, load_classifier(protocol / "c0", dev), on_eval=evaluate)
    nets.save(deobf, out / "deobfuscator.safetensors", mode=cfg.mode, lam=repr(cfg.lam))
    nets.save(obf, out / "obfuscator.safetensors", mode=cfg.mode, lam=repr(cfg.lam))
    run.finish()
    return out / "obfuscator.safetensors"
