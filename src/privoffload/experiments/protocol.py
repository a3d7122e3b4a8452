"""The protocol: the registered stages (stages/) of every seed, each one a run folder; then the report.

    OUT/config.toml           the protocol's settings (the profile and every --set)
    OUT/seed-<s>/<stage>/     the stages of seed s, in the registry's order (stages/__init__.py)
    OUT/seed-<s>/timings.json the wall time of each stage
    OUT/report.md, OUT/fig*.png   mean and 95 % interval over the seeds (report.py)

`stages` chooses what runs: `main` (the paper's stages and the attack suite on the final obfuscator: what
`make run` answers first), `all`, groups (paper, privacy, beyond) or stage names; what a chosen stage reads runs
with it. Seed s adds 1000 * s to every stage's own seed: initialisation, order, flips and draws change, while the
test images stay the same for every seed and stage.

Giving the same command again continues: a finished stage whose saved config matches is skipped without
touching its trainer, the interrupted one resumes from its checkpoint, and more stages or seeds can be added
to the same folder later. Seeds run one after another, in `jobs` processes on this machine, or as tasks on a
Ray cluster.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import multiprocessing
import os
import time
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from .. import config as config_mod
from ..config import PROFILES
from ..errors import UserError
from ..runs import is_done
from ..runtime import atomic_write_text
from .stage import Seed, Stage, configured, select
from .stages import STAGES, ProtocolConfig

Runner = Callable[[Any, Path, Seed], Any]


def profile_path(name: str, dataset: str = "cifar10") -> Path:
    """profiles/NAME-DATASET.toml where there is one (sizes that fit that data set), else profiles/NAME.toml."""
    if name not in PROFILES:
        raise UserError(f"profile {name!r} is not one of {', '.join(PROFILES)}")
    folder = resources.files("privoffload.experiments") / "profiles"
    own = folder / f"{name}-{dataset}.toml"
    return Path(str(own if own.is_file() else folder / f"{name}.toml"))


def auto_profile(device: str = "auto") -> str:
    """The profile that suits this machine: the paper's on CUDA, the quick one on a CPU."""
    from ..runtime import pick_device

    return "paper" if pick_device(device).type == "cuda" else "quick"


def load_profile(name: str, sets: list[str] | None = None, dataset: str | None = None) -> Any:
    """The profile's settings (a ProtocolConfig) with the --set overrides and the data set given."""
    return config_mod.load(ProtocolConfig, profile_path(name, dataset or "cifar10"), sets=sets,
                           overrides={"profile": name, "dataset": dataset}, ignore=("seconds",))


def expected_seconds(cfg: Any) -> dict[str, float]:
    """What each stage took on the reference machine (the profile's [seconds] table): the ETA's yardstick."""
    text = profile_path(cfg.profile, cfg.dataset).read_text()
    return {k: float(v) for k, v in tomllib.loads(text).get("seconds", {}).items()}


class Clock:
    """Progress over the whole run: which stage of which seed, elapsed time and an ETA from the reference seconds,
    rescaled by how this machine kept up with them so far."""

    def __init__(self, plan: list[str], reference: dict[str, float]):
        self.plan, self.reference, self.t0 = plan, reference, time.perf_counter()
        self.done_ref = self.done_real = 0.0

    def finished(self, stage: str, seconds: float) -> None:
        if stage in self.reference:
            self.done_ref += self.reference[stage]
            self.done_real += seconds

    def line(self, k: int) -> str:
        elapsed = time.perf_counter() - self.t0
        left = sum(self.reference.get(s, 0.0) for s in self.plan[k:])
        speed = self.done_real / self.done_ref if self.done_ref else 1.0
        eta = f", about {fmt(left * speed)} left in this seed" if left else ""
        return f"[{k + 1}/{len(self.plan)}, {fmt(elapsed)} elapsed{eta}]"


def fmt(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def reproduce(cfg: Any, out: str | Path, *, stages: str = "main", seeds: int = 1, jobs: int = 1, ray: str | None = None,
              data_root: str | Path | None = None, device: str = "auto",
              runners: dict[str, Runner] | None = None) -> Path:
    """Run (or continue) the chosen stages of every seed, then draw the figures and write report.md. Returns its path.

    `runners` supplies the runs of stages that need layers above this one (the live hot swap needs the service and
    the client: the command line passes live.py's)."""
    from .report import write_report

    out = Path(out)
    if seeds < 1 or jobs < 1:
        raise UserError(f"--seeds {seeds} and --jobs {jobs} must be at least 1")
    chosen = select(STAGES, stages)
    runners = runners or {}
    for stage in chosen:
        if stage.run is None and stage.name not in runners:
            raise UserError(f"stage {stage.name} runs the service and the client: run it from the command line "
                            f"(`privoffload reproduce --stages {stage.name}`)")
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "config.toml"
    text = config_mod.to_toml(cfg)
    if saved.exists() and saved.read_text() != text:
        raise UserError(f"{out} was made with another protocol config (see {saved}); "
                        "give the same --profile and --set options, or choose a new --out")
    atomic_write_text(saved, text)
    for s in range(seeds):  # every seed's configs are checked before anything trains
        seed = Seed(s, out / f"seed-{s}", cfg)
        for stage in chosen:
            configured(stage, seed)
    names = [s.name for s in chosen]
    reference = expected_seconds(cfg)
    total = sum(reference.get(n, 0.0) for n in names) * seeds / min(jobs, seeds)
    print(f"reproduce: profile {cfg.profile} on {cfg.dataset}, {seeds} seed{'s' if seeds > 1 else ''}, stages "
          f"{' '.join(names)}" + (f"; about {fmt(total)} on the reference 2-core machine" if total else ""), flush=True)
    work = [functools.partial(run_seed, cfg, out / f"seed-{s}", s, stages=names, data_root=data_root, device=device,
                              runners=runners) for s in range(seeds)]
    if ray is not None:
        on_ray(work, ray, cpus=max(1, (os.cpu_count() or 1) // jobs))
    elif jobs > 1 and seeds > 1:
        in_processes(work, jobs)
    else:
        data = None
        for run in work:  # one data set for every seed
            data = run(data=data)._data
    return write_report(out, data_root=data_root, runners=runners)


def in_processes(work: list[Callable[..., Any]], jobs: int) -> None:
    """Seeds side by side in `jobs` fresh processes, the cores shared out among them (one thread each on 2 cores)."""
    import torch

    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=torch.set_num_threads,
                                                initargs=(threads,)) as pool:
        for done in concurrent.futures.as_completed([pool.submit(folder_of, run) for run in work]):
            done.result()  # the first failure (a UserError keeps its one-line message) ends the run


def folder_of(run: Callable[..., Seed]) -> str:
    """Run one seed; what travels back from another process is its folder, not its data."""
    return str(run().folder)


def on_ray(work: list[Callable[..., Any]], address: str, cpus: int) -> None:
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

    def seed_task(run: Callable[..., Any]) -> str:
        import torch

        torch.set_num_threads(cpus)
        return folder_of(run)

    try:
        ray.get([ray.remote(num_cpus=cpus)(seed_task).remote(run) for run in work])
    finally:
        ray.shutdown()


def run_seed(cfg: Any, folder: Path, index: int, *, stages: list[str], data: Any = None,
             data_root: str | Path | None = None, device: str = "auto", runners: dict[str, Runner] | None = None) -> Seed:
    """Run (or continue) the chosen stages of one seed in `folder`. A finished stage is skipped without touching its
    trainer (its saved config must still match); the data set is loaded only when a stage has work to do."""
    seed = Seed(index, folder, cfg, device=device, data_root=data_root, _data=data)
    folder.mkdir(parents=True, exist_ok=True)
    todo = [(s, configured(s, seed)) for s in STAGES if s.name in stages]
    todo = [(s, c) for s, c in todo if c is not None]  # a stage the profile turns off is not part of the plan
    clock = Clock([s.name for s, _ in todo], expected_seconds(cfg))
    for k, (stage, stage_cfg) in enumerate(todo):
        run_dir = folder / stage.name
        if is_done(run_dir) and (run_dir / "config.toml").read_text() == config_mod.to_toml(stage_cfg):
            print(f"== seed {index} stage {stage.name} (finished earlier) {clock.line(k)}", flush=True)
            continue
        print(f"== seed {index} stage {stage.name} {clock.line(k)}", flush=True)
        t0 = time.perf_counter()
        (runners or {}).get(stage.name, stage.run)(stage_cfg, run_dir, seed)
        if seed._data is not None:
            atomic_write_text(folder.parent / "data.txt", seed._data.source)
        seconds = time.perf_counter() - t0
        clock.finished(stage.name, seconds)
        add_wall_time(folder, stage.name, seconds)
    return seed


def add_wall_time(out: Path, stage: str, seconds: float) -> None:
    """Wall time per stage, summed over interrupted and resumed pieces."""
    path = out / "timings.json"
    times = json.loads(path.read_text()) if path.exists() else {}
    times[stage] = times.get(stage, 0.0) + seconds
    atomic_write_text(path, json.dumps(times, indent=1))


def stage_configs(cfg: Any, out: Path, seed: int = 0, stages: str = "all") -> dict[str, Any]:
    """Every chosen stage's config for one seed folder, as the protocol would run it (None where the profile turns a
    stage off): for inspection and tests."""
    s = Seed(seed, Path(out), cfg)
    return {stage.name: configured(stage, s) for stage in select(STAGES, stages)}


def stage(name: str) -> Stage:
    return next(s for s in STAGES if s.name == name)
