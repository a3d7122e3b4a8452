"""Resume with teeth: every trainer, SIGKILLed after a checkpoint, continues from that checkpoint (it does not
start over, and it leaves the finished epochs' records alone) and ends bit-identical to an uninterrupted run. The
kill may land between an epoch's metrics record and its checkpoint: that stale record is dropped on resume."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from privoffload.runs import is_done, read_metrics

from .helpers import kill_at_checkpoint, run_cli

pytestmark = pytest.mark.slow  # trainers killed and resumed in subprocesses: tens of seconds

EPOCHS = 3
COMMON = ("--subset", "first:256", "--batch-size", "64", "--epochs", str(EPOCHS), "--set", 'test_subset="random:128"',
          "--set", "eval_every=1")
TRAINERS = {  # kind -> (command line given the tiny classifier and obfuscator runs, weights files)
    "classifier": (lambda c, o: ["train-classifier", "--width", "8", *COMMON], ["classifier"]),
    "obfuscator": (lambda c, o: ["train-obfuscator", "--classifier", c, "--width", "4", "--lam", "1", *COMMON],
                   ["obfuscator", "deobfuscator"]),
    "attack": (lambda c, o: ["attack", "--obfuscator", o, "--arch", "codec", "--width", "4", *COMMON,
                             "--set", "val_split=0.25", "--set", "patience=0"], ["attacker"]),
}
TIMING = ("time_s", "images_per_s", "eval_time_s", "val_time_s")


def lines_up_to(run, epoch: int) -> list[str]:
    return [line for line in (run / "metrics.jsonl").read_text().splitlines() if json.loads(line)["epoch"] <= epoch]


@pytest.mark.parametrize("kind", TRAINERS)
def test_a_killed_run_continues_from_its_checkpoint(kind, tiny_classifier, obfuscator_run, tmp_path):
    command, weights = TRAINERS[kind]
    args = command(tiny_classifier, obfuscator_run)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_cli(*args, "--out", whole)

    kill_at_checkpoint(*args, "--out", killed, folder=killed)
    done = torch.load(killed / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= done < EPOCHS and not is_done(killed), done
    kept = lines_up_to(killed, done)
    assert len(kept) == done
    with open(killed / "metrics.jsonl", "a") as f:  # killed after logging the next epoch, before its checkpoint
        f.write(json.dumps({"stage": "stale", "epoch": done + 1}) + "\n")

    resumed = run_cli(*args, "--out", killed, "--resume").stdout
    trained = re.findall(rf"epoch (\d+)/{EPOCHS}", resumed)
    assert trained == [str(e) for e in range(done + 1, EPOCHS + 1)], resumed  # only the remaining epochs ran
    assert lines_up_to(killed, done) == kept  # the finished epochs' records, byte for byte (their times too)
    for name in weights:
        a, b = load_file(str(whole / f"{name}.safetensors")), load_file(str(killed / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    untimed = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    assert untimed(read_metrics(killed)) == untimed(read_metrics(whole))  # one record an epoch: the stale one is gone
    assert is_done(killed)
