"""Scoring a run folder after the fact: whichever networks it holds, on the test set.

A classifier run gives its test accuracy; an obfuscator run gives utility and privacy side by side
(clean, obfuscated and quantised-obfuscated accuracy of its classifier, the co-trained D's PSNR and
SSIM); an attack run gives the fresh attacker's PSNR and SSIM.
"""

from __future__ import annotations

from pathlib import Path

from . import config as config_mod
from . import nets
from .config import AttackConfig, ObfuscatorConfig
from .data import DeviceData, load_cifar10, parse_subset, select
from .errors import UserError
from .metrics import accuracy
from .train.common import frozen, pick_device, use_bf16


def evaluate_run(run: str | Path, data_root: str | None = None, device: str = "auto", precision: str = "auto",
                 test_subset: str = "all", seed: int = 0) -> dict:
    """Scores of the networks in `run` on the test images `test_subset` (`select` with `seed`)."""
    from .privacy.metrics import obfuscation_metrics, reconstruction_quality
    from .train.obfuscator import load_classifier, load_obfuscator, run_weights

    run = Path(run)
    if not run.is_dir():
        raise UserError(f"{run} is not a run folder")
    parse_subset(test_subset)
    dev = pick_device(device)
    bf16 = use_bf16(precision, dev)
    kind = next((k for k in ("attacker", "obfuscator", "classifier") if (run / f"{k}.safetensors").exists()), None)
    if kind is None:
        raise UserError(f"{run} holds no classifier, obfuscator or attacker weights; is it a run that finished an epoch?")
    data = load_cifar10(data_root)
    test = DeviceData(*select(data, test_subset, seed, split="test"), dev)
    result: dict = {"run": str(run), "kind": kind}
    if kind == "classifier":
        model = nets.load(run / "classifier.safetensors", expect="resnet18", device=dev)
        result["test_accuracy"] = accuracy(model, test, bf16=bf16)
    elif kind == "obfuscator":
        cfg = config_mod.load(ObfuscatorConfig, run / "config.toml")
        result.update(obfuscation_metrics(frozen(load_classifier(cfg.classifier, dev)), frozen(load_obfuscator(run, dev)),
                                          frozen(load_obfuscator(run, dev, name="deobfuscator")), test, bf16=bf16))
    else:
        cfg = config_mod.load(AttackConfig, run / "config.toml")
        attacker = frozen(nets.load(run_weights(run, "attacker.safetensors", "attack"), device=dev))
        psnr, ssim = reconstruction_quality(attacker, frozen(load_obfuscator(cfg.obfuscator, dev)), test, bf16=bf16)
        result.update(attacker_psnr_db=psnr, attacker_ssim=ssim)
    result["images"] = len(test)
    return result
