"""Which precision and memory layout make one step of the obfuscation game fastest on this machine?

One step = O forward, D forward+backward (D's step), C forward + backward to its input, D forward
+ backward to its input, O backward (O's step). All variants run in this one process on the same
random batch, interleaved round by round so that a busy machine slows them alike; the median of
the rounds is compared with the all-fp32, contiguous step. Then, the same way, the codec's
depthwise 3x3 convolutions alone (forward + backward, channels_last), bf16 against fp32.

    PYTHONPATH=src python bench/obfuscator_precision.py [--codec-width 32] [--classifier-width 16] [--batch 128]

On a machine whose cores are shared with other jobs, run it with OMP_NUM_THREADS=1: two OpenMP
threads that wait on each other on a busy core make every variant many times slower, and noisy.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from privoffload import nets
from privoffload.runtime import autocast, frozen

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
    depthwise(a.batch // 2, a.rounds)


def depthwise(batch: int, rounds: int) -> None:
    """Depthwise 3x3 convolutions of the codec at width 32 (mid channels = 6 x input), alone."""
    cases = {}
    for channels, size, stride in ((192, 32, 2), (384, 16, 2), (192, 32, 1)):
        for dtype in (torch.float32, torch.bfloat16):
            conv = torch.nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False)
            conv = conv.to(dtype=dtype, memory_format=torch.channels_last)
            x = torch.randn(batch, channels, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)
            x.requires_grad_()

            def run(conv=conv, x=x):
                conv(x).sum().backward()

            run()
            cases[(channels, size, stride, dtype)] = run
    times = {k: [] for k in cases}
    for _ in range(rounds):
        for k, run in cases.items():
            t0 = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t0)
    print(f"depthwise 3x3 alone, forward + backward, channels_last, batch {batch}:")
    for (channels, size, stride, dtype), ts in times.items():
        if dtype is torch.bfloat16:
            fp32 = statistics.median(times[(channels, size, stride, torch.float32)])
            bf16 = statistics.median(ts)
            print(f"  {channels} ch {size}x{size} stride {stride}: fp32 {fp32 * 1000:7.1f} ms  bf16 {bf16 * 1000:7.1f} ms"
                  f"  bf16 takes {bf16 / fp32:4.2f}x as long")


if __name__ == "__main__":
    main()
