"""The fast client path computes what the eval-mode codec computes, on real CIFAR-10 images."""

from __future__ import annotations

import pytest
import torch

from privoffload import nets
from privoffload.client.fast import fast_obfuscator, fold_batchnorm, has_onnxruntime
from privoffload.errors import UserError

from .helpers import calibrated


@pytest.fixture(scope="module")
def setup(cifar):
    """A seeded Table I codec whose BatchNorm statistics come from real training images (fresh
    statistics are an identity, which would hide folding errors), real test images, and the
    eager fp32 output on them."""
    torch.manual_seed(0)
    model = calibrated(nets.codec(32), cifar.x_train[:128])
    test = torch.from_numpy(cifar.x_test[:128]).float() / 255
    with torch.no_grad():
        ref = model(test)
    assert ref.std() > 0.05  # a non-trivial output, so that a wrong graph cannot pass
    return model, test, ref


def test_folding_removes_batchnorm_and_keeps_the_function(setup):
    codec, x, ref = setup
    folded = fold_batchnorm(codec)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in codec.modules())  # the original is untouched
    with torch.no_grad():
        assert (folded(x) - ref).abs().max() < 1e-4


@pytest.mark.parametrize("backend", ["torch"] + (["onnx"] if has_onnxruntime() else []))
def test_fast_paths_match_eager_fp32(setup, backend):
    codec, x, ref = setup
    fast = fast_obfuscator(codec, backend, threads=2, chunk=8)
    out = fast(x)  # several chunks, run side by side
    assert out.shape == x.shape and out.dtype == torch.float32
    assert (out - ref).abs().max() < 1e-4  # far below one 8-bit step (3.9e-3)
    assert (fast(x[:1]) - out[:1]).abs().max() < 1e-5  # one image alone: the same pixels


def test_auto_prefers_onnxruntime(setup):
    assert fast_obfuscator(setup[0]).backend == ("onnx" if has_onnxruntime() else "torch")


def test_is_a_snapshot_and_does_not_touch_the_model(setup):
    codec, x, _ = setup
    before = {k: v.clone() for k, v in codec.state_dict().items()}
    fast_obfuscator(codec, "torch")(x[:4])
    assert codec.training is False
    assert all(torch.equal(before[k], v) for k, v in codec.state_dict().items())


def test_bad_input_is_a_user_error(setup):
    with pytest.raises(UserError, match="backend"):
        fast_obfuscator(setup[0], "tensorrt")
    with pytest.raises(UserError, match=r"\[N, 3, 32, 32\]"):
        fast_obfuscator(setup[0], "torch")(torch.rand(3, 32, 32))


@pytest.mark.skipif(not has_onnxruntime(), reason="without onnxruntime, auto never exports")
def test_auto_falls_back_to_pytorch_when_the_export_fails(setup, monkeypatch):
    """A torch without the exporter this path uses still obfuscates, with a warning."""
    from privoffload.client import fast

    def no_exporter(model):
        raise RuntimeError("exporter removed")

    monkeypatch.setattr(fast, "to_onnx", no_exporter)
    codec, x, ref = setup
    with pytest.warns(UserWarning, match="exporter removed"):
        obf = fast_obfuscator(codec)
    assert obf.backend == "torch"
    assert (obf(x[:16]) - ref[:16]).abs().max() < 1e-4
