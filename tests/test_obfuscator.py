"""Obfuscator training at smoke scale, on real CIFAR-10 slices: metrics, frozen C, test split, resume, errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from .helpers import cli, records
from safetensors.torch import load_file

from privoffload import nets
from privoffload.config import ObfuscatorConfig
from privoffload.data import DeviceData
from privoffload.metrics import reconstruction_quality
from privoffload.train import obfuscator as obf_mod
from privoffload.runs import is_done
from privoffload.runtime import use_bf16
from privoffload.train.obfuscator import train_obfuscator

EVAL_KEYS = ("test_accuracy", "obfuscated_accuracy", "quantized_obfuscated_accuracy", "deobfuscator_psnr_db",
             "deobfuscator_ssim")
TRAIN_KEYS = ("train_classification_loss", "train_reconstruction_loss", "train_obfuscator_loss",
              "train_obfuscated_accuracy", "time_s", "images_per_s")


def test_cli_run_logs_every_metric(obfuscator_run):
    recs = records(obfuscator_run)
    assert [r["epoch"] for r in recs] == [1, 2]
    for r in recs:
        assert all(np.isfinite(r[k]) for k in TRAIN_KEYS)
    last = recs[-1]  # the last epoch is always evaluated
    for k in EVAL_KEYS:
        assert np.isfinite(last[k]), k
    for k in ("test_accuracy", "obfuscated_accuracy", "quantized_obfuscated_accuracy", "deobfuscator_ssim"):
        assert 0.0 <= last[k] <= 1.0
    assert 3.0 < last["deobfuscator_psnr_db"] < 60.0
    assert is_done(obfuscator_run)
    assert nets.read_metadata(obfuscator_run / "obfuscator.safetensors")["arch"] == "codec"
    assert nets.read_metadata(obfuscator_run / "deobfuscator.safetensors")["epoch"] == "2"
    state = torch.load(obfuscator_run / "checkpoint.pt", weights_only=True)
    assert {"obfuscator", "deobfuscator", "optim_o", "optim_d"} <= set(state)


def test_evaluate_reproduces_the_logged_test_metrics(obfuscator_run):
    result = cli("evaluate", obfuscator_run, "--subset", "random:64", "--json")
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    assert scored["kind"] == "obfuscator" and scored["images"] == 64
    last = records(obfuscator_run)[-1]
    for k in EVAL_KEYS:
        assert scored[k] == pytest.approx(last[k], rel=1e-6, abs=1e-9), k


def test_classifier_stays_frozen_and_scores_come_from_the_test_split(tiny_classifier, cifar, tmp_path, monkeypatch):
    """Train against a test split of 64 identical black images: every test accuracy must then be 0 or 1
    exactly, and D's PSNR and SSIM those of black images; the real training images give neither."""
    loaded = {}

    def keep(run, device="cpu"):
        loaded["c"] = load(run, device)
        return loaded["c"]

    load = obf_mod.load_classifier
    monkeypatch.setattr(obf_mod, "load_classifier", keep)
    black = dataclasses.replace(cifar, x_test=np.zeros((64, 3, 32, 32), np.uint8), y_test=np.zeros(64, np.int64))
    cfg = ObfuscatorConfig(classifier=str(tiny_classifier), width=4, epochs=1, batch_size=64, subset="first:128",
                           test_subset="all")
    train_obfuscator(cfg, tmp_path / "o", data=black)

    c = loaded["c"]
    assert not c.training and not any(p.requires_grad for p in c.parameters())
    on_disk = load_file(str(tiny_classifier / "classifier.safetensors"))
    assert any("running_mean" in k for k in on_disk)
    after = c.state_dict()
    for k, v in on_disk.items():  # weights, BatchNorm running statistics and batch counters
        assert torch.equal(after[k].cpu(), v), k

    last = records(tmp_path / "o")[-1]
    for k in ("test_accuracy", "obfuscated_accuracy", "quantized_obfuscated_accuracy"):
        assert last[k] in (0.0, 1.0), (k, last[k])
    obf = nets.load(tmp_path / "o" / "obfuscator.safetensors", expect="codec")
    deobf = nets.load(tmp_path / "o" / "deobfuscator.safetensors", expect="codec")
    bf16 = use_bf16("auto", torch.device("cpu"))
    psnr, ssim = reconstruction_quality(deobf, obf, DeviceData(black.x_test, black.y_test), bf16=bf16)
    assert (last["deobfuscator_psnr_db"], last["deobfuscator_ssim"]) == pytest.approx((psnr, ssim), rel=1e-6)
    on_train = reconstruction_quality(deobf, obf, DeviceData(black.x_train[:64], black.y_train[:64]), bf16=bf16)
    assert on_train[0] != pytest.approx(psnr, abs=0.5)  # so the check above can tell the splits apart


def test_init_continues_from_an_obfuscator_run(obfuscator_run, tiny_classifier, cifar, tmp_path):
    cfg = ObfuscatorConfig(classifier=str(tiny_classifier), init=str(obfuscator_run), epochs=1, width=4, batch_size=64,
                          subset="first:128", lam=1.0, test_subset="random:64")
    train_obfuscator(cfg, tmp_path / "next", data=cifar)
    start = records(tmp_path / "next")[0]
    assert start["epoch"] == 0  # the starting point is scored before training goes on
    last = records(obfuscator_run)[-1]
    for k in EVAL_KEYS:
        assert start[k] == pytest.approx(last[k], rel=1e-6, abs=1e-9), k


def _wrong_arch_run(tmp_path):
    run = tmp_path / "not-a-classifier"
    run.mkdir()
    nets.save(nets.codec(4), run / "classifier.safetensors")
    return run


@pytest.mark.parametrize("make_args, message", [
    (lambda c, t: ["--classifier", t / "missing"], "does not exist"),
    (lambda c, t: ["--classifier", _wrong_arch_run(t)], "holds a codec, expected a resnet18"),
    (lambda c, t: ["--classifier", c, "--set", "no_such_key=1"], "unknown key no_such_key"),
    (lambda c, t: ["--classifier", c, "--lam", "-1"], "lam"),
    (lambda c, t: ["--classifier", c, "--recon-loss", "huber"], "recon_loss"),
    (lambda c, t: [], "classifier is required"),
])
def test_bad_input_is_one_line_and_exit_2(make_args, message, tiny_classifier, tmp_path):
    result = cli("train-obfuscator", "--out", tmp_path / "out", "--epochs", "1", *make_args(tiny_classifier, tmp_path))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out" / "checkpoint.pt").exists()
