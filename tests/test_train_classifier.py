import json
import os
import signal
import subprocess
import sys
import time

from safetensors.torch import load_file

from privoffload.config import ClassifierConfig
from privoffload.train.classifier import train_classifier
from privoffload.train.common import read_metrics

from .conftest import ROOT, assert_user_error, run_cli

SMALL = ["--subset", "first:256", "--width", "8", "--batch-size", "64", "--set", "test_subset=\"random:200\""]


def test_short_training_lowers_the_loss(cifar, tmp_path):
    cfg = ClassifierConfig(width=8, epochs=4, batch_size=64, subset="first:1024", test_subset="random:1000", eval_every=2)
    cfg.optim.lr = 0.05
    train_classifier(cfg, tmp_path / "run", data=cifar)
    m = read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in m] == [1, 2, 3, 4]
    assert m[-1]["train_loss"] < m[0]["train_loss"] - 0.1
    assert "test_accuracy" in m[1] and "test_accuracy" in m[3] and "test_accuracy" not in m[0]
    assert m[-1]["test_accuracy"] > 0.15  # better than chance (0.10) on held-out images


def test_cli_run_writes_everything_and_evaluates(tmp_path):
    out = tmp_path / "run"
    run_cli("train-classifier", "--out", out, "--epochs", "1", *SMALL)
    for name in ("classifier.safetensors", "checkpoint.pt", "metrics.jsonl", "config.toml", "DONE"):
        assert (out / name).exists(), name
    done = run_cli("evaluate", out, "--json")
    result = json.loads(done.stdout)
    assert result["images"] == 10000 and 0 <= result["test_accuracy"] <= 1
    # a second run into the same folder is refused unless resumed; a changed config is refused on resume
    assert_user_error(run_cli("train-classifier", "--out", out, "--epochs", "1", *SMALL, check=False), "--resume")
    assert_user_error(run_cli("train-classifier", "--out", out, "--epochs", "2", *SMALL, "--resume", check=False), "differs")


def test_bad_input_gets_one_line(tmp_path):
    assert_user_error(run_cli("train-classifier", "--out", tmp_path / "a", "--set", "epochz=1", check=False), "unknown key epochz")
    assert_user_error(run_cli("train-classifier", "--out", tmp_path / "a", "--precision", "fp64", check=False), "precision")
    small = tmp_path / "w8"
    run_cli("train-classifier", "--out", small, "--epochs", "1", *SMALL)
    # starting from a classifier of another width
    done = run_cli("train-classifier", "--out", tmp_path / "w16", "--epochs", "1", *SMALL[:2], "--width", "16", "--init", small, check=False)
    assert_user_error(done, "does not fit")
    # a checkpoint from another architecture dropped into a run folder
    other = tmp_path / "other"
    other.mkdir()
    (other / "checkpoint.pt").write_bytes((small / "checkpoint.pt").read_bytes())
    done = run_cli("train-classifier", "--out", other, "--epochs", "1", *SMALL[:2], "--width", "16", "--resume", check=False)
    assert_user_error(done, "checkpoint.pt is for")


def test_killed_and_resumed_run_matches_an_uninterrupted_one(tmp_path):
    # 512 images, so that an epoch lasts long enough (a few tenths of a second) for the kill to land inside one
    args = ["train-classifier", "--epochs", "3", *SMALL, "--subset", "first:512", "--set", "eval_every=1"]
    run_cli(*args, "--out", tmp_path / "whole")

    killed = tmp_path / "killed"
    env = {**os.environ, "PRIVOFFLOAD_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "privoffload", *args, "--out", str(killed)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoint.pt").exists():  # epoch 1 is done: the kill lands in epoch 2
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.02)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "DONE").exists()

    run_cli(*args, "--out", killed, "--resume")
    a, b = load_file(str(tmp_path / "whole" / "classifier.safetensors")), load_file(str(killed / "classifier.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert [r["epoch"] for r in read_metrics(killed)] == [1, 2, 3]
    assert read_metrics(killed)[-1]["test_accuracy"] == read_metrics(tmp_path / "whole")[-1]["test_accuracy"]
