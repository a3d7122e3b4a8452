"""The adaptive attack: the attacker knows how O was trained, and trains its own.

O's recipe is no secret (its run's config.toml; the method is published). The attacker trains O' with that
recipe on its own images (training split only) with its own seed, against the same classifier (the cloud
has it), and from the same starting weights when O was fine-tuned from a published obfuscator. It then
  1. trains a decoder on (8-bit O'(x), x) pairs: what it can do before seeing a single pair of the real O;
  2. fine-tunes that decoder on (8-bit O(x), x) pairs made with the real O.
Both are scored on the validation split of the real O's pairs; the better one is the attack.

    OUT/oprime (obfuscator run), OUT/transfer (decoder for O'), OUT/finetune (decoder for O, from transfer),
    OUT/attacker.safetensors (the chosen decoder), OUT/metrics.jsonl, OUT/DONE
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

from .. import config as config_mod
from ..config import AdaptiveConfig, ObfuscatorConfig
from ..data import Cifar10, DeviceData, load_cifar10, select
from ..errors import UserError
from ..metrics import reconstruction_quality
from ..runs import RunDir, is_done, load_attacker, load_codec, run_weights
from ..runtime import atomic_path, atomic_write_text, frozen, init_dist, pick_device, use_bf16
from ..train.obfuscator import train_obfuscator
from .attack import train_attack


def recipe(cfg: AdaptiveConfig) -> ObfuscatorConfig:
    """O's training config, with the attacker's images, seed and epochs: how the attacker trains O'."""
    run_weights(cfg.obfuscator, "obfuscator.safetensors", "obfuscator")
    path = Path(cfg.obfuscator) / "config.toml"
    if not path.exists():
        raise UserError(f"{cfg.obfuscator} has no config.toml: the adaptive attack needs O's training recipe")
    target = config_mod.load(ObfuscatorConfig, path)
    return replace(target, subset=cfg.subset, seed=cfg.seed, epochs=cfg.epochs or target.epochs,
                   test_subset=cfg.test_subset, eval_every=max(target.epochs, cfg.epochs, 1))


def run_adaptive(cfg: AdaptiveConfig, out: str | Path, *, resume: bool = False, data: Cifar10 | None = None,
                 device: str = "auto", data_root: str | Path | None = None) -> Path:
    """Train (or go on with) the adaptive attack in `out`; returns the chosen decoder's weights."""
    out = Path(out)
    dev = pick_device(device)
    dist = init_dist(dev)
    run = RunDir(out, dist)
    oprime_cfg = recipe(cfg)  # checked before anything is written
    run.start(cfg, resume)
    if is_done(out):
        return out / "attacker.safetensors"
    data = data or load_cifar10(data_root)
    kw = dict(resume=True, data=data, device=device)
    train_obfuscator(oprime_cfg, out / "oprime", **kw)
    decoder = replace(cfg.decoder, subset=cfg.subset, test_subset=cfg.test_subset)
    train_attack(replace(decoder, obfuscator=str(out / "oprime")), out / "transfer", **kw)
    train_attack(replace(decoder, obfuscator=cfg.obfuscator, init=str(out / "transfer"),
                         epochs=cfg.finetune_epochs or decoder.epochs), out / "finetune", **kw)

    # the choice: the real O's validation pairs (held out of the attacker's images, as in the decoders' runs)
    x, y = select(data, cfg.subset, decoder.seed)
    n_val = decoder.val_images or len(y)
    val = DeviceData(x[len(y) - n_val:], y[len(y) - n_val:], dev)
    obf = frozen(load_codec(cfg.obfuscator, device=dev))
    bf16 = use_bf16(decoder.precision, dev)
    scores = {name: reconstruction_quality(frozen(load_attacker(out / name, dev)), obf, val, bf16=bf16)
              for name in ("transfer", "finetune")}
    chosen = max(scores, key=lambda k: scores[k][0])
    if dist.main:
        with atomic_path(out / "attacker.safetensors") as tmp:
            shutil.copyfile(out / chosen / "attacker.safetensors", tmp)
        record = {"stage": "adaptive", "chosen": chosen, **{f"{k}_val_psnr_db": v[0] for k, v in scores.items()},
                  **{f"{k}_val_ssim": v[1] for k, v in scores.items()}}
        atomic_write_text(out / "metrics.jsonl", json.dumps(record) + "\n")
    run.finish()
    return out / "attacker.safetensors"
