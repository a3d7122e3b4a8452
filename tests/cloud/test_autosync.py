"""End to end over HTTP: the cloud hot-swaps its model; the client notices and re-syncs by itself.

A real server on loopback, a real repository, real CIFAR-10 images. The user only calls classify.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import httpx
import numpy as np
import torch
from safetensors.torch import load_file

from .cloud_helpers import ADMIN, MODEL, TOKEN, auth, calibrated, make_repo, serve
from privoffload import nets, oip
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


def hot_swap(server, repo, weights_file, signing_key=None) -> None:
    repo.publish(weights_file, MODEL, signing_key=signing_key)
    r = httpx.post(f"{server.url}/v2/repository/models/{MODEL}/load", json={}, headers=auth(ADMIN), timeout=60)
    assert r.status_code == 200, r.text


class Gateway:
    """In front of the service: counts the images of every upload it sees; answers 503 (after reading it) to the
    upload `gate.fail_in` uploads from now, and to every manifest and weights request while `gate.down`."""

    def __init__(self, app, gate: SimpleNamespace):
        self.app, self.gate = app, gate

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.endswith(("/infer", "/manifest", "/weights")):
            return await self.app(scope, receive, send)
        if path.endswith("/infer"):
            chunks = [await receive()]
            while chunks[-1].get("more_body"):
                chunks.append(await receive())
            body = b"".join(c.get("body", b"") for c in chunks)
            head, _ = oip.split_body(body, dict(scope["headers"]).get(b"inference-header-content-length", b"").decode() or None)
            self.gate.received += head["inputs"][0]["shape"][0]
            self.gate.fail_in -= 1
            if self.gate.fail_in != 0:
                replayed = iter([{"type": "http.request", "body": body, "more_body": False}])
                return await self.app(scope, lambda: _next(replayed, receive), send)
        elif not self.gate.down:
            return await self.app(scope, receive, send)
        await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"error": "down for maintenance"}'})


async def _next(replayed, receive):
    return next(replayed, None) or await receive()


def gateway(server) -> SimpleNamespace:
    gate = SimpleNamespace(received=0, fail_in=0, down=False)
    server.app.add_middleware(Gateway, gate=gate)
    return gate


def events(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]


def images_served(server) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=auth(ADMIN)).text
    return float(re.search(rf'privoffload_images_total{{model="{MODEL}"}} ([0-9.e+]+)', text).group(1))


def test_white_box_resync_after_a_hot_swap_without_the_user_doing_anything(tmp_path, weights, cifar, keys):
    private, public = keys
    repo = make_repo(tmp_path / "repo", [weights["fitted"]], signing_key=private)
    state = tmp_path / "client"
    client_folder(state, weights, cifar)
    old_o = (state / "obfuscator.safetensors").read_bytes()
    x = cifar.x_test[:8]
    cfg = ResyncConfig(steps=4, batch_size=32, eval_every=4)
    with serve(repo, serve_weights=True) as server, \
            AutoSyncClient(server.url, state, cifar.x_train[:128], cifar.y_train[:128], resync_cfg=cfg, token=TOKEN,
                           publisher_key=public) as client:
        assert client.classify(x).model_version == "1" and client.resyncs == []
        hot_swap(server, repo, weights["c2"], signing_key=private)
        result = client.classify(x)  # answered by version 2: the client re-syncs, then classifies again
    assert result.model_version == "2"
    (done,) = client.resyncs
    assert done["mode"] == "white-box" and done["model_version"] == "2" and done["queries"] == 0 and done["steps"] == 4
    assert [e["event"] for e in events(state)] == ["model version changed", "resync started", "resync finished"]
    assert (state / "obfuscator.safetensors").read_bytes() != old_o
    assert (state / "obfuscator.previous.safetensors").read_bytes() == old_o  # the one it replaced, kept
    assert nets.read_metadata(state / "obfuscator.safetensors")["model_version"] == "2"
    published, kept = load_file(str(weights["c2"])), load_file(str(state / "classifier.safetensors"))
    assert all(torch.equal(published[k], kept[k]) for k in published)  # the downloaded weights, verified

    # the answer the user got came from the re-synced obfuscator
    obfuscate, cloud = load_obfuscator(state / "obfuscator.safetensors"), nets.load(weights["c2"]).eval()
    with torch.no_grad():
        uploads = torch.from_numpy(quantize(obfuscate(x))).float() / 255
        np.testing.assert_allclose(result.probabilities, torch.softmax(cloud(uploads), 1).numpy(), atol=1e-4)


def test_black_box_resync_counts_every_upload_when_weights_are_not_published(tmp_path, weights, cifar):
    """The query budget counts images uploaded, retries included: a re-sync upload answered 503 and sent again
    costs twice. What the server received during the re-sync is exactly what was charged."""
    repo = make_repo(tmp_path / "repo", [weights["fitted"]])
    state = tmp_path / "client"
    client_folder(state, weights, cifar)
    cfg = ResyncConfig(steps=4, batch_size=32, max_queries=96, rounds=2, surrogate_steps=3, eval_every=4)
    drift = DriftConfig(canary_threshold=0.0)
    server = serve(repo)
    gate = gateway(server)
    with server, AutoSyncClient(server.url, state, cifar.x_train[:128], cifar.y_train[:128], drift=drift,
                                resync_cfg=cfg, token=TOKEN, images_per_request=16, backoff=0.01) as client:
        client.classify(cifar.x_test[:8])
        hot_swap(server, repo, weights["c3"])
        gate.fail_in = 2  # the user's next call goes through; the re-sync's first upload is refused once
        assert client.classify(cifar.x_test[:8]).model_version == "2"
        served = images_served(server)
    (done,) = client.resyncs
    assert done["mode"] == "black-box" and done["queries"] == 96
    assert gate.received == 8 + 8 + done["queries"] + 8  # two calls, the re-sync's uploads, the call again
    assert served == 8 + 8 + (96 - 16) + 8  # the refused upload was not classified, but it was sent
    assert nets.read_metadata(state / "classifier.safetensors")["mode"] == "black-box"  # the surrogate, for next time
    assert events(state)[-1]["queries"] == 96


def test_a_failed_resync_keeps_its_reason_and_the_answer_and_is_tried_again(tmp_path, weights, cifar, keys):
    """The weights cannot be fetched when the cloud's model changes: the user still gets the answer, the failure is
    logged, and the re-sync is tried again (after one call of backoff) until it succeeds."""
    private, public = keys
    repo = make_repo(tmp_path / "repo", [weights["fitted"]], signing_key=private)
    state = tmp_path / "client"
    client_folder(state, weights, cifar)
    x = cifar.x_test[:8]
    cfg = ResyncConfig(mode="white-box", steps=4, batch_size=32, eval_every=4)
    server = serve(repo, serve_weights=True)
    gate = gateway(server)
    with server, AutoSyncClient(server.url, state, cifar.x_train[:128], cifar.y_train[:128], resync_cfg=cfg, token=TOKEN,
                                publisher_key=public, drift=DriftConfig(retry_after_calls=1)) as client:
        client.classify(x)
        hot_swap(server, repo, weights["c2"], signing_key=private)
        gate.down = True
        assert client.classify(x).model_version == "2"  # answered, with the stale obfuscator
        assert [e["event"] for e in events(state)] == ["model version changed", "resync started", "resync failed"]
        assert "503" in events(state)[-1]["error"] and client.resyncs == []
        client.classify(x)  # backing off: one call without a try
        assert len(events(state)) == 3
        client.classify(x)  # tried again, still down: the backoff doubles
        assert [e["event"] for e in events(state)][3:] == ["resync started", "resync failed"]
        assert events(state)[-1]["retry_after_calls"] == 2
        gate.down = False
        for _ in range(3):
            client.classify(x)
        assert [e["event"] for e in events(state)][5:] == ["resync started", "resync finished"]
    assert nets.read_metadata(state / "obfuscator.safetensors")["model_version"] == "2"


def test_a_resync_that_fails_to_save_keeps_its_reason_and_the_answer(tmp_path, weights, cifar, keys):
    """Saving the re-synced obfuscator fails with an OSError (here: the backup's name is taken by a folder): the
    user's call still gets its answer, the drift signal is kept, and the re-sync succeeds once saving works."""
    private, public = keys
    repo = make_repo(tmp_path / "repo", [weights["fitted"]], signing_key=private)
    state = tmp_path / "client"
    client_folder(state, weights, cifar)
    (state / "obfuscator.previous.safetensors").mkdir()  # os.replace onto a folder: IsADirectoryError
    x = cifar.x_test[:8]
    cfg = ResyncConfig(mode="white-box", steps=2, batch_size=32, eval_every=2)
    with serve(repo, serve_weights=True) as server, \
            AutoSyncClient(server.url, state, cifar.x_train[:64], cifar.y_train[:64], resync_cfg=cfg, token=TOKEN,
                           publisher_key=public, drift=DriftConfig(retry_after_calls=1)) as client:
        client.classify(x)
        hot_swap(server, repo, weights["c2"], signing_key=private)
        assert client.classify(x).model_version == "2"  # answered, with the stale obfuscator
        assert [e["event"] for e in events(state)][-1] == "resync failed"
        assert "Is a directory" in events(state)[-1]["error"] and client.resyncs == []
        (state / "obfuscator.previous.safetensors").rmdir()
        for _ in range(2):
            client.classify(x)
    assert [e["event"] for e in events(state)][-2:] == ["resync started", "resync finished"]
    assert nets.read_metadata(state / "obfuscator.safetensors")["model_version"] == "2"
