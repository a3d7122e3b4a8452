"""One step of the obfuscation game (train/game.py: game_step), the codec as shipped against the codec before,
side by side in this process; with --profile, the per-op table of each (torch.profiler).

Shipped: under CPU autocast the codec's stride-2 depthwise convolutions run in fp32 (nets/codec.py:
StridedDepthwise), everything else in bf16. Before: the whole step in bf16. Same weights, same batch,
the two interleaved round by round; the median of the rounds is compared.

    python bench/game_step.py [--codec-width 8] [--classifier-width 16] [--batch 64] [--rounds 7] [--profile]
"""

from __future__ import annotations

import argparse
import copy

import _common  # noqa: F401  (puts src/ on the path)
import torch
from torch import nn

from privoffload import nets
from privoffload.config import OptimConfig
from privoffload.nets.codec import StridedDepthwise
from privoffload.runtime import frozen
from privoffload.train.game import Readability, game_step, reconstruction_loss
from privoffload.train.loop import make_optimizer


def as_before(codec: nn.Module) -> nn.Module:
    """The same codec with plain convolutions where the shipped one has StridedDepthwise (all bf16 under autocast)."""
    old = copy.deepcopy(codec)
    for module in old.modules():
        for name, child in module.named_children():
            if isinstance(child, StridedDepthwise):
                plain = nn.Conv2d(child.in_channels, child.out_channels, 3, 2, 1, groups=child.groups, bias=False)
                plain.load_state_dict(child.state_dict())
                setattr(module, name, plain.to(memory_format=torch.channels_last))
    return old


def make_step(obf, deobf, classifier, x, y):
    adam = OptimConfig(name="adam", lr=1e-3, weight_decay=0.0)
    opt_o, opt_d = make_optimizer(obf.parameters(), adam), make_optimizer(deobf.parameters(), adam)
    readability, recon = Readability(classifier), reconstruction_loss("mse")
    return lambda: game_step(obf, deobf, readability, x, y, opt_o, opt_d, lam=4.0, recon=recon, device=x.device, bf16=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codec-width", type=int, default=8)
    ap.add_argument("--classifier-width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--profile", action="store_true", help="print the top ops of each variant")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    info = _common.print_machine("one step of the obfuscation game: shipped codec vs all-bf16 codec")
    torch.manual_seed(0)
    cl = torch.channels_last
    obf, deobf = nets.codec(a.codec_width).to(memory_format=cl), nets.codec(a.codec_width).to(memory_format=cl)
    classifier = frozen(nets.resnet18(a.classifier_width).to(memory_format=cl))
    x = torch.rand(a.batch, 3, 32, 32).contiguous(memory_format=cl)
    y = torch.randint(0, 10, (a.batch,))
    steps = {"shipped (strided depthwise fp32)": make_step(obf, deobf, classifier, x, y),
             "before (all bf16)": make_step(as_before(obf), as_before(deobf), classifier, x, y)}
    times = _common.interleaved(steps, a.rounds)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, codec width {a.codec_width}, "
          f"classifier width {a.classifier_width}, batch {a.batch}, median of {a.rounds} interleaved rounds")
    base = _common.median(times["before (all bf16)"])
    results = {}
    for name, ts in times.items():
        t = _common.median(ts)
        results[name] = {"ms": 1000 * t, "images_per_s": a.batch / t, "speedup": base / t}
        print(f"{name:36s} {1000 * t:7.1f} ms/step  {a.batch / t:6.0f} images/s  x{base / t:.2f}")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, step in steps.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    step()
            print(f"\n{name}: top ops by self CPU time (3 steps)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    _common.save_json(a.json, {"machine": info, "args": vars(a), "results": results})


if __name__ == "__main__":
    main()
