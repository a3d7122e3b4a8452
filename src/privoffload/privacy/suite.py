"""The attack suite: every attack on one obfuscator, with reference rows, on the same test images.

    OUT/decoder, OUT/inversion, OUT/decoder+inversion, OUT/adaptive   one run folder per attack (resumable)
    OUT/rows/<row>.json     each row's scores, written when the row is done (a rerun reuses them)
    OUT/suite.json          the summary: utility, every row, the strongest attack and where it lies
    OUT/config.toml, OUT/DONE

Rows: the attacks, and references computed here on the same images: the mean training image and the
per-class mean image (the cloud knows the class: C tells it), no defence (the identity obfuscator: the upload
is the image, so the reconstruction is exact), the upload itself read as an image, and the co-trained D.
Per row: PSNR and SSIM per image, then the mean with its 95 % t-interval over images; and the accuracy of a
fresh classifier trained on the row's reconstructions (k-fold over the test images: each image is
classified by a classifier that never saw it; a linear one on the pixels, or a ResNet18). The strongest attack is the one with the highest mean PSNR;
its SSIM and its probe accuracy are placed between the mean image (0) and no defence (1).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .. import config as config_mod
from .. import nets
from ..config import ObfuscatorConfig, ProbeConfig, SuiteConfig
from ..data import Dataset, DeviceData, load_cifar10, quantize8, select, to_pixels
from ..metrics import accuracy, mean_ci, obfuscation_scores, psnr_ssim
from ..runs import RunDir, is_done, load_attacker, load_classifier, load_codec, read_metrics
from ..runtime import atomic_write_text, epoch_seed, frozen, pick_device, use_bf16
from ..train.loop import make_optimizer, make_schedule
from .adaptive import run_adaptive
from .attack import train_attack
from .inversion import run_inversion

REFERENCES = ("mean image", "per-class mean image", "no defence", "upload as image", "co-trained D")


# ---------------------------------------------------------------- the fresh classifier on reconstructions

def probe_correct(images: torch.Tensor, labels: torch.Tensor, cfg: ProbeConfig, *, seed: int,
                  device: torch.device, classes: int = 10) -> np.ndarray:
    """Per image: is it classified right by a fresh classifier fitted on the other folds' images? [N] bool.

    `images` are reconstructions in [0, 1], kept as the 8-bit images an attacker would store."""
    pixels, labels = to_pixels(images).cpu().numpy(), labels.cpu().numpy()
    fold = np.random.default_rng(seed).permutation(len(labels)) % cfg.folds
    correct = np.zeros(len(labels), dtype=bool)
    fit = fit_ridge if cfg.kind == "ridge" else fit_resnet
    for k in range(cfg.folds):
        predict = fit(pixels[fold != k], labels[fold != k], cfg, seed=epoch_seed(seed, k), device=device, classes=classes)
        correct[fold == k] = predict(pixels[fold == k]) == labels[fold == k]
    return correct


def fit_ridge(pixels: np.ndarray, labels: np.ndarray, cfg: ProbeConfig, *, classes: int,
              **_) -> Callable[[np.ndarray], np.ndarray]:
    """A linear classifier on the pixels: ridge regression onto one-hot labels, solved in its dual (n x n)."""
    a = torch.from_numpy(pixels).double().flatten(1) / 255
    mu = a.mean(0)
    a = a - mu
    t = F.one_hot(torch.from_numpy(labels), classes).double()
    alpha = torch.linalg.solve(a @ a.T + cfg.ridge * torch.eye(len(a), dtype=torch.float64), t - t.mean(0))
    w = a.T @ alpha
    return lambda px: ((torch.from_numpy(px).double().flatten(1) / 255 - mu) @ w).argmax(1).numpy()


def fit_resnet(pixels: np.ndarray, labels: np.ndarray, cfg: ProbeConfig, *, seed: int,
               device: torch.device, classes: int) -> Callable[[np.ndarray], np.ndarray]:
    """A ResNet18 trained from scratch on the images (Adam, flips, the schedule of `cfg.optim`)."""
    torch.manual_seed(seed)
    c, h, w = pixels.shape[1:]
    model = nets.resnet18(cfg.width, num_classes=classes, channels=c, size=(h, w)).to(device)
    train = DeviceData(pixels, labels, device)
    batch = min(cfg.batch_size, len(train))
    opt = make_optimizer(model.parameters(), cfg.optim)
    sched = make_schedule(opt, cfg.optim, train.steps(batch, drop_last=True), cfg.epochs)
    model.train()
    for epoch in range(cfg.epochs):
        for xb, yb in train.batches(batch, shuffle=True, flip_images=cfg.flip, seed=epoch_seed(seed, epoch), drop_last=True):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()

    @torch.no_grad()
    def predict(px: np.ndarray) -> np.ndarray:
        held = torch.from_numpy(px).to(device).float() / 255
        return torch.cat([model(xb).argmax(1) for xb in held.split(500)]).cpu().numpy()

    return predict


# ---------------------------------------------------------------- rows

def finite(v: float) -> float | None:
    """JSON has no infinity: an exact reconstruction's PSNR is written as null (shown as ∞)."""
    return v if math.isfinite(v) else None


def score_row(rec: torch.Tensor, x: torch.Tensor, y: torch.Tensor, cfg: SuiteConfig, device: torch.device,
              classes: int = 10) -> dict:
    psnr, ssim = psnr_ssim(rec, x)
    p, p_ci = mean_ci(psnr.numpy()) if torch.isfinite(psnr).all() else (float("inf"), 0.0)
    s, s_ci = mean_ci(ssim.numpy())
    row = {"psnr_db": finite(p), "psnr_ci": finite(p_ci), "ssim": s, "ssim_ci": s_ci}
    correct = probe_correct(rec, y, cfg.probe, seed=cfg.seed, device=device, classes=classes)
    row["probe_accuracy"], row["probe_accuracy_ci"] = mean_ci(correct.astype(np.float64))
    return row


def decoder_info(run: Path) -> dict:
    """What a decoder run spent and where validation peaked."""
    recs = [r for r in read_metrics(run) if "epoch" in r]
    return {"epochs": recs[-1]["epoch"], "steps": recs[-1].get("steps"), "best_epoch": recs[-1].get("best_epoch"),
            "arch": nets.read_metadata(run / "attacker.safetensors")["arch"]}


@torch.no_grad()
def decode(attacker: torch.nn.Module, upload: torch.Tensor) -> torch.Tensor:
    return torch.cat([attacker(u) for u in upload.split(500)]).cpu()


def run_suite(cfg: SuiteConfig, out: str | Path, *, resume: bool = True, data: Dataset | None = None,
              device: str = "auto", data_root: str | Path | None = None) -> Path:
    """Run (or go on with) every attack of `cfg` on its obfuscator, score every row; returns suite.json."""
    out = Path(out)
    run = RunDir(out)
    run.start(cfg, resume)
    if is_done(out):
        return out / "suite.json"
    dev = pick_device(device)
    data = data or load_cifar10(data_root)
    x_np, y_np = select(data, cfg.test_subset, split="test")  # the same test images whatever the seed
    x, y = torch.from_numpy(x_np).to(dev).float() / 255, torch.from_numpy(y_np).to(dev)
    obf = frozen(load_codec(cfg.obfuscator, device=dev))
    with torch.no_grad():
        upload = torch.cat([quantize8(obf(xb)) for xb in x.split(500)])
    known, known_y = select(data, cfg.decoder.subset, cfg.seed)  # the training images the attacker knows
    known = torch.from_numpy(known).float() / 255
    class_means = torch.stack([known[known_y == c].mean(0) for c in range(len(data.classes))])
    kw = dict(resume=True, data=data, device=device)

    def attack(name: str) -> tuple[Callable[[], torch.Tensor], Callable[[], dict]]:
        """(reconstructions, facts) of one attack, its run folder trained or reused first."""
        folder, part = out / name, cfg.part(name, str(out / "decoder"))
        if name == "decoder":
            train_attack(part, folder, **kw)
            return lambda: decode(frozen(load_attacker(folder, dev)), upload), lambda: decoder_info(folder)
        if name == "adaptive":
            run_adaptive(part, folder, **kw)
            return (lambda: decode(frozen(load_attacker(folder, dev)), upload),
                    lambda: {**read_metrics(folder)[-1], **decoder_info(folder / read_metrics(folder)[-1]["chosen"])})
        if name == "decoder+inversion" and "decoder" not in cfg.attacks:
            train_attack(cfg.part("decoder"), out / "decoder", **kw)
        run_inversion(part, folder, **kw)
        return lambda: torch.load(folder / "reconstructions.pt", weights_only=True), lambda: {"steps": part.steps}

    rows: dict[str, Callable[[], tuple[torch.Tensor, dict]]] = {
        "mean image": lambda: (known.mean(0, keepdim=True).expand_as(x.cpu()), {}),
        "per-class mean image": lambda: (class_means[y.cpu()], {}),
        "no defence": lambda: (x.cpu(), {}),
        "upload as image": lambda: (upload.cpu(), {}),
    }
    if (Path(cfg.obfuscator) / "deobfuscator.safetensors").exists():
        rows["co-trained D"] = lambda: (decode(frozen(load_codec(cfg.obfuscator, "deobfuscator", dev)), upload), {})
    for name in cfg.attacks:
        def attack_row(name=name):
            t0 = time.perf_counter()
            recon, facts = attack(name)
            return recon(), {**facts(), "wall_s": time.perf_counter() - t0}
        rows[name] = attack_row

    (out / "rows").mkdir(exist_ok=True)
    scored = {}
    for name, make in rows.items():
        path = out / "rows" / f"{name.replace(' ', '-').replace('+', '-')}.json"
        if path.exists():
            scored[name] = json.loads(path.read_text())
            continue
        print(f"suite: {name}", flush=True)
        rec, facts = make()
        scored[name] = {"kind": "attack" if name in cfg.attacks else "reference", **score_row(rec, x.cpu(), y.cpu(), cfg, dev, len(data.classes)),
                        **facts}
        atomic_write_text(path, json.dumps(scored[name], indent=1) + "\n")

    summary = {"obfuscator": cfg.obfuscator, "test_subset": cfg.test_subset, "images": len(y_np),
               "utility": utility(cfg, x_np, y_np, obf, dev), "rows": scored, **verdict(scored, cfg.attacks)}
    atomic_write_text(out / "suite.json", json.dumps(summary, indent=1) + "\n")
    run.finish()
    return out / "suite.json"


def utility(cfg: SuiteConfig, x: np.ndarray, y: np.ndarray, obf: torch.nn.Module, dev: torch.device) -> dict:
    """C's clean, obfuscated and 8-bit obfuscated accuracy on the suite's images (C from O's recipe)."""
    path = Path(cfg.obfuscator) / "config.toml"
    if not path.exists():
        return {}
    classifier = frozen(load_classifier(config_mod.load(ObfuscatorConfig, path).classifier, dev))
    data = DeviceData(x, y, dev)
    bf16 = use_bf16("auto", dev)
    return {"clean_accuracy": accuracy(classifier, data, bf16=bf16), **obfuscation_scores(classifier, obf, data, bf16=bf16)}


def position(rows: dict[str, dict], attack: str) -> dict[str, float | None]:
    """Where `attack` lies between the mean image (0) and no defence (1): its PSNR above the mean image's, and its
    SSIM and fresh-classifier accuracy as shares of the way (PSNR has no top: no defence's is infinite)."""
    s, lo, hi = rows[attack], rows["mean image"], rows["no defence"]
    out = {"psnr_db_above_mean_image": None if s["psnr_db"] is None else s["psnr_db"] - lo["psnr_db"],
           "ssim": (s["ssim"] - lo["ssim"]) / (hi["ssim"] - lo["ssim"])}
    if "probe_accuracy" in s and hi["probe_accuracy"] != lo["probe_accuracy"]:
        out["probe_accuracy"] = (s["probe_accuracy"] - lo["probe_accuracy"]) / (hi["probe_accuracy"] - lo["probe_accuracy"])
    return out


def verdict(rows: dict[str, dict], attacks: list[str]) -> dict[str, Any]:
    """The strongest attack (highest mean PSNR) and where it lies between the mean image (0) and no defence (1)."""
    strongest = max(attacks, key=lambda a: rows[a]["psnr_db"] if rows[a]["psnr_db"] is not None else float("inf"))
    return {"strongest": strongest, "strongest_psnr_db": rows[strongest]["psnr_db"],
            "max_ssim": max(rows[a]["ssim"] for a in attacks), "position": position(rows, strongest)}


# ---------------------------------------------------------------- the table

def _ci(v: float | None, half: float | None, fmt: str) -> str:
    if v is None:
        return "∞ (exact)"
    return f"{v:{fmt}} ± {half:{fmt}}" if half is not None and math.isfinite(half) else f"{v:{fmt}}"


def budget_text(rows: list[dict]) -> str:
    """What an attack spent (epochs, steps, validation's best epoch, choice, seconds): one row, or one per seed,
    each value written once where the seeds agree and as 'a/b/c' where they differ."""
    def joined(key: str) -> str:
        values = [x[key] for x in rows]
        return str(values[0]) if len(set(values)) == 1 else "/".join(map(str, values))

    r, parts = rows[0], []
    if r.get("epochs"):
        parts.append(f"{joined('epochs')} epochs ({joined('steps')} steps), best at {joined('best_epoch')}"
                     + (f", {r['arch']}" if r.get("arch") else ""))
    elif r.get("steps"):
        parts.append(f"{r['steps']} steps per image")
    if r.get("chosen"):
        parts.append(f"chose {joined('chosen')}")
    if r.get("wall_s"):
        parts.append(f"{sum(x['wall_s'] for x in rows) / len(rows):.0f} s")
    return "; ".join(parts)


def suite_rows(summary: dict) -> list[str]:
    """A suite.json as markdown: one row per attack and reference, then the strongest attack and where it lies."""
    lines = ["| row | kind | PSNR dB | SSIM | fresh-classifier acc. % | budget used |", "|---|---|---|---|---|---|"]
    for name, r in summary["rows"].items():
        probe = (f"{100 * r['probe_accuracy']:.1f} ± {100 * r['probe_accuracy_ci']:.1f}" if "probe_accuracy" in r else "–")
        name_ = f"**{name}**" if name == summary["strongest"] else name
        lines.append(f"| {name_} | {r['kind']} | {_ci(r['psnr_db'], r['psnr_ci'], '.2f')} | "
                     f"{_ci(r['ssim'], r['ssim_ci'], '.3f')} | {probe} | {budget_text([r])} |")
    pos = summary["position"]
    above = pos["psnr_db_above_mean_image"]
    where = (f"{'∞' if above is None else format(above, '+.2f')} dB above the mean image; SSIM {100 * pos['ssim']:.0f} % of the way "
             f"from the mean image to no defence")
    if "probe_accuracy" in pos:
        where += f", fresh-classifier accuracy {100 * pos['probe_accuracy']:.0f} % of the way"
    u = summary.get("utility") or {}
    lines += ["", f"Strongest attack: **{summary['strongest']}** ({where}). {summary['images']} test images "
              f"(`{summary['test_subset']}`); ± is the 95 % t-interval over images."]
    if u:
        lines.append(f"On the same images C's accuracy is {100 * u['clean_accuracy']:.2f} % clean and "
                     f"{100 * u['quantized_obfuscated_accuracy']:.2f} % on the 8-bit uploads.")
    return lines
