"""The attack suite's mechanics on tiny real slices: inversion works before it measures anything, early stopping
reads only the validation split and flags a decoder its budget stopped, the upload cache is reused, reference rows
come from the test split and C's predicted classes, the label-only decoder never sees an upload pixel, the adaptive
attack is never below its candidates, identifiability counts what it says, a suite resumes, and the recipe
options do what they say."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from privoffload import nets
from privoffload.config import AdaptiveConfig, AttackConfig, InversionConfig, ObfuscatorConfig, SuiteConfig
from privoffload.data import DeviceData, quantize8, select
from privoffload.experiments.privacy_table import suite_table
from privoffload.metrics import pair_quality, psnr_ssim
from privoffload.privacy import suite as suite_mod
from privoffload.privacy import uploads as uploads_mod
from privoffload.privacy.adaptive import run_adaptive
from privoffload.privacy.attack import EarlyStopping, train_attack
from privoffload.privacy.inversion import invert
from privoffload.privacy.suite import candidates, identified, run_suite
from privoffload.privacy.uploads import cached_answers, cached_uploads
from privoffload.runs import load_classifier, load_codec
from privoffload.runtime import use_bf16
from privoffload.train.game import game_step, reconstruction_loss
from privoffload.train.loop import Progress
from privoffload.train.obfuscator import train_obfuscator

from .helpers import calibrated, cli, records

DECODER = AttackConfig(obfuscator="-", arch="unet", width=4, epochs=1, batch_size=64, subset="first:256", val_split=0.25,
                       patience=1, lr_cuts=0)


def tiny_suite(obfuscator_run, attacks, **kw) -> SuiteConfig:
    return SuiteConfig(obfuscator=str(obfuscator_run), attacks=attacks, test_subset="random:64", decoder=DECODER,
                       inversion=InversionConfig(obfuscator="-", steps=3, batch_size=32, val_images=16, lrs=[0.01], tvs=[0.0]),
                       adaptive=AdaptiveConfig(obfuscator="-", subset="first:128", epochs=1), **kw)


def black_test(cifar, n: int = 64, labels=None):
    y = np.zeros(n, np.int64) if labels is None else labels
    return dataclasses.replace(cifar, x_test=np.zeros((n, 3, 32, 32), np.uint8), y_test=y)


# ---------------------------------------------------------------- inversion

def test_inversion_recovers_an_image_through_the_identity(cifar):
    """No defence: the upload is the image, rounded to 8 bits; inversion from the mean image must find it."""
    x = torch.from_numpy(cifar.x_test[:8]).float() / 255
    mean = torch.from_numpy(cifar.x_train[:512]).float().mean(0, keepdim=True) / 255
    rec = invert(nn.Identity(), quantize8(x), mean, steps=100, lr=0.05, tv=0.0)
    assert psnr_ssim(rec, x)[0].min() > 30.0


def test_inversion_through_a_random_codec_fits_the_upload(cifar):
    """Through a random (BatchNorm-calibrated) codec, inversion must bring its upload much closer to the real
    upload than the mean image's upload is: the search works. (Whether that brings the image closer is what the
    suite measures; see docs/threat-model.md.)"""
    torch.manual_seed(0)
    obf = calibrated(nets.codec(4), cifar.x_train[:256])
    x = torch.from_numpy(cifar.x_test[:8]).float() / 255
    mean = torch.from_numpy(cifar.x_train[:512]).float().mean(0, keepdim=True) / 255
    with torch.no_grad():
        upload = quantize8(obf(x))
    rec = invert(obf, upload, mean, steps=60, lr=0.01, tv=0.0)
    with torch.no_grad():
        err = lambda z: ((quantize8(obf(z)) - upload) ** 2).mean().item()  # noqa: E731
        assert err(rec) < err(mean.expand_as(x)) / 3
    assert rec.min() >= 0 and rec.max() <= 1


# ---------------------------------------------------------------- the decoder converges on its validation split

def test_decoder_early_stopping_reads_only_the_validation_split(obfuscator_run, cifar, tmp_path, monkeypatch):
    """Same training and validation images, another test split: the same validation scores, stopping epoch and
    weights. Another validation split: other scores. The logged validation PSNR is that of the kept weights on
    the held-out images' uploads, and a run killed mid-way resumes to the same end."""
    cfg = dataclasses.replace(DECODER, obfuscator=str(obfuscator_run), epochs=6, test_subset="all", patience=1,
                              optim=dataclasses.replace(DECODER.optim, lr=3e-2))
    black = black_test(cifar)
    train_attack(cfg, tmp_path / "a", data=black)
    train_attack(dataclasses.replace(cfg, test_subset="random:64"), tmp_path / "b", data=cifar)
    other_val = cifar.x_train.copy()
    other_val[192:256] = 255 - other_val[192:256]
    train_attack(cfg, tmp_path / "c", data=dataclasses.replace(black, x_train=other_val))

    a, b, c = (records(tmp_path / k) for k in "abc")
    keys = ("epoch", "train_reconstruction_loss", "val_psnr_db", "val_ssim", "best_epoch", "steps", "converged")
    assert [{k: r[k] for k in keys} for r in a] == [{k: r[k] for k in keys} for r in b]
    assert a[-1]["attacker_psnr_db"] != b[-1]["attacker_psnr_db"]  # the test splits do differ
    assert a[0]["train_reconstruction_loss"] == c[0]["train_reconstruction_loss"]  # the same training images
    assert a[0]["val_psnr_db"] != pytest.approx(c[0]["val_psnr_db"], abs=1e-3)  # but another validation split

    vals = [r["val_psnr_db"] for r in a]
    best = a[-1]["best_epoch"]
    assert best == 1 + int(np.argmax(vals)) and a[-1]["steps"] == len(a) * 3
    if len(a) < 6:  # stopped by its rule before the budget: converged, validation's best before its last epoch
        assert a[-1]["converged"] and best < len(a)
    assert not a[-1]["converged"] or best < len(a)
    kept = nets.load(tmp_path / "a" / "attacker.safetensors")
    assert nets.read_metadata(tmp_path / "a" / "attacker.safetensors")["epoch"] == str(best)
    bf16 = use_bf16("auto", torch.device("cpu"))
    obf = load_codec(obfuscator_run).eval()
    val = DeviceData(cifar.x_train[192:256], cifar.y_train[192:256])
    with torch.no_grad():
        upload = cached_uploads(tmp_path / "a" / "uploads", obfuscator_run, black, "first:256")[192:]
        direct = (quantize8(obf(val.x.float() / 255)) * 255).round().to(torch.uint8).numpy()
        assert np.abs(upload.astype(int) - direct).max() <= 1  # the client's upload (up to a float rounding tie)
    psnr, _ = pair_quality(kept, val.paired(upload), bf16=bf16)
    assert psnr == pytest.approx(vals[best - 1], rel=1e-5)

    line = Progress.line

    def stop_after_first_epoch(self, epoch, text):
        line(self, epoch, text)
        raise KeyboardInterrupt

    monkeypatch.setattr(Progress, "line", stop_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_attack(cfg, tmp_path / "resumed", data=black)
    monkeypatch.setattr(Progress, "line", line)
    train_attack(cfg, tmp_path / "resumed", resume=True, data=black)
    assert [{k: r[k] for k in keys} for r in records(tmp_path / "resumed")] == [{k: r[k] for k in keys} for r in a]
    train_attack(cfg, tmp_path / "resumed", resume=True, data=black)  # a finished, early-stopped run stays finished
    assert len(records(tmp_path / "resumed")) == len(a)


def test_early_stopping_cuts_the_rate_then_stops():
    """Patience 2, one cut, a gain must exceed 0.1: two flat epochs cut the rate, two more stop; the best stays."""
    net = nn.Linear(1, 1)
    stop = EarlyStopping(net, patience=2, min_delta=0.1, cuts=1)
    cuts = [stop.update(e, score, net) for e, score in enumerate([10.0, 10.05, 10.1, 11.0, 11.0, 11.05, 10.0], 1)]
    assert cuts == [False, False, True, False, False, False, False] and stop.stopped
    assert (stop.best, stop.best_epoch) == (11.0, 4)
    again = EarlyStopping(net, patience=2, min_delta=0.1, cuts=1)
    again.load_state_dict(stop.state_dict())
    assert again.stopped and again.best_epoch == 4


def test_a_decoder_stopped_by_its_budget_is_flagged_not_converged(obfuscator_run, cifar, tmp_path):
    """One epoch of budget: validation's best epoch is the last, the run says so, and the suite's tables print the
    row as not converged and the leakage as a lower bound."""
    cfg = tiny_suite(obfuscator_run, ["decoder"])
    summary = json.loads(run_suite(cfg, tmp_path / "s", data=cifar).read_text())
    row = summary["rows"]["decoder"]
    assert row["epochs"] == row["best_epoch"] == row["budget"] == 1 and row["converged"] is False
    assert records(tmp_path / "s" / "decoder")[-1]["converged"] is False
    assert summary["strongest_converged"] is False and summary["leakage"]["verdict"] == "lower bound, not converged"
    table = "\n".join(suite_table({"seed-0": summary}))
    assert "| **decoder** | attack |" in table and "**not converged** (best epoch 1 of 1 run, budget 1)" in table
    assert "**lower bound, not converged**" in table and "n = 64 test images" in table and "x 1 seed" in table


# ---------------------------------------------------------------- the suite

@pytest.fixture(scope="module")
def black_suite(obfuscator_run, cifar, tmp_path_factory):
    """A suite (decoder and its inversion) whose test split is 64 black images of class 0."""
    out = tmp_path_factory.mktemp("suite") / "s"
    cfg = dataclasses.replace(tiny_suite(obfuscator_run, ["decoder", "decoder+inversion"]), test_subset="all")
    run_suite(cfg, out, data=black_test(cifar))
    return out


def test_reference_rows_use_the_test_split_and_the_predicted_class(black_suite, obfuscator_run, cifar):
    summary = json.loads((black_suite / "suite.json").read_text())
    rows = summary["rows"]
    assert summary["images"] == 64 and set(rows) >= {"mean image", "per-class mean image", "label-only decoder",
                                                      "no defence", "upload as image", "co-trained D", "decoder"}
    black = torch.zeros(64, 3, 32, 32)
    known = torch.from_numpy(cifar.x_train[:192]).float() / 255  # the decoder's known images, its validation held out
    known_y = torch.from_numpy(cifar.y_train[:192])
    upload = quantize8(load_codec(obfuscator_run).eval()(black)).detach()
    predicted = load_classifier(uploads_mod.recipe_classifier(obfuscator_run)).eval()(upload).argmax(1)
    expect = {"mean image": known.mean(0, keepdim=True).expand_as(black),
              "per-class mean image": torch.stack([known[known_y == c].mean(0) for c in range(10)])[predicted],
              "upload as image": upload}
    for name, rec in expect.items():
        psnr, ssim = psnr_ssim(rec, black)
        assert rows[name]["psnr_db"] == pytest.approx(psnr.mean().item(), rel=1e-4), name
        assert rows[name]["ssim"] == pytest.approx(ssim.mean().item(), rel=1e-4), name
    assert rows["no defence"]["psnr_db"] is None and rows["no defence"]["ssim"] == pytest.approx(1.0)
    assert summary["strongest"] in ("decoder", "decoder+inversion") and rows[summary["strongest"]]["kind"] == "attack"
    assert rows["decoder+inversion"]["steps"] == 3 and rows["decoder+inversion"]["lr"] == 0.01
    table = "\n".join(suite_table({"": summary}))
    assert "∞ (exact)" in table and "identified of 10 %" in table and "Leakage beyond the class" in table


def test_per_class_mean_reads_the_predicted_class_not_the_label(obfuscator_run, cifar, tmp_path):
    """The cloud has C's answer, never the label: the same test images under other true labels give the same row."""
    rows = []
    for labels in (np.zeros(64, np.int64), np.arange(64) % 10):
        cfg = dataclasses.replace(tiny_suite(obfuscator_run, ["decoder"], label_only=False), test_subset="all")
        out = tmp_path / f"s{labels[1]}"
        rows.append(json.loads(run_suite(cfg, out, data=black_test(cifar, labels=labels)).read_text())["rows"])
    assert rows[0]["per-class mean image"]["psnr_db"] == rows[1]["per-class mean image"]["psnr_db"]
    assert rows[0]["per-class mean image"]["identify"] == rows[1]["per-class mean image"]["identify"]


def test_the_label_only_decoder_never_sees_an_upload_pixel(obfuscator_run, cifar, tmp_path):
    """Trained on C's answers with the uploads beside them scrambled, it ends bit for bit where it ends with the
    real uploads."""
    cfg = dataclasses.replace(DECODER, obfuscator=str(obfuscator_run), arch="answer", epochs=2, test_subset="random:64")
    cache = tmp_path / "real"
    train_attack(cfg, tmp_path / "a", data=cifar, uploads=cache)
    scrambled = tmp_path / "scrambled"
    shutil.copytree(cache, scrambled)
    for f in scrambled.glob("*.upload.npy"):
        np.save(f, np.random.default_rng(0).integers(0, 256, np.load(f).shape, dtype=np.uint8))
    train_attack(cfg, tmp_path / "b", data=cifar, uploads=scrambled)
    a, b = (nets.load(tmp_path / k / "attacker.safetensors") for k in "ab")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert records(tmp_path / "a")[-1]["val_psnr_db"] == records(tmp_path / "b")[-1]["val_psnr_db"]
    assert isinstance(a, nets.AnswerDecoder) and a(torch.full((3, 10), 0.1)).shape == (3, 3, 32, 32)


def test_the_upload_cache_is_reused_and_a_suite_resumes(obfuscator_run, cifar, tmp_path, monkeypatch):
    """A suite killed at its label-aware decoder reuses, when rerun, the cached uploads (O never runs again) and the
    finished decoders; a finished suite returns the same summary."""
    cfg = tiny_suite(obfuscator_run, ["decoder", "label-aware"])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    train_for_real = suite_mod.train_attack
    monkeypatch.setattr(suite_mod, "train_attack", lambda c, out, **kw: killed() if c.answer else train_for_real(c, out, **kw))
    with pytest.raises(KeyboardInterrupt):
        run_suite(cfg, tmp_path / "s", data=cifar)
    cache = sorted(p.name for p in (tmp_path / "s" / "uploads").iterdir())
    assert any(n.endswith(".upload.npy") for n in cache) and any(".answer-" in n for n in cache)
    decoder_log = (tmp_path / "s" / "decoder" / "metrics.jsonl").read_text()
    assert not (tmp_path / "s" / "suite.json").exists()
    monkeypatch.setattr(suite_mod, "train_attack", train_for_real)
    monkeypatch.setattr(uploads_mod, "load_codec", killed)  # the uploads must come from the cache
    summary = json.loads(run_suite(cfg, tmp_path / "s", data=cifar).read_text())
    assert (tmp_path / "s" / "decoder" / "metrics.jsonl").read_text() == decoder_log  # reused, not retrained
    assert sorted(p.name for p in (tmp_path / "s" / "uploads").iterdir()) == cache
    assert set(summary["rows"]) >= {"decoder", "label-aware", "label-only decoder"}
    assert json.loads(run_suite(cfg, tmp_path / "s", data=cifar).read_text()) == summary
    result = cli("attack-suite", "--obfuscator", obfuscator_run, "--out", tmp_path / "s", "--attacks", "decoder")
    assert result.exit_code == 2 and "differs from this config" in result.stderr


def test_adaptive_is_never_below_its_candidates_and_oprime_never_sees_test_images(obfuscator_run, cifar, tmp_path):
    """O' is trained by O's recipe on the attacker's images, the same whatever the test split holds; the attack
    keeps the best of the plain decoder, its continuation on O and O' pairs, and the mean image, on validation."""
    cfg = AdaptiveConfig(obfuscator=str(obfuscator_run), subset="first:128", epochs=1, test_subset="all",
                         decoder=DECODER)
    run_adaptive(cfg, tmp_path / "a", data=black_test(cifar))
    run_adaptive(dataclasses.replace(cfg, test_subset="random:64"), tmp_path / "b", data=cifar)
    a, b = (nets.load(tmp_path / k / "oprime" / "obfuscator.safetensors") for k in "ab")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    recipe = (tmp_path / "a" / "oprime" / "config.toml").read_text()
    assert 'subset = "first:128"' in recipe and "seed = 1" in recipe
    result = records(tmp_path / "a")[-1]
    scores = {k: v["val_psnr_db"] for k, v in result["candidates"].items()}
    assert set(scores) == {"decoder", "mixed", "mean image"} and scores[result["chosen"]] == max(scores.values())
    mixed = records(tmp_path / "a" / "mixed")
    assert mixed[-1]["best_val_psnr_db"] >= records(tmp_path / "a" / "decoder")[-1]["best_val_psnr_db"] - 1e-9
    assert len(list((tmp_path / "a" / "uploads").glob("*.upload.npy"))) == 3  # O's training and test images, O''s


def test_identifiability_counts_nearest_originals_among_the_predicted_class():
    """Candidates share the image's predicted class (fewer where the class is small); the exact image is always
    picked, one constant guess for all almost never beats chance."""
    predicted = np.array([0] * 30 + [1] * 3)
    sets = candidates(predicted, 10, seed=0)
    assert [len(s) for s in sets] == [10] * 30 + [3] * 3
    assert all(s[0] == i and (predicted[s] == predicted[i]).all() and len(set(s)) == len(s) for i, s in enumerate(sets))
    x = torch.rand(33, 3, 8, 8)
    assert identified(x, x, sets).all()
    assert identified(torch.full_like(x, 0.5), x, sets).mean() < 0.5


@pytest.mark.parametrize("sets, message", [
    (["attacks=[\"nope\"]"], "attacks[] = 'nope' is not one of"),
    (["attacks=[]"], "must name each attack once"),
    (["inversion.lrs=[]"], "lrs = [] must list rates > 0"),
    (["identify=[1]"], "identify = [1] must list candidate counts >= 2"),
    (["decoder.arch=\"codec\""], "label-aware: config: answer = true needs arch = \"unet\""),
    (["decoder.flip=true"], "flip = true does not apply to attacks"),
])
def test_suite_bad_input_is_one_line_and_exit_2(sets, message, obfuscator_run, tmp_path):
    args = [a for s in sets for a in ("--set", s)]
    result = cli("attack-suite", "--obfuscator", obfuscator_run, "--out", tmp_path / "s", *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr


# ---------------------------------------------------------------- the game's recipe options

def test_recipe_options_d_steps_and_recon_cap():
    torch.manual_seed(0)
    obf, deobf = nets.codec(4), nets.codec(4)
    x, y = torch.rand(1, 3, 32, 32).expand(8, -1, -1, -1).contiguous(), torch.randint(0, 10, (8,))
    head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    readability = lambda z, t: (nn.functional.cross_entropy(head(z), t), head(z))  # noqa: E731
    opt_o, opt_d = torch.optim.Adam(obf.parameters()), torch.optim.Adam(deobf.parameters())
    step = dict(lam=2.0, recon=reconstruction_loss("mse"), device=torch.device("cpu"), bf16=False)
    ce, _, loss_o, _ = game_step(obf, deobf, readability, x, y, opt_o, opt_d, d_steps=3, **step)
    assert next(iter(opt_d.state.values()))["step"] == 3 and next(iter(opt_o.state.values()))["step"] == 1
    assert loss_o < ce  # uncapped: O is rewarded for D's error

    # capped at a guess that is exactly right: D can do no worse than a perfect guess, so O gains nothing
    ce, _, loss_o, _ = game_step(obf, deobf, readability, x, y, opt_o, opt_d, recon_cap=x[:1], **step)
    assert loss_o == pytest.approx(ce.item(), abs=1e-7)


def test_soft_targets_and_recon_cap_train(tiny_classifier, cifar, tmp_path):
    cfg = ObfuscatorConfig(classifier=str(tiny_classifier), width=4, epochs=1, batch_size=64, subset="first:128",
                           test_subset="random:64", soft_targets=True, recon_cap=True, d_steps=2)
    train_obfuscator(cfg, tmp_path / "o", data=cifar)
    assert np.isfinite(records(tmp_path / "o")[-1]["train_classification_loss"])
    result = cli("train-obfuscator", "--classifier", tiny_classifier, "--out", tmp_path / "bad", "--set", "d_steps=0")
    assert result.exit_code == 2 and "d_steps = 0 must be > 0" in result.stderr


def test_attack_cli_inversion_is_a_resumable_run(obfuscator_run, tmp_path):
    args = ("attack", "--kind", "inversion", "--obfuscator", obfuscator_run, "--out", tmp_path / "inv", "--steps", "2",
            "--batch-size", "16", "--test-subset", "random:32", "--subset", "first:64", "--set", "val_images=16")
    result = cli(*args)
    assert result.exit_code == 0, result.output
    rec = torch.load(tmp_path / "inv" / "reconstructions.pt", weights_only=True)["rec"]
    assert rec.shape == (32, 3, 32, 32) and not list((tmp_path / "inv").glob("chunk-*"))
    (first,) = records(tmp_path / "inv")
    assert first["images"] == 32 and first["steps"] == 2 and first["lr"] in (0.003, 0.01, 0.03)
    tuning = json.loads((tmp_path / "inv" / "tuning.json").read_text())
    assert len(tuning["settings"]) == 6 and tuning["chosen"]["val_psnr_db"] == max(r["val_psnr_db"] for r in tuning["settings"])
    assert first["empty"] == (tuning["chosen"]["val_change"] < 0.004)
    assert cli(*args).exit_code == 2  # an existing run is not overwritten
    assert cli(*args, "--resume").exit_code == 0 and records(tmp_path / "inv") == [first]
