"""The obfuscator as a file that a phone or a browser runs, and the runners that run such files here.

    onnx        ONNX Runtime (Android, iOS, desktop) and ONNX Runtime Web (the browser page, WebAssembly)
    executorch  an ExecuTorch program (.pte) lowered through torch.export to the XNNPACK delegate
    tflite      a LiteRT (TensorFlow Lite) flatbuffer converted by litert-torch

The network is the eval-mode codec with its BatchNorms folded (`fast.fold_batchnorm`: the same function,
fewer operations). Input `x` is float32 [N, C, H, W] in [0, 1], output `y` the obfuscated images, float32
in [0, 1]; the device rounds `y` to the 8-bit pixels it uploads (`obfuscator.quantize`). The batch size N is
free: any N for ONNX and LiteRT, 1 to `max_batch` for ExecuTorch, whose memory is planned ahead for that many.
An attack run's decoder exports the same way (its input is the 8-bit upload / 255): the browser demo shows
what it rebuilds.

Every file says what it takes and which weights it holds, as our safetensors do: a sidecar `FILE.json`
(every format) and, for ONNX, the model's own metadata_props with the same keys: `image` (CxHxW), `sha256`
(of the weights file: the obfuscator's version), `kind`, `arch`, `width`, `format`, `privoffload`.
Each exporter is an optional extra; a missing one is a one-line error that says what to install.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .. import __version__, nets
from ..errors import UserError
from ..runtime import atomic_path, atomic_write_text
from .fast import fold_batchnorm, to_onnx
from .obfuscator import Obfuscate, as_float_images

FORMATS = ("onnx", "executorch", "tflite")
SUFFIX = {"onnx": ".onnx", "executorch": ".pte", "tflite": ".tflite"}
# what to run when a format's packages are missing (the extras are in pyproject.toml; `make edge` installs them all)
INSTALL = {
    "onnx": "pip install 'privoffload[fast]'",
    "executorch": "pip install -c requirements.lock 'privoffload[executorch]' (or make edge)",
    "tflite": "make edge (privoffload[litert], then litert-torch and litert-converter with --no-deps: README)",
}
KINDS = {"obfuscator.safetensors": "obfuscator", "attacker.safetensors": "attacker"}
MAX_BATCH = 64  # ExecuTorch plans its memory for this many images at once; larger batches run in chunks
CHECK_IMAGES = 8  # the written file is run on this many images and compared with PyTorch before export returns
TOLERANCE = 1e-4  # largest difference allowed from PyTorch at export (one 8-bit step is 3.9e-3)


def need(module: str, fmt: str, purpose: str = "exporting to"):
    """Import an optional package, or fail in one line that says what to install."""
    try:
        with warnings.catch_warnings():  # these packages warn about their own experimental APIs on import
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"{purpose} {fmt} needs {module.split('.')[0]} ({str(e)[:60]}); run: {INSTALL[fmt]}") from None


def weights_of(source: str | Path) -> tuple[Path, str]:
    """(weights file, kind): an obfuscator run's obfuscator.safetensors, an attack run's attacker.safetensors, or
    a .safetensors file of either."""
    source = Path(source)
    if source.is_dir():
        found = [source / name for name in KINDS if (source / name).is_file()]
        if not found:
            raise UserError(f"{source} holds neither obfuscator.safetensors nor attacker.safetensors; pass an "
                            f"obfuscator or attack run folder")
        source = found[0]
    elif not source.is_file():
        raise UserError(f"{source} does not exist; pass an obfuscator or attack run folder, or a .safetensors file")
    return source, KINDS.get(source.name, "obfuscator" if nets.read_metadata(source).get("arch") == "codec" else "attacker")


def load_network(weights: Path) -> nn.Module:
    """The network to export: an image-to-image network (codec or U-Net), eval mode, BatchNorm folded, on the CPU."""
    net = nets.load(weights, device="cpu")
    if nets.arch_of(net)["arch"] == "resnet18":
        raise UserError(f"{weights} holds a classifier: it runs in the cloud; export an obfuscator or attack run")
    return fold_batchnorm(net.float().eval())


def describe(weights: Path, kind: str, net: nn.Module, fmt: str) -> dict[str, str]:
    """The metadata every exported file carries (strings, as ONNX's metadata_props and safetensors' are)."""
    a = nets.arch_of(net)
    meta = {"format": fmt, "kind": kind, "arch": a["arch"], "width": str(a["width"]),
            "image": "x".join(map(str, nets.image_shape(net))), "input": "x", "output": "y",
            "sha256": hashlib.sha256(nets.read_file(weights)).hexdigest(), "weights": weights.name,
            "privoffload": __version__}
    if fmt == "executorch":
        meta["max_batch"] = str(MAX_BATCH)
    return meta


def export(source: str | Path, fmt: str, out: str | Path) -> dict[str, str]:
    """Write `source`'s network as `out` in `fmt`, and `out`.json beside it; returns the metadata written, with the
    largest difference of the written file from PyTorch on a few images where its runtime is installed here."""
    if fmt not in FORMATS:
        raise UserError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    out = Path(out)
    weights, kind = weights_of(source)
    net = load_network(weights)
    meta = describe(weights, kind, net, fmt)
    write = {"onnx": _write_onnx, "executorch": _write_executorch, "tflite": _write_tflite}[fmt]
    started = time.perf_counter()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror})") from None
    with atomic_path(out) as tmp:
        write(net, tmp, meta)
    atomic_write_text(sidecar(out), json.dumps(meta, indent=1) + "\n")
    report = {**meta, "seconds": f"{time.perf_counter() - started:.1f}", "bytes": str(out.stat().st_size)}
    try:
        run = load(out)
    except UserError:  # exported, but this machine lacks the runtime: nothing to compare with
        return report
    x = torch.rand(CHECK_IMAGES, *nets.image_shape(net), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        diff = float(np.abs(run(x.numpy()) - net(x).numpy()).max())
    if not diff <= TOLERANCE:
        out.unlink()
        sidecar(out).unlink()
        raise UserError(f"the {fmt} file computes another function than the network ({diff:.2g} apart on random "
                        f"images); nothing written")
    return {**report, "max_abs_diff": f"{diff:.1e}"}


def sidecar(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def read_sidecar(path: str | Path) -> dict[str, str]:
    try:
        meta = json.loads(sidecar(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{sidecar(path)} is missing; export {path} again with privoffload export") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {sidecar(path)} ({type(e).__name__}); export {path} again") from None
    if not isinstance(meta, dict) or meta.get("format") not in FORMATS or "image" not in meta:
        raise UserError(f"{sidecar(path)} does not describe an exported network; export {path} again")
    return meta


# ---------------------------------------------------------------- writers

def example(net: nn.Module, n: int = 2) -> tuple[torch.Tensor]:
    return (torch.rand(n, *nets.image_shape(net)),)


def _write_onnx(net: nn.Module, path: Path, meta: dict[str, str]) -> None:
    onnx = need("onnx", "onnx")
    model = onnx.load_from_string(to_onnx(net))
    onnx.helper.set_model_props(model, meta)
    path.write_bytes(model.SerializeToString())


def batch_dim(max_batch: int = MAX_BATCH) -> tuple[dict]:
    return ({0: torch.export.Dim("n", min=1, max=max_batch)},)


def _write_executorch(net: nn.Module, path: Path, meta: dict[str, str]) -> None:
    exir = need("executorch.exir", "executorch")
    xnnpack = need("executorch.backends.xnnpack.partition.xnnpack_partitioner", "executorch")
    from torch.fx.experimental import _config as shapes

    program = torch.export.export(net, example(net), dynamic_shapes=batch_dim())
    # Lowering re-traces the graph; the convolution's shape rules there ask whether the batch is below 16 and,
    # with the example's 2 as the hint, would cap the batch at 15. Size-oblivious reasoning keeps 1..max_batch.
    with shapes.patch(backed_size_oblivious=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecations inside the lowering, not ours to act on
        edge = exir.to_edge_transform_and_lower(program, partitioner=[xnnpack.XnnpackPartitioner()])
        path.write_bytes(edge.to_executorch().buffer)


def _write_tflite(net: nn.Module, path: Path, meta: dict[str, str]) -> None:
    litert = need("litert_torch", "tflite")
    # the upper bound only bounds the conversion's shape reasoning: LiteRT resizes the input to any batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        litert.convert(net, example(net), dynamic_shapes=batch_dim(1024)).export(str(path))


# ---------------------------------------------------------------- runners

def load(path: str | Path, threads: int = 1) -> Obfuscate:
    """An exported file as the client's obfuscator function: images (uint8, or floats in [0, 1]) -> O(x) floats,
    with `.shape` and `.meta` (the sidecar). `threads`: the runtime's CPU threads (1: one core, as on a phone's
    small core). `Client(server, load("o.pte"))` obfuscates with the phone's runtime."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; write it with privoffload export")
    meta = read_sidecar(path)
    shape = tuple(int(v) for v in meta["image"].split("x"))
    run = {"onnx": _run_onnx, "executorch": _run_executorch, "tflite": _run_tflite}[meta["format"]](path, meta, threads)

    def obfuscate(images: np.ndarray) -> np.ndarray:
        return run(np.ascontiguousarray(as_float_images(images, shape)))

    obfuscate.shape, obfuscate.meta = shape, meta
    return obfuscate


Run = Callable[[np.ndarray], np.ndarray]


def _run_onnx(path: Path, meta: dict, threads: int) -> Run:
    ort = need("onnxruntime", "onnx", "running")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})[0]


def _run_executorch(path: Path, meta: dict, threads: int) -> Run:
    runtime = need("executorch.runtime", "executorch", "running")
    need("executorch.extension.pybindings.portable_lib", "executorch", "running")._unsafe_reset_threadpool(threads)
    method = runtime.Runtime.get().load_program(str(path)).load_method("forward")
    max_batch = int(meta.get("max_batch", MAX_BATCH))

    def run(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x)
        return torch.cat([method.execute([part])[0] for part in t.split(max_batch)]).numpy()

    return run


def _run_tflite(path: Path, meta: dict, threads: int) -> Run:
    interpreter_mod = need("ai_edge_litert.interpreter", "tflite", "running")
    interpreter = interpreter_mod.Interpreter(model_path=str(path), num_threads=threads)
    (inp,), (outp,) = interpreter.get_input_details(), interpreter.get_output_details()
    batch = [0]

    def run(x: np.ndarray) -> np.ndarray:
        if batch[0] != len(x):  # resizing re-plans the interpreter's memory: only when the batch changes
            interpreter.resize_tensor_input(inp["index"], list(x.shape))
            interpreter.allocate_tensors()
            batch[0] = len(x)
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(outp["index"]).copy()

    return run


EXPORTED = tuple(SUFFIX.values())

__all__ = ["export", "load", "FORMATS", "EXPORTED", "read_sidecar", "sidecar", "weights_of"]
