"""Shared fixtures: the real CIFAR-10 (prepared once into the project's cache), cut into small slices."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from privoffload.data import load_cifar10

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
