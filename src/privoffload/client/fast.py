"""Fast obfuscation on a client's CPU: the eval-mode codec, folded and run by ONNX Runtime.

Eager PyTorch spends most of a small codec's time on overhead and on depthwise convolutions in
NCHW. For inference the codec is a fixed function, so we fold every BatchNorm into the convolution
before it and hand the graph to ONNX Runtime (fused, blocked layouts); without onnxruntime the same
folded network runs in PyTorch in channels_last. Batches go through in chunks of a few images: the
activations of a small chunk stay in cache, which makes a batch several times faster than one big
call. `bench/obfuscator_latency.py` measures every backend against eager fp32.

The result is a snapshot of the weights: build a new one after loading other weights.
"""

from __future__ import annotations

import copy
import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .. import nets
from ..errors import UserError

BACKENDS = ("auto", "onnx", "torch", "torch-bf16", "eager")
CHUNK = 8  # images per call; measured best between 4 and 16 on a 1 MiB-L2 CPU


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` where every Conv2d directly followed by a BatchNorm2d (in a
    Sequential) is one convolution with a bias. Same function, fewer operations."""
    model = copy.deepcopy(model).eval()
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
    return model


def has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def to_onnx(model: nn.Module) -> bytes:
    """The folded network as an ONNX model with a dynamic batch dimension.

    Uses the TorchScript-based exporter, which needs no extra package (the dynamo exporter needs
    onnxscript); its deprecation warnings are silenced here.
    """
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(1, *nets.image_shape(model)),), buf, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17)
    return buf.getvalue()


def onnx_session(model: nn.Module):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # parallelism comes from running chunks side by side
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(to_onnx(model), opts, providers=["CPUExecutionProvider"])


class FastObfuscator:
    """Callable: float images [N, C, H, W] in [0, 1] (the codec's own shape) -> obfuscated float images, on the CPU.

    `threads` chunks run side by side (each chunk on one thread); one image always runs on one.
    """

    def __init__(self, model: nn.Module, backend: str = "auto", threads: int | None = None, chunk: int = CHUNK):
        if backend not in BACKENDS:
            raise UserError(f"obfuscator backend {backend!r} is not one of {', '.join(BACKENDS)}")
        if backend == "onnx" and not has_onnxruntime():
            raise UserError("the onnx backend needs onnxruntime: pip install onnxruntime, or use the torch backend")
        self.chunk = max(1, chunk)
        self.threads = max(1, threads or torch.get_num_threads())
        model = getattr(model, "module", model)  # unwrap DDP
        model = copy.deepcopy(model).float().cpu().eval()
        self.shape = nets.image_shape(model)
        self._pool: ThreadPoolExecutor | None = None
        if backend == "auto":
            backend = "torch"
            if has_onnxruntime():
                try:
                    self._session = onnx_session(fold_batchnorm(model))
                    backend = "onnx"
                except Exception as e:  # an exporter this torch lacks: the PyTorch path still works
                    warnings.warn(f"ONNX export failed ({type(e).__name__}: {e}); obfuscating with PyTorch instead")
        elif backend == "onnx":
            self._session = onnx_session(fold_batchnorm(model))
        self.backend = backend
        if backend == "eager":
            self._net, self._dtype = model, torch.float32
        elif backend != "onnx":
            self._dtype = torch.bfloat16 if backend == "torch-bf16" else torch.float32
            self._net = fold_batchnorm(model).to(self._dtype).to(memory_format=torch.channels_last)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "onnx":
            return torch.from_numpy(self._session.run(None, {"x": x.numpy()})[0])
        with torch.inference_mode():
            if self.backend == "eager":
                return self._net(x)
            x = x.to(self._dtype).contiguous(memory_format=torch.channels_last)
            return self._net(x).float().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.shape:
            raise UserError(f"the obfuscator takes images [N, {', '.join(map(str, self.shape))}], got {list(x.shape)}")
        x = x.detach().to("cpu", torch.float32).contiguous()
        if self.backend == "eager" or len(x) <= self.chunk:
            return self._run(x)
        parts = list(x.split(self.chunk))
        if self.backend == "onnx" and self.threads > 1:  # onnxruntime releases the GIL in run()
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads)
            return torch.cat(list(self._pool.map(self._run, parts)))
        return torch.cat([self._run(p) for p in parts])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def fast_obfuscator(model: nn.Module, backend: str = "auto", threads: int | None = None,
                    chunk: int = CHUNK) -> Callable[[torch.Tensor], torch.Tensor]:
    """The fastest available CPU path for an obfuscator (see the module docstring).

    backend: auto (onnx when onnxruntime is installed and the export works, else torch) | onnx |
    torch (folded fp32, channels_last) | torch-bf16 (the same in bf16; fast only on CPUs with bf16
    instructions and too coarse for the client: on real images up to 0.16, on average 0.014 per
    pixel from fp32; kept for benchmarks) | eager (the unmodified module, the reference).
    threads: chunks run at once (default: torch.get_num_threads()).
    """
    return FastObfuscator(model, backend, threads, chunk)


__all__ = ["fast_obfuscator", "FastObfuscator", "fold_batchnorm", "to_onnx", "has_onnxruntime", "BACKENDS"]
