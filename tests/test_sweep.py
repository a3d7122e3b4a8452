"""The lambda sweep at smoke scale: one obfuscator and one attack suite per lambda and seed, frontier.json with
intervals over seeds and frontier.png, and a rerun that reuses finished runs."""

from __future__ import annotations

import json

import pytest

from privoffload.experiments.sweep import frontier_point, meets

from .helpers import cli

SUITE = ("--set", 'suite.attacks=["decoder"]', "--set", 'suite.test_subset="random:64"', "--set", "suite.decoder.val_split=0.5",
         "--set", "suite.decoder.batch_size=64")
SWEEP_ARGS = ("--lams", "0,2", "--seeds", "2", "--subset", "first:128", "--epochs", "1", "--width", "4",
              "--attack-epochs", "1", "--attack-width", "4", "--attack-arch", "codec", "--set", "obfuscator.batch_size=64",
              "--set", 'obfuscator.test_subset="random:64"', *SUITE)


def test_sweep_writes_the_frontier_and_reuses_finished_runs(tiny_classifier, tmp_path):
    out = tmp_path / "sweep"
    result = cli("sweep-lambda", "--classifier", tiny_classifier, "--out", out, *SWEEP_ARGS)
    assert result.exit_code == 0, result.output
    frontier = json.loads((out / "frontier.json").read_text())
    assert [p["lam"] for p in frontier["points"]] == [0.0, 2.0]
    assert [(r["lam"], r["seed"]) for r in frontier["runs"]] == [(0.0, 0), (0.0, 1), (2.0, 0), (2.0, 1)]
    for r in frontier["runs"]:
        suite = json.loads((out / f"lam-{r['lam']:g}" / f"seed-{r['seed']}" / "suite" / "suite.json").read_text())
        assert r["psnr_db"] == suite["rows"]["decoder"]["psnr_db"] and r["strongest"] == "decoder"  # never D
        assert r["relative_accuracy"] == pytest.approx(r["quantized_obfuscated_accuracy"] / r["test_accuracy"])
    for p in frontier["points"]:
        for k in ("relative_accuracy", "psnr_db", "ssim"):
            assert isinstance(p[k], float) and isinstance(p[f"{k}_ci"], float), k
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    log = (out / "lam-2" / "seed-1" / "suite" / "decoder" / "metrics.jsonl").read_text()

    again = cli("sweep-lambda", "--classifier", tiny_classifier, "--out", out, *SWEEP_ARGS)
    assert again.exit_code == 0, again.output
    assert (out / "lam-2" / "seed-1" / "suite" / "decoder" / "metrics.jsonl").read_text() == log  # nothing retrained
    assert json.loads((out / "frontier.json").read_text()) == frontier


def test_points_and_the_target_by_their_intervals():
    runs = [{"lam": 1.0, "seed": s, "test_accuracy": 0.5, "quantized_obfuscated_accuracy": a, "relative_accuracy": 2 * a,
             "psnr_db": p, "ssim": 0.2, "deobfuscator_psnr_db": 12.0, "mean_image_psnr_db": 12.0, "strongest": "decoder"}
            for s, (a, p) in enumerate([(0.47, 14.0), (0.48, 14.2), (0.49, 14.4)])]
    point = frontier_point(runs)
    assert point["relative_accuracy"] == pytest.approx(0.96) and point["psnr_db"] == pytest.approx(14.2)
    assert point["psnr_db_ci"] == pytest.approx(4.302653 * 0.2 / 3 ** 0.5, rel=1e-5)  # t(0.975, 2) * sd / sqrt(n)
    assert point["target_met"]  # 0.96 - 0.025 >= 0.9, 14.2 + 0.5 <= 15, 0.2 <= 0.3
    assert not meets({**point, "psnr_db": 14.7})  # the interval crosses 15 dB
    assert not frontier_point(runs[:1])["target_met"]  # one seed has no interval: never met


def test_sweep_refuses_bad_lambdas_and_changed_settings(tiny_classifier, tmp_path):
    result = cli("sweep-lambda", "--classifier", tiny_classifier, "--out", tmp_path / "s", "--lams", "0,x")
    assert result.exit_code == 2 and "comma-separated" in result.stderr
    result = cli("sweep-lambda", "--classifier", tiny_classifier, "--out", tmp_path / "s", "--lams", "1,1")
    assert result.exit_code == 2 and "repeats" in result.stderr
