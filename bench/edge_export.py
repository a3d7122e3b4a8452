"""The obfuscator on phone and browser runtimes: file size, parity with the PyTorch client, latency.

For each format `privoffload export` writes (ONNX, ExecuTorch .pte, LiteRT .tflite) whose packages are
installed here: the file's size; on real CIFAR-10 test images, how far its 8-bit uploads are from the PyTorch
client's and the cloud classifier's accuracy on them; its latency for one image and per image in a batch, on one
core, in its own runtime (onnxruntime, ExecuTorch's Python runtime, ai-edge-litert), timed round-robin in this
process against the PyTorch client (eager fp32, the baseline) and the client's default fast path. With Chromium
and the page's runtime (`make web`), the browser page's own timing of the same ONNX file (WebAssembly, one
thread), and a screenshot of the page classifying a few test images through the real service.

    python bench/edge_export.py --obfuscator runs/o [--attack runs/a] [--screenshot docs/browser-client.png]
    python bench/edge_export.py                      # no runs: a seeded Table I codec, latency and size only
"""

from __future__ import annotations

import argparse
import tempfile
import tomllib
from pathlib import Path

from _common import ROOT, interleaved, median, print_machine, save_json

import numpy as np
import torch

from privoffload import nets
from privoffload.client import load_obfuscator, quantize
from privoffload.client.export import FORMATS, SUFFIX, export, load
from privoffload.errors import UserError


def seeded_codec(folder: Path, width: int) -> Path:
    """A Table I codec whose BatchNorm statistics come from real images, saved as an obfuscator run would."""
    from privoffload.data import load_cifar10

    torch.manual_seed(0)
    model = nets.codec(width)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.from_numpy(load_cifar10().x_train[:512]).float() / 255)
    nets.save(model.eval(), folder / "obfuscator.safetensors")
    return folder


def classifier_of(run: Path) -> Path | None:
    try:
        return Path(tomllib.loads((run / "config.toml").read_text())["classifier"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return None


def parity(obfuscators: dict, x: np.ndarray, y: np.ndarray, classifier) -> dict:
    """Per path: the largest difference of its uploads from the PyTorch client's, in grey levels, the share of
    pixels that differ at all, and the classifier's accuracy on its uploads (percent)."""
    uploads = {k: quantize(f(x)) for k, f in obfuscators.items()}
    reference = uploads["pytorch"].astype(int)
    out = {}
    for k, u in uploads.items():
        with torch.no_grad():
            logits = torch.cat([classifier(torch.from_numpy(p).float() / 255) for p in np.array_split(u, 10)])
        diff = np.abs(u.astype(int) - reference)
        out[k] = {"max_grey_levels": int(diff.max()), "pixels_differing_pct": 100 * float((diff > 0).mean()),
                  "accuracy_pct": 100 * float((logits.argmax(1).numpy() == y).mean())}
    for k in out:
        out[k]["accuracy_diff_points"] = out[k]["accuracy_pct"] - out["pytorch"]["accuracy_pct"]
    return out


def browser(web: Path, classifier: Path | None, x: np.ndarray, rounds: int, batch: int, screenshot: str | None) -> dict:
    """The page's own timing of the exported obfuscator and, with a classifier, a screenshot of it at work."""
    import sys

    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from privoffload.cloud.app import create_app
    from privoffload.cloud.auth import Tokens
    from privoffload.cloud.repository import Repository
    from privoffload.config import ServeConfig
    from privoffload.live import LoopbackServer
    from tests.chromium import Chromium, find_chromium

    if find_chromium() is None:
        return {"skipped": "chromium is not installed"}
    token = "bench-token-bench-token"
    with tempfile.TemporaryDirectory() as tmp:
        repo = Repository(Path(tmp) / "repo")
        weights = classifier / "classifier.safetensors" if classifier and classifier.is_dir() else classifier
        if weights is None:  # the service needs a model to start; the timing needs none
            torch.manual_seed(0)
            weights = Path(tmp) / "c.safetensors"
            nets.save(nets.resnet18(4), weights)
        repo.publish(weights, "cifar10-resnet18")
        pictures = []
        for i in range(4):
            pictures.append(Path(tmp) / f"test-image-{i}.png")
            Image.fromarray(x[i].transpose(1, 2, 0)).save(pictures[-1])
        app = create_app(ServeConfig(repo=str(repo.root), device="cpu", web=str(web)), Tokens.of(token, token + "-admin"))
        with LoopbackServer(app) as server, Chromium(width=1100, height=760) as chromium:
            page = chromium.open(f"{server.url}/web/")
            page.wait_for("document.getElementById('status').textContent.startsWith('Obfuscator loaded')", 60)
            timing = page.eval(f"window.privoffload.benchmark({rounds}, {batch})", timeout=600)
            result = {"one_ms": timing["one"], "batch_ms_per_image": timing["batch"], "rounds": rounds,
                      "batch": batch, "user_agent": page.eval("navigator.userAgent")}
            if screenshot and classifier is not None:
                page.eval(f"document.getElementById('token').value = '{token}'; "
                          f"document.getElementById('connect').requestSubmit(); true")
                page.wait_for("window.privoffload.state.ready")
                page.set_files("#file", pictures)
                page.wait_for(f"document.querySelectorAll('.row[data-state]').length === {len(pictures)}", 60)
                result["screenshot"] = str(page.screenshot(screenshot))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--obfuscator", type=Path, help="an obfuscator run (default: a seeded Table I codec, no parity)")
    ap.add_argument("--classifier", type=Path, help="the cloud's classifier run (default: the obfuscator's own)")
    ap.add_argument("--attack", type=Path, help="an attack run: its decoder is the page's reconstruction column")
    ap.add_argument("--width", type=int, default=32, help="width of the seeded codec (no --obfuscator)")
    ap.add_argument("--images", type=int, default=1000, help="test images for parity")
    ap.add_argument("--rounds", type=int, default=200, help="one-image rounds (batches: rounds // 10 + 1)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--screenshot", help="save the browser page's screenshot here (with a classifier)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    info = print_machine("the obfuscator on phone and browser runtimes (client, CPU)")
    from privoffload.data import load_cifar10
    from privoffload.runs import load_classifier

    data = load_cifar10()
    pick = np.random.default_rng(0).choice(len(data.x_test), args.images, replace=False)
    x, y = data.x_test[pick], data.y_test[pick]
    results: dict = {"machine": info, "formats": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        run = args.obfuscator or seeded_codec(folder, args.width)
        classifier = args.classifier or (classifier_of(run) if args.obfuscator else None)
        print(f"# obfuscator {args.obfuscator or f'a seeded Table I codec, width {args.width}'}; classifier {classifier}")
        web = folder / "web"
        web.mkdir()
        runners = {}
        for fmt in FORMATS:
            out = web / ("obfuscator.onnx" if fmt == "onnx" else f"obfuscator{SUFFIX[fmt]}")
            try:
                report = export(run, fmt, out)
            except UserError as e:
                results["formats"][fmt] = {"skipped": str(e)}
                print(f"{fmt:>10}: not measured ({e})")
                continue
            results["formats"][fmt] = {"bytes": out.stat().st_size, "export_s": float(report["seconds"])}
            runners[fmt] = load(out, threads=1)
            print(f"{fmt:>10}: {out.stat().st_size:,} bytes, exported in {report['seconds']} s")
        if args.attack:
            export(args.attack, "onnx", web / "attack.onnx")

        torch.set_num_threads(1)
        paths = {"pytorch": load_obfuscator(run, backend="eager"), "client-fast": load_obfuscator(run), **runners}
        if classifier is not None:
            results["parity"] = parity(paths, x, y, load_classifier(classifier).eval())
            print(f"\nparity on {len(x)} random test images (vs the PyTorch client's uploads):")
            for k, p in results["parity"].items():
                print(f"{k:>12}: max {p['max_grey_levels']} grey level(s), {p['pixels_differing_pct']:.3f} % of pixels "
                      f"differ; accuracy {p['accuracy_pct']:.2f} % ({p['accuracy_diff_points']:+.2f} points)")

        one, many = x[:1].copy(), x[:args.batch].copy()
        for name, images, rounds in (("one", one, args.rounds), ("batch", many, args.rounds // 10 + 1)):
            times = interleaved({k: (lambda f=f: f(images)) for k, f in paths.items()}, rounds, warmup=5)
            base = median(times["pytorch"])
            print(f"\n{'one image' if name == 'one' else f'batch of {len(images)}'}, 1 core, median of {rounds}, "
                  f"per image:")
            for k, ts in times.items():
                ms = median(ts) * 1e3 / len(images)
                results.setdefault("latency", {}).setdefault(k, {})[name] = {"ms_per_image": ms,
                                                                               "speedup_vs_pytorch": base / median(ts)}
                print(f"{k:>12}: {ms:7.3f} ms  x{base / median(ts):5.2f} vs the PyTorch client")

        if "onnx" in runners:
            b = browser(web, classifier, x, args.rounds, args.batch, args.screenshot)
            results["browser"] = b
            if "skipped" in b:
                print(f"\nbrowser: {b['skipped']}")
            else:
                print(f"\nbrowser ({b['user_agent']}), the page's own timing, WebAssembly, 1 thread: one image "
                      f"{b['one_ms']:.3f} ms, batch of {b['batch']} {b['batch_ms_per_image']:.3f} ms per image"
                      + (f"; screenshot {b['screenshot']}" if "screenshot" in b else ""))
    save_json(args.json, results)


if __name__ == "__main__":
    main()
