"""End to end over HTTP: the cloud hot-swaps its model; the client notices and re-syncs by itself.

A real server on loopback, a real repository, real CIFAR-10 images. The user only calls classify.
"""

from __future__ import annotations

import json
import re

import httpx
import numpy as np
import torch
from safetensors.torch import load_file

from .cloud_helpers import ADMIN, MODEL, TOKEN, auth, calibrated, make_repo, serve
from privoffload import nets
from privoffload.client import load_obfuscator, quantize
from privoffload.client.drift import AutoSyncClient
from privoffload.config import DriftConfig, ResyncConfig


def client_folder(path, weights, cifar) -> None:
    """The client's folder: O (synced to version 1, the 'fitted' classifier), a D, and that classifier."""
    path.mkdir()
    nets.save(nets.load(weights["obfuscator"]), path / "obfuscator.safetensors", model_version="1", lam="1.0")
    torch.manual_seed(5)
    nets.save(calibrated(nets.codec(8), cifar.x_train[:64]), path / "deobfuscator.safetensors")
    nets.save(nets.load(weights["fitted"]), path / "classifier.safetensors")


def hot_swap(server, repo, weights_file) -> None:
    repo.publish(weights_file, MODEL)
    r = httpx.post(f"{server.url}/v2/repository/models/{MODEL}/load", json={}, headers=auth(ADMIN), timeout=60)
    assert r.status_code == 200, r.text


def events(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]


def images_served(server) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=auth(ADMIN)).text
    return float(re.search(rf'privoffload_images_total{{model="{MODEL}"}} ([0-9.e+]+)', text).group(1))


def test_white_box_resync_after_a_hot_swap_without_the_user_doing_anything(tmp_path, weights, cifar):
    repo = make_repo(tmp_path / "repo", [weights["fitted"]])
    state = tmp_path / "client"
    client_folder(state, weights, cifar)
    old_o = (state / "obfuscator.safetensors").read_bytes()
    x = cifar.x_test[:8]
    cfg = ResyncConfig(steps=4, batch_size=32, eval_every=4)
    with serve(repo, serve_weights=True) as server, \
            AutoSyncClient(server.url, state, cifar.x_train[:128], cifar.y_train[:128], resync_cfg=cfg, token=TOKEN) as client:
        assert client.classify(x).model_version == "1" and client.resyncs == []
        hot_swap(server, repo, weights["c2"])
        result = client.classify(x)  # answered by version 2: the client re-syncs, then classifies again
    assert result.model_version == "2"
    (done,) = client.resyncs
    assert done["mode"] == "white-box" and done["model_version"] == "2" and done["queries"] == 0 and done["steps"] == 4
    assert [e["event"] for e in events(state)] == ["model version changed", "resync started", "resync finished"]
    assert (state / "obfuscator.safetensors").read_bytes() != old_o
    assert nets.read_metadata(state / "obfuscator.safetensors")["model_version"] == "2"
    published, kept = load_file(str(weights["c2"])), load_file(str(state / "classifier.safetensors"))
    assert all(torch.equal(published[k], kept[k]) for k in published)  # the downloaded weights, verified

    # the answer the user got came from the re-synced obfuscator
    obfuscate, cloud = load_obfuscator(state / "obfuscator.safetensors"), nets.load(weights["c2"]).eval()
    with torch.no_grad():
        uploads = torch.from_numpy(quantize(obfuscate(x))).float() / 255
        np.testing.assert_allclose(result.probabilities, torch.softmax(cloud(uploads), 1).numpy(), atol=1e-4)


def test_black_box_resync_counts_its_queries_when_weights_are_not_published(tmp_path, weights, cifar):
    repo = make_repo(tmp_path / "repo", [weights["fitted"]])
    state = tmp_path / "client"
    client_folder(state, weights, cifar)
    cfg = ResyncConfig(steps=4, batch_size=32, max_queries=96, rounds=2, surrogate_steps=3, eval_every=4)
    drift = DriftConfig(canary_threshold=0.0)
    with serve(repo) as server, AutoSyncClient(server.url, state, cifar.x_train[:128], cifar.y_train[:128], drift=drift,
                                               resync_cfg=cfg, token=TOKEN) as client:
        client.classify(cifar.x_test[:8])
        hot_swap(server, repo, weights["c3"])
        assert client.classify(cifar.x_test[:8]).model_version == "2"
        served = images_served(server)
    (done,) = client.resyncs
    assert done["mode"] == "black-box" and done["queries"] == 96
    assert served == 8 + 8 + 96 + 8  # two calls, the re-sync's uploads, the call again: nothing else was sent
    assert nets.read_metadata(state / "classifier.safetensors")["mode"] == "black-box"  # the surrogate, for next time
    assert events(state)[-1]["queries"] == 96
