"""`privoffload export`: each format's file computes what the PyTorch client computes (8-bit uploads within one
grey level, the classifier's accuracy on them within 0.2 points) and says what it takes and which weights it is."""

from __future__ import annotations

import hashlib
import importlib.util
import sys

import numpy as np
import pytest
import torch

from privoffload.client import load_obfuscator, quantize
from privoffload.client.export import SUFFIX, export, read_sidecar
from privoffload.runs import load_classifier

from .helpers import cli


def installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


FORMATS = [
    pytest.param("onnx", marks=pytest.mark.skipif(not installed("onnx", "onnxruntime"), reason="onnx and onnxruntime "
                                                   "are not installed (they are in requirements.lock)")),
    pytest.param("executorch", marks=pytest.mark.skipif(not installed("executorch"), reason="ExecuTorch is not "
                                                         "installed: `make edge` installs it")),
    pytest.param("tflite", marks=pytest.mark.skipif(not installed("litert_torch", "ai_edge_litert"), reason="litert-torch "
                                                     "and ai-edge-litert are not installed: `make edge` installs them")),
]


@pytest.fixture(scope="module")
def held_out_images(cifar):
    pick = np.random.default_rng(0).choice(len(cifar.x_test), 500, replace=False)
    return cifar.x_test[pick], cifar.y_test[pick]


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_exported_obfuscator_uploads_what_the_pytorch_client_uploads(fmt, obfuscator_run, tiny_classifier,
                                                                          held_out_images, tmp_path):
    out = tmp_path / f"obfuscator{SUFFIX[fmt]}"
    report = export(obfuscator_run, fmt, out)
    assert float(report["max_abs_diff"]) < 1e-4  # export ran the written file and compared it with PyTorch

    # the file says what it takes and which weights it holds: the sidecar, and ONNX's own metadata
    weights = (obfuscator_run / "obfuscator.safetensors").read_bytes()
    meta = read_sidecar(out)
    assert meta["image"] == "3x32x32" and meta["kind"] == "obfuscator" and meta["format"] == fmt
    assert meta["sha256"] == hashlib.sha256(weights).hexdigest()
    if fmt == "onnx":
        import onnx

        assert {p.key: p.value for p in onnx.load(str(out)).metadata_props} == meta

    x, y = held_out_images
    reference = quantize(load_obfuscator(obfuscator_run, backend="eager")(x))  # the PyTorch client
    uploads = quantize(load_obfuscator(out)(x))  # the exported file, through the client's one door
    assert uploads.shape == reference.shape and uploads.dtype == np.uint8 and uploads.std() > 1
    assert np.abs(uploads.astype(int) - reference).max() <= 1
    classifier = load_classifier(tiny_classifier).eval()

    def accuracy(pixels: np.ndarray) -> float:
        with torch.no_grad():
            return 100 * float((classifier(torch.from_numpy(pixels).float() / 255).argmax(1).numpy() == y).mean())

    assert abs(accuracy(uploads) - accuracy(reference)) <= 0.2
    # any batch size: one image alone gives its pixels in the batch
    assert np.abs(quantize(load_obfuscator(out)(x[3:4])).astype(int) - uploads[3:4]).max() <= 1


def one_line_error(result, *words: str) -> None:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert all(w in lines[0] for w in words), (words, lines[0])


def test_export_from_the_command_line(obfuscator_run, tmp_path):
    out = tmp_path / "site" / "o.onnx"  # the folder is made
    result = cli("export", obfuscator_run, "--format", "onnx", "--out", out)
    assert result.exit_code == 0 and f"wrote {out} (onnx: obfuscator codec width 4, images 3x32x32" in result.output
    assert out.is_file() and (tmp_path / "site" / "o.onnx.json").is_file()


def test_bad_exports_are_one_line_errors(obfuscator_run, tiny_classifier, tmp_path):
    one_line_error(cli("export", obfuscator_run, "--format", "coreml", "--out", tmp_path / "o"),
                   "coreml", "onnx, executorch, tflite")
    one_line_error(cli("export", tiny_classifier, "--format", "onnx", "--out", tmp_path / "c.onnx"),
                   "neither obfuscator.safetensors nor attacker.safetensors")
    one_line_error(cli("export", tiny_classifier / "classifier.safetensors", "--format", "onnx",
                       "--out", tmp_path / "c.onnx"), "classifier", "runs in the cloud")
    (tmp_path / "file").write_text("")
    one_line_error(cli("export", obfuscator_run, "--format", "onnx", "--out", tmp_path / "file" / "o.onnx"),
                   "cannot write")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_a_missing_runtime_says_what_to_install(obfuscator_run, tmp_path, monkeypatch):
    """Without ExecuTorch (imports of it fail, as where it is not installed): one line naming the install."""
    monkeypatch.setitem(sys.modules, "executorch.exir", None)
    one_line_error(cli("export", obfuscator_run, "--format", "executorch", "--out", tmp_path / "o.pte"),
                   "needs executorch", "pip install", "make edge")
    assert not list(tmp_path.iterdir())
