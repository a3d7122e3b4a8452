"""FLOPs of the networks and of the paper's full protocol, and what they mean on one H100.

Counted with torch.utils.flop_counter.FlopCounterMode (matmuls and convolutions, 2 FLOPs per
multiply-add; BatchNorm, activations and the optimiser are not counted; the backward of grouped
convolutions counted correctly, see conv_backward_flop), per 32x32 image:
ResNet18 training (forward + backward), the Table I codec, and one step of the obfuscator game
(codec O and codec D trained, the frozen ResNet18 adding a forward and a backward to its input
only). The protocol is docs/method.md's: 50 + 50 classifier epochs (20,000 then 50,000 images)
and 100 + 100 obfuscator epochs, with a test evaluation every 5 epochs.

    python bench/flops.py [--width 64] [--codec-width 32] [--peak-tflops 990] [--json FILE]
"""

from __future__ import annotations

import argparse

from _common import print_machine, save_json

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from privoffload import nets
from privoffload.runtime import frozen
from train_throughput import obfuscator_step

N = 8  # images per counted batch; every count is divided by it


def conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                       _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """Each gradient a convolution's backward computes (input, weight) costs what its forward costs.

    torch's own formula counts the weight gradient of a grouped convolution as if it were dense,
    which makes a depthwise layer's backward look ~100x too expensive.
    """
    fwd = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count(fn) -> float:
    """FLOPs per image of fn() on a batch of N."""
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop}) as fc:
        fn()
    return fc.get_total_flops() / N


def per_image_flops(width: int = 64, codec_width: int = 32) -> dict[str, float]:
    x, y = torch.rand(N, 3, 32, 32), torch.randint(0, 10, (N,))
    C, O, D = nets.resnet18(width), nets.codec(codec_width), nets.codec(codec_width)
    with torch.no_grad():
        c_fwd, o_fwd = count(lambda: C.eval()(x)), count(lambda: O.eval()(x))
    c_train = count(lambda: F.cross_entropy(C.train()(x), y).backward())
    o_train = count(lambda: F.mse_loss(O.train()(x), x).backward())
    xg = x.clone().requires_grad_(True)
    c_input_grad = count(lambda: F.cross_entropy(frozen(nets.resnet18(width))(xg), y).backward())
    step = obfuscator_step(frozen(C), O.train(), D.train(), torch.device("cpu"), bf16=False)
    return {"classifier_forward": c_fwd, "classifier_train": c_train, "classifier_input_grad": c_input_grad,
            "codec_forward": o_fwd, "codec_train": o_train, "obfuscator_step": count(lambda: step(x, y))}


def protocol_stages(f: dict[str, float]) -> dict[str, tuple[int, int, float]]:
    """docs/method.md's protocol: stage -> (epochs, images per epoch, training FLOPs per image)."""
    return {"C0 classifier": (50, 20_000, f["classifier_train"]),
            "O0 obfuscator": (100, 20_000, f["obfuscator_step"]),
            "exp. 1 classifier": (50, 50_000, f["classifier_train"]),
            "exp. 2 obfuscator": (100, 50_000, f["obfuscator_step"])}


def evaluation_flops(f: dict[str, float], test: int = 10_000) -> float:
    """A test evaluation every 5 epochs: C0 clean; O0 obfuscated; exp. 1 clean and O0's probe twice
    (raw and 8-bit); exp. 2 obfuscated."""
    c, oc = f["classifier_forward"], f["codec_forward"] + f["classifier_forward"]
    return test * (10 * c + 20 * oc + 10 * (c + 2 * oc) + 20 * oc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=64, help="ResNet18 width (64 = the real one)")
    ap.add_argument("--codec-width", type=int, default=32, help="codec width (32 = Table I)")
    ap.add_argument("--peak-tflops", type=float, default=990.0, help="dense bf16 peak of the card (H100 SXM: ~990)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    info = print_machine("FLOP count")

    per_image = per_image_flops(args.width, args.codec_width)
    names = {"classifier_forward": f"ResNet18 w{args.width} forward",
             "classifier_train": f"ResNet18 w{args.width} forward + backward (training)",
             "classifier_input_grad": f"ResNet18 w{args.width} forward + backward to input (frozen)",
             "codec_forward": f"codec w{args.codec_width} forward",
             "codec_train": f"codec w{args.codec_width} forward + backward (training)",
             "obfuscator_step": "obfuscator step (O, D trained; frozen ResNet18)"}
    print("\nper 32x32 image:")
    for k, v in per_image.items():
        print(f"  {names[k]:<62} {v / 1e6:10.1f} MFLOP")

    stages = [(f"{k}: {e} epochs x {n // 1000}k", e * n * fl) for k, (e, n, fl) in protocol_stages(per_image).items()]
    stages.append(("evaluations on the 10k test images", evaluation_flops(per_image)))
    total = sum(f for _, f in stages)
    print("\nthe paper's full protocol:")
    for k, f in stages:
        print(f"  {k:<40} {f / 1e15:8.2f} PFLOP  ({100 * f / total:4.1f} %)")
    print(f"  {'total':<40} {total / 1e15:8.2f} PFLOP")
    peak = args.peak_tflops * 1e12
    times = {f"{int(100 * mfu)}% MFU": total / (peak * mfu) for mfu in (1.0, 0.4, 0.3, 0.1)}
    print(f"\ntime at {args.peak_tflops:.0f} TFLOP/s dense bf16 peak:")
    for k, t in times.items():
        print(f"  {k:>9}: {t:7.1f} s  ({t / 60:.1f} min)")
    print("  (small convolutions on 32x32 images rarely pass 30-40 % of peak; the codec's depthwise layers far less)")
    save_json(args.json, {"machine": info, "per_image_flops": per_image, "stages_flops": dict(stages), "total_flops": total,
                          "peak_tflops": args.peak_tflops, "seconds": times})


if __name__ == "__main__":
    main()
