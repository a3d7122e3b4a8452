"""What the compatibility term costs: one classifier training step (train/classifier.py: ClassifierTask.step's
arithmetic) with the term for one published obfuscator, against the plain step, side by side in this process.

Variants: plain (clean cross-entropy only, the baseline); compat (the term as shipped: O's upload and the old C's
answer without gradients, everything under the run's autocast); compat, upload fp32 (O run outside autocast: is
bf16 faster for the codec's forward here?). Same weights, same batch, interleaved round by round; the median of
the rounds is compared.

    python bench/compat_step.py [--width 16] [--codec-width 8] [--batch 128] [--rounds 7] [--fp32]
"""

from __future__ import annotations

import argparse
import copy

import _common  # noqa: F401  (puts src/ on the path)
import torch
import torch.nn.functional as F

from privoffload import nets
from privoffload.config import OptimConfig
from privoffload.runtime import autocast, cpu_has_bf16, frozen
from privoffload.train.classifier import Compatibility
from privoffload.train.loop import make_optimizer


class Fp32Upload(torch.nn.Module):
    """The obfuscator's forward with autocast off: the upload computed in fp32 whatever the run's precision."""

    def __init__(self, obf: torch.nn.Module):
        super().__init__()
        self.obf = obf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.obf(x.float())


def make_step(model, x, y, bf16: bool, compat: Compatibility | None):
    opt = make_optimizer(model.parameters(), OptimConfig(lr=0.01))
    device = x.device

    def step():
        with autocast(device, bf16):
            loss = F.cross_entropy(model(x).float(), y)
            if compat is not None:
                loss = loss + compat(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=16, help="classifier width")
    ap.add_argument("--codec-width", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--fp32", action="store_true", help="the whole step in fp32 (default: bf16 where the CPU has it)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    info = _common.print_machine("a classifier step with the compatibility term against the plain step")
    bf16 = not a.fp32 and (torch.cuda.is_available() or cpu_has_bf16())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cl = torch.channels_last
    base = nets.resnet18(a.width).to(device, memory_format=cl).train()
    obf = frozen(nets.codec(a.codec_width).to(device, memory_format=cl))
    old = frozen(copy.deepcopy(base))
    x = torch.rand(a.batch, 3, 32, 32, device=device).contiguous(memory_format=cl)
    y = torch.randint(0, 10, (a.batch,), device=device)
    steps = {"plain": make_step(copy.deepcopy(base), x, y, bf16, None),
             "compat": make_step(copy.deepcopy(base), x, y, bf16, Compatibility([(obf, old)], "kl")),
             "compat, upload fp32": make_step(copy.deepcopy(base), x, y, bf16, Compatibility([(Fp32Upload(obf), old)], "kl"))}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = _common.interleaved(steps, a.rounds, sync=sync)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, {'bf16' if bf16 else 'fp32'}, "
          f"classifier width {a.width}, codec width {a.codec_width}, batch {a.batch}, median of {a.rounds} rounds")
    plain = _common.median(times["plain"])
    results = {}
    for name, ts in times.items():
        t = _common.median(ts)
        results[name] = {"ms": 1000 * t, "images_per_s": a.batch / t, "vs_plain": t / plain}
        print(f"{name:22s} {1000 * t:7.1f} ms/step  {a.batch / t:6.0f} images/s  x{t / plain:.2f} the plain step's time")
    _common.save_json(a.json, {"machine": info, "args": vars(a), "results": results})


if __name__ == "__main__":
    main()
