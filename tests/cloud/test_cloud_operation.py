"""What an operator relies on and nothing else tested: the token rules at start, --no-auth, micro-batching
really grouping concurrent requests, and a canary-triggered re-sync end to end."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import numpy as np

from privoffload.client import Client
from privoffload.client.drift import AutoSyncClient
from privoffload.config import DriftConfig, ResyncConfig

from ..helpers import ROOT, assert_user_error, free_port, run_cli
from .cloud_helpers import ADMIN, TOKEN, auth, make_repo, serve
from .test_autosync import client_folder, events, hot_swap


def test_serve_refuses_weak_or_shared_tokens(tmp_path, weights):
    repo = make_repo(tmp_path / "repo", [weights["c1"]])
    strong = "s" * 32
    short = run_cli("serve", "--repo", repo.root, check=False, env={"PRIVOFFLOAD_TOKEN": "short", "PRIVOFFLOAD_ADMIN_TOKEN": strong})
    assert_user_error(short, "PRIVOFFLOAD_TOKEN", "at least")
    same = run_cli("serve", "--repo", repo.root, check=False, env={"PRIVOFFLOAD_TOKEN": strong, "PRIVOFFLOAD_ADMIN_TOKEN": strong})
    assert_user_error(same, "must all differ")


def test_no_auth_serves_everyone_and_says_so(tmp_path, weights):
    repo = make_repo(tmp_path / "repo", [weights["c1"]])
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIVOFFLOAD_") or k == "PRIVOFFLOAD_DATA"}
    proc = subprocess.Popen([sys.executable, "-m", "privoffload", "serve", "--repo", str(repo.root), "--port", str(port),
                             "--no-auth", "--device", "cpu"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/v2").status_code == 200  # no token needed
        assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert "authentication is off" in err


def test_micro_batching_groups_concurrent_requests(tmp_path, weights, cifar):
    """16 one-image requests sent at once, with a 200 ms window: fewer forward passes than requests."""
    repo = make_repo(tmp_path / "repo", [weights["c1"]])
    with serve(repo, batch_window_ms=200.0) as server:
        def one(i: int) -> str:
            with Client(server.url, lambda a: a / 255.0, token=TOKEN, retries=0) as client:
                return client.classify(cifar.x_test[i:i + 1]).model_version

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            assert list(pool.map(one, range(16))) == ["1"] * 16
        text = httpx.get(f"{server.url}/metrics", headers=auth(ADMIN)).text
    batches = float(re.search(r"privoffload_batch_requests_count ([0-9.e+]+)", text).group(1))
    requests = float(re.search(r"privoffload_batch_requests_sum ([0-9.e+]+)", text).group(1))
    print(f"\n{requests:.0f} requests in {batches:.0f} forward passes")
    assert requests == 16 and batches < 16


def test_canary_triggers_a_resync_when_the_version_signal_is_off(tmp_path, weights, cifar):
    """The version hook is switched off: only the canary (labelled images of the user's) can notice the swap."""
    repo = make_repo(tmp_path / "repo", [weights["fitted"]])
    state = tmp_path / "client"
    client_folder(state, weights, cifar)
    canary = (cifar.x_train[:64], cifar.y_train[:64])
    drift = DriftConfig(on_version_change=False, canary_threshold=0.99, canary_every=1)
    with serve(repo, serve_weights=True) as server, \
            AutoSyncClient(server.url, state, cifar.x_train[:128], cifar.y_train[:128], drift=drift, canary=canary,
                           resync_cfg=ResyncConfig(steps=2, batch_size=32, eval_every=2, max_queries=64, rounds=1,
                                                   surrogate_steps=2, queries=["plain"]), token=TOKEN) as client:
        hot_swap(server, repo, weights["c2"])
        client.classify(cifar.x_test[:4])
    logged = events(state)
    assert [e["event"] for e in logged][:3] == ["model version changed", "canary checked", "resync started"]
    assert logged[0]["resync"] is False  # the version signal was seen and, as configured, ignored
    assert logged[1]["resync"] is True and logged[1]["accuracy"] < 0.99
    assert "canary accuracy" in logged[2]["reason"] and logged[3]["event"] == "resync finished"
    assert np.isfinite(logged[1]["accuracy"]) and len(client.resyncs) == 1
