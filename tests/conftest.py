"""Shared fixtures: the real CIFAR-10 (prepared once into the project's cache), tiny real runs built
on it, and two ways to run the CLI (a real subprocess, or in this process for speed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from privoffload.cli import app
from privoffload.config import ClassifierConfig
from privoffload.data import load_cifar10
from privoffload.train.classifier import train_classifier

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PRIVOFFLOAD_PROGRESS", "0")


@pytest.fixture(scope="session")
def cifar():
    """The whole data set as uint8 arrays (about 180 MB); tests cut their own small slices."""
    return load_cifar10()


def run_cli(*args: str, timeout: float = 300, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m privoffload ARGS` as a user would, capturing its output."""
    done = subprocess.run([sys.executable, "-m", "privoffload", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT)
    if check and done.returncode != 0:
        raise AssertionError(f"privoffload {' '.join(map(str, args))} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done


def assert_user_error(done: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2, one line on stderr that starts with 'error:', no traceback, and the given words."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert "Traceback" not in done.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def cli(*args: str):
    """Run the `privoffload` command in this process; returns click's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory, cifar):
    """A width-4 ResNet18 run, one epoch on 256 images: a real, if weak, cloud classifier."""
    out = tmp_path_factory.mktemp("classifier")
    cfg = ClassifierConfig(width=4, epochs=1, batch_size=64, subset="first:256", test_subset="random:64")
    train_classifier(cfg, out, data=cifar)
    return out
# the smoke-scale obfuscator run the tests share (and the resume test repeats in pieces)
OBF_ARGS = ("--subset", "first:128", "--epochs", "2", "--width", "4", "--batch-size", "64", "--lam", "1",
            "--set", 'test_subset="random:64"')


@pytest.fixture(scope="session")
def obfuscator_run(tmp_path_factory, tiny_classifier):
    """`privoffload train-obfuscator` at smoke scale, through the CLI."""
    out = tmp_path_factory.mktemp("obf") / "run"
    result = cli("train-obfuscator", "--classifier", tiny_classifier, "--out", out, *OBF_ARGS)
    assert result.exit_code == 0, result.output
    return out
