"""The adaptive attack: the attacker knows how O was trained, trains its own O', and learns from both.

O's recipe is no secret (its run's config.toml; the method is published). The attacker trains O' with that
recipe on its own images (training split only) with its own seed, against the same classifier (the cloud has
it), and from the same starting weights when O was fine-tuned from a published obfuscator. O itself ships with
every client, so O' is no stand-in for O: it is more of what O could have been, more pairs to learn from. The
attacker continues its plain decoder (`decoder.init`, in the suite the suite's decoder; else one it trains first)
on its training images sent through O and O' in turn (every other image through O'), with the decoder's budget
and stopping rule. Then it keeps whichever candidate scores best on the validation split of the real O's pairs:

    decoder      the plain decoder
    mixed        the plain decoder continued on O and O' pairs
    mean image   the mean of the known training images (nothing learned)

so that on validation it is never worse than either the plain decoder or the mean image.

    OUT/oprime (obfuscator run), OUT/decoder (the plain decoder, when no init is given), OUT/mixed (attack run),
    OUT/attacker.safetensors (the chosen decoder; absent when the mean image is chosen), OUT/metrics.jsonl, OUT/DONE
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from .. import config as config_mod
from ..config import AdaptiveConfig, ObfuscatorConfig
from ..data import Dataset, PairedData, load_dataset, select
from ..errors import UserError
from ..metrics import pair_quality, psnr_ssim
from ..runs import RunDir, is_done, load_attacker, read_metrics, run_dataset, run_weights
from ..runtime import atomic_path, atomic_write_text, frozen, init_dist, pick_device, use_bf16
from ..train.loop import held_out
from ..train.obfuscator import train_obfuscator
from .attack import train_attack
from .uploads import cloud_view

MEAN = "mean image"


def recipe(cfg: AdaptiveConfig) -> ObfuscatorConfig:
    """O's training config, with the attacker's images, seed and epochs: how the attacker trains O'."""
    run_weights(cfg.obfuscator, "obfuscator.safetensors", "obfuscator")
    path = Path(cfg.obfuscator) / "config.toml"
    if not path.exists():
        raise UserError(f"{cfg.obfuscator} has no config.toml: the adaptive attack needs O's training recipe")
    target = config_mod.load(ObfuscatorConfig, path)
    return replace(target, subset=cfg.subset, seed=cfg.seed, epochs=cfg.epochs or target.epochs,
                   test_subset=cfg.test_subset, eval_every=max(target.epochs, cfg.epochs, 1))


def known_pairs(cfg, data: Dataset, uploads: Path, device: torch.device,
                answers: bool = False) -> tuple[PairedData, PairedData]:
    """A decoder config's (training, validation) pairs of the real O, from the cache: the split of `Context.open`
    (with C's answers where asked, or where the decoder reads them)."""
    x, y = select(data, cfg.subset, cfg.seed)
    up, ans = cloud_view(uploads, cfg.obfuscator, data, cfg.subset, answers=answers or cfg.reads_answer, seed=cfg.seed,
                         bf16=use_bf16(cfg.precision, device), device=device)
    n = len(y) - held_out(len(y), cfg.val_split, cfg.subset)
    pairs = PairedData(x, y, up, ans, device)
    return pairs.part(0, n), pairs.part(n)


def run_adaptive(cfg: AdaptiveConfig, out: str | Path, *, resume: bool = False, data: Dataset | None = None,
                 device: str = "auto", data_root: str | Path | None = None, uploads: str | Path | None = None) -> Path:
    """Train (or go on with) the adaptive attack in `out`; returns the run folder (`chosen` says which candidate)."""
    out = Path(out)
    dev = pick_device(device)
    dist = init_dist(dev)
    run = RunDir(out, dist)
    oprime_cfg = recipe(cfg)  # checked before anything is written
    if not cfg.decoder.val_split:
        raise UserError("the adaptive attack chooses on a validation split: set decoder.val_split > 0")
    run.start(cfg, resume)
    if is_done(out):
        return out
    if data is None:
        dataset, image_size = run_dataset(cfg.obfuscator)
        data = load_dataset(dataset, data_root, image_size)
    uploads = Path(uploads) if uploads else out / "uploads"
    kw = dict(resume=True, data=data, device=device, uploads=uploads)
    train_obfuscator(oprime_cfg, out / "oprime", resume=True, data=data, device=device)
    decoder = replace(cfg.decoder, obfuscator=cfg.obfuscator, test_subset=cfg.test_subset)
    plain = Path(decoder.init) if decoder.init else out / "decoder"
    if not decoder.init:
        train_attack(decoder, plain, **kw)
    train_attack(replace(decoder, init=str(plain), extra_obfuscators=[str(out / "oprime")]), out / "mixed", **kw)

    # the choice, on the real O's validation pairs (held out of the attacker's images, as in the decoders' runs)
    train, val = known_pairs(decoder, data, uploads, dev)
    bf16 = use_bf16(decoder.precision, dev)
    scores = {name: pair_quality(frozen(load_attacker(folder, dev)), val, bf16=bf16)
              for name, folder in (("decoder", plain), ("mixed", out / "mixed"))}
    mean = train.x.float().mean(0, keepdim=True) / 255
    scores[MEAN] = tuple(v.mean().item() for v in psnr_ssim(mean.expand(len(val), -1, -1, -1), val.x.float() / 255))
    chosen = max(scores, key=lambda k: scores[k][0])
    if dist.main:
        if chosen != MEAN:
            with atomic_path(out / "attacker.safetensors") as tmp:
                shutil.copyfile((plain if chosen == "decoder" else out / "mixed") / "attacker.safetensors", tmp)
        record = {"stage": "adaptive", "chosen": chosen, "candidates": {k: {"val_psnr_db": v[0], "val_ssim": v[1]}
                                                                          for k, v in scores.items()}}
        atomic_write_text(out / "metrics.jsonl", json.dumps(record) + "\n")
    run.finish()
    return out


def chosen(folder: str | Path) -> str:
    """Which candidate a finished adaptive attack chose: decoder, mixed or mean image."""
    return read_metrics(folder)[-1]["chosen"]
