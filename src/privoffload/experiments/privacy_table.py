"""The report's attack-suite tables: each seed's suite.json (on O0 and on the final O), aggregated over the seeds.

Every row (attack or reference) is the mean over the seeds of its per-seed mean over the test images, ± the
half-width of the 95 % t-interval over the seeds (`stats.estimate`), like every other figure of the report. The
strongest attack of an obfuscator is the one with the highest mean PSNR over the seeds; where it lies between
the mean image and no defence is computed per seed (`privacy.suite.position`), then averaged.
"""

from __future__ import annotations

import math
from typing import Any

from ..privacy.suite import budget_text, position
from .stats import Estimate, estimate, verdict
from .sweep import TARGET

SUITES = (("privacy-o0", "O0 (baseline)"), ("privacy", "O (after recovery)"))


def _psnr(v: float | None) -> float:
    return math.inf if v is None else v  # suite.json writes an exact reconstruction's PSNR as null


def _text(values: list[float | None], scale: float = 1.0, digits: int = 2) -> str:
    if values and all(v is None for v in values):
        return "∞ (exact)"
    return estimate(v for v in values if v is not None).text(scale, digits)


def _signed(e: Estimate) -> str:
    return "–" if e.n == 0 else f"{e.mean:+.2f}" + (f" ± {e.half:.2f}" if e.n > 1 else "")


def suite_table(summaries: dict[str, dict]) -> list[str]:
    """One obfuscator's suite over the seeds (seed folder name -> its suite.json): rows, strongest attack, target."""
    names = list(summaries)
    row_names = list(dict.fromkeys(r for s in summaries.values() for r in s["rows"]))
    attacks = [r for r in row_names if all(s["rows"].get(r, {}).get("kind", "attack") == "attack" for s in summaries.values())]
    per_row = {r: [s["rows"][r] for s in summaries.values() if r in s["rows"]] for r in row_names}
    mean_psnr = {a: sum(_psnr(x["psnr_db"]) for x in per_row[a]) / len(per_row[a]) for a in attacks}
    strongest = max(attacks, key=lambda a: mean_psnr[a])

    lines = ["| row | kind | PSNR dB | SSIM | fresh-classifier acc. % | budget used |", "|---|---|---|---|---|---|"]
    for r in row_names:
        rows = per_row[r]
        probe = [x["probe_accuracy"] for x in rows if "probe_accuracy" in x]
        lines.append(f"| {f'**{r}**' if r == strongest else r} | {rows[0]['kind']} | {_text([x['psnr_db'] for x in rows])} | "
                     f"{_text([x['ssim'] for x in rows], digits=3)} | {_text(probe, 100, 1) if probe else '–'} | "
                     f"{budget_text(rows)} |")

    where = [position(s["rows"], strongest) for s in summaries.values() if strongest in s["rows"]]
    above = [w["psnr_db_above_mean_image"] for w in where]
    text = ("∞" if None in above else _signed(estimate(above))) + " dB above the mean image; SSIM "
    text += f"{estimate(w['ssim'] for w in where).text(100, 0)} % of the way from the mean image to no defence"
    if all("probe_accuracy" in w for w in where):
        text += f", fresh-classifier accuracy {estimate(w['probe_accuracy'] for w in where).text(100, 0)} % of the way"
    first = next(iter(summaries.values()))
    k = len(names)
    per_seed = ", ".join(f"{n}: {s['strongest']} {_text([s['strongest_psnr_db']])} dB" for n, s in summaries.items())
    lines += ["", f"Strongest attack: **{strongest}** ({text}). Strongest in each seed: {per_seed}. "
              f"{first['images']} test images (`{first['test_subset']}`, the same in every seed); "
              + (f"± is the 95 % t-interval over the {k} seeds." if k > 1 else
                 "one seed, so no interval over seeds (its intervals over the images are in its suite.json).")]

    utility = [s["utility"] for s in summaries.values() if s.get("utility")]
    if utility:
        rel = estimate(u["quantized_obfuscated_accuracy"] / u["clean_accuracy"] for u in utility)
        psnr = [_psnr(s["strongest_psnr_db"]) for s in summaries.values()]
        psnr_e = estimate(psnr) if all(map(math.isfinite, psnr)) else Estimate(math.inf, math.nan, len(psnr))
        ssim = estimate(s["max_ssim"] for s in summaries.values())
        lines += ["", f"On the same images C's accuracy is {estimate(u['clean_accuracy'] for u in utility).text(100)} % clean "
                     f"and {estimate(u['quantized_obfuscated_accuracy'] for u in utility).text(100)} % on the 8-bit uploads. "
                     f"The project's target: uploads read at least {100 * TARGET['relative_accuracy']:.0f} % as well as clean "
                     f"images ({rel.text()}: {verdict(rel, TARGET['relative_accuracy'])}), the strongest attack at most "
                     f"{TARGET['psnr_db']:g} dB ({psnr_e.text() if math.isfinite(psnr_e.mean) else '∞'}: "
                     f"{verdict(psnr_e, TARGET['psnr_db'], at_least=False) if math.isfinite(psnr_e.mean) else 'missed'}) "
                     f"and every attack at most {TARGET['ssim']:g} SSIM ({ssim.text(digits=3)}: "
                     f"{verdict(ssim, TARGET['ssim'], at_least=False)})."]
    return lines


def privacy_lines(seeds: list[dict[str, Any]], names: list[str]) -> list[str]:
    """Markdown for every attack suite that has finished in some seed (nothing where none has)."""
    lines = []
    for stage, label in SUITES:
        summaries = {name: s["suites"][stage] for name, s in zip(names, seeds) if stage in s.get("suites", {})}
        if summaries:
            lines += ["", f"### Attack suite on {label}", ""] + suite_table(summaries)
    if lines:
        lines = ["", "The co-trained D's PSNR is no privacy figure: O can push D's output below a guess while a fresh "
                 "attacker still recovers the image. The attack suites below measure privacy."] + lines
        lines += ["", "Attacks and references: docs/threat-model.md. The attacks' numbers are lower bounds on what an "
                  "adversary can recover (a stronger attack can only do better); the references bracket them: the mean "
                  "image recovers nothing image-specific, no defence recovers everything."]
    return lines
