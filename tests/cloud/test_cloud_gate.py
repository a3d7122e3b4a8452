"""The swap gate: obfuscators registered with a model, a classifier refused when it breaks one, and clients that
announce their obfuscator answered by a version that supports it, on a real server."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from privoffload import nets
from privoffload.client import Client
from privoffload.cloud.repository import Repository
from privoffload.errors import UserError

from ..helpers import assert_user_error, cli
from .cloud_helpers import ADMIN, MODEL, TOKEN, auth, serve

GATE = ("--gate-images", "random:200")  # a few hundred of the test split's images


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file and folder under root, with the files' bytes."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def gated(tmp_path_factory, weights, keys):
    """A repository where the swap gate has run: version 1 the classifier fitted to the obfuscator's uploads, the
    obfuscator registered with it, version 2 the same classifier again (it passes the gate), version 3 a random
    classifier published with --allow-breaking (it breaks the obfuscator). Returns (repo, the outputs of publish)."""
    repo = Repository(tmp_path_factory.mktemp("gated") / "models")
    repo.publish(weights["fitted"], MODEL)
    registered = cli("publish", weights["obfuscator"], "--repo", repo.root)
    assert registered.exit_code == 0 and "registered obfuscator version 1" in registered.output, registered.output
    unchanged = tree(repo.root)
    refused = cli("publish", weights["c2"], "--repo", repo.root, *GATE, "--max-flip-rate", "0")
    assert tree(repo.root) == unchanged  # nothing left in the repository
    same = cli("publish", weights["fitted"], "--repo", repo.root, *GATE, "--max-flip-rate", "0",
               "--signing-key", keys[0])
    breaking = cli("publish", weights["c2"], "--repo", repo.root, *GATE, "--max-flip-rate", "0", "--allow-breaking",
                   "--signing-key", keys[0])
    return repo, {"registered": registered, "refused": refused, "same": same, "breaking": breaking}


def test_registering_an_obfuscator_records_it_with_the_serving_version(gated, weights, tmp_path):
    repo, _ = gated
    assert repo.obfuscators(MODEL) == [1] and repo.versions(MODEL) == [1, 2, 3]  # registering adds no classifier
    r = repo.obfuscator(MODEL, 1)
    assert r.works_with == 1 and r.shape == (3, 32, 32) and r.source == str(weights["obfuscator"])
    folder = repo.root / MODEL / "obfuscators" / "1"
    assert (folder / "obfuscator.safetensors").read_bytes() == weights["obfuscator"].read_bytes()
    assert json.loads((folder / "obfuscator.json").read_text())["sha256"] == r.sha256
    assert not list((repo.root / MODEL / "obfuscators").glob(".publish-*"))
    with pytest.raises(UserError, match="no obfuscator version 2"):
        repo.obfuscator(MODEL, 2)

    # bad input: one line, nothing written
    other = Repository(tmp_path / "models")
    with pytest.raises(UserError, match="publish its classifier first"):
        other.register(weights["obfuscator"], MODEL)
    other.publish(weights["c1"], MODEL)
    torch.manual_seed(0)
    nets.save(nets.build("codec", 4, channels=1, size=(32, 32)), tmp_path / "grey.safetensors")
    with pytest.raises(UserError, match="takes 1x32x32 images"):
        other.register(tmp_path / "grey.safetensors", MODEL)
    with pytest.raises(UserError, match="not an obfuscator"):
        other.register(weights["c1"], MODEL)
    missing = cli("publish", tmp_path / "none" / "obfuscator.safetensors", "--repo", other.root)
    assert_user_error(missing, "does not exist")
    assert other.obfuscators(MODEL) == []


def test_the_gate_refuses_a_classifier_that_breaks_a_registered_obfuscator(gated):
    repo, out = gated
    assert_user_error(out["refused"], "obfuscator version 1", "negative-flip rate", "--allow-breaking")
    rate = float(out["refused"].stderr.split("negative-flip rate is ")[1].split()[0])
    assert rate > 0  # above the bound of 0, which is why it was refused
    # the same classifier again flips nothing: it passes, and its manifest (signed) says so
    assert out["same"].exit_code == 0, out["same"].output
    m2 = repo.manifest(MODEL, 2)
    assert m2.obfuscators["1"]["negative_flip_rate"] == 0 and m2.obfuscators["1"]["supported"] is True
    assert m2.obfuscators["1"]["images"] == 200 and m2.obfuscators["1"]["reference"] == 1
    assert m2.supports(repo.obfuscator(MODEL, 1)) and repo.manifest(MODEL, 1).supports(repo.obfuscator(MODEL, 1))


def test_allow_breaking_publishes_with_the_obfuscator_unsupported_and_signed(gated, keys):
    repo, out = gated
    assert out["breaking"].exit_code == 0 and "NOT supported" in out["breaking"].output, out["breaking"].output
    m3 = repo.manifest(MODEL, 3)
    assert m3.obfuscators["1"]["supported"] is False and m3.obfuscators["1"]["negative_flip_rate"] > 0
    assert not m3.supports(repo.obfuscator(MODEL, 1))
    public = load_pem_public_key(keys[1].read_bytes())
    for v in (2, 3):  # the gate's results are inside the signed manifest
        text = repo.manifest_text(MODEL, v)
        assert '"obfuscators"' in text
        public.verify(base64.b64decode(repo.signature(MODEL, v)), text.encode())


def test_a_client_announcing_its_obfuscator_is_answered_by_a_version_that_supports_it(gated, weights, cifar, tmp_path,
                                                                                   monkeypatch):
    repo, _ = gated
    Image.fromarray(cifar.x_test[0].transpose(1, 2, 0)).save(tmp_path / "one.png")
    monkeypatch.setenv("PRIVOFFLOAD_TOKEN", TOKEN)
    repo.record_served(MODEL, 3)  # the breaking version serves
    images = cifar.x_test[:8]
    with serve(repo, max_batch_images=64) as server:
        with Client(server.url, weights["obfuscator"], token=TOKEN) as plain, \
                Client(server.url, weights["obfuscator"], token=TOKEN, obfuscator_version=1) as announcing:
            assert {plain.classify(images).model_version} == {"3"}
            assert {announcing.classify(images).model_version} == {"2"}  # the newest older version that supports it
            assert {plain.classify(images).model_version} == {"3"}  # and the served version is unchanged
        for extra, version in (((), "3"), (("--obfuscator-version", "1"), "2")):
            done = cli("classify", tmp_path / "one.png", "--server", server.url, "--obfuscator", weights["obfuscator"],
                       "--json", *extra)
            assert done.exit_code == 0 and json.loads(done.stdout)[0]["model_version"] == version, done.output

        body = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": [128] * 3072}],
                "parameters": {"obfuscator_version": "7"}}
        url = f"{server.url}/v2/models/{MODEL}"
        unknown = httpx.post(f"{url}/infer", json=body, headers=auth())
        assert unknown.status_code == 400 and "no obfuscator version 7" in unknown.json()["error"]
        body["parameters"]["obfuscator_version"] = "01"
        assert httpx.post(f"{url}/infer", json=body, headers=auth()).status_code == 400
        body["parameters"]["obfuscator_version"] = 1  # a number is fine too
        assert httpx.post(f"{url}/infer", json=body, headers=auth()).json()["model_version"] == "2"
        pinned = httpx.post(f"{url}/versions/3/infer", json=body, headers=auth())
        assert pinned.status_code == 400 and "pinned" in pinned.json()["error"]

        # once a version that supports it serves, everyone gets that one
        loaded = httpx.post(f"{server.url}/v2/repository/models/{MODEL}/load", json={"parameters": {"version": "2"}},
                            headers=auth(ADMIN))
        assert loaded.status_code == 200, loaded.text
        with Client(server.url, weights["obfuscator"], token=TOKEN, obfuscator_version=1) as announcing:
            assert announcing.classify(images).model_version == "2"
        del body["parameters"]
        assert httpx.post(f"{url}/infer", json=body, headers=auth()).json()["model_version"] == "2"
