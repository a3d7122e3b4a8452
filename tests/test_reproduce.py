"""The whole protocol at smoke scale: two seeds side by side, killed and continued, the report over seeds,
reuse, refusal to mix configs, the protocol's own checks, and the same seeds run as tasks on a local Ray cluster."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace

import pytest

from privoffload import nets
from privoffload.experiments.protocol import load_profile, stage_configs
from privoffload.experiments.stats import estimate
from privoffload.runs import read_metrics

from .helpers import assert_user_error, cli, free_port, kill_at_checkpoint, run_cli

FIGURES = ("fig4_samples.png", "fig5_accuracy.png", "fig6_drift.png", "fig7_recovery.png", "fig8_resync.png",
           "fig9_robust_cost.png", "fig11_robust_drift.png")
STAGES = ("c0", "o0", "drift", "recovery", "scores", "privacy", "privacy-o0", "drift-replicas", "compatible-drift",
          "stand-ins", "robust", "control", "attack-o0", "attack-robust", "robust-drift", "remap", "whitebox", "blackbox",
          "live")
SUITES = {"privacy-o0": "O0 (baseline)", "privacy": "the final O (after recovery)"}
SMOKE = ("reproduce", "--profile", "smoke", "--stages", "all", "--seeds", "2", "--jobs", "2")
pytestmark = pytest.mark.slow  # the whole protocol, twice: tens of seconds (`make test` runs it; -m "not slow" skips)


def stage_files(out):
    """Each stage's record: a suite stage's suite.json, else every metrics.jsonl in its folder (a group stage's
    runs are its subfolders)."""
    def record(folder):
        if folder.name in SUITES:
            return (folder / "suite.json").read_text()
        logs = sorted(folder.rglob("metrics.jsonl"))
        assert logs, f"{folder} has no metrics.jsonl"
        return "".join(f.read_text() for f in logs)
    return {f"{seed}/{s}": record(out / seed / s) for seed in ("seed-0", "seed-1") for s in STAGES}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Two smoke seeds in two processes, all killed once seed 0's baseline obfuscator has a checkpoint, then continued."""
    out = tmp_path_factory.mktemp("protocol") / "smoke"
    kill_at_checkpoint(*SMOKE, "--out", out, folder=out / "seed-0" / "o0", timeout=300)
    finished = {p.parent.name: p.stat().st_mtime_ns for p in (out / "seed-1").glob("*/DONE")}
    c0_weights = (out / "seed-0" / "c0" / "classifier.safetensors").stat().st_mtime_ns
    done = run_cli(*SMOKE, "--out", out, timeout=600)
    return out, done, c0_weights, finished


def test_report_over_seeds_and_figures(smoke):
    out, done, _, _ = smoke
    assert f"report: {out / 'report.md'}" in done.stdout
    report = (out / "report.md").read_text()
    c0 = [read_metrics(out / f"seed-{s}" / "scores")[-1]["c0"] for s in (0, 1)]
    o0 = [read_metrics(out / f"seed-{s}" / "scores")[-1]["o0@c0"] for s in (0, 1)]
    assert f"| C0 test accuracy | 70.82 | {estimate(c0).text(100)} |" in report  # the seeds' own numbers, with their CI
    assert f"| O0 obfuscated accuracy | 40.68 | {estimate(o0).text(100)} |" in report
    assert "2 seeds: seed-0, seed-1" in report and "| remap, then black-box | 2 | 8 | 512 |" in report  # smoke budgets
    for stage, label in SUITES.items():  # each seed's suite, aggregated over the two seeds
        summaries = [json.loads((out / f"seed-{s}" / stage / "suite.json").read_text()) for s in (0, 1)]
        assert f"## Attack suite on {label}" in report
        for summary in summaries:
            assert set(summary["rows"]) >= {"mean image", "per-class mean image", "label-only decoder", "no defence",
                                            "upload as image", "decoder", "label-aware", "decoder+inversion", "adaptive"}
            assert f"**{summary['strongest']}**" in report.split(f"## Attack suite on {label}")[1]
        psnr = estimate(s["rows"]["decoder+inversion"]["psnr_db"] for s in summaries).text()
        assert f"| decoder+inversion | attack | {psnr} |" in report or f"| **decoder+inversion** | attack | {psnr} |" in report
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / name).stat().st_size > 5000, name


def test_killed_seeds_continue_where_each_stopped(smoke):
    out, done, c0_weights, finished = smoke
    assert "seed 0 stage c0 (finished earlier" in done.stdout  # reused, not retrained
    assert (out / "seed-0" / "c0" / "classifier.safetensors").stat().st_mtime_ns == c0_weights
    for stage, mtime in finished.items():  # what seed 1 had finished when both were killed was kept as it was
        assert (out / "seed-1" / stage / "DONE").stat().st_mtime_ns == mtime, stage
    for seed in ("seed-0", "seed-1"):
        for stage in STAGES:
            marks = [r.get("epoch", r.get("step")) for r in read_metrics(out / seed / stage) if {"epoch", "step"} & r.keys()]
            assert marks == sorted(set(marks)) and (out / seed / stage / "DONE").exists(), (seed, stage, marks)
        drift = read_metrics(out / seed / "drift")
        assert drift[0]["epoch"] == 0 and all(r["probes"].keys() == {"O0"} for r in drift)
        # the robust O and its control, probed later on the very classifiers of the drift (its snapshots)
        probed = read_metrics(out / seed / "robust-drift")[-1]["curves"]
        assert {"O0", "robust", "control"} <= probed.keys()
        assert probed["O0"] == {str(r["epoch"]): r["probes"]["O0"]["quantized_obfuscated_accuracy"] for r in drift}
    # the seeds differ in what they learned, not in the images they are scored on
    assert read_metrics(out / "seed-0" / "c0") != read_metrics(out / "seed-1" / "c0")
    assert read_metrics(out / "seed-0" / "scores")[-1]["images"] == read_metrics(out / "seed-1" / "scores")[-1]["images"]


def test_resync_plays_at_the_lambda_of_the_obfuscator_it_continues(smoke):
    out, _, _, _ = smoke
    lam = nets.read_metadata(out / "seed-0" / "o0" / "obfuscator.safetensors")["lam"]
    for stage in ("whitebox", "blackbox"):
        assert nets.read_metadata(out / "seed-0" / stage / "obfuscator.safetensors")["lam"] == lam


def test_same_command_again_reuses_everything_and_plot_redraws(smoke):
    out, _, _, _ = smoke
    before = stage_files(out)
    again = run_cli(*SMOKE, "--out", out)
    assert again.stdout.count("finished earlier") == 2 * len(STAGES)
    assert stage_files(out) == before
    report = (out / "report.md").read_text()
    for name in (*FIGURES, "report.md"):
        (out / name).unlink()
    run_cli("plot", out)
    assert all((out / name).exists() for name in FIGURES)
    assert (out / "report.md").read_text() == report  # redrawn from the logs alone, identically


def test_another_config_is_refused(smoke, tmp_path):
    out, _, _, _ = smoke
    done = run_cli(*SMOKE, "--out", out, "--set", "baseline_classifier.epochs=3", check=False)
    assert_user_error(done, "another protocol config")
    assert_user_error(cli("reproduce", "--profile", "tiny", "--out", tmp_path), "not one of smoke, quick, paper")
    assert_user_error(cli("reproduce", "--profile", "smoke", "--seeds", "0", "--out", tmp_path), "at least 1")
    assert_user_error(cli("reproduce", "--profile", "smoke", "--stages", "c0,fig4", "--out", tmp_path), "'fig4' is not")
    assert_user_error(cli("plot", tmp_path / "none"), "not a folder")
    assert_user_error(cli("plot", tmp_path), "no seed folder")


def test_stand_ins_and_replicas_follow_the_update_recipe(tmp_path):
    """The robust obfuscator's stand-ins are independent runs of the drift's own recipe on images the update never
    sees, in every profile; the robust O trains against them, its control against C0 alone, for the same steps. The
    drift's replicas and the compatible drifts share the drift's recipe, and replica r of both shares its seed."""
    for profile in ("smoke", "quick", "paper"):
        stages = stage_configs(load_profile(profile), tmp_path, seed=2)
        drift, stand_ins, robust, control = stages["drift"], stages["stand-ins"], stages["robust"], stages["control"]
        assert robust.ensemble == [str(tmp_path / "stand-ins" / f"replica-{k}") for k in range(stand_ins.count)]
        assert stand_ins.count >= 2 and stand_ins.seed not in range(drift.seed, drift.seed + 100)
        assert (stand_ins.recipe.optim, stand_ins.recipe.flip, stand_ins.recipe.init) == (drift.optim, True, drift.init)
        assert control.ensemble == [] and (control.epochs, control.batch_size, control.subset, control.init) == \
            (robust.epochs, robust.batch_size, robust.subset, robust.init)
        plain, compat = stages["drift-replicas"], stages["compatible-drift"]
        assert plain.seed == compat.seed == drift.seed and plain.scored_too == [str(tmp_path / "drift")]
        assert plain.recipe.compat.obfuscators == [] and compat.recipe.compat.obfuscators == [str(tmp_path / "o0")]
        assert replace(compat.recipe, compat=plain.recipe.compat) == plain.recipe == replace(drift, seed=0, snapshot_every=0)
    for subset in ("range:0:512", "random:100"):
        clash = load_profile("smoke", [f"robust.stand_in_subset=\"{subset}\""])
        with pytest.raises(Exception, match="images the drift .* trains on too"):
            stage_configs(clash, tmp_path)


def test_seeds_run_as_tasks_on_a_local_ray_cluster(tmp_path):
    """A Ray head started here; a trivial seed (one epoch of C0) goes through the same path as a Ray task."""
    ray = shutil.which("ray", path=os.path.dirname(sys.executable))
    assert ray, "Ray is part of the test environment (requirements.lock)"
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                    f"--temp-dir={temp}", "--disable-usage-stats"], check=True, capture_output=True, env=env, timeout=120)
    try:
        out = tmp_path / "out"
        done = run_cli("reproduce", "--profile", "smoke", "--stages", "c0", "--out", out, "--ray", f"127.0.0.1:{port}",
                       "--set", "baseline_classifier.epochs=1", "--set", 'baseline_classifier.subset="first:128"',
                       env=env, timeout=600)
        assert f"report: {out / 'report.md'}" in done.stdout
        assert (out / "seed-0" / "c0" / "DONE").exists() and not (out / "seed-0" / "o0").exists()
        assert "1 seed: seed-0" in (out / "report.md").read_text()
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env=env, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_tensorboard_shows_the_logged_curves(smoke, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _, _ = smoke
    done = run_cli("tensorboard", out, "--logdir", tmp_path / "tb")
    assert f"tensorboard --logdir {tmp_path / 'tb'}" in done.stdout
    events = EventAccumulator(str(tmp_path / "tb" / "seed-1" / "drift")).Reload()
    logged = read_metrics(out / "seed-1" / "drift")
    probe = events.Scalars("probes/O0/quantized_obfuscated_accuracy")
    assert [(e.step, round(e.value, 6)) for e in probe] == \
        [(r["epoch"], round(r["probes"]["O0"]["quantized_obfuscated_accuracy"], 6)) for r in logged]
    assert "train_loss" in events.Tags()["scalars"] and "stage" not in events.Tags()["scalars"]
    run_cli("tensorboard", out, "--logdir", tmp_path / "tb")  # written anew, not appended
    again = EventAccumulator(str(tmp_path / "tb" / "seed-1" / "drift")).Reload()
    assert len(again.Scalars("train_loss")) == len([r for r in logged if "train_loss" in r])
    assert_user_error(run_cli("tensorboard", tmp_path / "nothing", check=False), "not a folder")


def test_stages_are_chosen_by_group_or_name_with_what_they_read():
    from privoffload.errors import UserError
    from privoffload.experiments.stage import select
    from privoffload.experiments.stages import STAGES

    names = lambda spec: [s.name for s in select(STAGES, spec)]  # noqa: E731
    assert names("main") == ["c0", "o0", "drift", "recovery", "scores", "privacy"]  # the paper's question first
    assert names("privacy-o0") == ["c0", "o0", "privacy-o0"]  # what it reads comes with it, in protocol order
    assert set(names("beyond")) >= {"stand-ins", "robust", "control", "robust-drift", "whitebox", "blackbox", "remap",
                                    "live", "c0", "o0", "drift", "drift-replicas", "compatible-drift"}
    assert names("all") == [s.name for s in STAGES]
    with pytest.raises(UserError, match="'fig4' is not main, all, a group"):
        select(STAGES, "main,fig4")


def test_a_finished_stage_is_skipped_without_touching_its_trainer(smoke, tmp_path):
    """Rerunning a finished stage never enters its trainer: a trainer would read the (here broken) checkpoint."""
    out, _, _, _ = smoke
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("seed-1"))
    (copy / "seed-0" / "c0" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    again = run_cli("reproduce", "--profile", "smoke", "--stages", "c0", "--out", copy)
    assert "seed 0 stage c0 (finished earlier)" in again.stdout and f"report: {copy / 'report.md'}" in again.stdout
