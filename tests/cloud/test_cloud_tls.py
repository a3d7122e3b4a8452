"""What crosses the network: https with a certificate made here, no token over plain http to another
machine, and downloaded weights that must carry the publisher's signature whoever relays them."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from types import SimpleNamespace

import httpx
import pytest
import trustme
from typer.testing import CliRunner

from .cloud_helpers import MODEL, TOKEN, auth, key_pair, make_repo, serve
from privoffload.cli import app as cli
from privoffload.client import BadServer, Client, ClientError


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> dict:
    """A throwaway CA and a certificate it signed for 127.0.0.1, as PEM files."""
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {"ca": folder / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem"}
    ca.cert_pem.write_to_path(files["ca"])
    cert.private_key_pem.write_to_path(files["key"])
    for i, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(files["cert"], append=i > 0)
    return files


def test_https_with_a_self_signed_certificate(tmp_path, weights, cifar, tls):
    repo = make_repo(tmp_path / "repo", [weights["c1"]])
    x = cifar.x_test[:2]
    with serve(repo, ssl_certfile=str(tls["cert"]), ssl_keyfile=str(tls["key"])) as server:
        assert server.url.startswith("https://")
        with Client(server.url, weights["obfuscator"], token=TOKEN, ca_cert=tls["ca"]) as client:
            assert client.classify(x).model_version == "1"
        with pytest.raises(ClientError, match="not trusted") as e:  # a certificate nobody vouched for: no retries
            Client(server.url, weights["obfuscator"], token=TOKEN).classify(x)
        assert "\n" not in str(e.value)
        with pytest.raises(httpx.HTTPError):  # the port speaks only TLS
            httpx.get(f"http://127.0.0.1:{server.port}/v2/health/live", timeout=5)
    (tmp_path / "junk.pem").write_text("not a certificate")
    bad = CliRunner().invoke(cli, ["serve", "--repo", str(repo.root), "--ssl-certfile", str(tmp_path / "junk.pem"),
                                   "--ssl-keyfile", str(tls["key"])],
                             env={"PRIVOFFLOAD_TOKEN": TOKEN, "PRIVOFFLOAD_ADMIN_TOKEN": "admin-token-for-the-tests"})
    assert bad.exit_code == 2 and bad.output.startswith("error: cannot use the certificate") and bad.output.count("\n") == 1


def test_no_token_over_plain_http_to_another_machine(weights):
    obf = weights["obfuscator"]
    for url in ("http://192.0.2.1:8000", "http://cloud.example:8000"):
        with pytest.raises(ClientError, match="plain http"):
            Client(url, obf, token=TOKEN)
    for url in ("http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000", "https://cloud.example:8000"):
        Client(url, obf, token=TOKEN).close()
    Client("http://192.0.2.1:8000", obf).close()  # no token, nothing secret
    Client("http://192.0.2.1:8000", obf, token=TOKEN, allow_http=True).close()  # told to
    refused = CliRunner().invoke(cli, ["classify", "--server", "http://192.0.2.1:8000", "--obfuscator", str(obf), "a.png"],
                                 env={"PRIVOFFLOAD_TOKEN": TOKEN})
    assert refused.exit_code == 2 and "plain http" in refused.output and refused.output.count("\n") == 1


class Tamper:
    """A man in the middle: rewrites the weights a server sends (with a matching X-Model-Sha256), or the
    manifest it serves, when `switch` says so."""

    def __init__(self, app, switch: SimpleNamespace):
        self.app, self.switch = app, switch

    async def __call__(self, scope, receive, send):
        path, switch = scope.get("path", "") if scope["type"] == "http" else "", self.switch
        if not (path.endswith("/weights") and switch.weights) and not (path.endswith("/manifest") and switch.manifest_sha):
            return await self.app(scope, receive, send)
        messages = []

        async def keep(message):
            messages.append(message)

        await self.app(scope, receive, keep)
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
        if path.endswith("/weights"):
            body, digest = switch.weights, hashlib.sha256(switch.weights).hexdigest()
            headers = [(b"content-length", str(len(body)).encode()), (b"x-model-sha256", digest.encode())]
        else:
            signed = json.loads(body)
            signed["manifest"] = json.dumps({**json.loads(signed["manifest"]), "sha256": switch.manifest_sha})
            body = json.dumps(signed).encode()
            headers = [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def test_downloaded_weights_must_carry_the_publishers_signature(tmp_path, weights, keys):
    private, public = keys
    repo = make_repo(tmp_path / "repo", [weights["c1"]], signing_key=private)
    server = serve(repo, serve_weights=True)
    tamper = SimpleNamespace(weights=None, manifest_sha=None)
    server.app.add_middleware(Tamper, switch=tamper)
    _, stranger = key_pair(tmp_path, "stranger")
    with server:
        with Client(server.url, weights["obfuscator"], token=TOKEN, publisher_key=public) as client:
            assert client.download_weights("1", tmp_path / "w1").read_bytes() == weights["c1"].read_bytes()

            tamper.weights = weights["c2"].read_bytes()  # other weights, announced with their own hash
            with pytest.raises(BadServer, match="not the signed one"):
                client.download_weights("1", tmp_path / "w2")
            assert not (tmp_path / "w2").exists()
            tamper.weights, tamper.manifest_sha = None, hashlib.sha256(weights["c2"].read_bytes()).hexdigest()
            with pytest.raises(BadServer, match="publisher's signature"):
                client.download_weights("1", tmp_path / "w3")
            tamper.manifest_sha = None
            with pytest.raises(ClientError, match="not a model version"):
                client.download_weights("1/../../metrics?", tmp_path / "w4")
        with Client(server.url, weights["obfuscator"], token=TOKEN, publisher_key=stranger) as client:
            with pytest.raises(BadServer, match="publisher's signature"):
                client.download_weights("1", tmp_path / "w5")
        repo.publish(weights["c2"], MODEL)  # unsigned
        assert httpx.post(f"{server.url}/v2/repository/models/{MODEL}/load", json={}, headers=auth("admin-token-for-the-tests"),
                          timeout=60).status_code == 200
        with Client(server.url, weights["obfuscator"], token=TOKEN, publisher_key=public) as client:
            with pytest.raises(BadServer, match="not signed"):
                client.download_weights("2", tmp_path / "w6")


class Recorder:
    """A loopback server that records the request heads it gets and answers 502: a proxy that reads everything."""

    def __init__(self):
        self.heads: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    head = b""
                    while b"\r\n\r\n" not in head:  # the whole head, however the network cut it
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        head += chunk
                    self.heads.append(head)
                    conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass


def test_proxy_settings_are_ignored_unless_given_and_the_http_rule_covers_the_proxy(tmp_path, weights, cifar, monkeypatch):
    """With HTTP_PROXY set, the token does not go to the proxy: the client goes direct unless told to use one, and a
    proxy it is told to use over plain http must be on this machine, like the server."""
    repo = make_repo(tmp_path / "repo", [weights["c1"]])
    proxy = Recorder()
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy.url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with serve(repo) as server:
        with Client(server.url, weights["obfuscator"], token=TOKEN, retries=0) as client:
            assert client.classify(cifar.x_test[:1]).model_version == "1"
        assert proxy.heads == []  # nothing went through the proxy, least of all the token
        with Client(server.url, weights["obfuscator"], token=TOKEN, retries=0, proxy=proxy.url) as client:
            with pytest.raises(ClientError):
                client.classify(cifar.x_test[:1])
        assert len(proxy.heads) == 1 and TOKEN.encode() in proxy.heads[0], proxy.heads  # told to: it went there
    with pytest.raises(ClientError, match="through the proxy .* plain http"):  # the proxy would read the token
        Client("http://127.0.0.1:8000", weights["obfuscator"], token=TOKEN, proxy="http://192.0.2.1:3128")
    # to an https server the proxy only relays a tunnel it cannot read (nothing is sent here: no request is made)
    Client("https://cloud.example:8443", weights["obfuscator"], token=TOKEN, proxy="http://192.0.2.1:3128").close()
    proxy.sock.close()


def test_rollbacks_below_the_minimum_version_and_unsigned_weights_are_refused(tmp_path, weights, cifar, keys):
    """A server that serves an older signed version than the client accepts (min_version) is refused, answers and
    weights alike; without the publisher's key, weights are refused unless the caller trusts the server's hash."""
    private, public = keys
    repo = make_repo(tmp_path / "repo", [weights["c1"], weights["c2"]], signing_key=private)
    with serve(repo, serve_weights=True) as server:
        assert httpx.post(f"{server.url}/v2/repository/models/{MODEL}/load", json={"parameters": {"version": 1}},
                          headers=auth("admin-token-for-the-tests"), timeout=60).status_code == 200
        with Client(server.url, weights["obfuscator"], token=TOKEN, publisher_key=public, min_version=2) as client:
            with pytest.raises(BadServer, match="older than version 2"):
                client.classify(cifar.x_test[:1])
            with pytest.raises(BadServer, match="older than version 2"):
                client.download_weights("1", tmp_path / "w1")
        with Client(server.url, weights["obfuscator"], token=TOKEN) as client:
            with pytest.raises(ClientError, match="nobody signed"):
                client.download_weights("1", tmp_path / "w2")
            assert client.download_weights("1", tmp_path / "w3", unsigned=True).read_bytes() == weights["c1"].read_bytes()
