"""The fresh attacker at smoke scale, the U-Net, Fig. 4's grid, and the attack's mistakes."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from .helpers import cli, records

from privoffload import nets
from privoffload.config import AttackConfig
from privoffload.data import DeviceData
from privoffload.privacy.attack import train_attack
from privoffload.privacy.samples import sample_rows
from privoffload.metrics import reconstruction_quality
from privoffload.runs import is_done
from privoffload.runtime import use_bf16

ATTACK_ARGS = ("--arch", "unet", "--width", "4", "--subset", "first:192", "--epochs", "2", "--batch-size", "64",
               "--set", 'test_subset="random:64"', "--set", "val_split=0.34", "--set", "patience=0")


@pytest.fixture(scope="module")
def attack_run(obfuscator_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("attack") / "run"
    result = cli("attack", "--obfuscator", obfuscator_run, "--out", out, *ATTACK_ARGS)
    assert result.exit_code == 0, result.output
    return out


def test_attack_cli_logs_privacy_metrics(attack_run):
    recs = records(attack_run)
    assert [r["epoch"] for r in recs] == [1, 2]
    last = recs[-1]
    assert 3.0 < last["attacker_psnr_db"] < 60.0 and 0.0 <= last["attacker_ssim"] <= 1.0
    assert all(np.isfinite(r[k]) for r in recs for k in ("train_reconstruction_loss", "time_s", "images_per_s"))
    assert nets.read_metadata(attack_run / "attacker.safetensors")["arch"] == "unet"
    assert is_done(attack_run)
    result = cli("evaluate", attack_run, "--subset", "random:64", "--json")
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    assert scored["kind"] == "attacker"
    assert scored["attacker_psnr_db"] == pytest.approx(last["attacker_psnr_db"], rel=1e-6)
    assert scored["attacker_ssim"] == pytest.approx(last["attacker_ssim"], rel=1e-6)


def test_attacker_trains_on_train_split_and_scores_on_test_split(obfuscator_run, cifar, tmp_path):
    """Test split = 64 black images: the logged PSNR must be that of black images, not of training images."""
    black = dataclasses.replace(cifar, x_test=np.zeros((64, 3, 32, 32), np.uint8), y_test=np.zeros(64, np.int64))
    cfg = AttackConfig(obfuscator=str(obfuscator_run), arch="codec", width=4, epochs=2, batch_size=64,
                       subset="first:128", test_subset="all", val_split=0, patience=0)
    train_attack(cfg, tmp_path / "straight", data=black)
    last = records(tmp_path / "straight")[-1]
    assert last["converged"] is False  # no validation split: nothing says it converged
    attacker = nets.load(tmp_path / "straight" / "attacker.safetensors", expect="codec")
    obf = nets.load(obfuscator_run / "obfuscator.safetensors", expect="codec")
    bf16 = use_bf16("auto", torch.device("cpu"))
    psnr, ssim = reconstruction_quality(attacker, obf, DeviceData(black.x_test, black.y_test), bf16=bf16)
    assert (last["attacker_psnr_db"], last["attacker_ssim"]) == pytest.approx((psnr, ssim), rel=1e-3)
    on_train = reconstruction_quality(attacker, obf, DeviceData(black.x_train[:64], black.y_train[:64]), bf16=bf16)
    assert on_train[0] != pytest.approx(psnr, abs=0.5)


def test_samples_figure(obfuscator_run, attack_run, tmp_path):
    out = tmp_path / "fig4.png"
    result = cli("samples", "--obfuscator", obfuscator_run, "--attack", attack_run, "--out", out, "--n", "4")
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_unet_is_an_image_to_image_net_and_round_trips(tmp_path):
    net = nets.build("unet", 4).eval()
    x = torch.rand(2, 3, 32, 32)
    y = net(x)
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    nets.save(net, tmp_path / "u.safetensors")
    back = nets.load(tmp_path / "u.safetensors", expect="unet").eval()
    assert nets.arch_of(back) == {"arch": "unet", "width": 4}
    assert torch.equal(back(x), y)


def weights_only(obfuscator_run, tmp_path):
    """An obfuscator folder with O's weights but no config.toml: its recipe is unknown."""
    (tmp_path / "bare").mkdir()
    shutil.copy(obfuscator_run / "obfuscator.safetensors", tmp_path / "bare")
    return tmp_path / "bare"


@pytest.mark.parametrize("make_args, message", [
    (lambda o, t: ["--obfuscator", t / "missing"], "does not exist"),
    (lambda o, t: ["--obfuscator", t], "has no obfuscator.safetensors"),
    (lambda o, t: ["--obfuscator", o, "--arch", "resnet18"], "arch"),
    (lambda o, t: ["--obfuscator", o, "--set", "optim.nope=1"], "unknown key optim.nope"),
    (lambda o, t: ["--obfuscator", o, "--kind", "nope"], "--kind 'nope' is not one of decoder, inversion, adaptive"),
    (lambda o, t: ["--obfuscator", o, "--kind", "inversion", "--arch", "unet"], "--arch does not apply to --kind inversion"),
    (lambda o, t: ["--obfuscator", o, "--kind", "decoder", "--steps", "3"], "--steps does not apply to --kind decoder"),
    (lambda o, t: ["--obfuscator", o, "--subset", "first:100", "--set", "val_split=0.999"],
     "validation split of 0.999 leaves none of the 100 images"),
    (lambda o, t: ["--obfuscator", o, "--set", "val_split=0"], "patience needs a validation split"),
    (lambda o, t: ["--obfuscator", o, "--arch", "codec", "--set", "answer=true"], "answer = true needs arch"),
    (lambda o, t: ["--obfuscator", o, "--kind", "inversion", "--set", 'start="decoder"'], "needs decoder = an attack run"),
    (lambda o, t: ["--obfuscator", weights_only(o, t), "--kind", "adaptive"], "needs O's training recipe"),
])
def test_attack_bad_input_is_one_line_and_exit_2(make_args, message, obfuscator_run, tmp_path):
    result = cli("attack", "--out", tmp_path / "out", *make_args(obfuscator_run, tmp_path))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.output


def test_fig4_shows_one_image_per_class_and_the_8_bit_upload(obfuscator_run, cifar):
    """Whatever the order of the test split, the columns are one image of each class, and the upload row is what
    the cloud receives: O(x) rounded to 8-bit pixels."""
    order = np.random.default_rng(0).permutation(len(cifar.y_test))
    shuffled = dataclasses.replace(cifar, x_test=cifar.x_test[order], y_test=cifar.y_test[order])
    rows = sample_rows(obfuscator_run, n=10, data=shuffled, device="cpu")
    originals = (rows["original"] * 255).round().to(torch.uint8).numpy()
    picked = [int(np.flatnonzero((shuffled.x_test == img).all(axis=(1, 2, 3)))[0]) for img in originals]
    assert sorted(shuffled.y_test[picked].tolist()) == list(range(10))
    upload = rows["uploaded\n(8-bit O(x))"]
    assert torch.equal(upload * 255, (upload * 255).round())  # 8-bit pixels
    obf = nets.load(obfuscator_run / "obfuscator.safetensors").eval()
    with torch.no_grad():
        assert torch.allclose(upload, torch.round(obf(rows["original"]).clamp(0, 1) * 255) / 255, atol=1 / 255 + 1e-6)
