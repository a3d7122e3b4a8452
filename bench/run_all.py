"""Run the CPU benchmarks at their default (small) sizes; results in $OUT or bench/results.

    python bench/run_all.py          # make bench

On a CUDA machine, bench/gpu.sh runs the GPU sizes instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = {
    "flops": ["flops.py"],
    "game_step": ["game_step.py"],
    "obfuscator_latency": ["obfuscator_latency.py"],
    "train_throughput": ["train_throughput.py"],
    "edge_export": ["edge_export.py", "--rounds", "100"],
    "protocol_time": ["protocol_time.py", "--width", "8", "--images", "256", "--batch", "64", "--obf-batch", "32",
                      "--test-images", "500"],
}


def main() -> int:
    out = Path(os.environ.get("OUT", HERE / "results"))
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name, (script, *args) in RUNS.items():
        print(f"== {name}", flush=True)
        with open(out / f"{name}.txt", "w") as log:
            proc = subprocess.Popen([sys.executable, str(HERE / script), *args, "--json", str(out / f"{name}.json")],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                print(line, end="", flush=True)
                log.write(line)
            if proc.wait() != 0:
                failed.append(name)
    print(f"results in {out}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
