"""The service under hostile load, old code and new side by side in one run: health-probe latency, memory,
and the wait of a fresh request behind abandoned ones.

    python bench/hostile_load.py [--before REV] [--width 16] [--waves 3]

Each code tree (the commit REV, extracted with `git archive`, and this checkout's src/) runs the real
`privoffload serve` in a subprocess on loopback, one torch thread, and gets the same load, in turn:
1. waves of 8 clients posting at once the largest JSON body the old inference route accepted (16 MiB of
   pixels), then waves of 8 posting 256 images of JSON pixels (about 4 MB, accepted by both), while the
   health probe `/v2/health/live` is timed every 20 ms: median, 90th percentile and max latency, and the
   server's peak resident memory (VmHWM);
2. 30 requests of 256 images whose clients give up after 0.05 s, then one fresh request of 1 image: its
   latency, and how many of the abandoned images were classified anyway.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from _common import ROOT, print_machine

sys.path.insert(0, str(ROOT / "src"))
from privoffload import nets, oip  # noqa: E402
from privoffload.cloud.repository import Repository  # noqa: E402

TOKEN, ADMIN = "bench-inference-token", "bench-admin-token-0000"


def extract(rev: str, into: Path) -> Path:
    """The src/ folder of commit `rev`, unpacked into `into`."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=True).stdout
    tarfile.open(fileobj=io.BytesIO(tar)).extractall(into, filter="data")
    return into / "src"


class Server:
    def __init__(self, src: Path, repo: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": str(src), "PRIVOFFLOAD_TOKEN": TOKEN, "PRIVOFFLOAD_ADMIN_TOKEN": ADMIN}
        self.proc = subprocess.Popen([sys.executable, "-m", "privoffload", "serve", "--repo", str(repo), "--port",
                                      str(port), "--device", "cpu", "--set", "threads=1", "--set", "log_level=error"],
                                     env=env, cwd=tempfile.gettempdir())
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the service did not start")
            time.sleep(0.2)

    def peak_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024

    def images_classified(self) -> float:
        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
        return float(re.search(r"^privoffload_batch_images_sum (\S+)", text, re.M).group(1))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def wave(url: str, body: bytes, headers: dict, statuses: list) -> list[float]:
    """8 clients post `body` at once; probe latencies (ms) every 20 ms until all 8 are answered."""
    start = threading.Barrier(9)

    def post():
        start.wait()
        try:
            statuses.append(str(httpx.post(f"{url}/v2/models/bench/infer", content=body, headers=headers, timeout=300).status_code))
        except httpx.HTTPError as e:
            statuses.append(type(e).__name__)

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    latencies = []
    with httpx.Client(timeout=120) as probe:
        start.wait()
        while any(t.is_alive() for t in threads):
            sent = time.perf_counter()
            probe.get(f"{url}/v2/health/live")
            latencies.append((time.perf_counter() - sent) * 1000)
            time.sleep(0.02)
    return latencies


def abandoned(url: str) -> float:
    """30 requests of 256 images given up after 0.05 s, then a fresh one: its latency in seconds."""
    def binary(n):
        spec, raw = oip.tensor("images", np.zeros((n, 3, 32, 32), np.uint8), "UINT8", binary=True)
        body, headers = oip.join_body({"inputs": [spec], "outputs": [{"name": "class"}]}, [raw])
        return body, {**headers, "Authorization": f"Bearer {TOKEN}"}

    body, headers = binary(256)

    def post():
        try:
            httpx.post(f"{url}/v2/models/bench/infer", content=body, headers=headers, timeout=0.05)
        except httpx.HTTPError:
            pass

    threads = [threading.Thread(target=post) for _ in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    body, headers = binary(1)
    start = time.perf_counter()
    httpx.post(f"{url}/v2/models/bench/infer", content=body, headers=headers, timeout=600)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", default="7657a07", help="the commit whose code is the baseline")
    p.add_argument("--width", type=int, default=16, help="ResNet18 width of the served model")
    p.add_argument("--waves", type=int, default=3, help="waves of 8 bodies of each kind")
    args = p.parse_args()
    print_machine("service under hostile load: old and new code side by side")
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    bodies = {
        "8 x 16 MiB JSON": b'{"inputs": [{"name": "images", "datatype": "UINT8", "shape": [256, 3, 32, 32], "data": ['
                           + b"255, " * ((16 * 2**20 - 200) // 5 - 1) + b"255]}]}",
        "8 x 4 MB JSON (256 images)": b'{"inputs": [{"name": "images", "datatype": "UINT8", "shape": [256, 3, 32, 32], '
                                      b'"data": [' + b"255, " * (256 * 3072 - 1) + b"255]}]}",
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        nets.save(nets.resnet18(args.width), tmp / "classifier.safetensors")
        Repository(tmp / "repo").publish(tmp / "classifier.safetensors", "bench")
        trees = {f"before ({args.before})": extract(args.before, tmp / "before"), "after (this checkout)": ROOT / "src"}
        rows = []
        for kind, body in bodies.items():
            for name, src in trees.items():
                server = Server(src, tmp / "repo")
                try:
                    statuses = []
                    latencies = [ms for _ in range(args.waves) for ms in wave(server.url, body, headers, statuses)]
                    rows.append((kind, name, latencies, server.peak_mb(), statuses))
                finally:
                    server.stop()
        print(f"\n{'load':28s}{'code':24s}{'probes':>7s}{'median ms':>10s}{'p90 ms':>8s}{'max ms':>8s}{'peak MB':>9s}  answers")
        for kind, name, lat, peak, statuses in rows:
            answers = ", ".join(f"{statuses.count(s)} x {s}" for s in sorted(set(statuses)))
            print(f"{kind:28s}{name:24s}{len(lat):7d}{statistics.median(lat):10.1f}"
                  f"{float(np.percentile(lat, 90)):8.1f}{max(lat):8.1f}{peak:9.0f}  {answers}")
        print(f"\n{'30 x 256 images abandoned after 0.05 s':40s}{'fresh request s':>16s}{'images classified':>19s}")
        for name, src in trees.items():
            server = Server(src, tmp / "repo")
            try:
                seconds = abandoned(server.url)
                print(f"{name:40s}{seconds:16.2f}{server.images_classified() - 1:19.0f}")
            finally:
                server.stop()


if __name__ == "__main__":
    main()
