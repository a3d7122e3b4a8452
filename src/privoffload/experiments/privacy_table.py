"""The attack suite's tables: one suite.json, or each seed's suite.json of one obfuscator, aggregated over the seeds.

Every row (attack or reference) is the mean over the seeds of its per-seed mean over the test images, ± the
half-width of the 95 % t-interval over the seeds (`stats.estimate`), like every other figure of the report; with
one seed, ± is the interval over the images, from its suite.json. Every row says whether it converged ("converged
at epoch k of n": validation stopped improving at epoch k and the stopping rule fired by epoch n; "not converged"
otherwise, a lower bound). The headline is the leakage beyond the class: the strongest converged attack minus the
label-only decoder, paired per image in each seed, then averaged over the seeds.
"""

from __future__ import annotations

import math
from typing import Any

from .stats import Estimate, estimate, verdict
from .sweep import TARGET



def _per_seed(rows: list[dict], key: str, ci: str | None) -> tuple[list[float | None], float | None]:
    """The values over the seeds and, for one seed, its interval over the images."""
    values = [r.get(key) for r in rows]
    return values, (rows[0].get(ci) if ci and len(rows) == 1 else None)


def _text(values: list[float | None], half: float | None = None, scale: float = 1.0, digits: int = 2) -> str:
    """Mean ± interval over the seeds, or one seed's value ± its interval over the images; ∞ for exact rows."""
    if values and all(v is None for v in values):
        return "∞ (exact)"
    e = estimate(v for v in values if v is not None)
    if e.n == 1 and half is not None and math.isfinite(half):
        return f"{scale * e.mean:.{digits}f} ± {scale * half:.{digits}f}"
    return e.text(scale, digits)


def _joined(values: list[Any]) -> str:
    return str(values[0]) if len(set(map(str, values))) == 1 else "/".join(map(str, values))


def status_text(rows: list[dict]) -> str:
    """Convergence and budget of a row over its seeds: 'converged at epoch 7 of 10', 'not converged (best epoch
    5 = last of 5, budget 5)', an inversion's steps and whether it is empty, the adaptive attack's choice, seconds."""
    r, parts = rows[0], []
    if "converged" in r:
        if all(x["converged"] for x in rows):
            parts.append(f"converged at epoch {_joined([x['best_epoch'] for x in rows])} of {_joined([x['epochs'] for x in rows])}")
        else:
            parts.append(f"**not converged** (best epoch {_joined([x['best_epoch'] for x in rows])} of "
                         f"{_joined([x['epochs'] for x in rows])} run, budget {_joined([x['budget'] for x in rows])}"
                         + (f"; converged in {sum(x['converged'] for x in rows)} of {len(rows)} seeds" if len(rows) > 1 else "")
                         + ")")
        parts.append(f"{r['arch']} w{r['width']}")
    if "empty" in r:
        empty = [x["empty"] for x in rows]
        change = estimate(x["mean_abs_change"] for x in rows).mean * 255
        parts.append(f"{r['steps']} steps, lr {_joined([x['lr'] for x in rows])}, tv {_joined([x['tv'] for x in rows])}; "
                     f"moves pixels {change:.1f}/255 on average"
                     + ("; **empty at this budget**" if all(empty) else f"; empty in {sum(empty)} of {len(rows)} seeds" if any(empty) else "")
                     + ("" if all(x.get("start_converged", True) for x in rows) else "; from a decoder that did **not converge**"))
    if r.get("chosen"):
        parts.append(f"chose {_joined([x['chosen'] for x in rows])}")
    if r.get("wall_s"):
        parts.append(f"{sum(x['wall_s'] for x in rows) / len(rows):.0f} s")
    return "; ".join(parts) or "–"


def _identify(rows: list[dict], n: str) -> str:
    hits = [x["identify"][n] for x in rows if n in x.get("identify", {})]
    if not hits:
        return "–"
    text = _text([h["rate"] for h in hits], hits[0]["ci"] if len(hits) == 1 else None, 100, 1)
    return text


def identify_note(summary: dict) -> str:
    """The chance level of each N, and where a predicted class had fewer candidates than N."""
    notes = []
    row = next(iter(summary["rows"].values()))
    for n, h in row.get("identify", {}).items():
        note = f"N = {n}: chance {100 * h['chance']:.1f} %"
        if h["min_candidates"] < int(n):
            note += f" (fewer candidates than {n} for some images, as few as {h['min_candidates']}: the chance is theirs)"
        notes.append(note)
    return "; ".join(notes)


def suite_table(summaries: dict[str, dict]) -> list[str]:
    """One obfuscator's suite over the seeds (seed folder name -> its suite.json; one entry for one suite): rows,
    the strongest attack, the leakage beyond the class, and the project's target."""
    k = len(summaries)
    first = next(iter(summaries.values()))
    row_names = list(dict.fromkeys(r for s in summaries.values() for r in s["rows"]))
    per_row = {r: [s["rows"][r] for s in summaries.values() if r in s["rows"]] for r in row_names}
    ns = [str(n) for n in first.get("identify", [])]
    strongest = [s["strongest"] for s in summaries.values()]
    lines = ["| row | kind | PSNR dB | SSIM | " + " | ".join(f"identified of {n} %" for n in ns) + " | convergence and budget |",
             "|---|---|---|---|" + "---|" * len(ns) + "---|"]
    for r in row_names:
        rows = per_row[r]
        name = f"**{r}**" if r in strongest else r
        cells = [_text(*_per_seed(rows, "psnr_db", "psnr_ci")), _text(*_per_seed(rows, "ssim", "ssim_ci"), digits=3)]
        cells += [_identify(rows, n) for n in ns]
        lines.append(f"| {name} | {rows[0]['kind']} | " + " | ".join(cells) + f" | {status_text(rows)} |")

    over = f"over the {k} seeds" if k > 1 else "over the images (one seed)"
    lines += ["", f"n = {first['images']} test images (`{first['test_subset']}`, the same in every seed) x {k} seed"
                  f"{'s' if k > 1 else ''}; ± is the 95 % t-interval {over}. Identified of N: the reconstruction's nearest "
                  f"neighbour among N test images of its predicted class is its original ({identify_note(first)})."]
    per_seed = ", ".join(f"{n + ': ' if n else ''}**{s['strongest']}**" + ("" if s["strongest_converged"] else
                         " (no attack converged: a lower bound)") for n, s in summaries.items())
    lines += ["", f"Strongest attack (best PSNR on {first['val_images']} validation images of the training split, among "
                  f"the converged, non-empty attacks): {per_seed}."]

    leak = [s["leakage"] for s in summaries.values() if s.get("leakage")]
    if leak:
        one = len(leak) == 1
        psnr = _text([x["psnr_db"] for x in leak], leak[0]["psnr_ci"] if one else None)
        ssim = _text([x["ssim"] for x in leak], leak[0]["ssim_ci"] if one else None, digits=3)
        sign = lambda t: t if t.startswith("-") else "+" + t  # noqa: E731
        state = "converged" if all(x["converged"] for x in leak) else "**lower bound, not converged**"
        lines += ["", f"**Leakage beyond the class** (the strongest attack minus the label-only decoder, paired per "
                      f"image{'' if one else ', then over the seeds'}): **{sign(psnr)} dB PSNR, {sign(ssim)} SSIM** "
                      f"({state}). What the label-only decoder recovers, any system that tells the cloud the class gives "
                      "away; the leakage is what the upload gives away beyond that."]

    utility = [s["utility"] for s in summaries.values() if s.get("utility")]
    if utility:
        rel = estimate(u["quantized_obfuscated_accuracy"] / u["clean_accuracy"] for u in utility if u["clean_accuracy"] > 0)
        psnr = [s["strongest_psnr_db"] for s in summaries.values()]
        psnr_e = estimate(psnr) if None not in psnr else Estimate(math.inf, math.nan, len(psnr))
        ssim = estimate(s["max_ssim"] for s in summaries.values())
        caveat = "" if all(s["strongest_converged"] for s in summaries.values()) else " (lower bounds: not converged)"
        lines += ["", f"On the same images C's accuracy is {estimate(u['clean_accuracy'] for u in utility).text(100)} % clean "
                      f"and {estimate(u['quantized_obfuscated_accuracy'] for u in utility).text(100)} % on the 8-bit uploads. "
                      f"The project's target: uploads read at least {100 * TARGET['relative_accuracy']:.0f} % as well as clean "
                      f"images ({rel.text()}: {verdict(rel, TARGET['relative_accuracy'])}), the strongest attack at most "
                      f"{TARGET['psnr_db']:g} dB ({psnr_e.text() if math.isfinite(psnr_e.mean) else '∞'}: "
                      f"{verdict(psnr_e, TARGET['psnr_db'], at_least=False) if math.isfinite(psnr_e.mean) else 'missed'}) "
                      f"and every attack at most {TARGET['ssim']:g} SSIM ({ssim.text(digits=3)}: "
                      f"{verdict(ssim, TARGET['ssim'], at_least=False)}){caveat}."]
    return lines

