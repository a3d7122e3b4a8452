"""The attack suite's mechanics on tiny real slices: inversion works before it measures anything, early stopping
reads only the validation split, reference rows come from the test split, the adaptive attacker's O' never sees
a test image, a suite resumes, and the recipe options do what they say."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from privoffload import nets
from privoffload.config import (AdaptiveConfig, AttackConfig, InversionConfig, ObfuscatorConfig, ProbeConfig,
                                SuiteConfig)
from privoffload.data import DeviceData, quantize8
from privoffload.metrics import psnr_ssim, reconstruction_quality
from privoffload.privacy import suite as suite_mod
from privoffload.privacy.adaptive import run_adaptive
from privoffload.privacy.attack import train_attack
from privoffload.privacy.inversion import invert
from privoffload.privacy.suite import probe_correct, run_suite, suite_rows
from privoffload.runs import load_codec
from privoffload.runtime import use_bf16
from privoffload.train.game import game_step, reconstruction_loss
from privoffload.train.loop import Progress
from privoffload.train.obfuscator import train_obfuscator

from .helpers import calibrated, cli, records

DECODER = AttackConfig(obfuscator="-", arch="codec", width=4, epochs=1, batch_size=64, subset="first:192", val_images=64,
                       patience=1)


def tiny_suite(obfuscator_run, attacks) -> SuiteConfig:
    return SuiteConfig(obfuscator=str(obfuscator_run), attacks=attacks, test_subset="random:64", decoder=DECODER,
                       inversion=InversionConfig(obfuscator="-", steps=3, batch_size=32, subset="first:192"),
                       adaptive=AdaptiveConfig(obfuscator="-", subset="first:192", epochs=1, decoder=DECODER),
                       probe=ProbeConfig(kind="ridge", folds=2))


def black_test(cifar, n: int = 64):
    return dataclasses.replace(cifar, x_test=np.zeros((n, 3, 32, 32), np.uint8), y_test=np.zeros(n, np.int64))


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
    the held-out images, and a run killed mid-way resumes to the same end."""
    cfg = dataclasses.replace(DECODER, obfuscator=str(obfuscator_run), epochs=6, subset="first:256", test_subset="all",
                              patience=1, optim=dataclasses.replace(DECODER.optim, lr=3e-2))
    black = black_test(cifar)
    train_attack(cfg, tmp_path / "a", data=black)
    train_attack(dataclasses.replace(cfg, test_subset="random:64"), tmp_path / "b", data=cifar)
    other_val = cifar.x_train.copy()
    other_val[192:256] = 255 - other_val[192:256]
    train_attack(cfg, tmp_path / "c", data=dataclasses.replace(black, x_train=other_val))

    a, b, c = (records(tmp_path / k) for k in "abc")
    keys = ("epoch", "train_reconstruction_loss", "val_psnr_db", "val_ssim", "best_epoch", "steps")
    assert [{k: r[k] for k in keys} for r in a] == [{k: r[k] for k in keys} for r in b]
    assert a[-1]["attacker_psnr_db"] != b[-1]["attacker_psnr_db"]  # the test splits do differ
    assert a[0]["train_reconstruction_loss"] == c[0]["train_reconstruction_loss"]  # the same training images
    assert a[0]["val_psnr_db"] != pytest.approx(c[0]["val_psnr_db"], abs=1e-3)  # but another validation split

    vals = [r["val_psnr_db"] for r in a]
    best = a[-1]["best_epoch"]
    assert best == 1 + int(np.argmax(vals)) and a[-1]["steps"] == len(a) * 3
    assert len(a) == 6 or vals[-1] <= max(vals)  # the budget, or one epoch without a better score (patience 1)
    kept = nets.load(tmp_path / "a" / "attacker.safetensors")
    assert nets.read_metadata(tmp_path / "a" / "attacker.safetensors")["epoch"] == str(best)
    obf = nets.load(obfuscator_run / "obfuscator.safetensors")
    bf16 = use_bf16("auto", torch.device("cpu"))
    psnr, _ = reconstruction_quality(kept, obf, DeviceData(cifar.x_train[192:256], cifar.y_train[192:256]), bf16=bf16)
    assert psnr == pytest.approx(vals[best - 1], rel=1e-5)
    test_psnr, _ = reconstruction_quality(kept, obf, DeviceData(black.x_test, black.y_test), bf16=bf16)
    assert a[-1]["attacker_psnr_db"] == pytest.approx(test_psnr, rel=1e-5)  # the test score is the kept weights'

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


# ---------------------------------------------------------------- the suite

@pytest.fixture(scope="module")
def black_suite(obfuscator_run, cifar, tmp_path_factory):
    """A suite (decoder and inversion) whose test split is 64 black images of class 0."""
    out = tmp_path_factory.mktemp("suite") / "s"
    cfg = dataclasses.replace(tiny_suite(obfuscator_run, ["decoder", "inversion"]), test_subset="all")
    run_suite(cfg, out, data=black_test(cifar))
    return out


def test_reference_rows_use_the_test_split(black_suite, obfuscator_run, cifar):
    summary = json.loads((black_suite / "suite.json").read_text())
    rows = summary["rows"]
    assert summary["images"] == 64 and set(rows) >= {"mean image", "per-class mean image", "no defence",
                                                      "upload as image", "co-trained D", "decoder", "inversion"}
    black = torch.zeros(64, 3, 32, 32)
    known = torch.from_numpy(cifar.x_train[:192]).float() / 255  # the decoder's known images
    expect = {"mean image": known.mean(0, keepdim=True).expand_as(black),
              "per-class mean image": known[torch.from_numpy(cifar.y_train[:192]) == 0].mean(0, keepdim=True).expand_as(black),
              "upload as image": quantize8(load_codec(obfuscator_run).eval()(black)).detach()}
    for name, rec in expect.items():
        psnr, ssim = psnr_ssim(rec, black)
        assert rows[name]["psnr_db"] == pytest.approx(psnr.mean().item(), rel=1e-5), name
        assert rows[name]["ssim"] == pytest.approx(ssim.mean().item(), rel=1e-5), name
    assert rows["no defence"]["psnr_db"] is None and rows["no defence"]["ssim"] == pytest.approx(1.0)
    assert summary["strongest"] in ("decoder", "inversion") and summary["rows"][summary["strongest"]]["kind"] == "attack"
    assert rows["decoder"]["epochs"] == 1 and rows["inversion"]["steps"] == 3
    table = "\n".join(suite_rows(summary))
    assert "∞ (exact)" in table and f"| **{summary['strongest']}** | attack |" in table


def test_a_suite_resumes_and_reuses_finished_attacks(obfuscator_run, cifar, tmp_path, monkeypatch):
    cfg = tiny_suite(obfuscator_run, ["decoder", "decoder+inversion"])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    invert_for_real = suite_mod.run_inversion
    monkeypatch.setattr(suite_mod, "run_inversion", killed)
    with pytest.raises(KeyboardInterrupt):
        run_suite(cfg, tmp_path / "s", data=cifar)
    decoder_log = (tmp_path / "s" / "decoder" / "metrics.jsonl").read_text()
    assert not (tmp_path / "s" / "suite.json").exists()
    monkeypatch.setattr(suite_mod, "run_inversion", invert_for_real)
    summary = json.loads(run_suite(cfg, tmp_path / "s", data=cifar).read_text())
    assert (tmp_path / "s" / "decoder" / "metrics.jsonl").read_text() == decoder_log  # reused, not retrained
    assert set(summary["rows"]) >= {"decoder", "decoder+inversion"}
    again = run_suite(cfg, tmp_path / "s", data=cifar)
    assert json.loads(again.read_text()) == summary
    result = cli("attack-suite", "--obfuscator", obfuscator_run, "--out", tmp_path / "s", "--attacks", "decoder")
    assert result.exit_code == 2 and "differs from this config" in result.stderr


def test_adaptive_oprime_never_sees_test_images(obfuscator_run, cifar, tmp_path):
    """O' is trained by O's recipe on the attacker's images: the same whatever the test split holds."""
    cfg = AdaptiveConfig(obfuscator=str(obfuscator_run), subset="first:192", epochs=1, test_subset="all", decoder=DECODER)
    run_adaptive(cfg, tmp_path / "a", data=black_test(cifar))
    run_adaptive(dataclasses.replace(cfg, test_subset="random:64"), tmp_path / "b", data=cifar)
    a, b = (nets.load(tmp_path / k / "oprime" / "obfuscator.safetensors") for k in "ab")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    recipe = (tmp_path / "a" / "oprime" / "config.toml").read_text()
    assert 'subset = "first:192"' in recipe and "seed = 1" in recipe
    result = records(tmp_path / "a")[-1]
    assert result["chosen"] in ("transfer", "finetune") and (tmp_path / "a" / "attacker.safetensors").exists()
    assert result[f"{result['chosen']}_val_psnr_db"] == max(result["transfer_val_psnr_db"], result["finetune_val_psnr_db"])


def test_probe_classifies_what_it_can_tell_apart(cifar):
    """The fresh classifier on reconstructions: images that show their class (a bright row at the class's index) are
    read perfectly; one constant image for all is read at the frequency of one class."""
    labels = torch.from_numpy(cifar.y_test[::50])  # the test split is stored class by class: 20 of each
    per_class = torch.zeros(200, 3, 32, 32)
    per_class[torch.arange(200), :, labels] = 1.0
    same = torch.full((200, 3, 32, 32), 0.5)
    cfg = ProbeConfig(kind="ridge", folds=4, ridge=1.0)
    assert probe_correct(per_class, labels, cfg, seed=0, device=torch.device("cpu")).all()
    assert probe_correct(same, labels, cfg, seed=0, device=torch.device("cpu")).mean() <= 0.2


@pytest.mark.parametrize("sets, message", [
    (["attacks=[\"nope\"]"], "attacks[] = 'nope' is not one of"),
    (["attacks=[]"], "must name each attack once"),
    (["inversion.steps=0"], "inversion: config: steps = 0 must be > 0"),
    (["probe.kind=\"svm\""], "probe.kind = 'svm' is not one of ridge, resnet18"),
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
            "--batch-size", "16", "--test-subset", "random:32", "--subset", "first:64")
    result = cli(*args)
    assert result.exit_code == 0, result.output
    rec = torch.load(tmp_path / "inv" / "reconstructions.pt", weights_only=True)
    assert rec.shape == (32, 3, 32, 32) and not list((tmp_path / "inv").glob("chunk-*"))
    (first,) = records(tmp_path / "inv")
    assert first["images"] == 32 and first["steps"] == 2
    assert cli(*args).exit_code == 2  # an existing run is not overwritten
    assert cli(*args, "--resume").exit_code == 0 and records(tmp_path / "inv") == [first]
