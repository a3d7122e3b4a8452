"""The model repository on disk, publishing, loading at start, and the line between cloud and client."""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import stat
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from .cloud_helpers import ADMIN, MODEL, ServeProcess, auth
from privoffload import nets
from privoffload.cli import app as cli
from privoffload.cloud.repository import MANIFEST, WEIGHTS, Repository, sha256_of
from privoffload.cloud.dataplane import DataPlane
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
    assert result.exit_code == 0 and "registered obfuscator version 1" in result.output  # an obfuscator is registered
    assert repo.versions(MODEL) == [1] and repo.obfuscators(MODEL) == [1]


def test_start_loads_the_newest_version_that_verifies(tmp_path, weights):
    with pytest.raises(UserError, match="no loadable model"):
        DataPlane.open(Repository(tmp_path / "empty"), torch.device("cpu"))
    repo = Repository(tmp_path / "repo")
    for f in (weights["c1"], weights["c2"], weights["c3"]):
        repo.publish(f, MODEL)
    assert repo.served(MODEL) is None  # publishing serves nothing
    assert DataPlane.open(repo, torch.device("cpu")).serving(MODEL).version == 3
    assert repo.served(MODEL) == 3  # the first start records what it serves
    repo.weights_path(MODEL, 3).write_bytes(repo.weights_path(MODEL, 3).read_bytes()[:-10])  # truncated
    plane = DataPlane.open(repo, torch.device("cpu"))
    assert plane.serving(MODEL).version == 2 and "damaged" in reasons(plane)[3]
    repo.publish(weights["c1"], MODEL)  # version 4: newer than the record, never served unless loaded
    assert DataPlane.open(repo, torch.device("cpu")).serving(MODEL).version == 2


def reasons(plane: DataPlane) -> dict[int, str]:
    return {int(e["version"]): e["reason"] for e in plane.index()}


def bound_by_file_modes() -> dict:
    """Popen arguments under which a command obeys file modes as a service account does, even when the tests run
    as root: root's capabilities to read and search past them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) are dropped."""
    if os.geteuid() != 0:
        return {}

    def drop():
        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (1, 2):  # PR_CAPBSET_DROP = 24: gone from the bounding set, gone after exec
            if libc.prctl(24, capability, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    return {"preexec_fn": drop}


def test_a_server_bound_by_file_modes_reads_what_publish_wrote_and_refuses_what_it_cannot_read(weights):
    """publish writes 0755 folders and 0644 files; a version nobody may read (as an older publish left them, 0700)
    is a refused version with a reason, at start and later: never a crash, a traceback or a 500."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        repo = Repository(root / "repo")
        repo.publish(weights["c1"], MODEL)
        repo.publish(weights["c2"], MODEL)
        version = root / "repo" / MODEL / "1"
        assert stat.S_IMODE(version.stat().st_mode) == 0o755 and stat.S_IMODE((version / MANIFEST).stat().st_mode) == 0o644
        (root / "repo" / MODEL / "2").chmod(0o000)  # unreadable to the server's user, whoever it is
        try:
            with ServeProcess(root / "repo", cwd=tmp, env={"HOME": tmp}, **bound_by_file_modes()) as server:
                url = server.url
                get = lambda path: httpx.get(f"{url}{path}", headers=auth())  # noqa: E731
                assert get(f"/v2/models/{MODEL}").json()["versions"] == ["1"]
                answers = [get(f"/v2/models/{MODEL}/versions/2"), get(f"/v2/models/{MODEL}/versions/2/ready"),
                           httpx.post(f"{url}/v2/repository/models/{MODEL}/load", json={"parameters": {"version": 2}},
                                      headers=auth(ADMIN), timeout=60)]
                assert [r.status_code for r in answers] == [400, 400, 400], [r.text for r in answers]
                assert "Permission denied" in answers[2].json()["error"] and "version 1 keeps serving" in answers[2].json()["error"]
                index = httpx.post(f"{url}/v2/repository/index", headers=auth()).json()
                assert [(e["version"], e["state"]) for e in index] == [("1", "READY"), ("2", "UNAVAILABLE")]
                assert "Permission denied" in index[1]["reason"]
                assert all(tmp not in r.text for r in answers) and tmp not in json.dumps(index)  # no paths of the server

                repo.publish(weights["c3"], MODEL)  # published now: the server's user can read it and swap it in
                r = httpx.post(f"{url}/v2/repository/models/{MODEL}/load", json={}, headers=auth(ADMIN), timeout=60)
                assert r.status_code == 200 and r.json()["version"] == "3", r.text
        finally:
            (root / "repo" / MODEL / "2").chmod(0o755)
        logs = server.logs
        assert "Traceback" not in logs and all(line.startswith("{") for line in logs.splitlines() if line.strip()), logs[-800:]


def hostile_file(folder: Path, name: str, width: str, tensors: dict | None = None) -> Path:
    path = folder / f"{name}.safetensors"
    save_file(tensors or {"x": torch.zeros(1)}, str(path), metadata={"arch": "resnet18", "width": width})
    return path


def test_hostile_weights_are_refused_before_anything_is_built(tmp_path, weights):
    """Files that lie about their width or hold the wrong tensors: one-line refusals, and no memory spent."""
    good = load_file(str(weights["c1"]))
    files = {
        "a width that is a word": hostile_file(tmp_path, "word", "sixteen"),
        "a width of 4096 in 116 bytes": hostile_file(tmp_path, "huge", "4096"),
        "a width of 0": hostile_file(tmp_path, "zero", "0"),
        "the right width, the wrong tensors": hostile_file(tmp_path, "names", "8"),
        "a tensor of the wrong shape": hostile_file(tmp_path, "shape", "8", {**good, "fc.weight": torch.zeros(10, 999)}),
    }
    assert files["a width of 4096 in 116 bytes"].stat().st_size == 116
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    runner = CliRunner()
    for case, path in files.items():  # the operator's command: exit 2 and one line, never a traceback
        result = runner.invoke(cli, ["publish", str(path), "--repo", str(tmp_path / "repo")])
        assert result.exit_code == 2 and result.output.startswith("error: ") and result.output.count("\n") == 1, \
            (case, result.output, result.exception)
        with pytest.raises(UserError):
            nets.load(path)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    assert grown_mb < 100, grown_mb  # a width-4096 ResNet18 would take hundreds of gigabytes

    # a server that finds such a version on disk at start serves the one before, and says why
    repo = Repository(tmp_path / "served")
    repo.publish(weights["c1"], MODEL)
    version = tmp_path / "served" / MODEL / "2"
    version.mkdir()
    shutil.copyfile(files["a width of 4096 in 116 bytes"], version / WEIGHTS)
    manifest = json.loads((tmp_path / "served" / MODEL / "1" / MANIFEST).read_text())
    (version / MANIFEST).write_text(json.dumps({**manifest, "version": 2, "width": 4096, "sha256": sha256_of(version / WEIGHTS)}))
    plane = DataPlane.open(repo, torch.device("cpu"))
    assert plane.serving(MODEL).version == 1 and "width '4096'" in reasons(plane)[2]


def test_a_file_whose_tensors_do_not_fit_its_bytes_is_refused_before_anything_is_built(tmp_path):
    """An 11 KB file whose header lists every tensor of a width-512 ResNet18 (3 GB of weights) with data offsets
    past its end: refused from the header, without building the network."""
    with torch.device("meta"):
        shapes = {k: list(v.shape) for k, v in nets.resnet18(512).state_dict().items()}
    header, offset = {"__metadata__": {"arch": "resnet18", "width": "512"}}, 0
    for key, shape in shapes.items():
        size = 4 * int(np.prod(shape))
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path = tmp_path / "claims-512.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(64))
    assert path.stat().st_size < 16_000
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(UserError, match="claims-512"):
        nets.load(path)
    result = CliRunner().invoke(cli, ["publish", str(path), "--repo", str(tmp_path / "repo")])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024 < 100  # MB: nothing was built


def test_publish_under_a_strict_umask_and_after_a_killed_publish(tmp_path, weights):
    """Under umask 077 every folder publish makes is still 0755 (a server running as another user reads it);
    `..` is no model name; a `.publish-*` folder left by a publish that died an hour ago is removed, a fresh one
    (a publish in progress) is not."""
    old = os.umask(0o077)
    try:
        repo = Repository(tmp_path / "new" / "repo")
        repo.publish(weights["c1"], MODEL)
    finally:
        os.umask(old)
    for folder in (tmp_path / "new", repo.root, repo.root / MODEL, repo.root / MODEL / "1"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
    (tmp_path / "new" / "1").mkdir()  # a version-like folder one level above the repository
    (tmp_path / "new" / "1" / MANIFEST).write_text("{}")
    assert repo.versions("..") == [] and repo.names() == [MODEL]
    with pytest.raises(UserError, match="model name"):
        repo.manifest_text("..", 1)
    stale, fresh = repo.root / MODEL / ".publish-dead", repo.root / MODEL / ".publish-running"
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    repo.publish(weights["c2"], MODEL)
    assert not stale.exists() and fresh.exists()
