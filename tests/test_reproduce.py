"""The whole protocol at smoke scale: report, figures, resume after a kill, and refusal to mix configs."""

import json

import pytest

from privoffload.runs import last_record, read_metrics

from .helpers import assert_user_error, kill_at_checkpoint, run_cli

FIGURES = ("fig4_samples.png", "fig5_accuracy.png", "fig6_drift.png", "fig7_recovery.png", "fig8_resync.png")
STAGES = ("c0", "o0", "extra1", "robust", "drift", "recovery", "privacy-o0", "privacy", "attack-o0", "attack-robust",
          "whitebox", "blackbox")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke protocol, killed once during the baseline obfuscator and then continued."""
    out = tmp_path_factory.mktemp("protocol") / "smoke"
    kill_at_checkpoint("reproduce", "--profile", "smoke", "--out", out, folder=out / "o0", timeout=300)
    c0_weights = (out / "c0" / "classifier.safetensors").stat().st_mtime_ns
    done = run_cli("reproduce", "--profile", "smoke", "--out", out, timeout=600)
    return out, done, c0_weights


def test_report_and_figures(smoke):
    out, done, _ = smoke
    assert f"report: {out / 'report.md'}" in done.stdout
    report = (out / "report.md").read_text()
    c0 = last_record(read_metrics(out / "c0"), "test_accuracy")["test_accuracy"]
    o0 = last_record(read_metrics(out / "o0"), "obfuscated_accuracy")["obfuscated_accuracy"]
    assert f"| C0 test accuracy | 70.82 | {100 * c0:.2f} |" in report  # the run's own numbers, from its logs
    assert f"| O0 obfuscated accuracy | 40.68 | {100 * o0:.2f} |" in report
    assert "| black-box | 8 | 256 |" in report  # the smoke profile's steps and query budget
    for stage, label in (("privacy-o0", "O0 (baseline)"), ("privacy", "O (after recovery)")):  # the suites, rendered
        summary = json.loads((out / stage / "suite.json").read_text())
        assert f"### Attack suite on {label}" in report and f"Strongest attack: **{summary['strongest']}**" in report
        assert set(summary["rows"]) >= {"mean image", "no defence", "decoder", "inversion", "decoder+inversion", "adaptive"}
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / name).stat().st_size > 5000, name


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
    log = lambda s: (out / s / ("suite.json" if s.startswith("privacy") else "metrics.jsonl")).read_text()  # noqa: E731
    before = {s: log(s) for s in STAGES}
    again = run_cli("reproduce", "--profile", "smoke", "--out", out)
    assert again.stdout.count("finished earlier") == len(STAGES)
    assert {s: log(s) for s in STAGES} == before
    report = (out / "report.md").read_text()
    for name in (*FIGURES, "report.md"):
        (out / name).unlink()
    run_cli("plot", out)
    assert all((out / name).exists() for name in FIGURES)
    assert (out / "report.md").read_text() == report  # redrawn from the logs alone, identically


def test_another_config_is_refused(smoke, tmp_path):
    out, _, _ = smoke
    done = run_cli("reproduce", "--profile", "smoke", "--out", out, "--set", "baseline_classifier.epochs=3", check=False)
    assert_user_error(done, "another protocol config")
    assert_user_error(run_cli("reproduce", "--profile", "tiny", "--out", tmp_path, check=False), "not one of smoke, quick, paper")
    assert_user_error(run_cli("plot", tmp_path / "none", check=False), "not a folder")
    assert_user_error(run_cli("plot", tmp_path, check=False), "no finished baseline classifier")
