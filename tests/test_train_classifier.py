import json

import pytest
import torch

from privoffload.config import ClassifierConfig
from privoffload.train.classifier import train_classifier
from privoffload.runs import read_metrics

from .helpers import assert_user_error, cli, run_cli

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
    assert cli("train-classifier", "--out", out, "--epochs", "1", *SMALL).exit_code == 0
    for name in ("classifier.safetensors", "checkpoint.pt", "metrics.jsonl", "config.toml", "DONE"):
        assert (out / name).exists(), name
    done = run_cli("evaluate", out, "--json")  # as a user runs it: its own process, its output on stdout
    result = json.loads(done.stdout)
    assert result["images"] == 10000 and 0 <= result["test_accuracy"] <= 1
    # a second run into the same folder is refused unless resumed; a changed config is refused on resume
    assert_user_error(run_cli("train-classifier", "--out", out, "--epochs", "1", *SMALL, check=False), "--resume")
    assert_user_error(cli("train-classifier", "--out", out, "--epochs", "2", *SMALL, "--resume"), "differs")


def test_bad_input_gets_one_line(tmp_path):
    assert_user_error(cli("train-classifier", "--out", tmp_path / "a", "--set", "epochz=1"), "unknown key epochz")
    assert_user_error(cli("train-classifier", "--out", tmp_path / "a", "--precision", "fp64"), "precision")
    small = tmp_path / "w8"
    assert cli("train-classifier", "--out", small, "--epochs", "1", *SMALL).exit_code == 0
    # starting from a classifier of another width
    done = cli("train-classifier", "--out", tmp_path / "w16", "--epochs", "1", *SMALL[:2], "--width", "16", "--init", small)
    assert_user_error(done, "does not fit")
    # a checkpoint from another architecture dropped into a run folder
    other = tmp_path / "other"
    other.mkdir()
    (other / "checkpoint.pt").write_bytes((small / "checkpoint.pt").read_bytes())
    done = cli("train-classifier", "--out", other, "--epochs", "1", *SMALL[:2], "--width", "16", "--resume")
    assert_user_error(done, "checkpoint.pt is for")


def test_schedule_warms_up_then_decays_to_zero():
    from privoffload.config import OptimConfig
    from privoffload.train.loop import make_schedule

    def rates(schedule: str, warmup: float) -> list[float]:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        sched = make_schedule(opt, OptimConfig(lr=1.0, schedule=schedule, warmup_epochs=warmup), steps_per_epoch=4, epochs=2)
        out = []
        for _ in range(8):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    assert rates("linear", 0.5) == pytest.approx([0.5, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert rates("constant", 0.0) == [1.0] * 8
    cosine = rates("cosine", 0.0)
    assert cosine[0] == 1.0 and cosine[4] == pytest.approx(0.5) and all(a > b for a, b in zip(cosine, cosine[1:]))
