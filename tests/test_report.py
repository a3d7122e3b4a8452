"""The report's arithmetic on hand-made logs: drops, the robustness ratio, the re-sync summary and the verdicts.

No training here: each stage folder gets a metrics.jsonl written by the test, so every number the report
prints is known in advance, and a wrong formula or an inverted verdict fails.
"""

from __future__ import annotations

import json

import pytest

from privoffload.experiments.report import collect, drop, resync_summary, robustness, write_report


def log(folder, *records) -> None:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def probes(o0: float, robust: float) -> dict:
    return {"O0": {"obfuscated_accuracy": o0}, "robust": {"obfuscated_accuracy": robust}}


@pytest.fixture
def protocol(tmp_path):
    """A protocol folder whose logs say: O0 falls 0.40 -> 0.20 (drop 50 %), the robust O 0.40 -> 0.36 (10 %);
    white-box regains 0.10, black-box 0.095 (95 %); fresh-attacker PSNR 14.0 vs 14.3 dB."""
    out = tmp_path / "run"
    log(out / "c0", {"epoch": 1, "test_accuracy": 0.5}, {"epoch": 2, "test_accuracy": 0.6})
    log(out / "o0", {"epoch": 1, "obfuscated_accuracy": 0.40, "quantized_obfuscated_accuracy": 0.39,
                     "deobfuscator_psnr_db": 13.0, "deobfuscator_ssim": 0.2})
    log(out / "drift", {"epoch": 0, "test_accuracy": 0.6, "probes": probes(0.40, 0.40)},
        {"epoch": 1, "test_accuracy": 0.7, "probes": probes(0.30, 0.38)},
        {"epoch": 2, "test_accuracy": 0.8, "probes": probes(0.20, 0.36)})
    log(out / "recovery", {"epoch": 1, "obfuscated_accuracy": 0.45, "quantized_obfuscated_accuracy": 0.44,
                           "deobfuscator_psnr_db": 12.5, "deobfuscator_ssim": 0.15})
    log(out / "attack", {"epoch": 1, "attacker_psnr_db": 13.5, "attacker_ssim": 0.21, "arch": "unet"})
    log(out / "attack-o0", {"epoch": 1, "attacker_psnr_db": 14.0, "attacker_ssim": 0.3})
    log(out / "attack-robust", {"epoch": 1, "attacker_psnr_db": 14.3, "attacker_ssim": 0.3})
    log(out / "whitebox", {"step": 0, "queries": 0, "obfuscated_accuracy": 0.20},
        {"step": 10, "queries": 0, "obfuscated_accuracy": 0.30, "deobfuscator_psnr_db": 13.1})
    log(out / "blackbox", {"step": 0, "queries": 0, "obfuscated_accuracy": 0.20},
        {"step": 10, "queries": 512, "obfuscated_accuracy": 0.295, "deobfuscator_psnr_db": 13.2})
    return out


def test_drop_after_on_average_and_at_worst():
    d = drop([(0, 0.40), (1, 0.30), (2, 0.20), (3, 0.25)])
    assert d["start"] == 0.40 and d["end"] == 0.25
    assert d["drop"] == pytest.approx(0.375) and d["worst_drop"] == pytest.approx(0.5)
    assert d["mean_drop"] == pytest.approx((0.40 - 0.25) / 0.40)  # the mean of 0.30, 0.20, 0.25 is 0.25
    assert drop([(0, 0.4), (1, 0.5)])["drop"] == pytest.approx(-0.25)  # a gain is a negative drop


def test_robustness_and_resync_summaries(protocol):
    numbers = collect(protocol)
    r = robustness(numbers)
    assert r["plain"]["drop"] == pytest.approx(0.5) and r["robust"]["drop"] == pytest.approx(0.1)
    assert r["drop_ratio"] == pytest.approx(0.2) and r["worst_drop_ratio"] == pytest.approx(0.2)
    assert r["mean_drop_ratio"] == pytest.approx(((0.40 - 0.37) / 0.40) / ((0.40 - 0.25) / 0.40))
    assert r["psnr_gap"] == pytest.approx(0.3)
    s = resync_summary(numbers)
    assert s["whitebox"]["gain"] == pytest.approx(0.10) and s["blackbox"]["gain"] == pytest.approx(0.095)
    assert s["gain_ratio"] == pytest.approx(0.95) and s["blackbox"]["queries"] == 512
    assert numbers["recovery"][0] == (0, 0.20)  # recovery starts where the drift left O0


def test_report_prints_the_numbers_and_the_right_verdicts(protocol):
    report = write_report(protocol).read_text()
    assert "| C0 test accuracy | 70.82 | 60.00 |" in report
    assert "| O after recovery | 73.00 | 45.00 | after 1 epochs |" in report
    assert "after the drift 0.20 (met)" in report and "gap 0.30 dB (target at most 0.5 dB: met)" in report
    assert "Black-box regained 95 % of what white-box regained, with 512 queries (target at least 90 %: met)" in report

    # the same logs with a robust O that drops as much as O0, and a black-box that regains half: both missed
    log(protocol / "drift2", {"epoch": 0, "test_accuracy": 0.6, "probes": probes(0.40, 0.40)},
        {"epoch": 2, "test_accuracy": 0.8, "probes": probes(0.20, 0.20)})
    (protocol / "drift2" / "metrics.jsonl").replace(protocol / "drift" / "metrics.jsonl")
    (protocol / "attack-robust" / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "attacker_psnr_db": 15.0}) + "\n")
    (protocol / "blackbox" / "metrics.jsonl").write_text(
        json.dumps({"step": 0, "queries": 0, "obfuscated_accuracy": 0.20}) + "\n"
        + json.dumps({"step": 10, "queries": 512, "obfuscated_accuracy": 0.25, "deobfuscator_psnr_db": 13.2}) + "\n")
    report = write_report(protocol).read_text()
    assert "after the drift 1.00 (missed)" in report and "gap 1.00 dB (target at most 0.5 dB: missed)" in report
    assert "regained 50 % of what white-box regained, with 512 queries (target at least 90 %: missed)" in report


def test_the_same_logs_give_the_same_report(protocol):
    first = write_report(protocol).read_bytes()
    assert write_report(protocol).read_bytes() == first


def test_report_renders_each_suite_from_its_summary(protocol):
    """The privacy section comes from suite.json alone: the strongest attack in bold, exact rows as ∞, CIs as ±."""
    row = lambda p, ci, s, acc: {"kind": "attack", "psnr_db": p, "psnr_ci": ci, "ssim": s, "ssim_ci": 0.01,  # noqa: E731
                                 "probe_accuracy": acc, "probe_accuracy_ci": 0.02}
    rows = {"mean image": {**row(12.0, 0.2, 0.18, 0.10), "kind": "reference"},
            "no defence": {**row(None, None, 1.0, 0.30), "kind": "reference"},
            "decoder": {**row(15.25, 0.21, 0.27, 0.20), "epochs": 5, "steps": 155, "best_epoch": 5, "arch": "unet"},
            "inversion": {**row(12.5, 0.2, 0.2, 0.12), "steps": 10}}
    summary = {"rows": rows, "strongest": "decoder", "strongest_psnr_db": 15.25, "max_ssim": 0.27, "images": 500,
               "test_subset": "random:500", "utility": {"clean_accuracy": 0.5, "quantized_obfuscated_accuracy": 0.3},
               "position": {"psnr_db_above_mean_image": 3.25, "ssim": (0.27 - 0.18) / (1 - 0.18), "probe_accuracy": 0.5}}
    (protocol / "privacy").mkdir()
    (protocol / "privacy" / "suite.json").write_text(json.dumps(summary))
    report = write_report(protocol).read_text()
    assert "### Attack suite on O (after recovery)" in report and "Attack suite on O0" not in report
    assert "| **decoder** | attack | 15.25 ± 0.21 | 0.270 ± 0.010 | 20.0 ± 2.0 | 5 epochs (155 steps), best at 5, unet |" in report
    assert "| no defence | reference | ∞ (exact) | 1.000 ± 0.010 | 30.0 ± 2.0 |  |" in report
    assert "Strongest attack: **decoder** (+3.25 dB above the mean image; SSIM 11 % of the way" in report
    assert "fresh-classifier accuracy 50 % of the way" in report
