"""The report's arithmetic on hand-made logs: intervals over seeds, drops, ratios, re-sync shares and verdicts.

No training here: each stage folder gets a metrics.jsonl (and DONE) written by the test, so every number the report
prints is known in advance, and a wrong formula, a wrong t quantile or an inverted verdict fails. A finished stage
whose log lacks a field stops the report with a message that names the file.
"""

from __future__ import annotations

import json
import math

import pytest

from privoffload.errors import UserError
from privoffload.experiments.report import seed_records, write_report
from privoffload.experiments.stage import RecordError
from privoffload.experiments.stages import paper, resync, robust
from privoffload.experiments.stats import estimate, t_quantile, verdict

from .helpers import assert_user_error, run_cli


def log(folder, *records, done: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if done:
        (folder / "DONE").write_bytes(b"")


def probes(o0: float) -> dict:
    return {"O0": {"quantized_obfuscated_accuracy": o0}}


def make_seed(folder, o0: float, o0_final: float, robust_final: float, black_after: float, attack_robust: float) -> None:
    """One seed's logs: C0 0.60 -> 0.80; O0 o0 -> o0_final; robust o0 -> robust_final; white-box regains 0.10."""
    log(folder / "c0", {"epoch": 1, "test_accuracy": 0.5}, {"epoch": 2, "test_accuracy": 0.6})
    log(folder / "o0", {"epoch": 1, "quantized_obfuscated_accuracy": o0, "deobfuscator_psnr_db": 13.0, "deobfuscator_ssim": 0.2})
    log(folder / "drift", {"epoch": 0, "test_accuracy": 0.6, "probes": probes(o0)},
        {"epoch": 1, "test_accuracy": 0.7, "probes": probes((o0 + o0_final) / 2)},
        {"epoch": 2, "test_accuracy": 0.8, "probes": probes(o0_final)})
    log(folder / "recovery", {"epoch": 1, "quantized_obfuscated_accuracy": 0.45, "deobfuscator_psnr_db": 12.5,
                              "deobfuscator_ssim": 0.15})
    log(folder / "scores", {"images": 10000, "c0": 0.6, "drift": 0.8, "o0@c0": o0, "o0@drift": o0_final,
                            "recovery@drift": 0.45})
    curves = {"O0": {"0": o0, "1": (o0 + o0_final) / 2, "2": o0_final},
              "robust": {"0": o0, "1": (o0 + robust_final) / 2, "2": robust_final}}
    log(folder / "robust-drift", {"images": 10000, "curves": curves,
                                  "ends": {"O0@c0": o0, "O0@drift": o0_final, "robust@c0": o0, "robust@drift": robust_final}})
    log(folder / "attack-o0", {"epoch": 1, "attacker_psnr_db": 14.0, "attacker_ssim": 0.3})
    log(folder / "attack-robust", {"epoch": 1, "attacker_psnr_db": attack_robust, "attacker_ssim": 0.3})
    log(folder / "whitebox", {"step": 0, "queries": 0, "quantized_obfuscated_accuracy": o0_final},
        {"step": 10, "queries": 0, "quantized_obfuscated_accuracy": o0_final + 0.10, "deobfuscator_psnr_db": 13.1},
        {"images": 10000, "before": o0_final, "after": o0_final + 0.10})
    log(folder / "blackbox", {"step": 0, "queries": 0, "quantized_obfuscated_accuracy": o0_final},
        {"step": 10, "queries": 512, "quantized_obfuscated_accuracy": black_after, "deobfuscator_psnr_db": 13.2,
         "agreement": 0.7}, {"images": 10000, "before": o0_final, "after": black_after})


def test_t_interval_matches_the_t_table():
    assert t_quantile(3) == pytest.approx(4.303, abs=1e-3)  # two-sided 95 %, 2 degrees of freedom
    assert t_quantile(5) == pytest.approx(2.776, abs=1e-3)
    e = estimate([1.0, 2.0, 3.0])
    assert (e.mean, e.n) == (2.0, 3) and e.half == pytest.approx(4.303 / math.sqrt(3), abs=1e-3)
    one = estimate([0.5, float("nan")])  # a missing value is left out; one seed has no interval
    assert one.n == 1 and math.isnan(one.half) and one.text(100) == "50.00"
    assert estimate([0.5, 0.6]).text(100, 1) == "55.0 ± 63.5"  # s = 0.1 / sqrt(2), half = 12.706 * s / sqrt(2)


def test_verdicts_count_only_when_the_interval_says_so():
    assert verdict(estimate([0.60, 0.61, 0.62]), 0.55) == "met"
    assert verdict(estimate([0.40, 0.41, 0.42]), 0.55) == "missed"
    assert verdict(estimate([0.50, 0.55, 0.60]), 0.55).startswith("not resolved")
    assert verdict(estimate([0.10, 0.11, 0.12]), 1 / 3, at_least=False) == "met"  # at most a third
    assert verdict(estimate([0.60]), 0.55).startswith("not resolved")


def test_drop_after_on_average_and_at_worst():
    d = robust.drop(0.40, [0.30, 0.20, 0.25])
    assert d["drop"] == pytest.approx(0.375) and d["worst_drop"] == pytest.approx(0.5)
    assert d["mean_drop"] == pytest.approx((0.40 - 0.25) / 0.40)  # the mean of 0.30, 0.20, 0.25 is 0.25
    assert robust.drop(0.4, [0.5])["drop"] == pytest.approx(-0.25)  # a gain is a negative drop


@pytest.fixture
def protocol(tmp_path):
    """Three seeds: O0 0.40 -> 0.20 (drop 0.50), the robust O drops 0.10, black-box regains 95 % of white-box."""
    out = tmp_path / "run"
    for s, o0 in enumerate((0.39, 0.40, 0.41)):
        make_seed(out / f"seed-{s}", o0=o0, o0_final=o0 / 2, robust_final=o0 * 0.9, black_after=o0 / 2 + 0.095,
                  attack_robust=14.3)
    return out


def test_records_take_the_ends_of_ratios_from_the_scores(protocol):
    r = seed_records(protocol / "seed-1", "cifar10")
    n = paper.numbers(r)
    assert n["o0_ratio"] == pytest.approx(0.40 / 0.6) and n["drop"] == pytest.approx(0.5)
    assert n["recovery_ratio"] == pytest.approx(0.45 / 0.8)
    b = robust.numbers(r)
    assert b["robust_drop_ratio"] == pytest.approx(0.1 / 0.5) and b["privacy_gap_db"] == pytest.approx(0.3)
    assert resync.share(r) == pytest.approx(0.95) and r["blackbox"].queries == 512
    assert paper.recovery_curve(r)[0] == pytest.approx(0.20)  # recovery starts where the drift left O0


def test_report_prints_means_intervals_and_verdicts(protocol):
    report = write_report(protocol).read_text()
    ratios = estimate([0.39 / 0.6, 0.40 / 0.6, 0.41 / 0.6])
    assert f"| O0 / C0 | 0.57 | {ratios.text()} | at least 0.55 | met |" in report
    assert "| relative drop of O0 after the drift | 0.50 | 0.50 ± 0.00 | at least 0.35 | met |" in report
    assert "| O after recovery / C after drift | 0.90 | 0.56 ± 0.00 | at least 0.60 | missed |" in report
    assert f"| O0 obfuscated accuracy | 40.68 | {estimate([0.39, 0.40, 0.41]).text(100)} | |" in report
    assert "after the drift 0.20 ± 0.00 (met)" in report and "0.30 ± 0.00 dB (target at most 0.5 dB: met)" in report
    assert "Black-box regained 0.95 ± 0.00 of what white-box regained (target at least 0.9: met)" in report
    assert "3 seeds: seed-0, seed-1, seed-2" in report and "n = 3 seeds × 10,000 test images" in report


def test_report_says_missed_when_the_methods_miss(protocol):
    for s, o0 in enumerate((0.39, 0.40, 0.41)):  # a robust O that drops as much as O0, a black-box that regains half
        make_seed(protocol / f"seed-{s}", o0=o0, o0_final=o0 / 2, robust_final=o0 / 2, black_after=o0 / 2 + 0.05,
                  attack_robust=15.0 + s / 10)
    report = write_report(protocol).read_text()
    assert "after the drift 1.00 ± 0.00 (missed)" in report
    assert "(target at most 0.5 dB: missed)" in report
    assert "(target at least 0.9: missed)" in report


def test_a_seed_whose_ratio_has_no_denominator_is_counted_not_hidden(protocol):
    make_seed(protocol / "seed-2", o0=0.41, o0_final=0.41, robust_final=0.40, black_after=0.45, attack_robust=14.3)
    report = write_report(protocol).read_text()  # seed 2's O0 did not drop: its ratio is undefined, and said so
    assert "after the drift 0.20 ± 0.00 (not resolved" not in report
    assert "1 seed without a value (O0 did not drop)" in report


def test_the_same_logs_give_the_same_report(protocol):
    first = write_report(protocol).read_bytes()
    assert write_report(protocol).read_bytes() == first


def test_a_missing_field_stops_the_report_and_names_the_file(protocol):
    scores = protocol / "seed-1" / "scores" / "metrics.jsonl"
    scores.write_text(json.dumps({"images": 10000, "c0": 0.6, "drift": 0.8, "o0@c0": 0.4}) + "\n")  # no o0@drift
    with pytest.raises(RecordError, match=f"{scores}.*'o0@drift'"):
        write_report(protocol)
    assert_user_error(run_cli("plot", protocol, check=False), "o0@drift", str(scores))
    log(protocol / "seed-0" / "drift", {"epoch": 1, "train_loss": 1.0})  # finished, yet no evaluation
    with pytest.raises(UserError, match="drift/metrics.jsonl has no evaluation with probes"):
        seed_records(protocol / "seed-0", "cifar10")


def test_an_unfinished_stage_is_left_out_and_its_section_with_it(protocol):
    for s in range(3):
        for stage in ("whitebox", "blackbox"):
            (protocol / f"seed-{s}" / stage / "DONE").unlink()
    report = write_report(protocol).read_text()
    assert "re-sync after the update" not in report and "drift-robust obfuscator" in report


def suite(decoder_psnr: float, decoder_ssim: float, best_epoch: int, converged: bool = True) -> dict:
    """One seed's suite.json: the references, a decoder (the strongest), an empty inversion, and the leakage."""
    ident = {"10": {"rate": 0.5, "ci": 0.02, "chance": 0.1, "min_candidates": 10},
             "100": {"rate": 0.2, "ci": 0.02, "chance": 0.01, "min_candidates": 100}}
    row = lambda p, s, kind="attack": {"kind": kind, "psnr_db": p, "psnr_ci": 0.2, "ssim": s,  # noqa: E731
                                       "ssim_ci": 0.01, "identify": ident}
    rows = {"mean image": row(12.0, 0.18, "reference"), "no defence": row(None, 1.0, "reference"),
            "label-only decoder": {**row(13.0, 0.2, "reference"), "epochs": 9, "budget": 40, "best_epoch": 7,
                                   "converged": True, "arch": "answer", "width": 16, "wall_s": 5.0},
            "decoder": {**row(decoder_psnr, decoder_ssim), "epochs": 8, "budget": 40, "steps": 1120,
                        "best_epoch": best_epoch, "converged": converged, "arch": "unet", "width": 16, "wall_s": 10.0},
            "decoder+inversion": {**row(12.5, 0.2), "steps": 10, "lr": 0.01, "tv": 0.3, "empty": True,
                                  "mean_abs_change": 0.001, "wall_s": 4.0}}
    leak = {"attack": "decoder", "reference": "label-only decoder", "psnr_db": decoder_psnr - 13.0, "psnr_ci": 0.1,
            "ssim": decoder_ssim - 0.2, "ssim_ci": 0.01, "converged": converged,
            "verdict": "converged" if converged else "lower bound, not converged"}
    return {"rows": rows, "strongest": "decoder", "strongest_converged": converged, "strongest_psnr_db": decoder_psnr,
            "max_ssim": decoder_ssim, "images": 2000, "test_subset": "random:2000", "identify": [10, 100],
            "val_images": 256, "leakage": leak,
            "utility": {"clean_accuracy": 0.5, "quantized_obfuscated_accuracy": 0.3}}


def test_report_aggregates_each_suite_over_the_seeds(protocol):
    """Each seed's suite.json, one table: every row the mean ± t-interval over the seeds, exact rows as ∞, the
    strongest attack in bold, convergence per row, identifiability, the leakage beyond the class, n, the target."""
    for s, (p, ssim) in enumerate(((15.0, 0.26), (15.5, 0.27), (16.0, 0.28))):
        log(protocol / f"seed-{s}" / "privacy")
        (protocol / f"seed-{s}" / "privacy" / "suite.json").write_text(json.dumps(suite(p, ssim, best_epoch=3 + s)))
    report = write_report(protocol).read_text()
    assert "## Attack suite on the final O (after recovery)" in report and "Attack suite on O0" not in report
    psnr, ssim = estimate([15.0, 15.5, 16.0]), estimate([0.26, 0.27, 0.28])
    assert (f"| **decoder** | attack | {psnr.text()} | {ssim.text(digits=3)} | 50.0 ± 0.0 | 20.0 ± 0.0 | "
            "converged at epoch 3/4/5 of 8; unet w16; 10 s |") in report
    assert "| no defence | reference | ∞ (exact) | 1.000 ± 0.000 | 50.0 ± 0.0 | 20.0 ± 0.0 | – |" in report
    assert ("| decoder+inversion | attack | 12.50 ± 0.00 | 0.200 ± 0.000 | 50.0 ± 0.0 | 20.0 ± 0.0 | 10 steps, lr 0.01, "
            "tv 0.3; moves pixels 0.3/255 on average; **empty at this budget**; 4 s |") in report
    assert "n = 2000 test images (`random:2000`, the same in every seed) x 3 seeds" in report
    assert "± is the 95 % t-interval over the 3 seeds" in report
    leak = estimate([2.0, 2.5, 3.0])
    assert f"**Leakage beyond the class** (the strongest attack minus the label-only decoder, paired per image, then " \
           f"over the seeds): **+{leak.text()} dB PSNR" in report and "(converged)" in report
    assert "seed-0: **decoder**, seed-1: **decoder**, seed-2: **decoder**" in report
    assert (f"(0.60 ± 0.00: missed), the strongest attack at most 15 dB ({psnr.text()}: not resolved (the interval "
            f"contains the target)) and every attack at most 0.3 SSIM ({ssim.text(digits=3)}: met).") in report


def test_one_suite_prints_its_intervals_over_images_and_flags_a_budget_stop():
    """One suite.json alone (the attack-suite command): ± over the images, and a decoder whose best epoch was its
    last printed as not converged, its leakage as a lower bound."""
    from privoffload.experiments.privacy_table import suite_table

    table = "\n".join(suite_table({"": suite(15.0, 0.26, best_epoch=8, converged=False)}))
    assert "| **decoder** | attack | 15.00 ± 0.20 | 0.260 ± 0.010 | 50.0 ± 2.0 | 20.0 ± 2.0 | **not converged** (best " \
           "epoch 8 of 8 run, budget 40); unet w16; 10 s |" in table
    assert "**+2.00 ± 0.10 dB PSNR, +0.060 ± 0.010 SSIM** (**lower bound, not converged**)" in table
    assert "x 1 seed; ± is the 95 % t-interval over the images (one seed)" in table
