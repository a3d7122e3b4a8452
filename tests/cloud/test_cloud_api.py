"""The Open Inference Protocol v2 routes against a real server: a standard client, auth, limits, bad input."""

from __future__ import annotations

import gzip
import json
import logging
import time

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from safetensors.numpy import load as load_safetensors
from tritonclient.utils import InferenceServerException

from privoffload import nets, oip
from privoffload.cloud.auth import Tokens
from .cloud_helpers import ADMIN, MODEL, TOKEN, auth, make_repo, serve


def offline_probs(path, pixels: np.ndarray) -> np.ndarray:
    model = nets.load(path).eval()
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(pixels).float() / 255), 1).numpy()


def infer_json(pixels, datatype="UINT8", **extra):
    data = pixels.reshape(-1).tolist()
    return {"inputs": [{"name": "images", "datatype": datatype, "shape": list(pixels.shape), "data": data}], **extra}


def test_health_is_open_and_the_rest_needs_a_token(live):
    assert httpx.get(f"{live.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{live.url}/v2/health/ready").json() == {"ready": True}
    r = httpx.get(f"{live.url}/v2")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "error" in r.json()
    meta = httpx.get(f"{live.url}/v2", headers=auth()).json()
    assert meta["name"] == "privoffload" and {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])
    assert httpx.get(f"{live.url}/openapi.json").status_code == 401  # the schema is behind the token too
    assert httpx.get(f"{live.url}/openapi.json", headers=auth()).json()["info"]["title"] == "privoffload cloud"
    assert httpx.get(f"{live.url}/docs").status_code == 404
    assert httpx.get(f"{live.url}/v2/models/%2E%2E/versions/1", headers=auth()).status_code == 404  # no model above


def test_tritonclient_lists_queries_and_classifies(live, cifar, weights):
    """A standard OIP v2 client, unchanged: repository index, metadata, readiness, JSON and binary inference."""
    pixels = cifar.x_test[:5]
    expected = offline_probs(weights["c2"], pixels)
    h = auth()  # tritonclient adds headers to the dict it is given: pass a fresh one to every infer()
    with triton.InferenceServerClient(live.url.removeprefix("http://")) as client:
        assert client.is_server_live() and client.is_server_ready()
        index = client.get_model_repository_index(headers=h)
        assert [(e["name"], e["version"], e["state"]) for e in index] == [(MODEL, "1", "UNAVAILABLE"), (MODEL, "2", "READY")]
        meta = client.get_model_metadata(MODEL, headers=h)
        assert meta["versions"] == ["2"] and meta["inputs"][0] == {"name": "images", "datatype": "UINT8", "shape": [-1, 3, 32, 32]}
        assert [o["name"] for o in meta["outputs"]] == ["probabilities", "class", "label"]
        assert client.is_model_ready(MODEL, headers=h) and not client.is_model_ready(MODEL, "1", headers=h)

        for binary in (True, False):
            inp = triton.InferInput("images", list(pixels.shape), "UINT8")
            inp.set_data_from_numpy(pixels, binary_data=binary)
            outs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "class", "label")]
            result = client.infer(MODEL, [inp], outputs=outs, headers=auth(), request_id="r1")
            response = result.get_response()
            assert response["model_version"] == "2" and response["id"] == "r1"
            np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
            assert (result.as_numpy("class") == expected.argmax(1)).all()
            labels = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label")]
            assert labels == [cifar_class(c) for c in expected.argmax(1)]

        # FP32 in [0, 1], all outputs by default (the client then asks for binary outputs), gzip-compressed body
        inp = triton.InferInput("images", list(pixels.shape), "FP32")
        inp.set_data_from_numpy(pixels.astype(np.float32) / 255, binary_data=True)
        result = client.infer(MODEL, [inp], model_version="2", headers=auth(), request_compression_algorithm="gzip")
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)

        with pytest.raises(InferenceServerException, match="not loaded"):
            client.infer(MODEL, [inp], model_version="1", headers=auth())
        with pytest.raises(InferenceServerException, match="admin token"):
            client.load_model(MODEL, headers=h)


def cifar_class(i: int) -> str:
    from privoffload.data import CLASSES

    return CLASSES[i]


def test_versions_and_unknown_names(live):
    h = auth()
    get = lambda path: httpx.get(f"{live.url}{path}", headers=h)  # noqa: E731
    assert get(f"/v2/models/{MODEL}/versions/1").json()["versions"] == ["1"]  # metadata of a stored version
    assert get(f"/v2/models/{MODEL}/versions/2/ready").json() == {"name": MODEL, "version": "2", "ready": True}
    assert get(f"/v2/models/{MODEL}/versions/1/ready").status_code == 400
    assert get(f"/v2/models/{MODEL}/versions/9").status_code == 404
    assert get(f"/v2/models/{MODEL}/versions/x1/ready").status_code == 404
    assert get("/v2/models/no-such-model").status_code == 404
    assert get("/v2/nothing/here").json() == {"error": "Not Found"}
    r = httpx.post(f"{live.url}/v2/models/{MODEL}/versions/2/infer", headers=h, json=infer_json(np.zeros((1, 3, 32, 32), np.uint8)))
    assert r.status_code == 200 and r.json()["model_version"] == "2"


def test_tokens(live):
    body = infer_json(np.zeros((1, 3, 32, 32), np.uint8))
    url = f"{live.url}/v2/models/{MODEL}/infer"
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers=auth("x" * 30)).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    assert httpx.post(url, json=body, headers=auth(ADMIN)).status_code == 200  # the admin token may also infer
    assert httpx.post(f"{live.url}/v2/repository/models/{MODEL}/load", headers=auth()).status_code == 403
    assert httpx.get(f"{live.url}/metrics").status_code == 401
    assert httpx.get(f"{live.url}/metrics", headers=auth()).status_code == 200  # no metrics token set: the inference one


def test_metrics_take_their_own_token(tmp_path, weights):
    """A Prometheus scraper holds the metrics token: it reads /metrics and nothing else, and needs no admin token."""
    scraper = "metrics-token-for-the-tests"
    with serve(make_repo(tmp_path / "repo", [weights["c1"]]), tokens=Tokens.of(TOKEN, ADMIN, scraper)) as server:
        r = httpx.get(f"{server.url}/metrics", headers=auth(scraper))
        assert r.status_code == 200 and "privoffload_model_version" in r.text
        assert httpx.get(f"{server.url}/metrics", headers=auth(ADMIN)).status_code == 200
        assert httpx.get(f"{server.url}/metrics", headers=auth()).status_code == 403  # the inference token, once it has one
        body = infer_json(np.zeros((1, 3, 32, 32), np.uint8))
        assert httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, headers=auth(scraper)).status_code == 403
        load = httpx.post(f"{server.url}/v2/repository/models/{MODEL}/load", json={}, headers=auth(scraper))
        assert load.status_code == 403 and "admin token" in load.json()["error"]


def test_body_limit_answers_413(live):
    url = f"{live.url}/v2/models/{MODEL}/infer"
    big = b"{" + b" " * (2 << 20) + b"}"  # the live server allows 1 MiB
    r = httpx.post(url, content=big, headers=auth())
    assert r.status_code == 413 and "limit" in r.json()["error"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(40):
            yield b" " * 65536

    assert httpx.post(url, content=chunks(), headers=auth()).status_code == 413
    bomb = gzip.compress(b" " * (8 << 20))  # tiny on the wire, 8 MiB inflated
    r = httpx.post(url, content=bomb, headers={**auth(), "Content-Encoding": "gzip"})
    assert r.status_code == 413 and "decompressed" in r.json()["error"]
    assert httpx.post(url, content=b"{}", headers={**auth(), "Content-Encoding": "br"}).status_code == 415


def binary_request(pixels: np.ndarray, datatype="UINT8", size: int | None = None, tail: bytes | None = None):
    raw = pixels.astype(oip.DTYPES[datatype]).tobytes() if tail is None else tail
    head = json.dumps({"inputs": [{"name": "images", "datatype": datatype, "shape": list(pixels.shape),
                                   "parameters": {"binary_data_size": len(raw) if size is None else size}}]}).encode()
    return head + raw, {oip.HEADER_LENGTH: str(len(head))}


ONE = np.zeros((1, 3, 32, 32), np.uint8)
BAD = {
    "not json": (b"{nope", {}),
    "json array": (b"[1, 2]", {}),
    "deeply nested": (b"[" * 100_000, {}),
    "no inputs": (b"{}", {}),
    "two inputs": (json.dumps({"inputs": [infer_json(ONE)["inputs"][0]] * 2}).encode(), {}),
    "wrong input name": (json.dumps({"inputs": [{**infer_json(ONE)["inputs"][0], "name": "x"}]}).encode(), {}),
    "wrong shape": (json.dumps(infer_json(np.zeros((1, 3, 16, 16), np.uint8))).encode(), {}),
    "zero images": (json.dumps(infer_json(np.zeros((0, 3, 32, 32), np.uint8))).encode(), {}),
    "too many images": (json.dumps({"inputs": [{**infer_json(ONE)["inputs"][0], "shape": [10**12, 3, 32, 32]}]}).encode(), {}),
    "datatype": (json.dumps(infer_json(ONE, datatype="INT32")).encode(), {}),
    "data too short": (json.dumps({"inputs": [{**infer_json(ONE)["inputs"][0], "data": [1, 2, 3]}]}).encode(), {}),
    "uint8 out of range": (json.dumps(infer_json(ONE.astype(int) + 300)).encode(), {}),
    "uint8 floats": (json.dumps(infer_json(ONE.astype(float) + 0.5)).encode(), {}),
    "strings": (json.dumps({"inputs": [{**infer_json(ONE)["inputs"][0], "data": ["a"] * 3072}]}).encode(), {}),
    "nan": (json.dumps(infer_json(ONE.astype(np.float32) * np.nan, datatype="FP32")).encode(), {}),
    "fp32 above 1": (json.dumps(infer_json(ONE.astype(np.float32) + 2, datatype="FP32")).encode(), {}),
    "binary inf": binary_request(ONE.astype(np.float32) + np.inf, "FP32"),
    "binary truncated": binary_request(ONE, tail=bytes(3000), size=3072),
    "binary huge size": binary_request(ONE, size=2**62),
    "binary negative size": binary_request(ONE, size=-1),
    "binary extra bytes": binary_request(ONE, tail=bytes(3100), size=3072),
    "binary wrong size": binary_request(ONE, tail=bytes(3000), size=3000),
    "header length too long": (binary_request(ONE)[0], {oip.HEADER_LENGTH: "999999"}),
    "header length not a number": (binary_request(ONE)[0], {oip.HEADER_LENGTH: "12abc"}),
    "unknown output": (json.dumps(infer_json(ONE, outputs=[{"name": "logits"}])).encode(), {}),
    "output twice": (json.dumps(infer_json(ONE, outputs=[{"name": "class"}] * 2)).encode(), {}),
    "binary_data_output not bool": (json.dumps(infer_json(ONE, parameters={"binary_data_output": "yes"})).encode(), {}),
    "id not a string": (json.dumps(infer_json(ONE, id=5)).encode(), {}),
    "gzip garbage": (b"\x1f\x8b garbage", {"Content-Encoding": "gzip"}),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tensors_answer_400(live, case):
    body, headers = BAD[case]
    r = httpx.post(f"{live.url}/v2/models/{MODEL}/infer", content=body, headers={**auth(), **headers})
    assert r.status_code == 400, (case, r.status_code, r.text[:200])
    assert isinstance(r.json()["error"], str) and r.json()["error"]


def test_weights_download_and_metrics(live, weights):
    r = httpx.get(f"{live.url}/v2/models/{MODEL}/versions/2/weights", headers=auth())
    assert r.status_code == 200 and r.headers["x-model-sha256"] == live.repo.manifest(MODEL, 2).sha256
    ours = load_safetensors(weights["c2"].read_bytes())
    theirs = load_safetensors(r.content)
    assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)
    r = httpx.get(f"{live.url}/v2/models/{MODEL}/versions/1/weights", headers=auth())  # never loaded here: unverified
    assert r.status_code == 404 and "verified" in r.json()["error"]

    text = httpx.get(f"{live.url}/metrics", headers=auth()).text
    assert f'privoffload_model_version{{model="{MODEL}"}} 2.0' in text
    assert 'privoffload_requests_total{route="/v2/models/{name}/infer",status="200"}' in text
    assert "privoffload_batch_images_count" in text and "privoffload_request_seconds_bucket" in text


def test_logs_are_json_lines_without_image_data(live, caplog):
    from privoffload.cloud.telemetry import JsonFormatter

    pixels = np.full((2, 3, 32, 32), 123, np.uint8)
    with caplog.at_level(logging.INFO, logger="privoffload.cloud"):
        body, headers = binary_request(pixels)
        assert httpx.post(f"{live.url}/v2/models/{MODEL}/infer", content=body, headers={**auth(), **headers}).status_code == 200
        httpx.post(f"{live.url}/v2/models/{MODEL}/infer", json=infer_json(pixels.astype(int) + 200), headers=auth())
        deadline = time.monotonic() + 10
        while True:  # a request's line is written just after its response is sent
            lines = [JsonFormatter().format(r) for r in caplog.records if r.name == "privoffload.cloud"]
            records = [json.loads(line) for line in lines]
            infers = [r for r in records if r.get("route") == "/v2/models/{name}/infer"]
            if {200, 400} <= {r["status"] for r in infers} or time.monotonic() > deadline:
                break
            time.sleep(0.02)
    ok = next(r for r in infers if r["status"] == 200)
    assert ok["images"] == 2 and ok["model_version"] == 2 and ok["model"] == MODEL
    bad = next(r for r in infers if r["status"] == 400)
    assert "range" in bad["error"]
    assert all(len(line) < 600 and "123, 123" not in line and "323" not in line for line in lines)
