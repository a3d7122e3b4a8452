"""The paper's protocol as stages in order, each one a run folder; one protocol folder per seed.

    OUT/config.toml           the protocol's settings (the profile and every --set)
    OUT/seed-<s>/<stage>/     the stages of seed s, in this order:
    c0        baseline classifier C0 (first N images, no augmentation)
    o0        baseline obfuscator O0 and deobfuscator D0 against frozen C0
    trajectory  beyond the paper: C0 fine-tuned on the client's own images, a snapshot every epoch: stand-ins for
              the cloud's next update
    robust    beyond the paper: O0 and D0 trained further against C0 and the stand-ins, on flipped uploads too
    control   the robust O's compute-matched control: O0 and D0 given the same steps against C0 alone
    drift     experiment 1: C goes on from C0 (all images, flips); O0 (and the robust O) measured on the current C
    recovery  experiment 2: O and D go on from O0 against the final C
    privacy-o0, privacy   the attack suite (privacy/suite.py) on O0 and on the final O: the privacy numbers that count
    identify  (where the profile asks) a fresh classifier trained on the suite's decoder's reconstructions of the
              final O's uploads: does the class (ORL: who it is) survive the reconstruction?
    attack-o0, attack-robust   fresh attackers against O0 and the robust O: is their privacy the same?
    whitebox  beyond the paper: re-sync O0 to the final C from its published weights, in a budget of steps
    blackbox  beyond the paper: re-sync O0 from the final C's API answers alone, queries counted and capped
    scores    every point that enters a ratio, scored again on all the test images (inference only)
    OUT/report.md, OUT/fig*.png   mean and 95 % interval over the seeds (experiments/report.py)

Seed s adds 1000 * s to every stage's own seed: initialisation, order, flips and draws all change, while the
test images stay the same for every seed and stage. The stand-ins, the robust obfuscator and its control come before `drift`
because experiment 1 measures both obfuscators on the very same classifiers, as probes of that one run.

Giving the same command again continues: finished stages are reused (each stage checks that its saved config
still matches), and the interrupted stage resumes from its checkpoint. More seeds can be added later to the
same folder. Seeds run one after another, in `jobs` processes on this machine, or as tasks on a Ray cluster.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import multiprocessing
import os
import time
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import config as config_mod
from .. import nets
from ..config import (PROFILES, AttackConfig, ClassifierConfig, IdentifyConfig, ObfuscatorConfig, ProtocolConfig, RemapConfig,
                      ResyncConfig, ScoresConfig, SuiteConfig)
from ..data import Dataset, DeviceData, load_dataset, select, subset_indices, to_pixels
from ..errors import UserError
from ..metrics import accuracy, obfuscation_scores, upload_accuracies
from ..privacy.attack import train_attack
from ..privacy.identify import train_identify
from ..privacy.suite import run_suite
from ..runs import RunDir, is_done, load_classifier, load_codec
from ..runtime import atomic_write_text, autocast, frozen, pick_device, use_bf16

SEED_STRIDE = 1000  # seed s of a protocol adds SEED_STRIDE * s to every stage's seed
from ..train.classifier import train_classifier
from ..train.obfuscator import train_obfuscator
from ..train.resync import Budget, black_box, complete, fit_remap, game_lambda, local_api, white_box
from .report import write_report


def profile_path(name: str, dataset: str = "cifar10") -> Path:
    """profiles/NAME-DATASET.toml where there is one (sizes that fit that data set), else profiles/NAME.toml."""
    if name not in PROFILES:
        raise UserError(f"profile {name!r} is not one of {', '.join(PROFILES)}")
    folder = resources.files("privoffload.experiments") / "profiles"
    own = folder / f"{name}-{dataset}.toml"
    return Path(str(own if own.is_file() else folder / f"{name}.toml"))


def auto_profile(device: str = "auto") -> str:
    """The profile that suits this machine: the paper's on CUDA, the 10-minute one on a CPU."""
    return "paper" if pick_device(device).type == "cuda" else "quick"


def load_profile(name: str, sets: list[str] | None = None, dataset: str | None = None) -> ProtocolConfig:
    path = profile_path(name, dataset or "cifar10")
    return config_mod.load(ProtocolConfig, path, sets=sets, overrides={"profile": name, "dataset": dataset})


def stage_configs(cfg: ProtocolConfig, out: Path, seed: int = 0) -> dict[str, Any]:
    """Every stage's config for seed `seed`, in the order they run, with its links to earlier stages, each validated."""
    r = cfg.robust
    o0 = replace(cfg.baseline_obfuscator, classifier=str(out / "c0"))
    robust_stages = {}
    if r.trajectory.epochs:  # beyond the paper: stand-ins for the update, the robust O and its compute-matched control
        trajectory = replace(r.trajectory, init=str(out / "c0"), width=cfg.baseline_classifier.width)
        stand_ins = [str(out / "trajectory" / f"epoch-{e}") for e in range(trajectory.snapshot_every or trajectory.epochs,
                                                                            trajectory.epochs + 1,
                                                                            trajectory.snapshot_every or trajectory.epochs)]
        robust = replace(o0, ensemble=stand_ins, ensemble_weight=r.weight, ensemble_per_step=r.per_step,
                         flip_consistency=r.flip_consistency, lam=o0.lam if r.lam < 0 else r.lam,
                         init=str(out / "o0") if r.fine_tune else "", epochs=r.epochs or o0.epochs, snapshot_every=1)
        robust_stages = {"trajectory": trajectory, "robust": robust}
        if r.control:
            robust_stages["control"] = replace(robust, ensemble=[], ensemble_per_step=0, flip_consistency=False)
    stages = {
        "c0": cfg.baseline_classifier,
        "o0": o0,
        **robust_stages,
        "drift": replace(cfg.drift, init=str(out / "c0")),
        "recovery": replace(cfg.recovery, classifier=str(out / "drift"), init=str(out / "o0")),
        "privacy-o0": replace(cfg.privacy, obfuscator=str(out / "o0")),
        "privacy": replace(cfg.privacy, obfuscator=str(out / "recovery")),
        **({"attack-o0": replace(r.attack, obfuscator=str(out / "o0")),
            "attack-robust": replace(r.attack, obfuscator=str(out / "robust"))} if robust_stages else {}),
        **({"identify": replace(cfg.identify, attack=str(out / "privacy" / "decoder"))} if cfg.identify.epochs else {}),
        "whitebox": replace(cfg.resync, mode="white-box"),
        "blackbox": replace(cfg.resync, mode="black-box"),
        "remap": cfg.remap,
    }
    data = {"dataset": cfg.dataset, "image_size": cfg.image_size}  # every stage works on the protocol's data set
    # (an attack suite is handed the protocol's data; its decoders' configs carry it, ProtocolConfig.validate)
    stages = {name: replace(stage, seed=stage.seed + SEED_STRIDE * seed, **(data if hasattr(stage, "dataset") else {}))
              for name, stage in stages.items()}
    stages["scores"] = replace(cfg.scores, **data)
    for name, stage_cfg in stages.items():
        try:
            stage_cfg.validate()
        except UserError as e:
            raise UserError(f"stage {name}: {e}") from None
    # the client's stand-ins for the next update must not have seen the update's own data
    if "trajectory" in stages and overlap(stages["trajectory"].subset, stages["drift"].subset):
        raise UserError(f"stage trajectory trains on {stages['trajectory'].subset}, images the drift "
                        f"({stages['drift'].subset}) trains on too; give the stand-ins images the cloud's update never sees")
    return stages


def overlap(a: str, b: str, n: int = 50_000) -> bool:
    """Do two training subsets share an image? (random:N subsets are drawn with a stage's seed: counted as overlapping)"""
    if "random" in (a.split(":")[0], b.split(":")[0]):
        return True
    return bool(set(subset_indices(a, n)) & set(subset_indices(b, n)))


def reproduce(cfg: ProtocolConfig, out: str | Path, *, seeds: int = 1, jobs: int = 1, ray: str | None = None,
              data_root: str | Path | None = None, device: str = "auto", after_stages: Callable[..., Any] | None = None) -> Path:
    """Run (or continue) every stage of every seed, then draw the figures and write report.md. Returns its path.

    `after_stages(cfg, folder, data=..., data_root=..., device=...)` runs once a seed's stages are done: the CLI
    passes the live hot swap (live.py), which needs the service and the client, layers above this one.
    """
    out = Path(out)
    if seeds < 1 or jobs < 1:
        raise UserError(f"--seeds {seeds} and --jobs {jobs} must be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "config.toml"
    text = config_mod.to_toml(cfg)
    if saved.exists() and saved.read_text() != text:
        raise UserError(f"{out} was made with another protocol config (see {saved}); "
                        "give the same --profile and --set options, or choose a new --out")
    atomic_write_text(saved, text)
    for s in range(seeds):  # every seed's configs are checked before anything trains
        stage_configs(cfg, out / f"seed-{s}", s)
    work = [functools.partial(run_seed, cfg, out / f"seed-{s}", s, data_root=data_root, device=device,
                              after_stages=after_stages) for s in range(seeds)]
    if ray is not None:
        on_ray(work, ray, cpus=max(1, (os.cpu_count() or 1) // jobs))
    elif jobs > 1 and seeds > 1:
        in_processes(work, jobs)
    else:
        data = load_dataset(cfg.dataset, data_root, cfg.image_size)
        for run in work:
            run(data=data)
    return write_report(out, data_root=data_root)


def in_processes(work: list[Callable[..., Path]], jobs: int) -> None:
    """Seeds side by side in `jobs` fresh processes, the cores shared out among them (one thread each on 2 cores)."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=torch.set_num_threads,
                                                initargs=(threads,)) as pool:
        for done in concurrent.futures.as_completed([pool.submit(run) for run in work]):
            done.result()  # the first failure (a UserError keeps its one-line message) ends the run


def on_ray(work: list[Callable[..., Path]], address: str, cpus: int) -> None:
    """Seeds as tasks of the Ray cluster at `address` (the optional extra privoffload[cluster]). Every node must see
    the protocol folder and the data at the same paths: a shared file system, as on any training cluster."""
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install 'privoffload[cluster]'") from None
    try:
        ray.init(address=address, log_to_driver=True, ignore_reinit_error=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot join the Ray cluster at {address} ({str(e)[:120]}); start one with `ray start --head`") from None

    def seed_task(run: Callable[..., Path]) -> str:
        torch.set_num_threads(cpus)
        return str(run())

    try:
        ray.get([ray.remote(num_cpus=cpus)(seed_task).remote(run) for run in work])
    finally:
        ray.shutdown()


def run_seed(cfg: ProtocolConfig, folder: Path, seed: int, *, data: Dataset | None = None,
             data_root: str | Path | None = None, device: str = "auto", after_stages: Callable[..., Any] | None = None) -> Path:
    """Run (or continue) the stages of one seed in `folder`, which is a protocol folder of its own."""
    stages = stage_configs(cfg, folder, seed)
    data = data or load_dataset(cfg.dataset, data_root, cfg.image_size)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder.parent / "data.txt", data.source)

    def drift_probes() -> dict[str, Any]:
        """O0, and the robust O and its control after each of their epochs (the last is the obfuscator itself)."""
        probes = {"O0": load_codec(folder / "o0")}
        for name in ("robust", "control"):
            if name in stages:
                probes[name] = load_codec(folder / name)
                last = f"epoch-{stages[name].epochs}"  # that snapshot is the obfuscator itself
                probes.update({f"{name}@{e.name}": load_codec(e) for e in sorted((folder / name).glob("epoch-*"))
                               if e.name != last})
        return probes

    # each stage's config type says which trainer runs it; drift also measures the obfuscators made so far
    trainers = {ClassifierConfig: train_classifier, ObfuscatorConfig: train_obfuscator, AttackConfig: train_attack,
                IdentifyConfig: train_identify, SuiteConfig: run_suite,
                ResyncConfig: functools.partial(resync_stage, protocol=folder),
                RemapConfig: functools.partial(remap_stage, protocol=folder),
                ScoresConfig: functools.partial(scores_stage, protocol=folder)}
    runners: dict[str, Callable[[], Any]] = {
        name: functools.partial(trainers[type(stage)], stage, folder / name, resume=True, data=data, device=device)
        for name, stage in stages.items()}
    runners["drift"] = lambda: train_classifier(stages["drift"], folder / "drift", resume=True, data=data, device=device,
                                                probes=drift_probes())
    for name, run in runners.items():
        was_done = is_done(folder / name)
        t0 = time.perf_counter()
        print(f"== seed {seed} stage {name}{' (finished earlier, checking it)' if was_done else ''}", flush=True)
        run()
        if not was_done:
            add_wall_time(folder, name, time.perf_counter() - t0)
    if after_stages is not None:
        was_done, t0 = is_done(folder / "live"), time.perf_counter()
        print(f"== seed {seed} live hot swap{' (finished earlier)' if was_done else ''}", flush=True)
        after_stages(cfg, folder, data=data, data_root=data_root, device=device)
        if not was_done:
            add_wall_time(folder, "live", time.perf_counter() - t0)
    return folder


def add_wall_time(out: Path, stage: str, seconds: float) -> None:
    """Wall time per stage, summed over interrupted and resumed pieces."""
    path = out / "timings.json"
    times = json.loads(path.read_text()) if path.exists() else {}
    times[stage] = times.get(stage, 0.0) + seconds
    atomic_write_text(path, json.dumps(times, indent=1))


def resync_stage(cfg: ResyncConfig, out: Path, *, protocol: Path, resume: bool = True, data: Dataset | None = None,
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
    data = data or load_dataset(cfg.dataset, image_size=cfg.image_size)
    train = DeviceData(*select(data, cfg.subset, cfg.seed), dev)
    test = DeviceData(*select(data, cfg.test_subset, split="test"), dev)
    obf, deobf = load_codec(protocol / "o0", device=dev), load_codec(protocol / "o0", "deobfuscator", device=dev)
    cfg = replace(cfg, lam=game_lambda(cfg, protocol / "o0" / "obfuscator.safetensors"))
    new = frozen(load_classifier(protocol / "drift", dev))
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()

    bf16 = use_bf16(cfg.precision, dev)

    rounds: list[dict] = []  # black-box: the last round's surrogate agreement, logged with the next evaluation

    def evaluate(step: int, queries: int) -> None:
        """Upload accuracy on the real new C; at the end also D's PSNR/SSIM; the round's surrogate agreement."""
        t1 = time.perf_counter()
        record = {"stage": out.name, "step": step, "queries": queries, **(rounds.pop() if rounds else {})}
        record.update(obfuscation_scores(new, obf, test, deobf=deobf if step == cfg.steps else None, unquantized=False,
                                         bf16=bf16))
        record["eval_time_s"] = time.perf_counter() - t1
        record["time_s"] = t1 - t0
        run.log(record)
        print(f"{out.name} step {step}/{cfg.steps} queries {queries} upload accuracy "
              f"{record['quantized_obfuscated_accuracy']:.4f}", flush=True)

    if cfg.mode == "white-box":
        white_box(obf, deobf, new, train, cfg, on_eval=evaluate)
    else:  # the surrogate starts from C0 or a stand-in for the update, whichever agrees best with the first answers
        api = Budget(local_api(new, dev, cfg.api_top_k), cfg.max_queries)
        candidates = [load_classifier(p, dev) for p in [protocol / "c0", *sorted((protocol / "trajectory").glob("epoch-*"))]]
        black_box(obf, deobf, api, train, cfg, candidates, on_eval=evaluate, on_round=lambda info: rounds.append(info))
    nets.save(deobf, out / "deobfuscator.safetensors", mode=cfg.mode, lam=repr(cfg.lam))
    nets.save(obf, out / "obfuscator.safetensors", mode=cfg.mode, lam=repr(cfg.lam))
    run.finish()
    return out / "obfuscator.safetensors"


def remap_stage(cfg: RemapConfig, out: Path, *, protocol: Path, resume: bool = True, data: Dataset | None = None,
                device: str = "auto") -> Path:
    """The output-mapping baseline: O0's uploads of `queries` labelled client images go to the drifted C's API once; a
    remapping of its answers to the labels is fitted; then the test uploads' answers are remapped. No game step."""
    run = RunDir(out)
    run.start(cfg, resume)
    if is_done(out):
        return out
    dev = pick_device(device)
    bf16 = use_bf16(cfg.precision, dev)
    data = data or load_dataset(cfg.dataset, image_size=cfg.image_size)
    api = local_api(load_classifier(protocol / "drift", dev), dev, cfg.api_top_k)
    obf = frozen(load_codec(protocol / "o0", device=dev))

    @torch.no_grad()
    def answers(images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images).to(dev).float() / 255
        with autocast(dev, bf16):
            pixels = torch.cat([to_pixels(obf(x[i:i + 128])) for i in range(0, len(x), 128)])
        return complete(torch.from_numpy(api(pixels.cpu().numpy())).to(dev))

    t0 = time.perf_counter()
    x, y = select(data, cfg.subset, cfg.seed)
    n = min(cfg.queries, len(y))
    remap = fit_remap(answers(x[:n]), torch.from_numpy(y[:n]).to(dev))
    x_test, y_test = select(data, cfg.test_subset, split="test")
    probs, labels = answers(x_test), torch.from_numpy(y_test).to(dev)
    with torch.no_grad():
        after = (remap(probs.clamp(min=1e-6).log()).argmax(1) == labels).float().mean().item()
    (out / "metrics.jsonl").unlink(missing_ok=True)
    run.log({"queries": n, "before": (probs.argmax(1) == labels).float().mean().item(), "after": after,
             "images": len(labels), "time_s": time.perf_counter() - t0})
    run.finish()
    return out


# the obfuscators whose 8-bit uploads enter the report's ratios, and the classifiers each is scored on
SCORED = {"o0": ("c0", "drift"), "robust": ("c0", "drift"), "control": ("c0", "drift"), "recovery": ("drift",),
          "whitebox": ("drift",), "blackbox": ("drift",)}


def scores_stage(cfg: ScoresConfig, out: Path, *, protocol: Path, resume: bool = True, data: Dataset | None = None,
                 device: str = "auto") -> Path:
    """Score the ends of every ratio once more on `test_subset` (all test images): clean accuracy of C0 and the
    drifted C (`c0`, `drift`), and the 8-bit upload accuracy of each obfuscator on them (`o0@c0`, ...).
    Inference only; one record."""
    run = RunDir(out)
    run.start(cfg, resume)
    if is_done(out):
        return out
    dev = pick_device(device)
    bf16 = use_bf16(cfg.precision, dev)
    test = DeviceData(*select(data or load_dataset(cfg.dataset, image_size=cfg.image_size), cfg.test_subset, split="test"), dev)
    classifiers = {name: frozen(load_classifier(protocol / name, dev)) for name in ("c0", "drift")}
    t0 = time.perf_counter()
    record: dict[str, Any] = {"images": len(test), **{name: accuracy(c, test, bf16=bf16) for name, c in classifiers.items()}}
    for obf, on in SCORED.items():
        if (protocol / obf / "obfuscator.safetensors").exists():
            scored = upload_accuracies({c: classifiers[c] for c in on}, frozen(load_codec(protocol / obf, device=dev)),
                                       test, bf16=bf16)
            record.update({f"{obf}@{c}": acc for c, acc in scored.items()})
    record["eval_time_s"] = time.perf_counter() - t0
    (out / "metrics.jsonl").unlink(missing_ok=True)
    run.log(record)
    run.finish()
    return out
