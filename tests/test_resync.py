"""Drift robustness (ensemble training), re-sync (white-box, black-box, query budget) and drift detection,
at smoke scale on real CIFAR-10 slices. The HTTP end-to-end test is tests/cloud/test_autosync.py."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from privoffload import nets
from privoffload.client.client import Result
from privoffload.client.drift import DriftMonitor
from privoffload.client.resync import ClientState
from privoffload.train.resync import (Budget, black_box, complete, fit_remap, game_lambda, local_api, make_queries, pick_start,
                                      remap_from, remap_state, remapped, white_box)
from privoffload.config import DriftConfig, ObfuscatorConfig, OptimConfig, ResyncConfig
from privoffload.data import DeviceData, to_pixels
from privoffload.errors import UserError
from privoffload.train.game import Readability
from privoffload.train.obfuscator import train_obfuscator

from .helpers import assert_user_error, cli, fitted_classifier


def test_readability_is_the_weighted_mean_and_sampling_keeps_its_expectation():
    torch.manual_seed(0)
    c, e = nets.resnet18(8).eval(), nets.resnet18(8).eval()
    z, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    with torch.no_grad():
        loss, logits = Readability(c, [e], weight=2.0)(z, y)
        ce_c, ce_e = F.cross_entropy(c(z), y), F.cross_entropy(e(z), y)
        assert torch.allclose(loss, (ce_c + 2 * ce_e) / 3) and torch.equal(logits, c(z))
        assert torch.allclose(Readability(c)(z, y)[0], ce_c)
        # one of two identical extras per step, scaled by 2/1, is exactly the full ensemble
        full = Readability(c, [e, e])(z, y)[0]
        assert torch.allclose(Readability(c, [e, e], per_step=1)(z, y)[0], full)
        assert not torch.allclose(full, ce_c)


def test_obfuscator_trains_against_an_ensemble_of_run_folders_and_files(tmp_path, cifar):
    x, y = cifar.x_train[:256], cifar.y_train[:256]
    (tmp_path / "c").mkdir()
    nets.save(fitted_classifier(x, y, 0), tmp_path / "c" / "classifier.safetensors")
    nets.save(fitted_classifier(x, y, 1), tmp_path / "extra.safetensors")
    (tmp_path / "e").mkdir()
    nets.save(fitted_classifier(x, y, 2), tmp_path / "e" / "classifier.safetensors")
    cfg = ObfuscatorConfig(classifier=str(tmp_path / "c"), ensemble=[str(tmp_path / "extra.safetensors"), str(tmp_path / "e")],
                           ensemble_per_step=1, width=4, epochs=1, batch_size=64, subset="first:128",
                           test_subset="random:128")
    path = train_obfuscator(cfg, tmp_path / "o", data=cifar, device="cpu")
    assert nets.read_metadata(path)["ensemble"] == "2"
    assert 'ensemble = [' in (tmp_path / "o" / "config.toml").read_text()

    done = cli("train-obfuscator", "--classifier", tmp_path / "c", "--out", tmp_path / "o2",
               "--set", f'ensemble=["{tmp_path / "nowhere"}"]')
    assert_user_error(done, "nowhere", "does not exist")
    with pytest.raises(UserError, match="ensemble_per_step = 2 must be between 0"):
        dataclasses.replace(cfg, ensemble=cfg.ensemble[:1], ensemble_per_step=2).validate()


def test_budget_counts_every_image_and_refuses_past_its_cap():
    api = Budget(lambda pixels: np.full((len(pixels), 10), 0.1), cap=10)
    assert api(np.zeros((6, 3, 32, 32), np.uint8)).shape == (6, 10) and api.used == 6 and api.left == 4
    with pytest.raises(UserError, match="exceed the budget of 10"):
        api(np.zeros((5, 3, 32, 32), np.uint8))
    assert api.used == 6
    with pytest.raises(UserError, match="max_queries"):
        ResyncConfig(max_queries=3, rounds=4).validate()


@pytest.fixture(scope="module")
def drifted(cifar):
    """The client's 256 labelled images; O0 fitted to an 'old' classifier; a 'new' classifier that differs."""
    x, y = cifar.x_train[:256], cifar.y_train[:256]
    torch.manual_seed(0)
    obf, deobf = nets.codec(4), nets.codec(4)
    with torch.no_grad():
        obf(torch.from_numpy(x[:64]).float() / 255)  # BatchNorm statistics of real images, as after training
        obf.eval()
        z = (torch.round(obf(torch.from_numpy(x).float() / 255) * 255)).to(torch.uint8).numpy()
    return x, y, obf, deobf, fitted_classifier(z, y, 0), fitted_classifier(x, y, 1)


def test_white_box_resync_moves_o_and_d_only_and_reports_its_steps(drifted):
    x, y, obf0, deobf0, _, new = drifted
    obf, deobf = copy.deepcopy(obf0), copy.deepcopy(deobf0)
    new_before = copy.deepcopy(new.state_dict())
    evals = []
    white_box(obf, deobf, new, DeviceData(x, y), ResyncConfig(steps=6, batch_size=32, lam=0.1, eval_every=4),
              on_eval=lambda step, queries: evals.append((step, queries)))
    assert evals == [(0, 0), (4, 0), (6, 0)]
    for before, after in ((obf0, obf), (deobf0, deobf)):
        assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))
    assert all(torch.equal(v, new.state_dict()[k]) for k, v in new_before.items())  # weights and BatchNorm kept


def test_black_box_resync_spends_exactly_its_queries_and_distils_the_api(drifted):
    x, y, obf0, deobf0, old, new = drifted
    obf, deobf = copy.deepcopy(obf0), copy.deepcopy(deobf0)
    data = DeviceData(x, y)
    api = Budget(local_api(new), cap=300)
    cfg = ResyncConfig(steps=6, batch_size=64, lam=0.1, max_queries=300, rounds=3, surrogate_steps=8, eval_every=4)
    evals, rounds = [], []
    old_before = copy.deepcopy(old.state_dict())
    surrogate = black_box(obf, deobf, api, data, cfg, [old], on_eval=lambda s, q: evals.append((s, q)), on_round=rounds.append)
    assert api.used == 300 and evals == [(0, 0), (2, 100), (4, 200), (6, 300)]
    assert [q for _, q in evals] == sorted(q for _, q in evals)  # queries only grow
    assert [(r["round"], r["queries"]) for r in rounds] == [(1, 100), (2, 200), (3, 300)]
    assert all(r["held_out"] > 0 and 0 <= r["agreement"] <= 1 for r in rounds)  # measured on queries it never learned from
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in old_before.items())  # candidates are never changed

    with torch.no_grad():  # on the uploads of the re-synced O, the surrogate answers like the API; C0 does not
        uploads = torch.round(obf.eval()(torch.from_numpy(x).float() / 255) * 255) / 255
        truth = torch.softmax(new(uploads), 1)
        kl = [F.kl_div(F.log_softmax(net(uploads), 1), truth, reduction="batchmean").item() for net in (surrogate, old)]
    print(f"\nKL(API || surrogate) {kl[0]:.4f}, KL(API || old classifier) {kl[1]:.4f}")
    assert kl[0] < 0.5 * kl[1]


def always(classifier: torch.nn.Module, k: int) -> torch.nn.Module:
    """A copy of `classifier` that answers class k to everything."""
    blank = copy.deepcopy(classifier)
    with torch.no_grad():
        blank.fc.weight.zero_()
        blank.fc.bias.copy_(10.0 * F.one_hot(torch.tensor(k), 10).float())
    return blank


def test_the_surrogate_starts_from_the_candidate_that_agrees_best(drifted):
    x, _, _, _, old, _ = drifted
    pixels = torch.from_numpy(x[:40])
    probs = F.one_hot(torch.tensor([5] * 30 + [3] * 10), 10).float()  # the API named class 5 three times in four
    threes, fives = always(old, 3), always(old, 5)
    assert pick_start([threes, fives], pixels, probs, False) is fives
    assert pick_start([fives, always(old, 5)], pixels, probs, False) is fives  # a tie keeps the first (C0 comes first)


def test_every_kind_of_query_is_an_8_bit_upload_and_counted(drifted):
    x, y, _, deobf, old, new = drifted
    torch.manual_seed(0)  # an O whose upload follows its input (a random codec's barely does), so kinds can differ
    obf = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.Sigmoid())
    cfg = ResyncConfig(batch_size=32, lam=0.1, lookahead_steps=2, optim_o=OptimConfig(name="adam", lr=0.05, weight_decay=0.0))
    images = torch.from_numpy(x[:50]).float() / 255
    pixels = make_queries(obf, deobf, images, torch.from_numpy(y[:50]), cfg, old, torch.Generator().manual_seed(0), False)
    assert pixels.dtype == torch.uint8 and pixels.shape == (50, 3, 32, 32)
    with torch.no_grad():
        plain = to_pixels(obf.eval()(images))
    share = torch.arange(50) % len(cfg.queries)
    assert torch.equal(pixels[share == 0], plain[share == 0])  # "plain" is O(x) itself
    assert all(not torch.equal(pixels[share == k], plain[share == k]) for k in range(1, len(cfg.queries)))
    api = Budget(local_api(new), cap=40)
    with pytest.raises(UserError, match="exceed the budget of 40"):
        api(pixels.numpy())
    assert api.used == 0


def test_a_top_k_api_is_completed_before_distillation(drifted):
    x, _, _, _, _, new = drifted
    full = local_api(new)(x[:8])
    top1 = local_api(new, top_k=1)(x[:8])
    assert ((top1 > 0).sum(1) == 1).all() and np.array_equal(top1.argmax(1), full.argmax(1))
    done = complete(torch.from_numpy(top1))
    assert torch.allclose(done.sum(1), torch.ones(8)) and torch.equal(done.argmax(1), torch.from_numpy(full.argmax(1)))


def test_output_remapping_fits_a_known_permutation_exactly():
    """The baseline's mechanics: answers that are a fixed relabelling of the truth are mapped back, every one."""
    labels = torch.arange(500) % 10
    permutation = torch.tensor([3, 7, 0, 9, 1, 8, 2, 6, 4, 5])
    probs = torch.full((500, 10), 0.02).scatter_(1, permutation[labels].view(-1, 1), 0.82)
    remap = fit_remap(probs, labels)
    with torch.no_grad():
        assert torch.equal(remap(probs.log()).argmax(1), labels)
        assert (probs.argmax(1) == labels).float().mean() < 0.2  # the API's own answers were mostly wrong


def test_a_remapped_classifier_reads_its_answers_through_the_map_kept_as_json(drifted):
    """The remap as the re-syncs' first step: the classifier the game plays against answers remap(log softmax(C)),
    the map survives its JSON record exactly, and black-box plays through it."""
    x, y, obf0, deobf0, old, new = drifted
    pixels = torch.from_numpy(x[:64]).float() / 255
    with torch.no_grad():
        probs = torch.softmax(new(pixels), 1)
    remap = fit_remap(probs, torch.from_numpy(y[:64]))
    again = remap_from(json.loads(json.dumps(remap_state(remap))))
    with torch.no_grad():
        assert torch.allclose(remapped(new, again)(pixels), remap(probs.clamp(min=1e-6).log()), atol=1e-5)
    assert remapped(new, None) is new
    obf, deobf = copy.deepcopy(obf0), copy.deepcopy(deobf0)
    cfg = ResyncConfig(steps=2, batch_size=32, lam=0.1, max_queries=64, rounds=1, surrogate_steps=2, eval_every=2,
                       queries=["plain"])
    black_box(obf, deobf, Budget(local_api(new), cap=64), DeviceData(x, y), cfg, [old], remap=again)
    assert any(not torch.equal(a, b) for a, b in zip(obf0.state_dict().values(), obf.state_dict().values()))


def answer(classes: np.ndarray, version: str = "1") -> Result:
    return Result(classes, [str(c) for c in classes], np.zeros((len(classes), 10), np.float32), [version] * len(classes))


def test_drift_monitor_decides_and_logs(tmp_path):
    canary = (np.zeros((4, 3, 32, 32), np.uint8), np.array([0, 1, 2, 3]))
    monitor = DriftMonitor(DriftConfig(canary_threshold=0.7, canary_every=2), canary, events=tmp_path / "events.jsonl")
    right, half = (lambda x: answer(np.array([0, 1, 2, 3]))), (lambda x: answer(np.array([0, 1, 0, 0])))
    assert monitor.check(right) is None  # call 1: no check due
    assert monitor.check(right) is None  # call 2: canary 1.0
    monitor.version_changed("1", "2")
    assert monitor.check(half) == "model version 1 -> 2"  # pending beats the canary
    monitor.resynced()  # a reason stays pending until a re-sync succeeds
    assert monitor.check(half) == "canary accuracy 0.500 below 0.7"  # call 4: canary due and low
    logged = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in logged] == ["canary checked", "model version changed", "canary checked"]
    assert logged[0]["accuracy"] == 1.0 and logged[2]["resync"] is True and logged == monitor.events

    quiet = DriftMonitor(DriftConfig(on_version_change=False))  # both signals can be switched off
    quiet.version_changed("2", "3")
    assert quiet.check(half) is None and quiet.events[0]["resync"] is False
    with pytest.raises(UserError, match="canary_threshold"):
        DriftMonitor(DriftConfig(canary_threshold=1.5))


def test_client_state_from_an_obfuscator_run(obfuscator_run, tiny_classifier, tmp_path):
    """The README's first step: a client folder made from an obfuscator run holds O, D, the classifier O was trained
    against, the model version and O's lambda (which a re-sync plays at)."""
    state = ClientState.create(obfuscator_run, tmp_path / "client", model_version="3")
    assert state.model_version == "3"
    assert nets.read_metadata(state.path / "obfuscator.safetensors")["lam"] == "1.0"
    obf, deobf, known = state.networks()
    for net, path in ((obf, obfuscator_run / "obfuscator.safetensors"), (deobf, obfuscator_run / "deobfuscator.safetensors"),
                      (known, tiny_classifier / "classifier.safetensors")):
        saved = nets.load(path)
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), saved.state_dict().values()))
    assert game_lambda(ResyncConfig(), state.path / "obfuscator.safetensors") == 1.0
    assert game_lambda(ResyncConfig(lam=2.5), state.path / "obfuscator.safetensors") == 2.5
    with pytest.raises(UserError, match="has no obfuscator.safetensors"):
        ClientState(tmp_path)
