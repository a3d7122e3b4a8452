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
from privoffload.metrics import reconstruction_quality
from privoffload.runs import is_done
from privoffload.runtime import use_bf16
from privoffload.train.loop import Progress

ATTACK_ARGS = ("--arch", "unet", "--width", "4", "--subset", "first:192", "--epochs", "2", "--batch-size", "64",
               "--set", 'test_subset="random:64"', "--set", "val_images=64", "--set", "patience=0")


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


def test_attacker_trains_on_train_split_scores_on_test_split_and_resumes(obfuscator_run, cifar, tmp_path, monkeypatch):
    """Test split = 64 black images: the logged PSNR must be that of black images. An interrupted
    attack resumed must end with the weights of one run straight through."""
    black = dataclasses.replace(cifar, x_test=np.zeros((64, 3, 32, 32), np.uint8), y_test=np.zeros(64, np.int64))
    cfg = AttackConfig(obfuscator=str(obfuscator_run), arch="codec", width=4, epochs=2, batch_size=64,
                       subset="first:128", test_subset="all", val_images=0, patience=0)
    train_attack(cfg, tmp_path / "straight", data=black)

    line = Progress.line

    def stop_after_first_epoch(self, epoch, text):
        line(self, epoch, text)
        raise KeyboardInterrupt

    monkeypatch.setattr(Progress, "line", stop_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_attack(cfg, tmp_path / "resumed", data=black)
    monkeypatch.setattr(Progress, "line", line)
    train_attack(cfg, tmp_path / "resumed", resume=True, data=black)

    last = records(tmp_path / "straight")[-1]
    attacker = nets.load(tmp_path / "straight" / "attacker.safetensors", expect="codec")
    obf = nets.load(obfuscator_run / "obfuscator.safetensors", expect="codec")
    bf16 = use_bf16("auto", torch.device("cpu"))
    psnr, ssim = reconstruction_quality(attacker, obf, DeviceData(black.x_test, black.y_test), bf16=bf16)
    assert (last["attacker_psnr_db"], last["attacker_ssim"]) == pytest.approx((psnr, ssim), rel=1e-6)
    on_train = reconstruction_quality(attacker, obf, DeviceData(black.x_train[:64], black.y_train[:64]), bf16=bf16)
    assert on_train[0] != pytest.approx(psnr, abs=0.5)
    resumed = nets.load(tmp_path / "resumed" / "attacker.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(attacker.state_dict().values(), resumed.state_dict().values()))
    assert [r["epoch"] for r in records(tmp_path / "resumed")] == [1, 2]
    assert records(tmp_path / "resumed")[-1]["attacker_psnr_db"] == last["attacker_psnr_db"]


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
    (lambda o, t: ["--obfuscator", o, "--subset", "first:100"], "validation split of 1000 images leaves none"),
    (lambda o, t: ["--obfuscator", o, "--set", "val_images=0"], "patience needs a validation split"),
    (lambda o, t: ["--obfuscator", o, "--kind", "inversion", "--set", 'start="decoder"'], "needs decoder = an attack run"),
    (lambda o, t: ["--obfuscator", weights_only(o, t), "--kind", "adaptive"], "needs O's training recipe"),
])
def test_attack_bad_input_is_one_line_and_exit_2(make_args, message, obfuscator_run, tmp_path):
    result = cli("attack", "--out", tmp_path / "out", *make_args(obfuscator_run, tmp_path))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.output
