"""Shared fixtures: the real CIFAR-10 (prepared once into the project's cache, loaded once per session) and
tiny real runs built on it. Helpers that are not fixtures live in helpers.py."""

from __future__ import annotations

import os

import pytest

from privoffload.config import ClassifierConfig
from privoffload.data import load_cifar10
from privoffload.train.classifier import train_classifier

from .helpers import cli

os.environ.setdefault("PRIVOFFLOAD_PROGRESS", "0")


@pytest.fixture(scope="session")
def cifar():
    """The whole data set as uint8 arrays (about 180 MB); tests cut their own small slices."""
    return load_cifar10()


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory, cifar):
    """A width-4 ResNet18 run, one epoch on 256 images: a real, if weak, cloud classifier."""
    out = tmp_path_factory.mktemp("classifier")
    cfg = ClassifierConfig(width=4, epochs=1, batch_size=64, subset="first:256", test_subset="random:64")
    train_classifier(cfg, out, data=cifar)
    return out


# the smoke-scale obfuscator run the tests share
OBF_ARGS = ("--subset", "first:128", "--epochs", "2", "--width", "4", "--batch-size", "64", "--lam", "1",
            "--set", 'test_subset="random:64"')


@pytest.fixture(scope="session")
def obfuscator_run(tmp_path_factory, tiny_classifier):
    """`privoffload train-obfuscator` at smoke scale, through the CLI."""
    out = tmp_path_factory.mktemp("obf") / "run"
    result = cli("train-obfuscator", "--classifier", tiny_classifier, "--out", out, *OBF_ARGS)
    assert result.exit_code == 0, result.output
    return out
