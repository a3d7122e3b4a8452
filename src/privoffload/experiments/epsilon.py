"""What formal privacy costs: one obfuscator, local-DP noise on its uploads at each epsilon (ldp.py).

For each epsilon (inf = no noise, today's upload): the accuracy of the obfuscator's own classifier on the noisy
8-bit uploads of the test images, and a fresh attacker (the decoder of privacy/attack.py) trained on noisy uploads
of training images and scored on noisy test uploads. Layout: OUT/eps-<ε>/ (attack run folders, resumed when the
command is given again), OUT/epsilon.json, OUT/epsilon.png, OUT/epsilon.md; ε and δ stand beside every number.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from .. import config as config_mod
from .. import ldp
from ..config import EpsilonSweepConfig, LdpConfig, ObfuscatorConfig
from ..data import Dataset, DeviceData, select
from ..metrics import accuracy, obfuscation_scores
from ..privacy.attack import train_attack
from ..runs import last_record, load_classifier, load_codec, read_metrics
from ..runtime import atomic_write_text, frozen, pick_device, use_bf16
from ..train.loop import check_input, dataset_for
from . import figures

UPLOADS = 10  # the table also gives epsilon after this many uploads of the same image (composition)


def label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def sweep_epsilon(cfg: EpsilonSweepConfig, out: str | Path, *, data: Dataset | None = None, device: str = "auto",
                  data_root: str | Path | None = None) -> Path:
    """Score and attack the obfuscator's uploads at every epsilon; returns the path of epsilon.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sweep.toml", config_mod.to_toml(cfg))
    obf_cfg = config_mod.load(ObfuscatorConfig, Path(cfg.obfuscator) / "config.toml")
    data = dataset_for(obf_cfg, data, data_root)
    dev = pick_device(device)
    bf16 = use_bf16(cfg.precision, dev)
    classifier = frozen(check_input(load_classifier(obf_cfg.classifier, dev), data, f"classifier {obf_cfg.classifier}"))
    obf = frozen(check_input(load_codec(cfg.obfuscator, device=dev), data, f"obfuscator {cfg.obfuscator}"))
    test = DeviceData(*select(data, cfg.test_subset, split="test"), dev)
    clean = accuracy(classifier, test, bf16=bf16)
    points = []
    for eps in cfg.epsilons:
        mech = ldp.mechanism(eps, cfg.delta, data.shape, cfg.clip)
        scores = obfuscation_scores(classifier, obf, test, unquantized=False, bf16=bf16,
                                    noise=ldp.Noisy(mech, cfg.seed) if mech else None)
        run = out / f"eps-{label(eps)}"
        attack = dataclasses.replace(cfg.attack, obfuscator=str(cfg.obfuscator), dataset=obf_cfg.dataset,
                                     image_size=obf_cfg.image_size, ldp=LdpConfig(eps, cfg.delta, cfg.clip))
        train_attack(attack, run, resume=True, data=data, device=device)
        r = last_record(read_metrics(run), "attacker_psnr_db") or {}
        points.append({"epsilon": label(eps), "delta": cfg.delta, "sigma": mech.sigma if mech else 0.0,
                       "clip": mech.clip if mech else None, "sensitivity": mech.sensitivity if mech else None,
                       f"epsilon_after_{UPLOADS}": label(mech.epsilon_after(UPLOADS)) if mech else "inf",
                       "quantized_obfuscated_accuracy": scores["quantized_obfuscated_accuracy"], "clean_accuracy": clean,
                       "chance": 1 / len(data.classes), "attacker_psnr_db": r.get("attacker_psnr_db", float("nan")),
                       "attacker_ssim": r.get("attacker_ssim", float("nan")), "attack_arch": attack.arch,
                       "attack_run": str(run), "test_images": len(test)})
        atomic_write_text(out / "epsilon.json", json.dumps(points, indent=2) + "\n")  # after every point
        figures.epsilon_sweep(points, out / "epsilon.png", title=f"{data.name}: what local differential privacy costs")
    return write_table(points, out / "epsilon.md", data, cfg)


def write_table(points: list[dict], path: Path, data: Dataset, cfg: EpsilonSweepConfig) -> Path:
    c, h, w = data.shape
    first = next((p for p in points if p["sensitivity"] is not None), None)
    lines = [f"# Local differential privacy against epsilon ({data.name}, {c}x{h}x{w} uploads)", "",
             f"Obfuscator {cfg.obfuscator}; uploads of {points[0]['test_images']} test images. Each upload is O(x) "
             f"clipped to an L2 ball around mid-grey"
             + (f" of radius {first['clip']:.3g} (L2 sensitivity {first['sensitivity']:.3g})" if first else "")
             + ", plus Gaussian noise calibrated by the analytic Gaussian mechanism to (ε, δ) per upload, then rounded "
             "to 8 bits. ε = inf is today's upload, without noise. The attacker is a fresh "
             f"{points[0]['attack_arch']} decoder trained on noisy uploads of training images (one seed).", "",
             f"| ε per upload | δ | σ per pixel | ε after {UPLOADS} uploads of one image | C on the upload (%) | "
             "C on clean images (%) | chance (%) | attacker PSNR dB | attacker SSIM |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p['epsilon']} | {p['delta']:g} | {p['sigma']:.3g} | {p[f'epsilon_after_{UPLOADS}']} | "
                     f"{100 * p['quantized_obfuscated_accuracy']:.2f} | {100 * p['clean_accuracy']:.2f} | "
                     f"{100 * p['chance']:.1f} | {p['attacker_psnr_db']:.2f} | {p['attacker_ssim']:.3f} |")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
