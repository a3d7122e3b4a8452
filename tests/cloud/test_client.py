"""The obfuscating client against a real server: same accuracy as offline, only O(x) on the wire, clear errors."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ..helpers import free_port
from .cloud_helpers import ADMIN, MODEL, TOKEN, LiveServer, Recorder, auth, make_repo, serve
from privoffload import nets, oip
from privoffload.cli import app as cli
from privoffload.client import (AuthError, BadServer, Client, RequestRejected, ServerUnavailable, load_obfuscator,
                                quantize)
from privoffload.cloud.repository import Repository
from privoffload.data import DeviceData
from privoffload.errors import UserError
from privoffload.metrics import obfuscation_scores


@pytest.fixture(scope="module")
def repo(tmp_path_factory, weights):
    return make_repo(tmp_path_factory.mktemp("repo"), [weights["c1"], weights["c2"]])


def test_accuracy_over_http_equals_offline_evaluation(tmp_path, weights, cifar):
    """200 test images: the client (obfuscate, 8-bit, HTTP, micro-batched server) against metrics.obfuscation_scores."""
    x, y = cifar.x_test[:200], cifar.y_test[:200]
    obfuscator = nets.load(weights["obfuscator"], expect="codec").eval()
    classifier = nets.load(weights["fitted"], expect="resnet18").eval()
    offline = obfuscation_scores(classifier, obfuscator, DeviceData(x, y))["quantized_obfuscated_accuracy"]
    repo = make_repo(tmp_path / "repo", [weights["fitted"]])
    # the eager path, so that the comparison is exact; the default fast path is bounded in test_fast_obfuscator
    eager = load_obfuscator(weights["obfuscator"], backend="eager")
    with serve(repo) as server, Client(server.url, eager, token=TOKEN, images_per_request=64) as client:
        result = client.classify(x)
    online = float((result.classes == y).mean())
    print(f"\nend to end: {len(y)} images, offline accuracy {offline:.4f}, over HTTP {online:.4f}")
    assert online == offline
    assert set(result.versions) == {"1"} and len(result.labels) == 200
    assert len(set(result.classes.tolist())) >= 5  # predictions differ from image to image: the check has teeth
    with torch.no_grad():
        q = torch.round(obfuscator(torch.from_numpy(x).float() / 255).clamp(0, 1) * 255) / 255
        expected = torch.softmax(classifier(q), 1).numpy()
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-4)


@pytest.mark.parametrize("binary", [True, False])
def test_raw_images_never_leave_the_client(repo, weights, cifar, binary):
    x = cifar.x_test[:8]
    bodies = []
    server = serve(repo)
    server.app.add_middleware(Recorder, bodies=bodies)
    with server, Client(server.url, weights["obfuscator"], token=TOKEN, binary=binary) as client:
        client.classify(x)
    (_, headers, body), = bodies
    head, tail = oip.split_body(body, headers.get(oip.HEADER_LENGTH.lower()))
    (spec,) = head["inputs"]
    received, _ = oip.read_tensor(spec, tail, 0)
    assert np.array_equal(received, quantize(load_obfuscator(weights["obfuscator"])(x)))  # exactly O(x), 8-bit
    assert received.shape == x.shape and np.abs(received.astype(int) - x).mean() > 20  # and far from x
    assert x.tobytes() not in body and x[0, 0].tobytes() not in body and x[0, :, 0].tobytes() not in body


def test_version_hook_is_called_when_the_cloud_changes_its_model(repo, weights, cifar):
    seen = []
    with serve(repo) as server, Client(server.url, weights["obfuscator"], token=TOKEN,
                                       on_version_change=lambda old, new: seen.append((old, new))) as client:
        assert client.classify(cifar.x_test[:2]).model_version == "2" and seen == []
        assert httpx.post(f"{server.url}/v2/repository/models/{MODEL}/load", json={"parameters": {"version": 1}},
                          headers=auth(ADMIN)).status_code == 200
        assert client.classify(cifar.x_test[:2]).model_version == "1" and client.last_version == "1"
        client.classify(cifar.x_test[:2])
        assert seen == [("2", "1")]
        assert httpx.post(f"{server.url}/v2/repository/models/{MODEL}/load", json={"parameters": {"version": 2}},
                          headers=auth(ADMIN)).status_code == 200  # back to 2: the record outlives this server
    with serve(repo) as server, Client(server.url, lambda a: a / 255.0, token=TOKEN, model_version="7",
                                       on_version_change=lambda old, new: seen.append((old, new))) as client:
        client.classify(cifar.x_test[:1])  # a client that knows the version its obfuscator was made for
        assert seen[-1] == ("7", "2")


def test_errors_are_typed_and_one_line(repo, weights, cifar):
    x = cifar.x_test[:1]
    obf = weights["obfuscator"]
    with serve(repo) as server:
        with pytest.raises(AuthError, match="refused the token"):
            Client(server.url, obf, token="wrong-token-wrong-token").classify(x)
        with pytest.raises(AuthError):
            Client(server.url, obf).classify(x)
        with pytest.raises(RequestRejected, match="no model named") as e:
            Client(server.url, obf, token=TOKEN, model="nope").classify(x)
        assert e.value.status == 404
    start = time.perf_counter()
    with pytest.raises(ServerUnavailable, match="cannot reach .* after 3 tries") as e:
        Client(f"http://127.0.0.1:{free_port()}", obf, retries=2, backoff=0.1).classify(x)
    assert time.perf_counter() - start >= 0.1 and isinstance(e.value, UserError) and "\n" not in str(e.value)

    silent = socket.socket()  # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    with pytest.raises(ServerUnavailable, match="did not answer within 0.3 s"):
        Client(f"http://127.0.0.1:{silent.getsockname()[1]}", obf, timeout=0.3, retries=1, backoff=0.01).classify(x)
    silent.close()

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)  # not an inference server
    threading.Thread(target=web.serve_forever, daemon=True).start()
    with pytest.raises(BadServer, match="does not answer like an inference server"):
        Client(f"http://127.0.0.1:{web.server_address[1]}", obf).classify(x)
    web.shutdown()
    for url in ("localhost:8000", "http://", "http://[::1"):
        with pytest.raises(UserError, match="must be a URL"):
            Client(url, obf)


class Unavailable:
    """A gateway in front of the service that answers 503 to the first `n` requests."""

    def __init__(self, app, n: int):
        self.app, self.left = app, n

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.left > 0:
            self.left -= 1
            await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"application/json")]})
            return await send({"type": "http.response.body", "body": b'{"error": "restarting"}'})
        await self.app(scope, receive, send)


def test_retries_with_backoff_ride_out_restarts_and_503(repo, weights, cifar):
    x = cifar.x_test[:1]
    server = serve(repo)  # its port is reserved now, but nothing listens yet: connections are refused
    threading.Timer(0.5, server.__enter__).start()
    try:
        result = Client(server.url, weights["obfuscator"], token=TOKEN, retries=8, backoff=0.1).classify(x)
        assert result.model_version == "2"
    finally:
        while not server.server.started:
            time.sleep(0.05)
        server.__exit__()
    gated = serve(repo)
    gated.app.add_middleware(Unavailable, n=2)
    with gated:
        assert Client(gated.url, weights["obfuscator"], token=TOKEN, retries=2, backoff=0.01).classify(x).model_version == "2"
    gated = serve(repo)
    gated.app.add_middleware(Unavailable, n=5)
    with gated, pytest.raises(ServerUnavailable, match="503"):
        Client(gated.url, weights["obfuscator"], token=TOKEN, retries=1, backoff=0.01).classify(x)


def test_command_line_serve_publish_classify(tmp_path, weights, cifar):
    """The real commands: publish, serve (a subprocess), classify PNG and JPEG files; errors exit 2 on one line."""
    runner = CliRunner()
    repo = tmp_path / "repo"
    assert runner.invoke(cli, ["publish", str(weights["c1"]), "--repo", str(repo)]).exit_code == 0
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"img{i}.{'png' if i < 2 else 'jpg'}")
        Image.fromarray(cifar.x_test[i].transpose(1, 2, 0)).resize((32 + 32 * (i == 2),) * 2).save(paths[-1])
    no_token = runner.invoke(cli, ["serve", "--repo", str(repo)], env={"PRIVOFFLOAD_TOKEN": "", "PRIVOFFLOAD_ADMIN_TOKEN": ""})
    assert no_token.exit_code == 2 and no_token.output.startswith("error: set PRIVOFFLOAD_TOKEN")

    port = free_port()
    env = {**os.environ, "PRIVOFFLOAD_TOKEN": TOKEN, "PRIVOFFLOAD_ADMIN_TOKEN": ADMIN}
    proc = subprocess.Popen([sys.executable, "-m", "privoffload", "serve", "--repo", str(repo), "--port", str(port)],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
                time.sleep(0.2)
        args = ["classify", "--server", url, "--obfuscator", str(weights["obfuscator"]), *map(str, paths)]
        ok = runner.invoke(cli, args, env={"PRIVOFFLOAD_TOKEN": TOKEN})
        assert ok.exit_code == 0, ok.output
        lines = ok.output.strip().splitlines()
        assert len(lines) == 3 and all(line.endswith("version 1") for line in lines)
        wrong = runner.invoke(cli, [*args, "--json"], env={"PRIVOFFLOAD_TOKEN": "x" * 20})
        assert wrong.exit_code == 2 and wrong.output.count("\n") == 1 and "refused the token" in wrong.output
        missing = runner.invoke(cli, [*args[:-3], str(tmp_path / "nope.png")], env={"PRIVOFFLOAD_TOKEN": TOKEN})
        assert missing.exit_code == 2 and "does not exist" in missing.output
    finally:
        proc.terminate()
        _, logs = proc.communicate(timeout=30)
    records = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert any(r["event"] == "serving" for r in records) and any(r.get("status") == 401 for r in records)
    assert all(line.startswith("{") for line in logs.splitlines() if line.strip()), logs[-500:]


class Hostile:
    """A server that answers whatever `script` says: a list of (status, headers, body or a chunk generator),
    one per request, the last repeated. It counts the requests it gets."""

    def __init__(self):
        self.script, self.requests = [], 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        self.requests += 1
        status, headers, body = self.script[min(self.requests, len(self.script)) - 1]
        await send({"type": "http.response.start", "status": status,
                    "headers": [(k.encode(), v.encode()) for k, v in headers.items()]})
        if isinstance(body, bytes):
            return await send({"type": "http.response.body", "body": body})
        async for chunk in body():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def answer(version="1", **replaced) -> tuple:
    """A JSON answer for one image; `replaced` tensors (by name) take the place of the right ones."""
    tensors = {"probabilities": {"name": "probabilities", "datatype": "FP32", "shape": [1, 10], "data": [0.1] * 10},
               "class": {"name": "class", "datatype": "INT64", "shape": [1], "data": [3]},
               "label": {"name": "label", "datatype": "BYTES", "shape": [1], "data": ["cat"]}}
    tensors.update({k: {"name": k, **v} for k, v in replaced.items()})
    body = {"model_name": MODEL, "model_version": version, "outputs": list(tensors.values())}
    return 200, {"content-type": "application/json"}, json.dumps(body).encode()


def test_the_client_survives_a_hostile_server(weights, cifar):
    """Whatever a server sends, the client raises one of its one-line errors, never anything else, never hangs,
    and never holds more than it expects."""
    hostile = Hostile()
    x, obf = cifar.x_test[:1], lambda a: np.asarray(a, np.float32) / 255
    mangled = {
        "a version that is a path": answer(version="1/../../metrics?"),
        "a version that is a number": answer(version=1),
        "probabilities as text": answer(probabilities={"datatype": "BYTES", "shape": [1], "data": ["x"]}),
        "labels as numbers": answer(label={"datatype": "INT64", "shape": [1], "data": [3]}),
        "a class out of range": answer(**{"class": {"datatype": "INT64", "shape": [1], "data": [12]}}),
        "NaN probabilities": answer(probabilities={"datatype": "FP32", "shape": [1, 10], "data": [float("nan")] * 10}),
        "two answers for one image": answer(probabilities={"datatype": "FP32", "shape": [2, 10], "data": [0.1] * 20}),
        "outputs that are an object": (200, {}, b'{"model_version": "1", "outputs": {"class": 1}}'),
        "a 10 MiB answer": (200, {}, b" " * (10 << 20)),
        "a 500 in HTML": (500, {}, b"<html>oops</html>"),
    }
    with LiveServer(hostile) as server, Client(server.url, obf, token=TOKEN, retries=0) as client:
        for case, reply in mangled.items():
            hostile.script = [reply]
            with pytest.raises(BadServer) as e:
                client.classify(x)
            assert "\n" not in str(e.value), case
        assert client.last_version is None  # nothing it said was believed

        async def drip():  # for 1.5 s, far past the client's patience
            for _ in range(30):
                yield b" "
                await asyncio.sleep(0.05)

        hostile.script, hostile.requests = [(200, {}, drip)], 0
        with Client(server.url, obf, token=TOKEN, timeout=0.5, retries=3) as slow, \
                pytest.raises(ServerUnavailable, match="took over 0.5 s"):
            slow.classify(x)
        assert hostile.requests == 1  # not re-sent: the server has the images already

        hostile.script, hostile.requests = [(503, {"retry-after": "1"}, b"busy"), answer()], 0
        start = time.perf_counter()
        with Client(server.url, obf, token=TOKEN, retries=2, backoff=0.01) as patient:
            assert patient.classify(x).model_version == "1"
            assert patient.uploaded == 2  # the retry counts as an upload too
        assert time.perf_counter() - start >= 1.0 and hostile.requests == 2  # it waited as the server asked

        hostile.script = [(200, {}, b"weights without a hash")]
        with pytest.raises(BadServer, match="X-Model-Sha256"):
            client.download_weights("1", Path(tempfile.mkdtemp()) / "w", unsigned=True)

        async def endless():  # 16 MiB, far past what the client takes
            for _ in range(16):
                yield bytes(1 << 20)

        target = Path(tempfile.mkdtemp()) / "w"
        hostile.script = [(200, {"x-model-sha256": "0" * 64}, endless)]
        with Client(server.url, obf, token=TOKEN, max_download_mb=2) as capped, pytest.raises(BadServer, match="more than"):
            capped.download_weights("1", target, unsigned=True)
        assert not target.exists() and not list(target.parent.iterdir())  # nothing half-written is left


def test_the_model_name_and_classes_follow_the_obfuscators_data_set(tmp_path):
    """A grey two-class classifier of PneumoniaMNIST, published without --name, is served as pneumoniamnist-resnet18;
    a client given an obfuscator run of that data set finds it without being told the name, and takes its class
    count and names from the served model. Registering the obfuscator run before its classifier says what comes first."""
    image = {"channels": 1, "size": (32, 32)}
    torch.manual_seed(0)
    nets.save(nets.build("resnet18", 4, **image, num_classes=2, mean=(0.5,), std=(0.25,)), tmp_path / "c.safetensors",
              classes=json.dumps(["normal", "pneumonia"]), dataset="pneumoniamnist")
    run = tmp_path / "o"
    run.mkdir()
    nets.save(nets.build("codec", 4, **image), run / "obfuscator.safetensors")
    (run / "config.toml").write_text(f'dataset = "pneumoniamnist"\nclassifier = "{tmp_path / "c"}"\n')
    runner = CliRunner()
    wrong = runner.invoke(cli, ["publish", str(run), "--repo", str(tmp_path / "repo")])
    assert wrong.exit_code == 2 and "publish its classifier first" in wrong.output and wrong.output.count("\n") == 1
    done = runner.invoke(cli, ["publish", str(tmp_path / "c.safetensors"), "--repo", str(tmp_path / "repo")])
    assert done.exit_code == 0 and "published pneumoniamnist-resnet18 version 1" in done.output, done.output
    with serve(Repository(tmp_path / "repo")) as server, Client(server.url, run, token=TOKEN) as client:
        assert client.model == "pneumoniamnist-resnet18"
        result = client.classify(np.zeros((3, 1, 32, 32), np.uint8))
        assert result.probabilities.shape == (3, 2) and set(result.labels) <= {"normal", "pneumonia"}
        assert client.send(np.zeros((0, 1, 32, 32), np.uint8)).probabilities.shape == (0, 2)
