"""The service under hostile load, old code and new side by side in one run.

    python bench/hostile_load.py [--before REV] [--width 16] [--waves 2]

Each code tree (the commit REV, extracted with `git archive`, and this checkout's src/) runs the real
`privoffload serve` in a subprocess on loopback, one torch thread, and gets the same load, in turn:
1. JSON parsing: waves of 8 clients posting at once a body at the inference route's real JSON limit (256
   images, 4.8 MB), then waves of 64 clients posting 255 KiB each, beside a baseline of 8 clients posting the
   same 256 images as binary tensors, while the health probe `/v2/health/live` is timed every 20 ms: median,
   90th percentile and max latency, and the server's peak resident memory (VmHWM);
2. a flood: 260 connections that each send half a request head and stay (reopened when closed), while
   /v2/health/live, /v2/health/ready and a one-image inference are asked for from a fresh connection every
   0.5 s: their answers and latencies;
3. a burst: 400 one-image requests sent at once, each on its own connection: their answers;
4. heads of 5,000 headers, sent without a token: the answer and the server's time per request;
5. replicas: two servers on one repository; a version published but not loaded, then one replica restarted;
   then a rollback on one replica, and the other restarted: which version each serves;
6. 30 requests of 256 images whose clients give up after 0.05 s, then one fresh request of 1 image: its
   latency, and how many of the abandoned images were classified anyway.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import selectors
import shutil
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
import torch

from _common import ROOT, print_machine

sys.path.insert(0, str(ROOT / "src"))
from privoffload import nets, oip  # noqa: E402
from privoffload.cloud.repository import Repository  # noqa: E402

TOKEN, ADMIN = "bench-inference-token", "bench-admin-token-0000"
MODEL = "bench"


def extract(rev: str, into: Path) -> Path:
    """The src/ folder of commit `rev`, unpacked into `into`."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=True).stdout
    tarfile.open(fileobj=io.BytesIO(tar)).extractall(into, filter="data")
    return into / "src"


class Server:
    def __init__(self, src: Path, repo: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(src), "PRIVOFFLOAD_TOKEN": TOKEN, "PRIVOFFLOAD_ADMIN_TOKEN": ADMIN}
        self.proc = subprocess.Popen([sys.executable, "-m", "privoffload", "serve", "--repo", str(repo), "--port",
                                      str(self.port), "--device", "cpu", "--set", "threads=1", "--set",
                                      "log_level=error", "--set", "max_queue_images=4096"],
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

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def images_classified(self) -> float:
        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
        return float(re.search(r"^privoffload_batch_images_sum (\S+)", text, re.M).group(1))

    def version(self) -> str:
        return httpx.get(f"{self.url}/v2/models/{MODEL}/ready", headers={"Authorization": f"Bearer {TOKEN}"}).json()["version"]

    def load(self, version: int) -> int:
        return httpx.post(f"{self.url}/v2/repository/models/{MODEL}/load", json={"parameters": {"version": str(version)}},
                          headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120).status_code

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def binary_request(n: int) -> tuple[bytes, dict]:
    spec, raw = oip.tensor("images", np.full((n, 3, 32, 32), 255, np.uint8), "UINT8", binary=True)
    body, headers = oip.join_body({"inputs": [spec], "outputs": [{"name": "class"}]}, [raw])
    return body, {**headers, "Authorization": f"Bearer {TOKEN}"}


def raw_request(body: bytes, headers: dict) -> bytes:
    head = "".join(f"{k}: {v}\r\n" for k, v in {**headers, "Content-Length": str(len(body))}.items())
    return f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode() + body


def status_of(sock: socket.socket, seconds: float = 60) -> str:
    sock.settimeout(seconds)
    try:
        data = sock.recv(65536)
    except OSError as e:
        return type(e).__name__
    return data.split()[1].decode() if data.startswith(b"HTTP/1.1 ") else "closed"


def json_body(images: int, value: bytes, separator: bytes) -> bytes:
    return (b'{"inputs": [{"name": "images", "datatype": "UINT8", "shape": [%d, 3, 32, 32], "data": [' % images
            + (value + separator) * (images * 3072 - 1) + value + b"]}]}")


# ---------------------------------------------------------------- the loads

def wave(url: str, body: bytes, headers: dict, clients: int, statuses: list) -> list[float]:
    """`clients` post `body` at once; probe latencies (ms) every 20 ms until all are answered."""
    start = threading.Barrier(clients + 1)

    def post():
        with httpx.Client(timeout=300) as client:  # made before the start: making one holds the GIL for a while
            start.wait()
            try:
                statuses.append(str(client.post(f"{url}/v2/models/{MODEL}/infer", content=body, headers=headers).status_code))
            except httpx.HTTPError as e:
                statuses.append(type(e).__name__)

    threads = [threading.Thread(target=post) for _ in range(clients)]
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


def flood(port: int, n: int, stop: threading.Event) -> None:
    """Keep `n` half-sent request heads open on `port` (each one closed is opened again) until `stop`."""
    with selectors.DefaultSelector() as sel:
        def open_one():
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ)
            except OSError:
                pass

        for _ in range(n):
            open_one()
        while not stop.is_set():
            for key, _ in sel.select(0.05):
                try:
                    gone = key.fileobj.recv(65536) == b""
                except OSError:
                    gone = True
                if gone:
                    sel.unregister(key.fileobj)
                    key.fileobj.close()
                    open_one()
        for key in list(sel.get_map().values()):
            key.fileobj.close()


def under_flood(server: Server) -> list[tuple[str, str, float]]:
    stop = threading.Event()
    thread = threading.Thread(target=flood, args=(server.port, 260, stop))
    thread.start()
    time.sleep(1.0)
    answers, request = [], raw_request(*binary_request(1))
    try:
        for _ in range(4):
            for path in ("/v2/health/live", "/v2/health/ready"):
                sent = time.perf_counter()
                try:
                    status = str(httpx.get(f"{server.url}{path}", timeout=10).status_code)
                except httpx.HTTPError as e:
                    status = type(e).__name__
                answers.append((path.rsplit("/", 1)[1], status, time.perf_counter() - sent))
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sent = time.perf_counter()
                sock.sendall(request)
                answers.append(("infer", status_of(sock, 10), time.perf_counter() - sent))
            time.sleep(0.5)
    finally:
        stop.set()
        thread.join(30)
    return answers


def burst(server: Server, n: int = 400) -> list[str]:
    request, socks = raw_request(*binary_request(1)), []
    for _ in range(n):
        try:
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(request)
            socks.append(sock)
        except OSError as e:
            socks.append(type(e).__name__)
    statuses = [s if isinstance(s, str) else status_of(s) for s in socks]
    for s in socks:
        if not isinstance(s, str):
            s.close()
    return statuses


def many_headers(server: Server, n: int = 20) -> tuple[str, float]:
    """`n` requests of 5,000 headers, one after the other: the last answer, and the server's CPU ms per request."""
    head = (b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(5000)) + b"\r\n")
    before, status = server.cpu_s(), ""
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(head)
            status = status_of(sock, 10)
    return status, (server.cpu_s() - before) * 1000 / n


def replicas(src: Path, repo: Path, weights: list[Path]) -> dict[str, str]:
    """Which version each replica serves after a publish without a load, and after a rollback and a restart."""
    shutil.rmtree(repo, ignore_errors=True)
    Repository(repo).publish(weights[0], MODEL)
    out = {}
    with Server(src, repo) as a:
        Repository(repo).publish(weights[1], MODEL)  # published, not loaded
        with Server(src, repo) as b:  # a replica restarted now
            out["published v2, not loaded; one replica restarted"] = f"{a.version()} / {b.version()}"
            a.load(2)
            b.load(2)
        a.load(1)  # a rollback, on one replica
        with Server(src, repo) as b:  # the other restarted
            out["both on v2, rollback to v1; one replica restarted"] = f"{a.version()} / {b.version()}"
    with Server(src, repo) as a, Server(src, repo) as b:
        out["then every replica restarted"] = f"{a.version()} / {b.version()}"
    return out


def abandoned(url: str) -> float:
    """30 requests of 256 images given up after 0.05 s, then a fresh one: its latency in seconds."""
    body, headers = binary_request(256)

    def post():
        try:
            httpx.post(f"{url}/v2/models/{MODEL}/infer", content=body, headers=headers, timeout=0.05)
        except httpx.HTTPError:
            pass

    threads = [threading.Thread(target=post) for _ in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    body, headers = binary_request(1)
    start = time.perf_counter()
    httpx.post(f"{url}/v2/models/{MODEL}/infer", content=body, headers=headers, timeout=600)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", default="f091011", help="the commit whose code is the baseline")
    p.add_argument("--width", type=int, default=16, help="ResNet18 width of the served model")
    p.add_argument("--waves", type=int, default=2, help="waves of each JSON load")
    args = p.parse_args()
    print_machine("service under hostile load: old and new code side by side")
    json_headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    loads = {
        "binary, 8 x 256 images": (*binary_request(256), 8),
        "JSON, 8 x 4.8 MB (256 images)": (json_body(256, b"255", b" , "), json_headers, 8),
        "JSON, 64 x 255 KiB (42 images)": (json_body(42, b"0", b","), json_headers, 64),
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            files.append(tmp / f"c{seed}.safetensors")
            nets.save(nets.resnet18(args.width), files[-1])
        trees = {f"before ({args.before})": extract(args.before, tmp / "before"), "after (this checkout)": ROOT / "src"}
        results = {name: {} for name in trees}
        for name, src in trees.items():
            repo = tmp / f"repo-{name[:5]}"
            Repository(repo).publish(files[0], MODEL)
            with Server(src, repo) as server:
                for kind, (body, headers, clients) in loads.items():
                    statuses = []
                    latencies = [ms for _ in range(args.waves) for ms in wave(server.url, body, headers, clients, statuses)]
                    results[name][kind] = (latencies, server.peak_mb(), statuses)
            with Server(src, repo) as server:
                results[name]["flood"] = under_flood(server)
            with Server(src, repo) as server:
                results[name]["burst"] = burst(server)
                results[name]["headers"] = many_headers(server)
                classified = server.images_classified()
                results[name]["abandoned"] = (abandoned(server.url), server.images_classified() - classified - 1)
            results[name]["replicas"] = replicas(src, tmp / f"replicas-{name[:5]}", files)

        def answers(statuses):
            return ", ".join(f"{statuses.count(s)} x {s}" for s in sorted(set(statuses)))

        print(f"\n1. health probe while clients post at once ({args.waves} waves each)")
        print(f"{'load':34s}{'code':24s}{'probes':>7s}{'median ms':>10s}{'p90 ms':>8s}{'max ms':>8s}{'peak MB':>9s}  answers")
        for kind in loads:
            for name in trees:
                lat, peak, statuses = results[name][kind]
                print(f"{kind:34s}{name:24s}{len(lat):7d}{statistics.median(lat):10.1f}"
                      f"{float(np.percentile(lat, 90)):8.1f}{max(lat):8.1f}{peak:9.0f}  {answers(statuses)}")
        print("\n2. under 260 half-sent request heads (reopened when closed): a fresh connection every 0.5 s")
        for name in trees:
            flooded = results[name]["flood"]
            for what in ("live", "ready", "infer"):
                rows = [(s, t) for w, s, t in flooded if w == what]
                print(f"{name:24s}{what:7s}{answers([s for s, _ in rows]):28s}"
                      f"max {max(t for _, t in rows) * 1000:7.1f} ms")
        print("\n3. a burst of 400 one-image requests, each on its own connection")
        for name in trees:
            print(f"{name:24s}{answers(results[name]['burst'])}")
        print("\n4. heads of 5,000 headers, no token (20 requests)")
        for name in trees:
            status, ms = results[name]["headers"]
            print(f"{name:24s}answer {status:6s}server CPU {ms:6.1f} ms a request")
        print("\n5. two replicas on one repository: versions served (replica A / replica B)")
        for name in trees:
            for case, versions in results[name]["replicas"].items():
                print(f"{name:24s}{case:52s}{versions}")
        print(f"\n6. {'30 x 256 images abandoned after 0.05 s':40s}{'fresh request s':>16s}{'images classified':>19s}")
        for name in trees:
            seconds, classified = results[name]["abandoned"]
            print(f"   {name:40s}{seconds:16.2f}{classified:19.0f}")


if __name__ == "__main__":
    main()
