"""Throughput of the inference service, with and without micro-batching, against the bare model. One run.

    python bench/serve_bench.py [--width 64] [--clients 32] [--images-per-request 1] [--seconds 8]

1. bare model: forward passes of `--max-batch` images, and of `--images-per-request` images, in this process;
2. the real service (`privoffload serve`, a subprocess on loopback) with a micro-batching window,
   then with batching off (window 0), each under `--clients` concurrent clients sending binary OIP
   requests of `--images-per-request` images for `--seconds`.
It prints requests/s, images/s, latency and the mean batch size, and the ratios between them.
Client and server share this machine's cores, so the service figures include the load generator's cost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from privoffload import nets, oip  # noqa: E402
from privoffload.cloud.repository import Repository  # noqa: E402

TOKEN, ADMIN = "bench-inference-token", "bench-admin-token-0000"


def bare(model: torch.nn.Module, batch: int, seconds: float) -> float:
    """Images per second of the model alone on batches of `batch`."""
    x = torch.rand(batch, 3, 32, 32)
    with torch.inference_mode():
        model(x)  # warm-up
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.softmax(model(x), 1)
            n += batch
    return n / (time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(url: str, clients: int, per_request: int, seconds: float) -> dict:
    """`clients` concurrent loops of binary infer requests; counts only what completes in the window."""
    pixels = np.random.default_rng(0).integers(0, 256, (per_request, 3, 32, 32), dtype=np.uint8)
    spec, raw = oip.tensor("images", pixels, "UINT8", binary=True)
    body, headers = oip.join_body({"inputs": [spec], "outputs": [{"name": "class"}]}, [raw])
    headers = {**headers, "Authorization": f"Bearer {TOKEN}"}
    latencies, failures = [], 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        async def worker(until: float, record: bool):
            nonlocal failures
            while time.perf_counter() < until:
                t0 = time.perf_counter()
                r = await client.post("/v2/models/bench/infer", content=body, headers=headers)
                if r.status_code != 200:
                    failures += 1
                elif record:
                    latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker(time.perf_counter() + 1.0, False) for _ in range(clients)))  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(worker(start + seconds, True) for _ in range(clients)))
        elapsed = time.perf_counter() - start
        metrics = (await client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN}"})).text
    lat = np.array(latencies) * 1000
    return {"req_s": len(lat) / elapsed, "img_s": len(lat) * per_request / elapsed, "failures": failures,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "mean_batch": mean_batch(metrics)}


def mean_batch(metrics: str) -> float:
    total = float(re.search(r"^privoffload_batch_images_sum (\S+)", metrics, re.M).group(1))
    count = float(re.search(r"^privoffload_batch_images_count (\S+)", metrics, re.M).group(1))
    return total / max(count, 1)


def service(repo: Path, window_ms: float, max_batch: int, args) -> dict:
    port = free_port()
    env = {**os.environ, "PRIVOFFLOAD_TOKEN": TOKEN, "PRIVOFFLOAD_ADMIN_TOKEN": ADMIN,
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cmd = [sys.executable, "-m", "privoffload", "serve", "--repo", str(repo), "--port", str(port), "--device", "cpu",
           "--batch-window-ms", str(window_ms), "--set", f"max_batch_images={max_batch}",
           "--set", f"max_request_images={min(max_batch, 256)}", "--set", "log_level=warning",
           "--set", f"threads={args.threads}"]
    proc = subprocess.Popen(cmd, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the service did not start")
            time.sleep(0.2)
        return asyncio.run(load(url, args.clients, args.images_per_request, args.seconds))
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=64, help="ResNet18 width (64 = the real one)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--window-ms", type=float, default=2.0)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads for the model, here and in the service (more threads than free cores stall)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = nets.resnet18(args.width).eval()
    print(f"ResNet18 width {args.width}, {args.clients} clients x {args.images_per_request} image(s) per request, "
          f"{args.seconds:.0f} s per service run, torch threads {torch.get_num_threads()}, {os.cpu_count()} cores")
    bare_big = bare(model, args.max_batch, args.seconds)
    bare_small = bare(model, args.images_per_request, args.seconds)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "classifier.safetensors"
        nets.save(model, weights)
        repo = Path(tmp) / "repo"
        Repository(repo).publish(weights, "bench")
        batched = service(repo, args.window_ms, args.max_batch, args)
        unbatched = service(repo, 0.0, args.max_batch, args)

    print(f"\n{'':32s}{'req/s':>9s}{'img/s':>9s}{'p50 ms':>9s}{'p99 ms':>9s}{'batch':>7s}{'failed':>7s}")
    print(f"{'bare model, batch ' + str(args.max_batch):32s}{'':9s}{bare_big:9.1f}")
    print(f"{'bare model, batch ' + str(args.images_per_request):32s}{'':9s}{bare_small:9.1f}")
    for name, r in ((f"service, window {args.window_ms:g} ms", batched), ("service, no batching", unbatched)):
        print(f"{name:32s}{r['req_s']:9.1f}{r['img_s']:9.1f}{r['p50_ms']:9.1f}{r['p99_ms']:9.1f}"
              f"{r['mean_batch']:7.1f}{r['failures']:7d}")
    print(f"\nbatched service / bare model (batch {args.max_batch}):   {batched['img_s'] / bare_big:.2f}")
    print(f"unbatched service / bare model (batch {args.max_batch}): {unbatched['img_s'] / bare_big:.2f}")
    print(f"batched / unbatched service:                {batched['img_s'] / unbatched['img_s']:.2f}")
    print("(one machine for clients and server; numbers are noisy when other work shares the CPU)")


if __name__ == "__main__":
    main()
