"""Compatible updates: the term that keeps a new classifier's answers on published obfuscators' uploads close to the
old classifier's (train/classifier.py: Compatibility), through `train-classifier --compatible-with`, on real slices."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from privoffload import nets
from privoffload.config import ObfuscatorConfig, to_toml
from privoffload.data import quantize8
from privoffload.runs import read_metrics
from privoffload.train.classifier import Compatibility

from .helpers import assert_user_error, calibrated, cli, fitted_classifier


@pytest.fixture(scope="module")
def pair(cifar):
    """256 real images, an obfuscator whose BatchNorm statistics come from them, and two classifiers that classify
    its uploads differently: the old one (fitted on the uploads) and another."""
    x, y = cifar.x_train[:256], cifar.y_train[:256]
    torch.manual_seed(0)
    obf = calibrated(nets.codec(4), x)
    with torch.no_grad():
        uploads = (quantize8(obf(torch.from_numpy(x).float() / 255)) * 255).round().to(torch.uint8).numpy()
    return torch.from_numpy(x).float() / 255, torch.from_numpy(y), obf, fitted_classifier(uploads, y, 0), \
        fitted_classifier(x, y, 1)


@pytest.mark.parametrize("loss", ["kl", "focal"])
def test_the_term_is_zero_when_the_new_classifier_is_the_old_one(pair, loss):
    x, y, obf, old, other = (v[:96] if isinstance(v, torch.Tensor) else v for v in pair)
    term = Compatibility([(obf, old)], loss)
    assert term(copy.deepcopy(old), x, y).item() == pytest.approx(0.0, abs=1e-6)
    assert term(other, x, y).item() > 0.01


def test_the_term_pulls_the_new_answers_on_uploads_toward_the_old(pair):
    x, y, obf, old, other = (v[:96] if isinstance(v, torch.Tensor) else v for v in pair)
    new = copy.deepcopy(other).train()
    term = Compatibility([(obf, old)], "kl")
    with torch.no_grad():
        uploads = quantize8(obf(x))
        agree = lambda: (copy.deepcopy(new).eval()(uploads).argmax(1) == old(uploads).argmax(1)).float().mean().item()  # noqa: E731
    before, agreement = term(new, x, y).item(), agree()
    opt = torch.optim.SGD(new.parameters(), lr=0.05, momentum=0.9)
    for _ in range(20):
        opt.zero_grad()
        term(new, x, y).backward()
        opt.step()
    assert term(new, x, y).item() < 0.5 * before and agree() > agreement
    assert new.training  # the term reads the uploads in eval mode and hands the network back as it found it
    stats = [m.running_mean.clone() for m in new.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    term(new, x, y)  # and never moves the BatchNorm statistics the classifier serves with
    assert all(torch.equal(a, m.running_mean) for a, m in zip(stats, (m for m in new.modules()
                                                                      if isinstance(m, torch.nn.BatchNorm2d))))


def test_focal_counts_only_the_uploads_the_old_classifier_got_right(pair):
    x, y, obf, old, other = pair
    with torch.no_grad():
        uploads = quantize8(obf(x))
        right = old(uploads).argmax(1) == y
        per_image = F.kl_div(F.log_softmax(other(uploads), 1), F.log_softmax(old(uploads), 1), log_target=True,
                             reduction="none").sum(1)
    assert 0 < right.float().mean() < 1
    assert Compatibility([(obf, old)], "focal")(other, x, y).item() == pytest.approx((per_image * right).mean().item(), rel=1e-4)
    both = Compatibility([(obf, old), (obf, old)], "kl")(other, x, y).item()  # the mean over the obfuscators
    assert both == pytest.approx(per_image.mean().item(), rel=1e-4)


SMALL = ("--subset", "first:384", "--width", "4", "--batch-size", "64", "--epochs", "1", "--set", 'test_subset="random:64"')


def test_train_classifier_compatible_with_a_published_obfuscator(obfuscator_run, tiny_classifier, tmp_path):
    out = tmp_path / "c1"
    done = cli("train-classifier", "--out", out, "--init", tiny_classifier, "--compatible-with", obfuscator_run, *SMALL,
               "--set", "compat.val_split=0.25", "--set", 'compat.loss="focal"')
    assert done.exit_code == 0, done.output
    (record,) = read_metrics(out)[1:]  # epoch 0 (the init, scored), then the epoch trained
    assert record["train_compat_loss"] > 0 and 0 <= record["val_accuracy"] <= 1
    scores = record["val_compat"][str(obfuscator_run)]
    assert {"old", "new", "new_negative_flips"} <= scores.keys() and 0 <= scores["new_negative_flips"] <= scores["old"]
    assert "focal" in (out / "config.toml").read_text()


def test_bad_compatible_with_is_one_line(tiny_classifier, tmp_path):
    assert_user_error(cli("train-classifier", "--out", tmp_path / "a", "--compatible-with", tiny_classifier, *SMALL),
                      "has no obfuscator.safetensors")
    assert_user_error(cli("train-classifier", "--out", tmp_path / "b", "--compatible-with", tmp_path / "nowhere", *SMALL),
                      "does not exist")
    grey = tmp_path / "grey"  # an obfuscator of grey 32x32 X-rays: not one for CIFAR-10's images
    grey.mkdir()
    nets.save(nets.codec(4, channels=1, size=(32, 32)), grey / "obfuscator.safetensors")
    (grey / "config.toml").write_text(to_toml(ObfuscatorConfig(classifier=str(tiny_classifier), dataset="pneumoniamnist")))
    assert_user_error(cli("train-classifier", "--out", tmp_path / "c", "--compatible-with", grey, *SMALL),
                      "data set 'pneumoniamnist'")
    assert_user_error(cli("train-classifier", "--out", tmp_path / "d", *SMALL, "--set", 'compat.loss="mse"'),
                      "compat.loss")
