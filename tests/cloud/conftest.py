"""Fixtures of the service tests (helpers live in cloud_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .cloud_helpers import calibrated, fit_head, key_pair, make_repo, serve
from privoffload import nets


@pytest.fixture(scope="session")
def weights(tmp_path_factory, cifar) -> dict[str, Path]:
    """Files: three classifier versions (different seeds), an obfuscator, a classifier of another width."""
    folder = tmp_path_factory.mktemp("weights")
    calib = cifar.x_train[:64]
    out = {}
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        out[f"c{seed}"] = folder / f"classifier{seed}.safetensors"
        nets.save(calibrated(nets.resnet18(8), calib), out[f"c{seed}"])
    torch.manual_seed(0)
    out["obfuscator"] = folder / "obfuscator.safetensors"
    nets.save(calibrated(nets.codec(8), calib), out["obfuscator"])
    out["wide"] = folder / "wide.safetensors"
    nets.save(nets.resnet18(16), out["wide"])
    out["fitted"] = folder / "fitted.safetensors"
    obfuscator = nets.load(out["obfuscator"]).eval()
    with torch.no_grad():
        obfuscated = torch.round(obfuscator(torch.from_numpy(cifar.x_train[:300]).float() / 255) * 255).to(torch.uint8)
    nets.save(fit_head(nets.load(out["c1"]).eval(), obfuscated.numpy(), cifar.y_train[:300]), out["fitted"])
    return out


@pytest.fixture(scope="module")
def live(tmp_path_factory, weights):
    """One server for a module's read-mostly tests: versions 1 and 2, version 2 serving, weights published."""
    repo = make_repo(tmp_path_factory.mktemp("repo"), [weights["c1"], weights["c2"]])
    with serve(repo, serve_weights=True, max_body_mb=1.0) as server:
        server.repo = repo
        yield server


@pytest.fixture(scope="session")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    """The publisher's key pair: (private PEM, public PEM)."""
    return key_pair(tmp_path_factory.mktemp("keys"))
