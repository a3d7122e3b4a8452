"""The browser client in a real headless Chromium against the real service on loopback: the page obfuscates
in WebAssembly, and the service receives the 8-bit upload and nothing of the picture."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from privoffload import nets, oip
from privoffload.client import Client, load_obfuscator, quantize, read_images
from privoffload.client.export import export
from privoffload.cloud.app import create_app
from privoffload.cloud.auth import Tokens
from privoffload.cloud.web import STATIC
from privoffload.config import ServeConfig
from privoffload.data import CLASSES
from privoffload.errors import UserError

from ..chromium import Chromium, find_chromium
from ..helpers import calibrated
from .cloud_helpers import ADMIN, TOKEN, LiveServer, Recorder, make_repo

needs_chromium = pytest.mark.skipif(find_chromium() is None, reason="Chromium is not installed (`make browser` "
                                                                    "installs Debian's chromium where it runs as root)")


@pytest.fixture(scope="module")
def site(tmp_path_factory, weights, cifar):
    """The web folder (the obfuscator and an attacker's decoder, exported to ONNX), a test picture as a PNG."""
    root = tmp_path_factory.mktemp("site")
    web = root / "web"
    web.mkdir()
    export(weights["obfuscator"], "onnx", web / "obfuscator.onnx")
    torch.manual_seed(5)
    nets.save(calibrated(nets.codec(4), cifar.x_train[:64]), root / "attacker.safetensors")
    export(root / "attacker.safetensors", "onnx", web / "attack.onnx")
    picture = root / "picture.png"
    Image.fromarray(cifar.x_test[7].transpose(1, 2, 0)).save(picture)
    return web, picture


@needs_chromium
def test_the_page_uploads_only_the_obfuscated_pixels_and_shows_the_clouds_answer(site, weights, tmp_path):
    assert (STATIC / "ort" / "ort-wasm-simd-threaded.wasm").is_file(), "the page's runtime is missing: run make web"
    web, picture = site
    repo = make_repo(tmp_path / "repo", [weights["fitted"]])
    app, requests = create_app(ServeConfig(repo=str(repo.root), device="cpu", web=str(web)), Tokens.of(TOKEN, ADMIN)), []
    app.add_middleware(Recorder, bodies=requests)  # what left the browser
    with LiveServer(app) as server, Chromium() as browser:
        page = browser.open(f"{server.url}/web/")
        page.wait_for("document.getElementById('status').textContent.startsWith('Obfuscator loaded')")
        page.eval(f"document.getElementById('token').value = {json.dumps(TOKEN)}; "
                  f"document.getElementById('connect').requestSubmit(); true")
        page.wait_for("window.privoffload.state.ready")
        page.set_files("#file", [picture])
        page.wait_for("document.querySelector('.row[data-state]')")
        shown = page.eval("[...document.querySelectorAll('.row[data-state=done] .top5 li')].map(li => li.textContent)")
        result = page.eval("window.privoffload.state.results[0]")
        stored = page.eval("[localStorage.length, document.documentElement.outerHTML.includes(" + json.dumps(TOKEN) + ")]")
        shot = page.screenshot(tmp_path / "browser-client.png")
        print(f"screenshot: {shot}")
        if os.environ.get("PRIVOFFLOAD_SCREENSHOT"):
            page.screenshot(os.environ["PRIVOFFLOAD_SCREENSHOT"])
        from_browser = list(requests)
        with Client(server.url, weights["obfuscator"], token=TOKEN) as client:
            expected = client.classify_files([picture])

    assert "error" not in result, result
    assert stored == [0, False]  # the token is in no page source and not kept beyond the tab (sessionStorage)

    # what reached the cloud: one inference request whose tensor is the upload, and nothing of the picture
    upload = quantize(load_obfuscator(weights["obfuscator"])(read_images([picture], (3, 32, 32))))
    original, file_bytes = read_images([picture], (3, 32, 32)).tobytes(), picture.read_bytes()
    infers = [(headers, body) for path, headers, body in from_browser if path.endswith("/infer")]
    assert len(infers) == 1
    headers, body = infers[0]
    spec, tail = oip.split_body(body, headers.get(oip.HEADER_LENGTH.lower()))
    spec = spec["inputs"][0]
    sent = np.frombuffer(tail, np.uint8).reshape(upload.shape)
    assert spec["shape"] == list(upload.shape) and spec["datatype"] == "UINT8"
    assert np.abs(sent.astype(int) - upload).max() <= 1  # the page's WebAssembly obfuscator within a grey level
    for path, _, body in from_browser:  # every request the page made: its own files and the protocol's routes
        assert path.startswith(("/web/", "/v2/")) and original not in body and file_bytes not in body
    assert not np.array_equal(sent, read_images([picture], (3, 32, 32)))

    # the answer shown is the Python client's for the same picture
    assert result["top5"][0]["label"] == expected.labels[0]
    assert shown[0].startswith(expected.labels[0])
    assert abs(result["top5"][0]["probability"] - float(expected.probabilities[0].max())) < 0.01
    assert len(shown) == 5 and result["version"] == expected.model_version
    assert result["ms"] > 0


def test_the_service_serves_the_page_its_runtime_and_the_models_and_nothing_else(site, weights, tmp_path):
    web, _ = site
    repo = make_repo(tmp_path / "repo", [weights["fitted"]])
    with LiveServer(create_app(ServeConfig(repo=str(repo.root), device="cpu", web=str(web)),
                               Tokens.of(TOKEN, ADMIN))) as server:
        get = lambda path, **kw: httpx.get(f"{server.url}{path}", **kw)  # noqa: E731
        page = get("/web/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "script-src 'self' 'wasm-unsafe-eval'; connect-src 'self'" in page.headers["content-security-policy"]
        assert TOKEN not in page.text and TOKEN not in get("/web/app.js").text
        assert get("/web/ort/ort-wasm-simd-threaded.wasm").headers["content-type"] == "application/wasm"
        models = get("/web/models.json").json()
        assert models["obfuscator"]["image"] == [3, 32, 32] and models["attack"]["url"] == "attack.onnx"
        assert models["obfuscator"]["sha256"] == json.loads((web / "obfuscator.onnx.json").read_text())["sha256"]
        assert get("/web/obfuscator.onnx").content == (web / "obfuscator.onnx").read_bytes()
        for path in ("/web/obfuscator.onnx.json", "/web/../app.py", "/web/ort/", "/web/static/app.js"):
            assert get(path).status_code == 404 and "error" in get(path).json()
        assert get("/v2/models/cifar10-resnet18").status_code == 401  # the page is open, inference is not
        meta = get("/v2/models/cifar10-resnet18", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert meta["parameters"]["classes"] == list(CLASSES)  # the names the page shows, from the model's metadata


def test_serve_web_without_an_exported_obfuscator_is_a_one_line_error(weights, tmp_path):
    repo = make_repo(tmp_path / "repo", [weights["fitted"]])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="must hold obfuscator.onnx: privoffload export RUN --format onnx"):
        create_app(ServeConfig(repo=str(repo.root), device="cpu", web=str(tmp_path / "empty")), Tokens.of(TOKEN, ADMIN))
    (tmp_path / "empty" / "obfuscator.onnx").write_bytes(b"not onnx")
    with pytest.raises(UserError, match="obfuscator.onnx.json"):
        create_app(ServeConfig(repo=str(repo.root), device="cpu", web=str(tmp_path / "empty")), Tokens.of(TOKEN, ADMIN))
