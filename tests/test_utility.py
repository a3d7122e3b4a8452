"""The utility-first recipe's mechanics and `sweep-utility`, at smoke scale on real CIFAR-10 slices: lam stays 0 until
the gate opens, D starts afresh on schedule without touching O, distillation reads the frozen C on the clean image,
the sweep resumes and reuses finished points, and bad input is one line."""

from __future__ import annotations

import json

import pytest
import torch

from privoffload.config import ObfuscatorConfig
from privoffload.data import mirror
from privoffload.train import obfuscator as obf_mod
from privoffload.train.game import UtilityGate
from privoffload.train.loop import Context
from privoffload.train.obfuscator import ObfuscatorTask, train_obfuscator

from .helpers import cli, records

SMALL = dict(width=4, batch_size=64, subset="first:128", test_subset="random:64", eval_every=100)
VAL = "range:49000:49064"


def task_for(classifier, cifar, tmp_path, **settings) -> ObfuscatorTask:
    cfg = ObfuscatorConfig(classifier=str(classifier), **{**SMALL, **settings})
    cfg.validate()
    return ObfuscatorTask(Context.open(cfg, tmp_path / "run", data=cifar, val_subset=cfg.val_subset))


def test_gate_holds_lam_at_zero_until_the_target_then_ramps_and_holds_utility():
    gate = UtilityGate(4.0, target=0.9, ramp_steps=4)
    assert [gate.lam() for _ in range(3)] == [0.0] * 3
    gate.update(1, 0.85)  # below the target: still closed
    assert not gate.open and gate.lam() == 0.0
    gate.update(2, 0.91)  # reached: lam rises over 4 steps
    assert gate.open and [gate.lam() for _ in range(5)] == [1.0, 2.0, 3.0, 4.0, 4.0]
    gate.update(3, 0.80)  # utility fell below the target: lam halves, and doubles back once it is met again
    assert gate.lam() == 2.0
    gate.update(4, 0.95)
    assert gate.lam() == 4.0

    plateau = UtilityGate(1.0, patience=2)  # no target: the gate opens once utility stops improving
    for epoch, u in enumerate([0.5, 0.6, 0.6, 0.59], 1):
        assert plateau.lam() == 0.0
        plateau.update(epoch, u)
    assert plateau.open and plateau.lam() == 1.0 and not plateau.stop
    stopping = UtilityGate(0.0, patience=1)  # lam = 0: no gate; a plateau ends training
    stopping.update(1, 0.5)
    stopping.update(2, 0.4)
    assert stopping.stop and stopping.lam() == 0.0
    assert UtilityGate(4.0).lam() == 4.0  # no settings: the paper's game, lam from the first step
    going_on = UtilityGate(4.0, target=0.9, ramp_steps=10, opened=True)  # a stage that continues a trained O
    assert going_on.open and going_on.lam() == 4.0
    going_on.update(1, 0.5)
    assert going_on.lam() == 2.0  # only the hold acts


def test_lam_stays_zero_until_the_gate_opens_in_training(tiny_classifier, cifar, tmp_path):
    """A real run: the gate opens after epoch 2 at the latest; until then lam is 0 and D rests."""
    cfg = ObfuscatorConfig(classifier=str(tiny_classifier), epochs=3, lam=2.0, gate_epoch=2, lam_ramp_epochs=1.0,
                           d_idle=True, distill=1.0, val_subset=VAL, **SMALL)
    train_obfuscator(cfg, tmp_path / "o", data=cifar)
    recs = records(tmp_path / "o")
    assert [r["train_lam"] for r in recs[:2]] == [0.0, 0.0] and [r["gate_open"] for r in recs] == [False, True, True]
    assert all(r["train_reconstruction_loss"] != r["train_reconstruction_loss"] for r in recs[:2])  # nan: D rested
    assert recs[2]["train_lam"] == pytest.approx(1.5)  # the ramp over one epoch of two steps: 1, then 2
    assert all(0.0 <= r["val_utility"] and r["val_accuracy"] > 0 for r in recs)


def test_d_starts_afresh_on_schedule_and_o_is_untouched(tiny_classifier, cifar, tmp_path):
    task = task_for(tiny_classifier, cifar, tmp_path, lam=1.0, d_reset_every=2)
    x, y = next(task.ctx.batches(0))
    task.begin_epoch(0)
    task.step(x, y)  # D and its optimiser have moved
    o_before = {k: v.clone() for k, v in task.obf.state_dict().items()}
    d_before = {k: v.clone() for k, v in task.deobf.state_dict().items()}
    task.begin_epoch(1)  # not due
    assert all(torch.equal(v, task.deobf.state_dict()[k]) for k, v in d_before.items())
    assert task.opt_d.state
    task.begin_epoch(2)  # due: D is new, O is not
    assert all(torch.equal(v, task.obf.state_dict()[k]) for k, v in o_before.items())
    weights = [k for k in d_before if k.endswith("weight")]
    assert all(not torch.equal(d_before[k], task.deobf.state_dict()[k]) for k in weights)
    assert not task.opt_d.state
    fresh = {k: v.clone() for k, v in task.deobf.state_dict().items()}
    task.step(x, y)
    task.begin_epoch(2)  # the same epoch's seed gives the same fresh D
    assert all(torch.equal(v, task.deobf.state_dict()[k]) for k, v in fresh.items())


def test_distillation_reads_the_frozen_classifier_on_the_clean_image(tiny_classifier, cifar, tmp_path, monkeypatch):
    """The targets are C's logits on the batch's clean images (mirrored ones included), whether computed on the batch
    or read from the per-image cache, and C stays as it was."""
    task = task_for(tiny_classifier, cifar, tmp_path, lam=0.0, distill=2.0, temperature=3.0, flip=True)
    seen = []
    real = obf_mod.distillation

    def spy(logits, teacher, temperature):
        seen.append((teacher.detach().clone(), temperature))
        return real(logits, teacher, temperature)

    monkeypatch.setattr(obf_mod, "distillation", spy)
    weights = {k: v.clone() for k, v in task.classifier.state_dict().items()}
    x, y, idx, flipped = next(task.ctx.batches(0, indices=True))
    assert 0 < flipped.sum() < len(flipped)
    assert torch.equal(x, mirror(task.ctx.train.x[idx].float() / 255, flipped))  # the batch's positions and flips
    task.begin_epoch(0)
    task.step(x, y)  # computed on the batch
    task.step(x, y, idx, flipped)  # read from the cache
    with torch.no_grad(), task.ctx.autocast():
        expected = task.classifier(x).float()
    (on_batch, temperature), (cached, _) = seen
    assert temperature == 3.0 and torch.equal(on_batch, expected)  # C on x itself, not on O(x)
    assert torch.allclose(cached, expected, atol=0.05) and torch.equal(cached.argmax(1), expected.argmax(1))
    assert not task.classifier.training and not any(p.requires_grad for p in task.classifier.parameters())
    assert all(torch.equal(v, task.classifier.state_dict()[k]) for k, v in weights.items())
    logits = torch.randn(4, 10)
    assert real(logits, logits, 4.0).abs() < 1e-6 and real(logits, torch.randn(4, 10), 4.0) > 0


SWEEP = ("--widths", "4", "--epochs", "2", "--subsets", "first:128", "--losses", "ce,distill", "--val-subset", VAL,
         "--set", "obfuscator.batch_size=64", "--set", 'obfuscator.test_subset="random:64"',
         "--set", "obfuscator.autoencoder_epochs=1")


def test_sweep_utility_prints_the_table_and_reuses_finished_points(tiny_classifier, tmp_path):
    out = tmp_path / "sweep"
    result = cli("sweep-utility", "--classifier", tiny_classifier, "--out", out, *SWEEP)
    assert result.exit_code == 0, result.output
    points = json.loads((out / "utility.json").read_text())["points"]
    assert [(p["point"], p["loss"]) for p in points] == [("w4-e2-first-128-ce", "ce"), ("w4-e2-first-128-distill", "distill")]
    for p in points:
        assert p["point"] in result.stdout and 0.0 <= p["utility"] and p["seconds"] > 0 and p["epochs"] <= 2
        assert not p["converged"]  # 2 epochs cannot show 2 epochs without improvement: flagged
        first, second = records(out / p["point"])  # scored on validation every epoch, the autoencoder's too
        assert "train_autoencoder_loss" in first and "train_classification_loss" in second
        assert "val_utility" in first and "val_utility" in second
    assert result.stdout.count("not converged") == 2
    assert (out / "utility.png").read_bytes()[:4] == b"\x89PNG"
    logs = {p["point"]: (out / p["point"] / "metrics.jsonl").read_text() for p in points}

    (out / points[1]["point"] / "DONE").unlink()  # an interrupted point: continued from its checkpoint, not redone
    again = cli("sweep-utility", "--classifier", tiny_classifier, "--out", out, *SWEEP)
    assert again.exit_code == 0, again.output
    assert {k: (out / k / "metrics.jsonl").read_text() for k in logs} == logs
    assert (out / points[1]["point"] / "DONE").exists()
    assert json.loads((out / "utility.json").read_text())["points"] == points


@pytest.mark.parametrize("args, message", [
    (("--losses", "ce,huber"), "losses[] = 'huber' is not one of ce, distill"),
    (("--widths", "8,x"), "--widths '8,x' is not a comma-separated list"),
    (("--epochs", "4,4"), "without repeats"),
    (("--val-subset", "first:x"), "first:x"),
    (("--set", "obfuscator.patience=-1"), "patience = -1 must be >= 0"),
])
def test_sweep_utility_bad_input_is_one_line(args, message, tiny_classifier, tmp_path):
    result = cli("sweep-utility", "--classifier", tiny_classifier, "--out", tmp_path / "s", "--widths", "4",
                 "--epochs", "1", "--subsets", "first:128", *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.output


def test_recipe_settings_are_checked(tiny_classifier, tmp_path):
    result = cli("train-obfuscator", "--classifier", tiny_classifier, "--out", tmp_path / "o", "--set", "utility_target=0.9")
    assert result.exit_code == 2 and "set val_subset" in result.stderr
    result = cli("train-obfuscator", "--classifier", tiny_classifier, "--out", tmp_path / "o", "--set", 'd_arch="vgg"')
    assert result.exit_code == 2 and "d_arch" in result.stderr


def test_the_validation_split_is_taken_out_of_the_training_images(tiny_classifier, cifar, tmp_path):
    """Where val_subset overlaps subset (the adaptive attack trains O' on all its images by O's recipe), the
    validation images are removed from training: O never trains on what its gate reads."""
    task = task_for(tiny_classifier, cifar, tmp_path, val_subset="range:64:96")
    ctx = task.ctx
    assert len(ctx.train) == 96 and len(ctx.val) == 32
    assert torch.equal(ctx.val.x, torch.from_numpy(cifar.x_train[64:96]))
    assert torch.equal(ctx.train.x, torch.from_numpy(cifar.x_train[list(range(64)) + list(range(96, 128))]))
