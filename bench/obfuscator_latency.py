"""Client obfuscation on the CPU: the fast path (privoffload.client.fast) against eager fp32.

Latency of one 32x32 image on 1 core, and images/s for a batch on 2 cores, each backend timed
round-robin in this one process. Prints medians, ratios to eager fp32, and the largest pixel
difference from eager fp32 on real CIFAR-10 test images.

    python bench/obfuscator_latency.py [--weights RUN/obfuscator.safetensors] [--json FILE]
"""

from __future__ import annotations

import argparse

from _common import interleaved, median, print_machine, save_json

import torch

from privoffload import nets
from privoffload.client.fast import fast_obfuscator, has_onnxruntime


def real_images(n: int, split: str = "test") -> torch.Tensor | None:
    try:
        from privoffload.data import load_cifar10

        d = load_cifar10()
    except Exception as e:  # no data here: the timings do not depend on pixel values
        print(f"# no CIFAR-10 ({type(e).__name__}): random pixels")
        return None
    x = d.x_test if split == "test" else d.x_train
    return torch.from_numpy(x[:n]).float() / 255


def codec_for_bench(weights: str | None, width: int) -> torch.nn.Module:
    """Trained weights if given; else a seeded codec whose BatchNorm statistics come from real images
    (fresh statistics would make BatchNorm an identity and hide folding errors)."""
    if weights:
        return nets.load(weights, expect="codec").eval()
    torch.manual_seed(0)
    model = nets.codec(width)
    x = real_images(512, "train")
    x = x if x is not None else torch.rand(512, 3, 32, 32)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the passes
    with torch.no_grad():
        model.train()(x)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", help="an obfuscator.safetensors (default: a seeded Table I codec)")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="cores for the batched measurement")
    ap.add_argument("--rounds", type=int, default=200, help="single-image rounds (batched: rounds // 100 + 1)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    info = print_machine("obfuscator latency (client, CPU)")
    model = codec_for_bench(args.weights, args.width)
    backends = ["eager", "torch", "torch-bf16"] + (["onnx"] if has_onnxruntime() else [])
    results = {"machine": info, "single": {}, "batched": {}, "max_abs_diff": {}}

    # ---- accuracy: every backend against eager fp32 on real test images
    x = real_images(1000)
    x = x if x is not None else torch.rand(1000, 3, 32, 32)
    with torch.inference_mode():
        ref = model(x)
    for b in backends[1:]:
        diff = (fast_obfuscator(model, b, threads=args.threads)(x) - ref).abs()
        results["max_abs_diff"][b] = diff.max().item()
        print(f"{b:>11}: max |diff| {diff.max().item():.2e}  mean {diff.mean().item():.2e}  (vs eager fp32, {len(x)} test images)")

    # ---- one image, one core
    torch.set_num_threads(1)
    one = x[:1].clone()
    fns = {b: (lambda f=fast_obfuscator(model, b, threads=1): f(one)) for b in backends}
    times = interleaved(fns, args.rounds, warmup=10)
    base = median(times["eager"])
    print(f"\none image, 1 core, median of {args.rounds} (p90):")
    for b, ts in times.items():
        m, p90 = median(ts), sorted(ts)[int(0.9 * len(ts))]
        results["single"][b] = {"median_ms": m * 1e3, "p90_ms": p90 * 1e3, "speedup": base / m}
        print(f"{b:>11}: {m * 1e3:7.3f} ms  (p90 {p90 * 1e3:.3f})  x{base / m:5.2f} vs eager")

    # ---- a batch, `threads` cores
    torch.set_num_threads(args.threads)
    batch = x[: args.batch].clone()
    if len(batch) < args.batch:
        batch = batch.repeat(-(-args.batch // len(batch)), 1, 1, 1)[: args.batch]
    rounds = args.rounds // 100 + 1
    fns = {b: (lambda f=fast_obfuscator(model, b, threads=args.threads): f(batch)) for b in backends}
    times = interleaved(fns, rounds, warmup=1)
    base = len(batch) / median(times["eager"])
    print(f"\nbatch of {len(batch)}, {args.threads} cores, median of {rounds}:")
    for b, ts in times.items():
        ips = len(batch) / median(ts)
        results["batched"][b] = {"images_per_s": ips, "speedup": ips / base}
        print(f"{b:>11}: {ips:8.0f} images/s  x{ips / base:5.2f} vs eager")
    save_json(args.json, results)


if __name__ == "__main__":
    main()
