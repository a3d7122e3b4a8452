"""What several test files need: the CLI as a user runs it, a kill at a checkpoint, free ports, small real networks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from privoffload import nets
from privoffload.cli import app

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"PRIVOFFLOAD_PROGRESS": "0"}


def run_cli(*args, timeout: float = 300, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m privoffload ARGS` as a user would, capturing its output."""
    done = subprocess.run([sys.executable, "-m", "privoffload", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **QUIET, **(env or {})}, cwd=ROOT)
    if check and done.returncode != 0:
        raise AssertionError(f"privoffload {' '.join(map(str, args))} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done


def kill_at_checkpoint(*args, folder: Path, timeout: float = 120) -> None:
    """Start `privoffload ARGS` and SIGKILL it, with every process it started, as soon as `folder/checkpoint.pt`
    appears (a finished epoch)."""
    proc = subprocess.Popen([sys.executable, "-m", "privoffload", *map(str, args)], cwd=ROOT, env={**os.environ, **QUIET},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not (folder / "checkpoint.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def assert_user_error(done, *words: str) -> None:
    """Exit 2, one line on stderr that starts with 'error:', no traceback, and the given words. `done` is a finished
    process (run_cli) or an in-process result (cli): the same contract either way."""
    code = done.returncode if hasattr(done, "returncode") else done.exit_code
    assert code == 2, (code, done.stderr)
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert "Traceback" not in done.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def cli(*args):
    """Run the `privoffload` command in this process; returns click's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def calibrated(net: torch.nn.Module, images: np.ndarray) -> torch.nn.Module:
    """An untrained network whose BatchNorm statistics are measured on real images (no weight updates):
    random but input-dependent outputs, unlike a fresh network whose BatchNorms flatten everything."""
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        net(torch.from_numpy(images).float() / 255)
    return net.eval()


def fit_head(net: torch.nn.Module, images: np.ndarray, labels: np.ndarray, ridge: float = 1e-3) -> torch.nn.Module:
    """Fit the classifier's last layer by ridge regression on its features of `images` (a linear probe):
    a few seconds instead of a training run, and predictions that differ from image to image."""
    fc, net.fc = net.fc, torch.nn.Identity()
    with torch.no_grad():
        feats = net(torch.from_numpy(images).float() / 255).double()
        feats = torch.cat([feats, torch.ones(len(feats), 1, dtype=torch.float64)], 1)
        target = F.one_hot(torch.from_numpy(labels), 10).double()
        w = torch.linalg.solve(feats.T @ feats + ridge * torch.eye(feats.shape[1], dtype=torch.float64), feats.T @ target)
        fc.weight.copy_(w[:-1].T.float())
        fc.bias.copy_(w[-1].float())
    net.fc = fc
    return net


def fitted_classifier(images: np.ndarray, labels: np.ndarray, seed: int, width: int = 8) -> torch.nn.Module:
    """A small classifier that really classifies `images`: BatchNorm measured on them, last layer by least squares."""
    torch.manual_seed(seed)
    return fit_head(calibrated(nets.resnet18(width), images), images, labels, ridge=1e-2).eval()
