"""Local differential privacy of the uploads: the calibration is the analytic Gaussian mechanism's, the noise has
the variance it was calibrated to, clipping bounds the sensitivity, and epsilon = inf is exactly today's path."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from privoffload import ldp
from privoffload.client import Client, load_obfuscator, quantize
from privoffload.errors import UserError

from .helpers import cli


def balle_wang_delta(sigma: float, epsilon: float, sensitivity: float) -> float:
    """Theorem 8 of Balle & Wang (2018): the exact delta of the Gaussian mechanism at epsilon."""
    a, b = sensitivity / (2 * sigma), epsilon * sigma / sensitivity
    return norm.cdf(a - b) - math.exp(epsilon) * norm.cdf(-a - b)


@pytest.mark.parametrize("epsilon, delta", [(1.0, 1e-5), (4.0, 1e-5), (16.0, 1e-6), (0.5, 1e-3)])
def test_sigma_is_the_smallest_that_meets_the_exact_condition(epsilon, delta):
    mech = ldp.mechanism(epsilon, delta, (1, 32, 32), clip=3.0)
    assert mech.sensitivity == 6.0
    assert balle_wang_delta(mech.sigma, epsilon, mech.sensitivity) == pytest.approx(delta, rel=1e-6)
    assert balle_wang_delta(0.99 * mech.sigma, epsilon, mech.sensitivity) > delta  # no smaller sigma would do
    # the classical bound sqrt(2 ln(1.25/delta)) / epsilon (valid for epsilon < 1) is never tighter
    if epsilon < 1:
        assert mech.sigma < math.sqrt(2 * math.log(1.25 / delta)) / epsilon * mech.sensitivity


def test_composition_of_uploads_agrees_with_the_pld_accountant():
    """k uploads of one image: epsilon from the Gaussian's exact composition and from the PLD accountant."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    mech = ldp.mechanism(2.0, 1e-5, (3, 32, 32))
    for k in (1, 10):
        acc = pld_privacy_accountant.PLDAccountant()
        acc.compose(dp_accounting.GaussianDpEvent(mech.sigma / mech.sensitivity), k)
        assert mech.epsilon_after(k) == pytest.approx(acc.get_epsilon(1e-5), rel=2e-3)
    assert mech.epsilon_after(1) == pytest.approx(2.0, rel=1e-6) and mech.epsilon_after(10) > 2.0


def test_noise_has_the_calibrated_variance_and_clipping_bounds_the_sensitivity():
    shape = (1, 32, 32)
    mech = ldp.mechanism(8.0, 1e-5, shape, clip=4.0)
    z = torch.full((1000, *shape), 0.5)  # at the centre: nothing to clip
    z[:, 0, 0, 0] = 0.6
    noise = (mech(z, torch.Generator().manual_seed(0)) - z).double()
    n = noise.numel()
    assert noise.mean().abs() < 4 * mech.sigma / math.sqrt(n)
    # the sample variance of n Gaussian draws has relative standard error sqrt(2/n) (0.14 % here): 5 of them
    assert noise.var().item() == pytest.approx(mech.sigma ** 2, rel=5 * math.sqrt(2 / n))
    far = torch.rand(64, *shape)  # norms around 9 around mid-grey: clipped to 4
    clipped = mech.clip_upload(far) - 0.5
    assert torch.all(clipped.flatten(1).norm(dim=1) <= 4.0 + 1e-4)
    inside = 0.5 + 0.01 * (far - 0.5)
    assert torch.allclose(mech.clip_upload(inside), inside)
    default = ldp.mechanism(8.0, 1e-5, shape)  # the whole pixel cube: sensitivity = its diameter
    assert default.sensitivity == pytest.approx(math.sqrt(1024))
    assert torch.allclose(default.clip_upload(far), far)


def test_settings_are_checked():
    assert ldp.mechanism(math.inf, 1e-5, (3, 32, 32)) is None
    for bad in ((0.0, 1e-5), (1.0, 0.0), (1.0, 1.0), (-1.0, 1e-5)):
        with pytest.raises(UserError, match="local DP needs"):
            ldp.mechanism(*bad, (3, 32, 32))


def test_infinite_epsilon_uploads_exactly_todays_pixels(obfuscator_run, cifar):
    """The client with epsilon = inf uploads bit for bit what it uploaded before local DP existed; a finite epsilon
    changes the upload, differently each call (fresh noise from the OS)."""
    obfuscate = load_obfuscator(obfuscator_run)
    images = cifar.x_test[:16]
    today = quantize(obfuscate(images))
    plain = Client("http://127.0.0.1:9", obfuscate, ldp_epsilon=math.inf)
    assert plain.noise is None and np.array_equal(quantize(plain.upload(images)), today)
    noisy = Client("http://127.0.0.1:9", obfuscate, ldp_epsilon=64.0, ldp_delta=1e-5)
    first, second = quantize(noisy.upload(images)), quantize(noisy.upload(images))
    assert first.dtype == np.uint8 and not np.array_equal(first, today) and not np.array_equal(first, second)
    for c in (plain, noisy):
        c.close()


def test_evaluate_and_sweep_write_epsilon_and_delta(obfuscator_run, tmp_path):
    result = cli("evaluate", obfuscator_run, "--subset", "random:64", "--ldp-epsilon", "16", "--ldp-delta", "1e-6",
                 "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert scores["ldp_epsilon"] == 16 and scores["ldp_delta"] == 1e-6 and scores["ldp_sigma"] > 0
    plain = json.loads(cli("evaluate", obfuscator_run, "--subset", "random:64", "--device", "cpu", "--json").output)
    assert "ldp_epsilon" not in plain

    result = cli("sweep-epsilon", "--obfuscator", obfuscator_run, "--out", tmp_path / "eps", "--epsilons", "4,inf",
                 "--attack-epochs", "1", "--attack-width", "4", "--attack-arch", "codec", "--attack-subset", "first:64",
                 "--set", 'test_subset="random:64"', "--set", "attack.batch_size=32", "--set", "attack.val_split=0.25", "--set",
                 'attack.test_subset="random:64"', "--device", "cpu")
    assert result.exit_code == 0, result.output
    table = (tmp_path / "eps" / "epsilon.md").read_text()
    assert "| 4 | 1e-05 |" in table and "| inf | 1e-05 | 0 |" in table
    points = json.loads((tmp_path / "eps" / "epsilon.json").read_text())
    assert [p["epsilon"] for p in points] == ["4", "inf"] and points[0]["sigma"] > 0
    assert (tmp_path / "eps" / "epsilon.png").stat().st_size > 0
    attack = (tmp_path / "eps" / "eps-4" / "metrics.jsonl").read_text().splitlines()[-1]
    assert '"ldp_epsilon": 4.0' in attack and '"ldp_delta": 1e-05' in attack
