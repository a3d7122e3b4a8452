"""The lambda sweep at smoke scale: frontier.json and frontier.png, and a rerun that reuses finished runs."""

from __future__ import annotations

import json

from .helpers import cli

SWEEP_ARGS = ("--lams", "0,2", "--subset", "first:64", "--epochs", "1", "--width", "4", "--attack-epochs", "1",
              "--attack-width", "4", "--set", "obfuscator.batch_size=64", "--set", "attack.batch_size=64",
              "--set", 'obfuscator.test_subset="random:64"', "--set", 'attack.test_subset="random:64"')


def test_sweep_writes_the_frontier_and_reuses_finished_runs(tiny_classifier, tmp_path):
    out = tmp_path / "sweep"
    result = cli("sweep-lambda", "--classifier", tiny_classifier, "--out", out, *SWEEP_ARGS)
    assert result.exit_code == 0, result.output
    points = json.loads((out / "frontier.json").read_text())
    assert [p["lam"] for p in points] == [0.0, 2.0]
    for p in points:
        for k in ("obfuscated_accuracy", "quantized_obfuscated_accuracy", "deobfuscator_psnr_db", "deobfuscator_ssim",
                  "attacker_psnr_db", "attacker_ssim", "obfuscator_wall_s", "attack_wall_s"):
            assert isinstance(p[k], float), k
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    metrics = (out / "lam-2" / "attack" / "metrics.jsonl").read_text()

    again = cli("sweep-lambda", "--classifier", tiny_classifier, "--out", out, *SWEEP_ARGS)
    assert again.exit_code == 0, again.output
    assert (out / "lam-2" / "attack" / "metrics.jsonl").read_text() == metrics  # nothing retrained
    assert json.loads((out / "frontier.json").read_text()) == points


def test_sweep_refuses_bad_lambdas_and_changed_settings(tiny_classifier, tmp_path):
    result = cli("sweep-lambda", "--classifier", tiny_classifier, "--out", tmp_path / "s", "--lams", "0,x")
    assert result.exit_code == 2 and "comma-separated" in result.stderr
    result = cli("sweep-lambda", "--classifier", tiny_classifier, "--out", tmp_path / "s", "--lams", "1,1")
    assert result.exit_code == 2 and "repeats" in result.stderr
