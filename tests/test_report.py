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
from privoffload.experiments.stages import paper, resync, robust, updates
from privoffload.experiments.stats import estimate, fieller, t_quantile, verdict

from .helpers import assert_user_error, run_cli


def log(folder, *records, done: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if done:
        (folder / "DONE").write_bytes(b"")


def probes(o0: float) -> dict:
    return {"O0": {"quantized_obfuscated_accuracy": o0}}


def updates_log(folder, o0: float, finals: list[float], clean: float = 0.8) -> None:
    """A drift stage's replicas: O0 o0 on C0, finals[k] on replica k; C clean 0.6 -> `clean`."""
    log(folder, {"images": 10000, "c0": 0.6, "o0@c0": o0, "replicas": [
        {"run": f"replica-{k}", "clean": clean, "o0": f, "o0_negative_flips": max(o0 - f, 0.0)} for k, f in enumerate(finals)]})


def make_seed(folder, o0: float, o0_final: float, robust_final: float, black_after: float, attack_robust: float,
              compat_final: float | None = None) -> None:
    """One seed's logs: C0 0.60 -> 0.80; O0 o0 -> o0_final (on both drifts); robust o0 -> robust_final; the remap
    lifts O0 by 0.05 and white-box regains 0.10 more; O0 on the compatible drift: compat_final (o0 - a tenth of the
    plain drop by default)."""
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
    log(folder / "robust-drift", {"images": 10000, "curves": curves, "replicas": ["drift", "replica-1"],
                                  "ends": {"O0@c0": o0, "O0@drift": o0_final, "O0@replica-1": o0_final, "robust@c0": o0,
                                           "robust@drift": robust_final, "robust@replica-1": robust_final}})
    updates_log(folder / "drift-replicas", o0, [o0_final, o0_final])
    compat_final = o0 - (o0 - o0_final) / 10 if compat_final is None else compat_final
    updates_log(folder / "compatible-drift", o0, [compat_final, compat_final], clean=0.795)
    live = lambda name, update, after: {"obfuscator": name, "update": update, "images": 500, "before_swap": o0,  # noqa: E731
                                        "after_swap": after, "after_resync": o0}
    log(folder / "live", live("robust", "drift", robust_final), live("o0", "drift", o0_final),
        live("o0", "compatible-drift/replica-0", compat_final))
    log(folder / "remap", {"queries": 256, "before": o0_final, "after": o0_final + 0.05, "images": 10000,
                           "remap": {"weight": [[1.0, 0.0], [0.0, 1.0]], "bias": [0.0, 0.0]}})
    log(folder / "attack-o0", {"epoch": 1, "attacker_psnr_db": 14.0, "attacker_ssim": 0.3})
    log(folder / "attack-robust", {"epoch": 1, "attacker_psnr_db": attack_robust, "attacker_ssim": 0.3})
    remapped = o0_final + 0.05
    log(folder / "whitebox", {"step": 0, "queries": 0, "quantized_obfuscated_accuracy": remapped},
        {"step": 10, "queries": 0, "quantized_obfuscated_accuracy": remapped + 0.10, "deobfuscator_psnr_db": 13.1},
        {"images": 10000, "before": remapped, "after": remapped + 0.10})
    log(folder / "blackbox", {"step": 0, "queries": 0, "quantized_obfuscated_accuracy": remapped},
        {"step": 10, "queries": 512, "quantized_obfuscated_accuracy": black_after, "deobfuscator_psnr_db": 13.2,
         "agreement": 0.7}, {"images": 10000, "before": remapped, "after": black_after})


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


def test_fieller_interval_in_known_cases():
    """A denominator without spread gives the t-interval of the numerator divided by it; a numerator proportional to
    the denominator gives that proportion exactly; a denominator not resolved from zero gives an unbounded set; and
    every endpoint solves Fieller's quadratic (checked by brute force on a grid)."""
    a, b = [0.1, 0.2, 0.35, 0.15], [0.5] * 4
    m, half = sum(a) / 4, estimate(a).half
    r = fieller(a, b)
    assert (r.value, r.n) == (pytest.approx(0.4), 4) and (r.low, r.high) == (pytest.approx((m - half) / 0.5),
                                                                            pytest.approx((m + half) / 0.5))
    prop = fieller([0.25 * x for x in (0.3, 0.5, 0.4, 0.6)], [0.3, 0.5, 0.4, 0.6])
    assert prop.low == pytest.approx(0.25) and prop.high == pytest.approx(0.25)
    loose = fieller([0.1, 0.2, -0.1], [0.1, -0.2, 0.15])
    assert math.isinf(loose.low) and math.isinf(loose.high) and "unbounded" in loose.text()
    assert verdict(loose, 0.2, at_least=False).startswith("not resolved (unbounded")
    a, b = [0.12, 0.05, 0.2, 0.09, 0.15], [0.3, 0.2, 0.45, 0.4, 0.35]
    r, t2, n = fieller(a, b), t_quantile(5) ** 2, 5
    ma, mb = sum(a) / n, sum(b) / n
    var = lambda q: sum(((x - ma) - q * (y - mb)) ** 2 for x, y in zip(a, b)) / (n - 1) / n  # noqa: E731
    inside = [q / 1000 for q in range(-1000, 2000) if (ma - q / 1000 * mb) ** 2 <= t2 * var(q / 1000)]
    assert (inside[0], inside[-1]) == (pytest.approx(r.low, abs=1e-3), pytest.approx(r.high, abs=1e-3))
    assert fieller([0.1], [0.2]).text() == "0.50" and fieller([0.1, 0.2], [-0.1, -0.2]).text().startswith("–")


@pytest.fixture
def protocol(tmp_path):
    """Three seeds: O0 0.40 -> 0.20 (drop 0.50), the robust O drops 0.10; the remap lifts O0 by 0.05, white-box
    regains 0.10 over it, black-box 0.095; the compatible drift leaves a tenth of the drop."""
    out = tmp_path / "run"
    for s, o0 in enumerate((0.39, 0.40, 0.41)):
        make_seed(out / f"seed-{s}", o0=o0, o0_final=o0 / 2, robust_final=o0 * 0.9, black_after=o0 / 2 + 0.145,
                  attack_robust=14.3)
    return out


def test_records_take_the_ends_of_ratios_from_the_scores(protocol):
    r = seed_records(protocol / "seed-1", "cifar10")
    n = paper.numbers(r)
    assert n["o0_ratio"] == pytest.approx(0.40 / 0.6) and n["drop"] == pytest.approx(0.5)
    assert n["recovery_ratio"] == pytest.approx(0.45 / 0.8)
    b = robust.numbers(r)
    assert b["robust_end"] - b["plain_end"] == pytest.approx(0.4 * 0.40) and b["privacy_gap_db"] == pytest.approx(0.3)
    assert b["replicas"] == 2 and b["robust_drop"] == pytest.approx(0.1)
    assert resync.gains(r) == (pytest.approx(0.10), pytest.approx(0.095)) and r["blackbox"].queries == 512
    assert resync.contrast(r) == pytest.approx(0.095 - 0.9 * 0.10)
    (n,) = updates.paired([r])
    assert n["drop_plain"] == pytest.approx(0.5) and n["drop_compat"] == pytest.approx(0.05)
    assert n["o0_negative_flips_plain"] == pytest.approx(0.2) and n["clean_compat"] - n["clean_plain"] == pytest.approx(-0.005)
    assert paper.recovery_curve(r)[0] == pytest.approx(0.20)  # recovery starts where the drift left O0


def test_report_prints_means_intervals_and_verdicts(protocol):
    report = write_report(protocol).read_text()
    ratios = estimate([0.39 / 0.6, 0.40 / 0.6, 0.41 / 0.6])
    assert f"| O0 / C0 | 0.57 | {ratios.text()} | at least 0.55 | met |" in report
    assert "| relative drop of O0 after the drift | 0.50 | 0.50 ± 0.00 | at least 0.35 | met |" in report
    assert "| O after recovery / C after drift | 0.90 | 0.56 ± 0.00 | at least 0.60 | missed |" in report
    assert f"| O0 obfuscated accuracy | 40.68 | {estimate([0.39, 0.40, 0.41]).text(100)} | |" in report
    after = estimate([0.4 * o0 for o0 in (0.39, 0.40, 0.41)])
    assert f"robust minus O0 (paired, n = 3): {after.text(100)} points (target: at or above O0, met)" in report
    assert "On C0, robust minus O0 (n = 3): 0.00 ± 0.00 points (non-inferiority: it may give up at most 2 points there, met)" in report
    assert "0.30 ± 0.00 dB (target at most 0.5 dB: met)" in report
    assert "minus 0.9 x white-box's (paired per seed, n = 3): 0.50 ± 0.00 points (target at least 0: met)" in report
    assert "| remap, then black-box | 3 | 10 | 768 |" in report  # the remap's queries count against black-box
    assert "(ratio of the mean drops, Fieller 95 % interval, n = 3): 0.10 [0.10, 0.10] (target at most 0.2: met)" in report
    assert "compatible minus plain (paired, n = 3): -0.50 ± 0.00 points (non-inferiority margin 1 point: met)" in report
    o0s = estimate([0.39, 0.40, 0.41]).text(100)
    assert f"| O0, compatible update | 3 | {o0s} | {estimate([0.95 * o0 for o0 in (0.39, 0.40, 0.41)]).text(100)} | {o0s} |" in report
    loss = estimate([o0 / 20 - 0.2 * o0 / 2 for o0 in (0.39, 0.40, 0.41)])  # a tenth of the drop, less a fifth of it
    assert f"O0's client loses {loss.text(100)} points minus 0.2 x what the plain swap takes" in report
    assert "target at most 0, it keeps its accuracy: met" in report
    assert "3 seeds: seed-0, seed-1, seed-2" in report and "n = 3 seeds × 10,000 test images" in report


def test_report_says_missed_when_the_methods_miss(protocol):
    for s, o0 in enumerate((0.39, 0.40, 0.41)):  # a robust O that ends below O0, a black-box that regains half
        make_seed(protocol / f"seed-{s}", o0=o0, o0_final=o0 / 2, robust_final=o0 / 2 - 0.05,
                  black_after=o0 / 2 + 0.10, attack_robust=15.0 + s / 10, compat_final=o0 / 2)
    report = write_report(protocol).read_text()
    assert "points (target: at or above O0, missed)" in report
    assert "(target at most 0.5 dB: missed)" in report
    assert "points (target at least 0: missed)" in report


def test_a_seed_whose_drop_is_zero_is_counted_not_hidden(protocol):
    make_seed(protocol / "seed-2", o0=0.41, o0_final=0.41, robust_final=0.40, black_after=0.45, attack_robust=14.3,
              compat_final=0.41)
    report = write_report(protocol).read_text()  # seed 2's O0 did not drop: the ratios of mean drops keep it
    drops = ([0.5, 0.5, 0.0], [0.05, 0.05, 0.0])
    expected = fieller(drops[1], drops[0])
    assert f"(ratio of the mean drops, Fieller 95 % interval, n = 3): {expected.text()}" in report
    assert "| seed-2 | 2 | 80.00 | 79.50 | 41.00 | 41.00 | 41.00 | 0.000 | 0.000 | 0.00 | 0.00 |" in report


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
