"""The whole protocol at smoke scale: report, figures, resume after a kill, and refusal to mix configs."""

import os
import signal
import subprocess
import sys
import time

import pytest

from privoffload.train.common import read_metrics

from .conftest import ROOT, assert_user_error, run_cli

FIGURES = ("fig4_samples.png", "fig5_accuracy.png", "fig6_drift.png", "fig7_recovery.png", "fig8_resync.png")
STAGES = ("c0", "o0", "extra1", "robust", "drift", "recovery", "attack", "attack-o0", "attack-robust", "whitebox", "blackbox")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke protocol, killed once during the baseline obfuscator and then continued."""
    out = tmp_path_factory.mktemp("protocol") / "smoke"
    cmd = [sys.executable, "-m", "privoffload", "reproduce", "--profile", "smoke", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PRIVOFFLOAD_PROGRESS": "0"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "o0" / "checkpoint.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "the protocol ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    c0_weights = (out / "c0" / "classifier.safetensors").stat().st_mtime_ns
    done = run_cli("reproduce", "--profile", "smoke", "--out", out, timeout=600)
    return out, done, c0_weights


def test_report_and_figures(smoke):
    out, done, _ = smoke
    assert f"report: {out / 'report.md'}" in done.stdout
    report = (out / "report.md").read_text()
    for figure in ("70.82", "40.68", "81.53", "20.52", "73.00", "fresh attacker", "co-trained D", "lossy", "Wall time",
                   "drift-robust obfuscator", "Robust drop / plain drop", "within 0.5 dB", "| black-box | 8 | 256 |"):
        assert figure in report, figure
    for name in FIGURES:
        assert (out / name).stat().st_size > 5000, name
    assert (out / "fig4_samples.png").read_bytes()[:4] == b"\x89PNG"


def test_killed_protocol_continues_where_it_stopped(smoke):
    out, done, c0_weights = smoke
    assert "stage c0 (finished earlier" in done.stdout  # reused, not retrained
    assert (out / "c0" / "classifier.safetensors").stat().st_mtime_ns == c0_weights
    for stage in STAGES:
        epochs = [r["epoch"] if "epoch" in r else r["step"] for r in read_metrics(out / stage)]
        assert epochs == sorted(set(epochs)) and (out / stage / "DONE").exists(), (stage, epochs)
    drift = read_metrics(out / "drift")
    assert drift[0]["epoch"] == 0 and all({"O0", "robust"} <= r["probes"].keys() for r in drift)


def test_same_command_again_reuses_everything_and_plot_redraws(smoke):
    out, _, _ = smoke
    before = {s: (out / s / "metrics.jsonl").read_text() for s in STAGES}
    again = run_cli("reproduce", "--profile", "smoke", "--out", out)
    assert again.stdout.count("finished earlier") == len(STAGES)
    assert {s: (out / s / "metrics.jsonl").read_text() for s in STAGES} == before
    for name in (*FIGURES, "report.md"):
        (out / name).unlink()
    run_cli("plot", out)
    assert all((out / name).exists() for name in (*FIGURES, "report.md"))


def test_another_config_is_refused(smoke, tmp_path):
    out, _, _ = smoke
    done = run_cli("reproduce", "--profile", "smoke", "--out", out, "--set", "baseline_classifier.epochs=3", check=False)
    assert_user_error(done, "another protocol config")
    assert_user_error(run_cli("reproduce", "--profile", "tiny", "--out", tmp_path, check=False), "not one of smoke, quick, paper")
    assert_user_error(run_cli("plot", tmp_path / "none", check=False), "not a folder")
    assert_user_error(run_cli("plot", tmp_path, check=False), "no finished baseline classifier")
