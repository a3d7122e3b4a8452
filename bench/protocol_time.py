"""Project the paper's full protocol's time from measured throughput and the FLOP count.

Measures, on this device: the classifier trainer (`train_classifier`, default precision and
channels_last; the second of two epochs over --images), the obfuscator step (bench/train_throughput's
step on device-resident data), and the test evaluations (`metrics.accuracy`, clean and through the
codec). Then multiplies out docs/method.md's protocol and prints each stage's projected time, the
FLOP rate it implies and its share of the card's peak. Checkpoints, start-up and compilation are
not included.

    python bench/protocol_time.py [--width 64] [--images 20000] [--batch 128] [--peak-tflops 990]
    python bench/protocol_time.py --width 8 --images 256 --test-images 500   # a quick check on a CPU
"""

from __future__ import annotations

import argparse
import time

from _common import cifar10_or_random, print_machine, save_json

import torch

from flops import evaluation_flops, per_image_flops, protocol_stages
from privoffload import nets
from privoffload.data import DeviceData
from privoffload.metrics import accuracy, obfuscation_scores
from privoffload.runtime import pick_device, use_bf16
from train_throughput import obfuscator_rate, sync, trainer_classifier


def eval_seconds(width: int, codec_width: int, test: DeviceData, device: torch.device, bf16: bool) -> tuple[float, float]:
    """Seconds of one clean and one obfuscated evaluation over `test` (after a warm-up)."""
    C = nets.resnet18(width).to(device, memory_format=torch.channels_last).eval()
    O = nets.codec(codec_width).to(device, memory_format=torch.channels_last).eval()
    out = []
    for score in (lambda: accuracy(C, test, bf16=bf16), lambda: obfuscation_scores(C, O, test, bf16=bf16)):
        score()
        sync(device)
        t0 = time.perf_counter()
        score()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--codec-width", type=int, default=32)
    ap.add_argument("--images", type=int, default=20_000, help="images per timed epoch")
    ap.add_argument("--batch", type=int, default=128, help="classifier batch")
    ap.add_argument("--obf-batch", type=int, default=128)
    ap.add_argument("--test-images", type=int, default=10_000, help="images per timed evaluation (scaled to 10k)")
    ap.add_argument("--peak-tflops", type=float, default=990.0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    device = pick_device(args.device)
    info = print_machine(f"protocol time projection on {device}")
    bf16 = use_bf16("auto", device)
    print(f"# bf16 {bf16}, channels_last, classifier batch {args.batch}, obfuscator batch {args.obf_batch}")
    data = cifar10_or_random()
    n = args.images
    rates = {
        "classifier": trainer_classifier(data, n, args.width, args.batch, device, bf16, True),
        "obfuscator": obfuscator_rate(data.x_train[:n], data.y_train[:n], args.width, args.obf_batch, device, True, bf16),
    }
    test = DeviceData(data.x_test[: args.test_images], data.y_test[: args.test_images], device)
    clean_s, obf_s = eval_seconds(args.width, args.codec_width, test, device, bf16)
    print(f"measured: classifier {rates['classifier']:.0f} images/s, obfuscator step {rates['obfuscator']:.0f} images/s, "
          f"evaluation of {len(test)}: clean {clean_s:.2f} s, obfuscated {obf_s:.2f} s")

    flops = per_image_flops(args.width, args.codec_width)
    peak = args.peak_tflops * 1e12
    rows, total_s, total_f = {}, 0.0, 0.0
    print(f"\nprojected protocol (ResNet18 width {args.width}):")
    for stage, (epochs, images, fl) in protocol_stages(flops).items():
        rate = rates["classifier" if "classifier" in stage else "obfuscator"]
        s, f = epochs * images / rate, epochs * images * fl
        rows[stage] = {"seconds": s, "flops": f}
        total_s, total_f = total_s + s, total_f + f
        print(f"  {stage:<20} {epochs:4d} x {images:6d}  {s:8.1f} s  {f / s / 1e12:7.1f} TFLOP/s  {100 * f / s / peak:5.1f} % of peak")
    evals = (10 * clean_s + 20 * obf_s + 10 * (clean_s + 2 * obf_s) + 20 * obf_s) * 10_000 / len(test)
    total_s, total_f = total_s + evals, total_f + evaluation_flops(flops)
    rows["evaluations"] = {"seconds": evals}
    print(f"  {'evaluations':<20} {'':15}  {evals:8.1f} s")
    print(f"  {'total':<20} {'':15}  {total_s:8.1f} s  ({total_s / 60:.1f} min)  {total_f / total_s / 1e12:.1f} TFLOP/s  "
          f"{100 * total_f / total_s / peak:.1f} % of a {args.peak_tflops:.0f} TFLOP/s peak")
    save_json(args.json, {"machine": info, "device": str(device), "bf16": bf16, "rates": rates, "eval_seconds": [clean_s, obf_s],
                          "stages": rows, "total_seconds": total_s, "total_flops": total_f})


if __name__ == "__main__":
    main()
