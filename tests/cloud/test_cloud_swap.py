"""Changing the served model while serving: refused loads keep the old version; swaps under load lose nothing."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import numpy as np
import torch
import tritonclient.http as triton

from .cloud_helpers import ADMIN, MODEL, auth, make_repo, serve
from privoffload import nets
from privoffload.client import Client
from privoffload.cloud.auth import Tokens
from privoffload.cloud.repository import MANIFEST, WEIGHTS, sha256_of


def load(server, version=None, token=ADMIN) -> httpx.Response:
    body = {"parameters": {"version": str(version)}} if version is not None else {}
    return httpx.post(f"{server.url}/v2/repository/models/{MODEL}/load", json=body, headers=auth(token), timeout=30)


def serving(server) -> str:
    pixels = np.zeros((1, 3, 32, 32), np.uint8).reshape(-1).tolist()
    body = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": pixels}]}
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, headers=auth())
    assert r.status_code == 200
    return r.json()["model_version"]


def forge(repo, version: int, weights_file, **manifest) -> None:
    """A version folder written by hand (as a damaged or careless operator might), bypassing publish's checks."""
    folder = repo.root / MODEL / str(version)
    folder.mkdir()
    shutil.copyfile(weights_file, folder / WEIGHTS)
    base = json.loads((repo.root / MODEL / "1" / MANIFEST).read_text())
    base.update(version=version, sha256=sha256_of(folder / WEIGHTS), **manifest)
    (folder / MANIFEST).write_text(json.dumps(base))


def test_refused_loads_keep_the_old_version(tmp_path, weights):
    repo = make_repo(tmp_path / "repo", [weights["c1"], weights["c2"]])
    with serve(repo, serve_weights=True) as server:
        assert serving(server) == "2"
        with triton.InferenceServerClient(server.url.removeprefix("http://")) as client:  # a standard client reloads
            client.load_model(MODEL, headers=auth(ADMIN))
        assert load(server, 1).json() == {"name": MODEL, "version": "1", "previous_version": "2"}

        repo.publish(weights["c3"], MODEL)  # version 3, then damaged on disk
        path = repo.weights_path(MODEL, 3)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        forge(repo, 4, weights["obfuscator"], architecture="codec")  # another architecture
        forge(repo, 5, weights["wide"], width=16)  # a classifier of another width
        forge(repo, 6, weights["obfuscator"])  # the manifest says resnet18, the file holds a codec
        forge(repo, 7, weights["c1"])
        (repo.root / MODEL / "7" / WEIGHTS).write_bytes(b"\x00" * 100)  # unreadable, with a matching sha256:
        m = json.loads((repo.root / MODEL / "7" / MANIFEST).read_text())
        (repo.root / MODEL / "7" / MANIFEST).write_text(json.dumps({**m, "sha256": sha256_of(repo.weights_path(MODEL, 7))}))

        expected = {3: "damaged", 4: "serves only resnet18", 5: "width 16", 6: "holds a codec", 7: "not a readable safetensors"}
        for version, why in expected.items():
            r = load(server, version)
            assert r.status_code == 400 and why in r.json()["error"] and "version 1 keeps serving" in r.json()["error"], r.text
            assert serving(server) == "1"
        assert load(server).status_code == 400  # the newest (7) is broken too
        assert load(server, 99).status_code == 404
        assert load(server, 2, token="not-the-admin-token").status_code == 401
        index = httpx.post(f"{server.url}/v2/repository/index", headers=auth()).json()
        reasons = {int(e["version"]): e["reason"] for e in index}
        assert reasons[1] == "" and reasons[2] == "not loaded" and "damaged" in reasons[3]
        ready = httpx.post(f"{server.url}/v2/repository/index", json={"ready": True}, headers=auth()).json()
        assert [(e["version"], e["state"]) for e in ready] == [("1", "READY")]
        metrics = httpx.get(f"{server.url}/metrics", headers=auth(ADMIN)).text
        assert f'privoffload_model_loads_total{{model="{MODEL}",result="refused"}} 6.0' in metrics
        assert all(str(repo.root) not in r for r in reasons.values())  # versions are named, paths are not

        # only verified versions are handed out: the serving one, not a refused one
        assert httpx.get(f"{server.url}/v2/models/{MODEL}/versions/1/weights", headers=auth()).status_code == 200
        for v in expected:
            assert httpx.get(f"{server.url}/v2/models/{MODEL}/versions/{v}/weights", headers=auth()).status_code == 404
        # metadata describes the version being served, whatever is newest on disk
        forge(repo, 8, weights["c1"], classes=["cat", "dog"])
        meta = httpx.get(f"{server.url}/v2/models/{MODEL}", headers=auth()).json()
        assert meta["versions"] == ["1"] and meta["outputs"][0]["shape"] == [-1, 10]
        # a version is a number and nothing after it
        assert httpx.get(f"{server.url}/v2/models/{MODEL}/versions/1%0A/ready", headers=auth()).status_code == 404


def test_the_batching_worker_is_watched_and_the_host_checked_without_tokens(tmp_path, weights):
    repo = make_repo(tmp_path / "repo", [weights["c1"]])
    with serve(repo, tokens=Tokens(None, None)) as server:
        assert serving(server) == "1"
        batcher = server.app.state.plane.batchers[MODEL]
        dead = batcher.task
        dead.get_loop().call_soon_threadsafe(dead.cancel)  # the worker dies (as a bug would kill it)
        deadline = time.monotonic() + 10
        while batcher.task is dead and time.monotonic() < deadline:
            time.sleep(0.01)
        assert dead.done() and batcher.alive
        assert serving(server) == "1"  # restarted: requests are still answered
        assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
        assert 'privoffload_batcher_restarts_total{model="cifar10-resnet18"} 1.0' in httpx.get(f"{server.url}/metrics").text
        # no tokens: a page on another site that rebinds its name to this address is turned away by its Host
        assert httpx.get(f"{server.url}/v2", headers={"Host": "attacker.example"}).status_code == 400
        assert httpx.get(f"{server.url}/v2").status_code == 200
        assert httpx.get(f"{server.url}/v2/models/{MODEL}/versions/1/weights").status_code == 404  # off by default


def test_hot_swap_under_load(tmp_path, weights, cifar):
    """N clients classify without pause while the model is swapped K times.

    Checked for every response: it succeeded; its version is one that could be current at some moment
    between sending and receiving (never older than a swap that had returned before the request left);
    and its probabilities are that version's own.
    """
    clients, swaps = 8, 5
    files = [weights[f"c{1 + i % 3}"] for i in range(swaps + 1)]  # neighbouring versions always differ
    pixels = cifar.x_test[:4]
    expected = {}
    for v, f in enumerate(files, start=1):
        with torch.no_grad():
            expected[str(v)] = torch.softmax(nets.load(f).eval()(torch.from_numpy(pixels).float() / 255), 1).numpy()
    repo = make_repo(tmp_path / "repo", files[:1])
    with serve(repo, batch_window_ms=2.0) as server:
        for f in files[1:]:  # published while serving
            repo.publish(f, MODEL)
        records, errors, changes = [], [], []
        stop = threading.Event()

        def classify():
            with Client(server.url, weights["obfuscator"], token=auth()["Authorization"][7:], retries=0, timeout=30,
                        on_version_change=lambda old, new: changes.append((old, new))) as client:
                while not stop.is_set():
                    sent = time.perf_counter()
                    try:
                        result = client.send(pixels)
                    except Exception as e:  # noqa: BLE001 - any failure counts
                        errors.append(repr(e))
                        continue
                    records.append((sent, time.perf_counter(), result.model_version, result.probabilities))

        threads = [threading.Thread(target=classify) for _ in range(clients)]
        for t in threads:
            t.start()
        timeline = []  # (started, returned, version)

        def settle():  # let every version answer a fair share of requests, however loaded the machine is
            target, deadline = len(records) + 3 * clients, time.monotonic() + 20
            while len(records) < target and time.monotonic() < deadline and not errors:
                time.sleep(0.02)

        try:
            settle()
            for v in range(2, swaps + 2):
                started = time.perf_counter()
                r = load(server, v)
                timeline.append((started, time.perf_counter(), str(v)))
                assert r.status_code == 200, r.text
                settle()
        finally:
            stop.set()
            for t in threads:
                t.join(30)

    versions = ["1"] + [v for _, _, v in timeline]
    wrong = []
    for sent, received, version, probs in records:
        lo = max([i + 1 for i, (_, returned, _) in enumerate(timeline) if returned <= sent], default=0)
        hi = max([i + 1 for i, (started, _, _) in enumerate(timeline) if started <= received], default=0)
        if version not in versions[lo:hi + 1] or not np.allclose(probs, expected[version], atol=1e-4):
            wrong.append((version, versions[lo:hi + 1]))
    per_version = {v: sum(r[2] == v for r in records) for v in versions}
    overlapping = sum(any(sent < returned and started < received for started, returned, _ in timeline)
                      for sent, received, _, _ in records)
    print(f"\nhot swap: {len(records)} requests from {clients} clients, {swaps} swaps, {len(errors)} failed, "
          f"{len(wrong)} with a wrong version, {overlapping} in flight during a swap; per version {per_version}")
    assert not errors, errors[:3]
    assert not wrong, wrong[:5]
    assert all(n > 0 for n in per_version.values()) and overlapping > 0, per_version  # swaps really happened under load
    assert all(int(new) > int(old) for old, new in changes) and len(changes) >= swaps
