"""The model repository on disk, publishing, loading at start, and the line between cloud and client."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from .cloud_helpers import MODEL
from privoffload.cli import app as cli
from privoffload.cloud.repository import MANIFEST, Repository, sha256_of
from privoffload.cloud.store import ModelStore
from privoffload.data import CLASSES
from privoffload.errors import UserError


def test_publish_adds_numbered_versions_with_manifests(tmp_path, weights):
    repo = Repository(tmp_path / "repo")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "classifier.safetensors").write_bytes(weights["c1"].read_bytes())
    result = CliRunner().invoke(cli, ["publish", str(tmp_path / "run"), "--repo", str(repo.root)])
    assert result.exit_code == 0 and f"published {MODEL} version 1" in result.output
    m2 = repo.publish(weights["c2"], MODEL)
    assert repo.versions(MODEL) == [1, 2] and m2.version == 2
    raw = json.loads((repo.root / MODEL / "2" / MANIFEST).read_text())
    assert raw["architecture"] == "resnet18" and raw["width"] == 8 and raw["classes"] == list(CLASSES)
    assert raw["sha256"] == sha256_of(weights["c2"]) == sha256_of(repo.weights_path(MODEL, 2))
    assert raw["created"].endswith("+00:00") and raw["source"] == str(weights["c2"])
    assert repo.manifest(MODEL, 1).source == str(tmp_path / "run")

    # leftovers of an interrupted publish are not versions, and do not block the next one
    (repo.root / MODEL / ".publish-crashed").mkdir()
    (repo.root / MODEL / "3").mkdir()
    (repo.root / MODEL / "3" / "model.safetensors").write_bytes(b"half")
    assert repo.versions(MODEL) == [1, 2]
    assert repo.publish(weights["c3"], MODEL).version == 4
    assert repo.versions(MODEL) == [1, 2, 4] and repo.names() == [MODEL]


def test_publish_refuses_what_the_cloud_cannot_serve(tmp_path, weights):
    repo = Repository(tmp_path / "repo")
    repo.publish(weights["c1"], MODEL)
    with pytest.raises(UserError, match="holds a codec"):
        repo.publish(weights["obfuscator"], MODEL)
    with pytest.raises(UserError, match="another --name"):
        repo.publish(weights["wide"], MODEL)
    assert repo.publish(weights["wide"], "cifar10-resnet18-w16").version == 1
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(UserError, match="not a readable safetensors"):
        repo.publish(tmp_path / "junk.safetensors", MODEL)
    with pytest.raises(UserError, match="does not exist"):
        repo.publish(tmp_path / "missing.safetensors", MODEL)
    with pytest.raises(UserError, match="model name"):
        repo.publish(weights["c1"], "../escape")
    result = CliRunner().invoke(cli, ["publish", str(weights["obfuscator"]), "--repo", str(repo.root)])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "error:" in result.output
    assert repo.versions(MODEL) == [1]


def test_start_loads_the_newest_version_that_verifies(tmp_path, weights):
    with pytest.raises(UserError, match="no loadable model"):
        ModelStore.open(Repository(tmp_path / "empty"), torch.device("cpu"))
    repo = Repository(tmp_path / "repo")
    for f in (weights["c1"], weights["c2"], weights["c3"]):
        repo.publish(f, MODEL)
    assert ModelStore.open(repo, torch.device("cpu")).current[MODEL].version == 3
    repo.weights_path(MODEL, 3).write_bytes(repo.weights_path(MODEL, 3).read_bytes()[:-10])  # truncated
    store = ModelStore.open(repo, torch.device("cpu"))
    assert store.current[MODEL].version == 2 and "damaged" in store.failures[(MODEL, 3)]
