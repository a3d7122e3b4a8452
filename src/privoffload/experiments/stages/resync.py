"""Beyond the paper: bringing O0 back after the update (experiment 2 without the cloud's help), within budgets.

    remap      relabel the drifted API's answers on O0's uploads: a classes x classes map fitted on the client's
               labelled images (no game step); the first step of both re-syncs
    whitebox   then re-sync O0 (and D0) to the remapped drifted C from its published weights: `steps` steps of the game
    blackbox   or from the drifted C's API answers alone: a surrogate distilled from counted, capped queries, played
               against through the same map

Each scores O through the map on the real drifted C along the way (the profile's test subset) and, at its end,
before (the remap alone) and after on the scores stage's images (all test images): the game's gain over the remap.
The target is a contrast per seed, black-box's gain minus 0.9 x white-box's, at least 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ... import nets
from ...config import DataConfig, ResyncConfig
from ...config.loader import choice, positive, subset
from ...data import DeviceData, select, to_pixels
from ...metrics import obfuscation_scores, upload_accuracies
from ...runs import RunDir, is_done, load_classifier, load_codec
from ...runtime import autocast, frozen, pick_device, use_bf16
from ...train.resync import (Budget, black_box, complete, fit_remap, game_lambda, local_api, remap_from, remap_state,
                             remapped, white_box)
from .. import figures
from ..stage import Log, Records, Seed, Stage
from ..stats import estimate, fieller, verdict
from .paper import curve
from .robust import stand_in_folders

BLACKBOX_SHARE = 0.9  # the target: black-box's gain over the remap at least 0.9 x white-box's (as a paired contrast)


@dataclass
class RemapConfig(DataConfig):
    """The output-mapping baseline beside re-sync: relabel the API's answers on O0's uploads, no game (train/resync.py)."""

    queries: int = 4096  # labelled images of the client's, uploaded once through O0, to fit the remapping on
    subset: str = "all"  # the client's own labelled images (the first `queries` of them are used)
    test_subset: str = "all"
    api_top_k: int = 0
    seed: int = 0
    precision: str = "auto"

    def validate(self) -> None:
        super().validate()
        positive("queries", self.queries)
        choice("precision", self.precision, ("auto", "bf16", "fp32"))
        subset(self.subset)
        subset(self.test_subset)


def run_resync(cfg: ResyncConfig, out: Path, seed: Seed) -> None:
    """Re-sync O0 (and D0) to the drifted classifier read through the remap stage's map, white-box (its weights) or
    black-box (its answers, through a counted API; the surrogate starts from C0 or a stand-in, whichever agrees best
    with the first answers), scoring O through the map on the real drifted C. A re-sync is short: an interrupted one
    starts over."""
    run = RunDir(out)
    run.start(cfg, resume=True)
    if is_done(out):
        return
    (out / "metrics.jsonl").unlink(missing_ok=True)
    dev = pick_device(seed.device)
    data = seed.data
    train = DeviceData(*select(data, cfg.subset, cfg.seed), dev)
    test = DeviceData(*select(data, cfg.test_subset, split="test"), dev)
    o0 = Path(seed.path("o0"))
    obf, deobf = load_codec(o0, device=dev), load_codec(o0, "deobfuscator", device=dev)
    cfg = replace(cfg, lam=game_lambda(cfg, o0 / "obfuscator.safetensors"))
    new = frozen(load_classifier(seed.path("drift"), dev))
    remap = remap_from(Log(Path(seed.path("remap"))).last("remap")["remap"], dev)
    served = frozen(remapped(new, remap))  # what the client reads: the drifted C's answers through the map
    scored = DeviceData(*select(data, seed.protocol.scores.test_subset, split="test"), dev)
    bf16 = use_bf16(cfg.precision, dev)
    before = upload_accuracies({"drift": served}, frozen(load_codec(o0, device=dev)), scored, bf16=bf16)["drift"]
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    rounds: list[dict] = []  # black-box: the last round's surrogate agreement, logged with the next evaluation

    def evaluate(step: int, queries: int) -> None:
        t1 = time.perf_counter()
        record = {"stage": out.name, "step": step, "queries": queries, **(rounds.pop() if rounds else {})}
        record.update(obfuscation_scores(served, obf, test, deobf=deobf if step == cfg.steps else None,
                                         unquantized=False, bf16=bf16))
        record["eval_time_s"] = time.perf_counter() - t1
        record["time_s"] = t1 - t0
        run.log(record)
        print(f"{out.name} step {step}/{cfg.steps} queries {queries} upload accuracy "
              f"{record['quantized_obfuscated_accuracy']:.4f}", flush=True)

    if cfg.mode == "white-box":
        white_box(obf, deobf, served, train, cfg, on_eval=evaluate)
    else:
        api = Budget(local_api(new, dev, cfg.api_top_k), cfg.max_queries)
        candidates = [load_classifier(p, dev) for p in [Path(seed.path("c0")), *stand_in_folders(seed)]
                      if (Path(p) / "classifier.safetensors").exists()]
        black_box(obf, deobf, api, train, cfg, candidates, on_eval=evaluate, on_round=rounds.append, remap=remap)
    after = upload_accuracies({"drift": served}, frozen(obf), scored, bf16=bf16)["drift"]
    run.log({"stage": out.name, "images": len(scored), "before": before, "after": after})
    nets.save(deobf, out / "deobfuscator.safetensors", mode=cfg.mode, lam=repr(cfg.lam))
    nets.save(obf, out / "obfuscator.safetensors", mode=cfg.mode, lam=repr(cfg.lam))
    run.finish()


def run_remap(cfg: RemapConfig, out: Path, seed: Seed) -> None:
    """O0's uploads of `queries` labelled client images go to the drifted C's API once; a remapping of its answers to
    the labels is fitted; then the test uploads' answers are remapped. No game step."""
    run = RunDir(out)
    run.start(cfg, resume=True)
    if is_done(out):
        return
    dev = pick_device(seed.device)
    bf16 = use_bf16(cfg.precision, dev)
    api = local_api(load_classifier(seed.path("drift"), dev), dev, cfg.api_top_k)
    obf = frozen(load_codec(seed.path("o0"), device=dev))

    @torch.no_grad()
    def answers(images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images).to(dev).float() / 255
        with autocast(dev, bf16):
            pixels = torch.cat([to_pixels(obf(x[i:i + 128])) for i in range(0, len(x), 128)])
        return complete(torch.from_numpy(api(pixels.cpu().numpy())).to(dev))

    t0 = time.perf_counter()
    x, y = select(seed.data, cfg.subset, cfg.seed)
    n = min(cfg.queries, len(y))
    remap = fit_remap(answers(x[:n]), torch.from_numpy(y[:n]).to(dev))
    x_test, y_test = select(seed.data, cfg.test_subset, split="test")
    probs, labels = answers(x_test), torch.from_numpy(y_test).to(dev)
    with torch.no_grad():
        after = (remap(probs.clamp(min=1e-6).log()).argmax(1) == labels).float().mean().item()
    (out / "metrics.jsonl").unlink(missing_ok=True)
    run.log({"queries": n, "before": (probs.argmax(1) == labels).float().mean().item(), "after": after,
             "images": len(labels), "time_s": time.perf_counter() - t0, "remap": remap_state(remap)})
    run.finish()


# ---------------------------------------------------------------- records and the report

@dataclass(frozen=True)
class ResyncRecord:
    steps: int
    queries: int
    images: int  # the ends' test images
    curve: dict[int, tuple[int, float]]  # step -> (queries spent, upload accuracy through the map on the test subset)
    before: float  # O0 on the drifted C through the map (the remap alone), all test images
    after: float  # the re-synced O on it
    d_psnr_db: float
    agreement: list[float]  # black-box: the surrogate's held-out agreement, round by round


def read_resync(folder: Path) -> ResyncRecord:
    log = Log(folder)
    curve = {r["step"]: (int(r["queries"]), float(r["quantized_obfuscated_accuracy"])) for r in log.records
             if "quantized_obfuscated_accuracy" in r}
    if not curve:
        raise log.missing("evaluation")
    end = log.last("after")
    last = max(curve)
    return ResyncRecord(last, curve[last][0], int(end["images"]), curve, float(end["before"]), float(end["after"]),
                        log.value("deobfuscator_psnr_db"),
                        [float(r["agreement"]) for r in log.records if r.get("agreement") is not None])


@dataclass(frozen=True)
class RemapRecord:
    queries: int
    before: float  # O0's uploads on the drifted C, its own answers
    after: float  # the same answers through the fitted map


def read_remap(folder: Path) -> RemapRecord:
    r = Log(folder).last("remap")
    return RemapRecord(int(r["queries"]), float(r["before"]), float(r["after"]))


def gains(r: Records) -> tuple[float, float]:
    """White-box's and black-box's gains over the remap (all test images)."""
    return tuple(r[name].after - r[name].before for name in ("whitebox", "blackbox"))  # type: ignore[return-value]


def contrast(r: Records) -> float:
    """The target's contrast for one seed: black-box's gain minus 0.9 x white-box's (at least 0 to meet it)."""
    white, black = gains(r)
    return black - BLACKBOX_SHARE * white


def budget_curve(r: Records) -> dict[int, float]:
    """After each black-box round, the contrast at the same number of steps (test subset), against the queries spent
    so far (the remap's included)."""
    white, black = r["whitebox"].curve, r["blackbox"].curve
    spent = r["remap"].queries
    return {queries + spent: (acc - black[0][1]) - BLACKBOX_SHARE * (white[step][1] - white[0][1])
            for step, (queries, acc) in black.items() if step > 0 and step in white}


def report(seeds: list[Records]) -> list[str]:
    k = len(seeds)
    remap_queries = seeds[0]["remap"].queries
    lines = ["## Beyond the paper: re-sync after the update (experiment 2)", "",
             "First, both re-syncs relabel the drifted API's answers with a classes x classes map fitted on O0's uploads "
             f"of {remap_queries:,} of the client's labelled images (output remapping, no game step); then O0 and D0 play "
             "the game against the remapped classifier on the client's own images, with the same budget of steps: "
             "white-box from its published weights, black-box from its API's probabilities alone (a surrogate distilled "
             "from the answers, started from C0 or a stand-in for the update, whichever agreed best with its first "
             "answers, and read through the same map). Accuracy of the real drifted classifier on the 8-bit uploads "
             f"(through the map where there is one) of {seeds[0]['whitebox'].images:,} test images; API queries include "
             f"the remap's. Accuracies and gains in %.", "",
             "| re-sync | n | steps | API queries (images) | O0 before | after | gain | co-trained D PSNR dB |",
             "|---|---|---|---|---|---|---|---|"]
    rm = [r["remap"] for r in seeds]
    lines.append(f"| output remapping of O0's answers (no game) | {k} | 0 | {remap_queries} | "
                 f"{estimate(x.before for x in rm).text(100)} | {estimate(x.after for x in rm).text(100)} | "
                 f"{estimate(x.after - x.before for x in rm).text(100)} | – |")
    for label, name, extra in (("remap, then white-box", "whitebox", 0), ("remap, then black-box", "blackbox", remap_queries)):
        rs = [r[name] for r in seeds]
        lines.append(f"| {label} | {k} | {rs[0].steps} | {rs[0].queries + extra} | {estimate(x.before for x in rs).text(100)} | "
                     f"{estimate(x.after for x in rs).text(100)} | {estimate(x.after - x.before for x in rs).text(100)} | "
                     f"{estimate(x.d_psnr_db for x in rs).text()} |")
    est = estimate(contrast(r) for r in seeds)
    share = fieller([gains(r)[1] for r in seeds], [gains(r)[0] for r in seeds])
    agreement = estimate(r["blackbox"].agreement[-1] for r in seeds if r["blackbox"].agreement)
    lines += ["", f"- Black-box's gain over the remap minus {BLACKBOX_SHARE} x white-box's (paired per seed, n = {est.n}): "
              f"{est.text(100)} points (target at least 0: {verdict(est, 0.0)}). For reference, black-box's gain / "
              f"white-box's (ratio of the mean gains, Fieller 95 % interval): {share.text()}.",
              f"- Its surrogate named the API's top class for {agreement.text(100)} % of held-out queries in its last round "
              f"(n = {agreement.n})."]
    budget = curve(seeds, budget_curve)
    if len(budget) > 1:
        points = ", ".join(f"{q:.0f} queries: {e.text(100)}" for q, e in budget)
        lines.append(f"- The same contrast at the same number of steps after each black-box round, against the queries "
                     f"spent so far (test subset; fig10_query_budget.png; points): {points}.")
    return lines


def draw(seeds: list[Records], out: Path, **_) -> list[Path]:
    white = curve(seeds, lambda r: {s: a for s, (_, a) in r["whitebox"].curve.items()})
    black = curve(seeds, lambda r: {s: a for s, (_, a) in r["blackbox"].curve.items()})
    queries = [float(np.mean([r["blackbox"].curve[s][0] + r["remap"].queries for r in seeds if s in r["blackbox"].curve]))
               for s, _ in black]
    paths = [figures.resync_curves(white, black, queries, out / "fig8_resync.png")]
    budget = curve(seeds, budget_curve)
    if len(budget) > 1:
        paths.append(figures.curves({"black-box gain - 0.9 x white-box gain": budget}, out / "fig10_query_budget.png",
                                    xlabel="API queries (obfuscated images sent)", ylabel="contrast (points)",
                                    title="Black-box re-sync against its query budget", ylim=None, target=0.0,
                                    log_x=True))
    return paths


REMAP = Stage("remap", "remap", RemapConfig, lambda s, seed: s, run_remap, read_remap, needs=("o0", "drift"))
WHITEBOX = Stage("whitebox", "resync", ResyncConfig, lambda s, seed: replace(s, mode="white-box"), run_resync, read_resync,
                 needs=("o0", "drift", "remap"))
BLACKBOX = Stage("blackbox", "resync", ResyncConfig, lambda s, seed: replace(s, mode="black-box"), run_resync, read_resync,
                 needs=("o0", "drift", "remap", "whitebox"), report=report, figures=draw)
STAGES = [REMAP, WHITEBOX, BLACKBOX]
