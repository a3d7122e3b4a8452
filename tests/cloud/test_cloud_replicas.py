"""Scale-out: replicas of the service behind a load balancer, all reading one model repository.

A rollout publishes a version once, tells each replica to load it by number, and waits until each
reports it (docs/service.md, "Beyond one machine"). Here two replicas run on loopback, and clients
spread their requests over both, as a round-robin load balancer would.
"""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import torch

from .cloud_helpers import ADMIN, MODEL, TOKEN, auth, make_repo, serve
from privoffload import nets
from privoffload.client import Client


def test_after_a_rollout_both_replicas_answer_only_the_new_version(tmp_path, weights, cifar):
    pixels = cifar.x_test[:4]
    expected = {}
    for version, name in (("1", "c1"), ("2", "c2")):
        with torch.no_grad():
            expected[version] = torch.softmax(nets.load(weights[name]).eval()(torch.from_numpy(pixels).float() / 255), 1).numpy()
    repo = make_repo(tmp_path / "repo", [weights["c1"]])
    with serve(repo) as a, serve(repo) as b:
        replicas = [a.url, b.url]
        records, errors, stop = [], [], threading.Event()

        def spread(first: int):
            clients = [Client(url, lambda x: x, token=TOKEN, retries=0) for url in replicas]
            k = first
            while not stop.is_set():
                replica = k % 2
                k += 1
                sent = time.perf_counter()
                try:
                    result = clients[replica].send(pixels)
                except Exception as e:  # noqa: BLE001 - any failure counts
                    errors.append(repr(e))
                    continue
                records.append((sent, replica, result.model_version, result.probabilities))
            for c in clients:
                c.close()

        def settle(n: int = 16):
            target, deadline = len(records) + n, time.monotonic() + 30
            while len(records) < target and time.monotonic() < deadline and not errors:
                time.sleep(0.01)

        threads = [threading.Thread(target=spread, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        try:
            settle()
            version = repo.publish(weights["c2"], MODEL).version  # one publish, on the shared repository
            marks = []
            for url in replicas:  # then each replica is told to load that version, by number
                marks.append(time.perf_counter())
                r = httpx.post(f"{url}/v2/repository/models/{MODEL}/load", json={"parameters": {"version": str(version)}},
                               headers=auth(ADMIN), timeout=60)
                assert r.status_code == 200, r.text
                marks.append(time.perf_counter())
                settle()
            while not all(httpx.get(f"{url}/v2/models/{MODEL}/ready", headers=auth()).json()["version"] == str(version)
                          for url in replicas):
                time.sleep(0.01)
            both = time.perf_counter()  # both replicas report the new version
            settle(32)
        finally:
            stop.set()
            for t in threads:
                t.join(30)

    assert not errors, errors[:3]
    # between the end of the first load and the start of the second, the replicas disagree: hence the wait
    mixed = {(replica, v) for sent, replica, v, _ in records if marks[1] < sent < marks[2]}
    after = [(replica, v, probs) for sent, replica, v, probs in records if sent > both]
    print(f"\nrollout over two replicas: {len(records)} answers; between the two loads {sorted(mixed)}; "
          f"{len(after)} after both reported version {version}")
    assert (0, "2") in mixed and (1, "1") in mixed
    assert {replica for replica, _, _ in after} == {0, 1}
    assert all(v == "2" and np.allclose(probs, expected["2"], atol=1e-4) for _, v, probs in after)
