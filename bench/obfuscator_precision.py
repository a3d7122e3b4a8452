"""Which precision and memory layout make one step of the obfuscation game fastest on this machine?

One step = O forward, D forward+backward (D's step), C forward + backward to its input, D forward
+ backward to its input, O backward (O's step). All variants run in this one process on the same
random batch, interleaved round by round so that a busy machine slows them alike; the median of
the rounds is compared with the all-fp32, contiguous step.

    PYTHONPATH=src python bench/obfuscator_precision.py [--codec-width 32] [--classifier-width 16] [--batch 128]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from privoffload import nets
from privoffload.train.common import autocast, frozen

VARIANTS = [  # (codec bf16, classifier bf16, channels_last)
    (False, False, False), (False, False, True), (False, True, True), (True, True, True), (True, False, True),
]


def make_step(obf, deobf, clf, x, y, codec_bf16: bool, clf_bf16: bool):
    dev = x.device

    def step():
        with autocast(dev, codec_bf16):
            z = obf(x).float()
            rec = deobf(z.detach()).float()
        F.mse_loss(rec, x).backward()
        with autocast(dev, clf_bf16):
            ce = F.cross_entropy(clf(z).float(), y)
        with autocast(dev, codec_bf16):
            rec = deobf(z).float()
        (ce - F.mse_loss(rec, x)).backward()

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--codec-width", type=int, default=32)
    ap.add_argument("--classifier-width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    torch.manual_seed(0)
    nets_by_layout = {}
    for cl in (False, True):
        fmt = torch.channels_last if cl else torch.contiguous_format
        obf, deobf = nets.codec(a.codec_width), nets.codec(a.codec_width)
        clf = frozen(nets.resnet18(a.classifier_width))
        nets_by_layout[cl] = [copy.deepcopy(m).to(memory_format=fmt) for m in (obf, deobf, clf)]
    x, y = torch.rand(a.batch, 3, 32, 32), torch.randint(0, 10, (a.batch,))
    steps = {}
    for v in VARIANTS:
        codec_bf16, clf_bf16, cl = v
        xv = x.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        steps[v] = make_step(*nets_by_layout[cl], xv, y, codec_bf16, clf_bf16)
        steps[v]()  # warm-up (oneDNN primitive caches)
    times = {v: [] for v in VARIANTS}
    for _ in range(a.rounds):
        for v in VARIANTS:
            t0 = time.perf_counter()
            steps[v]()
            times[v].append(time.perf_counter() - t0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, codec width {a.codec_width}, "
          f"classifier width {a.classifier_width}, batch {a.batch}, median of {a.rounds} interleaved rounds")
    base = statistics.median(times[VARIANTS[0]])
    for (codec_bf16, clf_bf16, cl), ts in times.items():
        t = statistics.median(ts)
        print(f"codec {'bf16' if codec_bf16 else 'fp32'}  classifier {'bf16' if clf_bf16 else 'fp32'}  "
              f"{'channels_last' if cl else 'contiguous   '}  {t * 1000:8.1f} ms/step  {base / t:5.2f}x vs all fp32 contiguous")


if __name__ == "__main__":
    main()
