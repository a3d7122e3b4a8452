"""Which precision, memory layout and batch size make the decoder attack's training step fastest here?

One step = the U-Net decoder forward on a batch of 8-bit uploads, MSE to the originals, backward, Adam step
(the uploads come from the cache, so O does not run). All variants run in this one process, interleaved round
by round so that a busy machine slows them alike; images/s are compared with the fp32 contiguous step at the
same batch size. Then each of the U-Net's convolutions alone (forward + backward), bf16 against fp32, to see
which layers gain from bf16 (strided convolutions can lose).

    PYTHONPATH=src python bench/attack_step.py [--width 16] [--batches 64,128,256] [--threads 2] [--rounds 5]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from _common import interleaved, median, print_machine
from privoffload import nets
from privoffload.runtime import autocast

VARIANTS = {"fp32": (False, False), "fp32 channels_last": (False, True), "bf16": (True, False),
            "bf16 channels_last": (True, True)}


def make_step(net, opt, upload, x, bf16: bool):
    def step():
        with autocast(x.device, bf16):
            loss = F.mse_loss(net(upload).float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batches", default="64,128,256")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print_machine(f"decoder training step, U-Net width {args.width}, {args.threads} threads")
    for batch in (int(b) for b in args.batches.split(",")):
        torch.manual_seed(0)
        upload, x = torch.rand(batch, 3, 32, 32), torch.rand(batch, 3, 32, 32)
        steps = {}
        for name, (bf16, cl) in VARIANTS.items():
            fmt = torch.channels_last if cl else torch.contiguous_format
            net = nets.build("unet", args.width).to(memory_format=fmt).train()
            opt = torch.optim.Adam(net.parameters(), 1e-3)
            steps[name] = make_step(net, opt, upload.contiguous(memory_format=fmt), x.contiguous(memory_format=fmt), bf16)
        times = interleaved(steps, args.rounds)
        base = median(times["fp32"])
        for name, t in times.items():
            print(f"batch {batch:4d}  {name:20s} {batch / median(t):8.0f} images/s  x{base / median(t):.2f}")

    print("\n# each convolution alone, forward + backward, channels_last, batch 128: bf16 time / fp32 time")
    net = nets.build("unet", args.width)
    shapes, hooks = {}, []

    def record(name):
        def hook(mod, inp, out):
            shapes.setdefault(name, (mod, inp[0].shape))
        return hook

    for name, m in net.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(record(name)))
    net(torch.rand(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    for name, (conv, shape) in shapes.items():
        inp = torch.rand(128, *shape[1:]).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        conv = conv.to(memory_format=torch.channels_last)

        def run(bf16, conv=conv, inp=inp):
            with autocast(inp.device, bf16):
                out = conv(inp)
            out.float().sum().backward()

        t = interleaved({"fp32": lambda: run(False), "bf16": lambda: run(True)}, args.rounds)
        print(f"{name:14s} in {tuple(shape[1:])} stride {conv.stride[0]}: fp32 {1e3 * median(t['fp32']):6.2f} ms  "
              f"bf16 {1e3 * median(t['bf16']):6.2f} ms  ratio {median(t['bf16']) / median(t['fp32']):.2f}")


if __name__ == "__main__":
    main()
