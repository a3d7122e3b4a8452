"""DDP under torchrun: 2 CPU processes (gloo) train a classifier, are killed, and resume exactly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from privoffload.data import DeviceData
from privoffload.runs import read_metrics

from .helpers import free_port

pytestmark = pytest.mark.slow  # two torchrun ranks, killed and resumed: tens of seconds

TIMING = ("time_s", "images_per_s", "eval_time_s")


def test_ranks_together_see_exactly_one_process_batches():
    """Each rank takes its stride of the same permutation and flips: their union is the batch one
    process would see, image for image (so N ranks with batch B/N train on the same data as 1 with B)."""
    rng = np.random.default_rng(0)
    data = DeviceData(rng.integers(0, 256, (100, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 100))
    kw = dict(shuffle=True, flip_images=True, seed=7, drop_last=True)
    whole = list(data.batches(20, **kw))
    ranks = [list(data.batches(10, rank=r, world=2, **kw)) for r in range(2)]
    assert len(whole) == len(ranks[0]) == len(ranks[1]) == 5
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *ranks):
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)
        assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)


def torchrun(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "privoffload", "train-classifier", "--out", str(out),
           "--subset", "first:1024", "--epochs", "4", "--width", "8", "--batch-size", "128", "--flip", "--device", "cpu",
           "--precision", "fp32", "--set", "test_subset=random:256", "--set", "eval_every=2", *extra]
    env = {**os.environ, "PRIVOFFLOAD_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def children(pid: int) -> list[int]:
    """The processes `pid` started (torchrun puts its ranks in process groups of their own)."""
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    return out


def test_torchrun_two_ranks_train_and_resume_exactly_after_a_kill(tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"

    log = finish(torchrun(whole))
    records = read_metrics(whole)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]  # one line per epoch: only rank 0 writes
    assert log.count("classifier epoch 4/4") == 1  # only rank 0 prints
    assert records[-1]["train_loss"] < records[0]["train_loss"]  # it learns
    assert 0.1 < records[-1]["test_accuracy"] <= 1  # reduced over both ranks' halves of the 256 images
    assert (whole / "DONE").exists() and (whole / "classifier.safetensors").exists()

    # kill both ranks once the first epoch's checkpoint is on disk
    proc = torchrun(broken)
    deadline = time.monotonic() + 90
    while not (broken / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    ranks = children(proc.pid)
    assert len(ranks) == 2
    for pid in ranks:  # both ranks die at once, without any cleanup
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not (broken / "DONE").exists(), "the run finished before it could be killed"
    assert len(read_metrics(broken)) < 4
    done = torch.load(broken / "checkpoint.pt", weights_only=True)["epoch"]  # epochs the checkpoint holds
    kept = [line for line in (broken / "metrics.jsonl").read_text().splitlines() if json.loads(line)["epoch"] <= done]

    log = finish(torchrun(broken, "--resume"))
    assert re.findall(r"classifier epoch (\d)/4", log) == [str(e) for e in range(done + 1, 5)]  # only the rest is trained
    assert (broken / "metrics.jsonl").read_text().splitlines()[:done] == kept  # finished epochs' records untouched
    resumed = read_metrics(broken)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    assert strip(resumed) == strip(records)  # the same losses and accuracies, epoch for epoch
    a, b = load_file(str(whole / "classifier.safetensors")), load_file(str(broken / "classifier.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
