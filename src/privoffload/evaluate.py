"""Scoring a run folder after the fact: whichever networks it holds, on the test set.

A classifier run gives its test accuracy; an obfuscator run gives utility and privacy side by side
(clean, obfuscated and quantised-obfuscated accuracy of its classifier, the co-trained D's PSNR and
SSIM); an attack run gives the fresh attacker's PSNR and SSIM. Each on its own data set (its config.toml).
With local DP (`ldp_epsilon` finite), the uploads carry the mechanism's noise (seeded: `seed`), and the
result says which (epsilon, delta) and sigma it was scored with.
"""

from __future__ import annotations

from pathlib import Path

from . import config as config_mod
from .config import AttackConfig, ObfuscatorConfig
from . import ldp
from .data import DeviceData, load_dataset, parse_subset, select
from .errors import UserError
from .metrics import accuracy, obfuscation_scores, pair_quality
from .privacy.uploads import cloud_view
from .runs import load_attacker, load_classifier, load_codec, run_dataset
from .runtime import frozen, pick_device, use_bf16


def evaluate_run(run: str | Path, data_root: str | Path | None = None, device: str = "auto", precision: str = "auto",
                 test_subset: str = "all", seed: int = 0, ldp_epsilon: float = float("inf"), ldp_delta: float = 1e-5,
                 ldp_clip: float = 0.0) -> dict:
    """Scores of the networks in `run` on the test images `test_subset` (`select` with `seed`), with local-DP
    noise on the uploads when `ldp_epsilon` is finite."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"{run} is not a run folder")
    parse_subset(test_subset)
    dev = pick_device(device)
    bf16 = use_bf16(precision, dev)
    kind = next((k for k in ("attacker", "obfuscator", "classifier") if (run / f"{k}.safetensors").exists()), None)
    if kind is None:
        raise UserError(f"{run} holds no classifier, obfuscator or attacker weights; is it a run that finished an epoch?")
    dataset, image_size = run_dataset(run)
    data = load_dataset(dataset, data_root, image_size)
    test = DeviceData(*select(data, test_subset, seed, split="test"), dev)
    mech = ldp.mechanism(ldp_epsilon, ldp_delta, data.shape, ldp_clip)
    noise = ldp.Noisy(mech, seed) if mech else None
    result: dict = {"run": str(run), "kind": kind, "dataset": dataset}
    if mech is not None and kind != "classifier":
        result.update(ldp_epsilon=mech.epsilon, ldp_delta=mech.delta, ldp_clip=mech.clip, ldp_sensitivity=mech.sensitivity,
                      ldp_sigma=mech.sigma)
    if kind == "classifier":
        result["test_accuracy"] = accuracy(frozen(load_classifier(run, dev)), test, bf16=bf16)
    elif kind == "obfuscator":
        cfg = config_mod.load(ObfuscatorConfig, run / "config.toml")
        classifier = frozen(load_classifier(cfg.classifier, dev))
        result["test_accuracy"] = accuracy(classifier, test, bf16=bf16)
        result.update(obfuscation_scores(classifier, frozen(load_codec(run, device=dev)), test,
                                         deobf=frozen(load_codec(run, "deobfuscator", device=dev)), bf16=bf16,
                                         noise=noise))
    else:
        cfg = config_mod.load(AttackConfig, run / "config.toml")  # scored on the uploads as its training cached them
        pairs = test.paired(*cloud_view(run / "uploads", cfg.obfuscator, data, test_subset, answers=cfg.reads_answer,
                                        seed=seed, split="test", bf16=bf16, device=dev))
        psnr, ssim = pair_quality(frozen(load_attacker(run, dev)), pairs, bf16=bf16, noise=noise)
        result.update(attacker_psnr_db=psnr, attacker_ssim=ssim)
    result["images"] = len(test)
    return result
