"""The attack suite: every attack on one obfuscator, with reference rows, on the same test images.

    OUT/uploads/                 the cloud's view, cached once: uploads and C's answers (privacy/uploads.py)
    OUT/decoder, OUT/label-aware, OUT/label-only, OUT/adaptive, OUT/decoder+inversion, OUT/inversion
                                 one run folder per trained or searched row (resumable)
    OUT/rows/<row>.json, .npz    each row's summary and per-image scores, written when the row is done (reused)
    OUT/suite.json, OUT/config.toml, OUT/DONE

Attacks (docs/threat-model.md): the decoder (trained until validation stops improving), the label-aware decoder
(the decoder continued with C's answer beside the upload), the adaptive attack (its own O' by O's recipe), the
white-box inversion from the decoder's output (or from the mean image). References, on the same images: the mean
training image, the per-class mean image of C's predicted class (the cloud has C's answer, never the label), the
**label-only decoder** (the decoder's recipe on C's answer alone, no upload pixel: what any system that tells the
cloud the class gives away), no defence (the upload is the image), the upload read as an image, the co-trained D.

Per row, over the test images: PSNR and SSIM per image, their means with 95 % t-intervals, and identifiability:
for each image, is its original the nearest neighbour (pixel L2) of the reconstruction among N candidates, itself
and N - 1 other test images of the same predicted class (chance 1/N; fewer where the class has fewer images: the
row says the effective chance). Every contrast is paired per image.

The strongest attack is chosen on validation images, never on test images: the converged, non-empty attack with
the best PSNR on the last `inversion.val_images` images of the decoder's training subset (held out of every
decoder's training). The headline, **leakage beyond the class**, is that attack minus the label-only decoder,
per image, in dB and SSIM with their 95 % intervals.

suite.json:
    obfuscator, test_subset, images (n), seed, identify ([N, ...]), val_images, utility {clean_accuracy,
    quantized_obfuscated_accuracy}, wall_s {uploads, rows..., total}
    rows: {name: {kind ("attack" | "reference"), psnr_db, psnr_ci, ssim, ssim_ci (mean, 95 % half-width over
        images; psnr null = exact), identify {N: {rate, ci, chance, min_candidates}}, val_psnr_db (attacks),
        trained rows: converged, best_epoch, epochs, budget, steps, arch, width, lr_cuts;
        inversion: empty, lr, tv, mean_abs_change, steps, start_val_psnr_db; adaptive: chosen; wall_s}}
    strongest (row name), strongest_converged (bool), strongest_psnr_db, max_ssim (over non-empty attacks),
    position {psnr_db_above_mean_image, ssim: share of the way from the mean image to no defence},
    leakage {attack, reference, psnr_db, psnr_ci, ssim, ssim_ci, converged, verdict} (null without label-only)
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import nets
from ..config import SuiteConfig
from ..data import Dataset, DeviceData, load_dataset, select
from ..errors import UserError
from ..metrics import accuracy, mean_ci, psnr_ssim
from ..runs import RunDir, is_done, load_attacker, load_classifier, load_codec, read_metrics, run_dataset
from ..runtime import atomic_write_bytes, atomic_write_text, frozen, pick_device, use_bf16
from .adaptive import MEAN, chosen, known_pairs, run_adaptive
from .attack import train_attack
from .inversion import reconstructions, run_inversion
from .uploads import cloud_view, recipe_classifier

LABEL_ONLY = "label-only decoder"
REFERENCES = ("mean image", "per-class mean image", LABEL_ONLY, "no defence", "upload as image", "co-trained D")


# ---------------------------------------------------------------- identifiability

def candidates(predicted: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """Per test image i: i and up to n - 1 other images of its predicted class, drawn at random (the same draw
    for every row of a suite, so that rows compare on the same candidates)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, c in enumerate(predicted):
        others = np.flatnonzero(predicted == c)
        others = others[others != i]
        out.append(np.concatenate([[i], rng.choice(others, size=min(n - 1, len(others)), replace=False)]).astype(np.int64))
    return out


def identified(rec: torch.Tensor, x: torch.Tensor, sets: list[np.ndarray]) -> np.ndarray:
    """Per image: is its original strictly the nearest (pixel L2) of its candidates to its reconstruction? [N] bool."""
    rec, x = rec.flatten(1).double(), x.flatten(1).double()
    hits = np.zeros(len(sets), dtype=bool)
    for i, cand in enumerate(sets):
        d = ((x[torch.from_numpy(cand)] - rec[i]) ** 2).sum(1)
        hits[i] = len(cand) > 1 and bool((d[0] < d[1:]).all())
    return hits


# ---------------------------------------------------------------- rows

def finite(v: float) -> float | None:
    """JSON has no infinity: an exact reconstruction's PSNR is written as null (shown as ∞)."""
    return v if math.isfinite(v) else None


def score_row(rec: torch.Tensor, x: torch.Tensor, sets: dict[int, list[np.ndarray]]) -> tuple[dict, dict[str, np.ndarray]]:
    """A row's summary and its per-image scores (psnr, ssim, hits@N)."""
    psnr, ssim = psnr_ssim(rec, x)
    p, p_ci = mean_ci(psnr.numpy()) if torch.isfinite(psnr).all() else (float("inf"), 0.0)
    s, s_ci = mean_ci(ssim.numpy())
    row = {"psnr_db": finite(p), "psnr_ci": finite(p_ci), "ssim": s, "ssim_ci": s_ci, "identify": {}}
    per_image = {"psnr": psnr.numpy(), "ssim": ssim.numpy()}
    for n, cand in sets.items():
        hits = identified(rec, x, cand)
        rate, ci = mean_ci(hits.astype(np.float64))
        sizes = np.array([len(c) for c in cand])
        row["identify"][str(n)] = {"rate": rate, "ci": ci, "chance": float(np.mean(1 / sizes)),
                                   "min_candidates": int(sizes.min())}
        per_image[f"hits{n}"] = hits
    return row, per_image


def decoder_info(run: Path, budget: int) -> dict:
    """What a decoder run spent, where validation peaked, and whether its stopping rule fired."""
    recs = [r for r in read_metrics(run) if r.get("epoch")]
    last = recs[-1]
    meta = nets.read_metadata(run / "attacker.safetensors")
    return {"epochs": last["epoch"], "budget": budget, "steps": last.get("steps"), "best_epoch": last.get("best_epoch"),
            "converged": bool(last.get("converged")) and last.get("best_epoch", 0) < last["epoch"],
            "lr_cuts": last.get("lr_cuts", 0), "arch": meta["arch"], "width": int(meta["width"])}


@torch.no_grad()
def decode_all(net: torch.nn.Module, upload: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    return torch.cat([nets.decode(net, upload[i:i + 500], answer[i:i + 500]).float()
                      for i in range(0, len(upload), 500)]).cpu()


def images(pixels: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.as_tensor(pixels).to(device).float() / 255


def run_suite(cfg: SuiteConfig, out: str | Path, *, resume: bool = True, data: Dataset | None = None,
              device: str = "auto", data_root: str | Path | None = None) -> Path:
    """Run (or go on with) every attack of `cfg` on its obfuscator, score every row; returns suite.json."""
    out = Path(out)
    if not (Path(cfg.obfuscator) / "config.toml").exists():
        raise UserError(f"{cfg.obfuscator} has no config.toml: the suite needs O's recipe (C's answers are part of "
                        "what the cloud sees)")
    run = RunDir(out)
    run.start(cfg, resume)
    if is_done(out):
        return out / "suite.json"
    t_start = time.perf_counter()
    dev = pick_device(device)
    if data is None:
        dataset, image_size = run_dataset(cfg.obfuscator)
        data = load_dataset(dataset, data_root, image_size)
    decoder_cfg = cfg.part("decoder")
    bf16 = use_bf16(decoder_cfg.precision, dev)
    uploads = out / "uploads"
    kw = dict(resume=True, data=data, device=device, uploads=uploads)

    # the cloud's view of the test images, and of the attacker's known images (their validation split too)
    t0 = time.perf_counter()
    x_np, y_np = select(data, cfg.test_subset, split="test")  # the same test images whatever the seed
    x = images(x_np)
    up, ans = cloud_view(uploads, cfg.obfuscator, data, cfg.test_subset, answers=True, split="test", bf16=bf16, device=dev)
    upload, answer = images(up, dev), torch.from_numpy(ans).to(dev)
    predicted = ans.argmax(1)
    train, val = known_pairs(decoder_cfg, data, uploads, dev, answers=True)
    n_choice = min(cfg.inversion.val_images, len(val))
    if n_choice < cfg.inversion.val_images and {"decoder+inversion", "inversion"} & set(cfg.attacks):
        raise UserError(f"inversion.val_images = {cfg.inversion.val_images} exceeds the decoder's {len(val)} validation "
                        "images (the inversion is tuned on them); lower it or raise decoder.val_split")
    choice = val.part(len(val) - n_choice)  # the images the strongest attack is chosen on (the inversion's validation)
    choice_x = images(choice.x)
    known = images(train.x)
    known_y = train.y.cpu()
    mean = known.mean(0, keepdim=True)
    class_means = torch.stack([known[known_y == c].mean(0) if (known_y == c).any() else mean[0]
                               for c in range(len(data.classes))])
    sets = {n: candidates(predicted, n, cfg.seed) for n in cfg.identify}
    walls = {"uploads": time.perf_counter() - t0}

    def decoded(folder: Path) -> tuple[torch.Tensor, float]:
        """A trained decoder's test reconstructions, and its PSNR on the choice images."""
        net = frozen(load_attacker(folder, dev))
        val_psnr = psnr_ssim(decode_all(net, images(choice.upload, dev), choice.answer), choice_x)[0].mean().item()
        return decode_all(net, upload, answer), val_psnr

    def run_row(name: str) -> Callable[[], tuple[torch.Tensor, dict, float | None]]:
        """A trained or searched row: its run folder made (or reused), then (reconstructions, facts, choice PSNR)."""
        key = "label-only" if name == LABEL_ONLY else name
        part, folder = cfg.part(key, str(out / "decoder")), out / key

        def make():
            if name in ("label-aware", "adaptive", "decoder+inversion"):
                train_attack(decoder_cfg, out / "decoder", **kw)  # they start from the plain decoder
            if name == "adaptive":
                run_adaptive(part, folder, **kw)
                pick = chosen(folder)
                facts = {"chosen": pick, **decoder_info(folder / "mixed", part.decoder.epochs)}
                if pick == MEAN:
                    return mean.expand_as(x), facts, psnr_ssim(mean.expand_as(choice_x), choice_x)[0].mean().item()
                rec, val_psnr = decoded(folder)
                return rec, facts, val_psnr
            if name in ("decoder+inversion", "inversion"):
                run_inversion(part, folder, **kw)
                rec = reconstructions(folder)
                r = read_metrics(folder)[-1]
                facts = {k: r[k] for k in ("steps", "lr", "tv", "empty", "mean_abs_change", "start_val_psnr_db", "val_change")}
                if part.start == "decoder":  # a search from a decoder is no more converged than that decoder
                    facts["start_converged"] = decoder_info(out / "decoder", decoder_cfg.epochs)["converged"]
                return rec, facts, r["val_psnr_db"]
            train_attack(part, folder, **kw)
            rec, val_psnr = decoded(folder)
            return rec, decoder_info(folder, part.epochs), val_psnr

        return make

    rows: dict[str, tuple[str, Callable[[], tuple[torch.Tensor, dict, float | None]]]] = {
        "mean image": ("reference", lambda: (mean.expand_as(x), {}, None)),
        "per-class mean image": ("reference", lambda: (class_means[torch.from_numpy(predicted)], {}, None)),
    }
    if cfg.label_only:
        rows[LABEL_ONLY] = ("reference", run_row(LABEL_ONLY))
    rows["no defence"] = ("reference", lambda: (x, {}, None))
    rows["upload as image"] = ("reference", lambda: (upload.cpu(), {}, None))
    if (Path(cfg.obfuscator) / "deobfuscator.safetensors").exists():
        rows["co-trained D"] = ("reference", lambda: (decode_all(frozen(load_codec(cfg.obfuscator, "deobfuscator", dev)),
                                                                 upload, answer), {}, None))
    for name in cfg.attacks:
        rows[name] = ("attack", run_row(name))

    (out / "rows").mkdir(exist_ok=True)
    scored, per_image = {}, {}
    for name, (kind, make) in rows.items():
        path = out / "rows" / name.replace(" ", "-").replace("+", "-")
        if path.with_suffix(".json").exists() and path.with_suffix(".npz").exists():
            scored[name] = json.loads(path.with_suffix(".json").read_text())
            with np.load(path.with_suffix(".npz")) as f:
                per_image[name] = dict(f)
            continue
        print(f"suite: {name}", flush=True)
        t0 = time.perf_counter()
        rec, facts, val_psnr = make()
        row, per_image[name] = score_row(rec.cpu(), x, sets)
        scored[name] = {"kind": kind, **row, **facts, **({"val_psnr_db": val_psnr} if val_psnr is not None else {}),
                        "wall_s": time.perf_counter() - t0}
        save_npz(path.with_suffix(".npz"), per_image[name])
        atomic_write_text(path.with_suffix(".json"), json.dumps(scored[name], indent=1) + "\n")
    walls.update({name: r["wall_s"] for name, r in scored.items()})
    walls["total"] = time.perf_counter() - t_start

    summary = {"obfuscator": cfg.obfuscator, "test_subset": cfg.test_subset, "images": len(y_np), "seed": cfg.seed,
               "identify": cfg.identify, "val_images": n_choice,
               "utility": utility(cfg, x_np, y_np, predicted, dev, bf16), "rows": scored,
               **verdict(scored, per_image, cfg.attacks), "wall_s": walls}
    atomic_write_text(out / "suite.json", json.dumps(summary, indent=1) + "\n")
    run.finish()
    return out / "suite.json"


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def utility(cfg: SuiteConfig, x: np.ndarray, y: np.ndarray, predicted: np.ndarray, dev: torch.device, bf16: bool) -> dict:
    """C's accuracy on the suite's images, clean and on the 8-bit uploads (C from O's recipe)."""
    classifier = frozen(load_classifier(recipe_classifier(cfg.obfuscator), dev))
    return {"clean_accuracy": accuracy(classifier, DeviceData(x, y, dev), bf16=bf16),
            "quantized_obfuscated_accuracy": float(np.mean(predicted == y))}


# ---------------------------------------------------------------- the verdict

def position(rows: dict[str, dict], attack: str) -> dict[str, float | None]:
    """Where `attack` lies between the mean image (0) and no defence (1): its PSNR above the mean image's, and its
    SSIM as a share of the way (PSNR has no top: no defence's is infinite)."""
    s, lo, hi = rows[attack], rows["mean image"], rows["no defence"]
    return {"psnr_db_above_mean_image": None if s["psnr_db"] is None else s["psnr_db"] - lo["psnr_db"],
            "ssim": (s["ssim"] - lo["ssim"]) / (hi["ssim"] - lo["ssim"])}


def usable(row: dict) -> bool:
    """A row that can be the strongest attack: not an empty search, and converged where it was trained (a search
    from a decoder: where that decoder was)."""
    return not row.get("empty", False) and row.get("converged", True) and row.get("start_converged", True)


def verdict(rows: dict[str, dict], per_image: dict[str, dict], attacks: list[str]) -> dict[str, Any]:
    """The strongest attack (best validation PSNR among the usable attacks; of all the non-empty ones when none is
    usable), where it lies, and the leakage beyond the class: it minus the label-only decoder, paired per image."""
    pool = [a for a in attacks if usable(rows[a])] or [a for a in attacks if not rows[a].get("empty")] or attacks
    strongest = max(pool, key=lambda a: rows[a].get("val_psnr_db", -math.inf))
    converged = usable(rows[strongest])
    out = {"strongest": strongest, "strongest_converged": converged, "strongest_psnr_db": rows[strongest]["psnr_db"],
           "max_ssim": max(rows[a]["ssim"] for a in attacks if not rows[a].get("empty")) if any(
               not rows[a].get("empty") for a in attacks) else rows[strongest]["ssim"],
           "position": position(rows, strongest), "leakage": None}
    if LABEL_ONLY in rows:
        ref = rows[LABEL_ONLY]
        d_psnr, d_ci = mean_ci(per_image[strongest]["psnr"] - per_image[LABEL_ONLY]["psnr"])
        s_psnr, s_ci = mean_ci(per_image[strongest]["ssim"] - per_image[LABEL_ONLY]["ssim"])
        both = converged and ref.get("converged", False)
        out["leakage"] = {"attack": strongest, "reference": LABEL_ONLY, "psnr_db": d_psnr, "psnr_ci": d_ci,
                          "ssim": s_psnr, "ssim_ci": s_ci, "converged": both,
                          "verdict": "converged" if both else "lower bound, not converged"}
    return out
