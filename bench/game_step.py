"""One step of the obfuscation game, side by side in this process; with --profile, the per-op table of each.

`--compare recipe` (default): the obfuscator trainer's real step (train/obfuscator.py: ObfuscatorTask.step) under
the paper's recipe and under the utility-first recipe's two phases, against a frozen ResNet18, on random images:
  paper                    Table I codec D, one D step, CE on the labels
  utility, logits per batch  lam 0 (gate closed), D at rest, CE + distillation, C's clean logits computed every step
  utility, logits cached     the same, C's clean logits read from the per-image cache (built once, timed apart)
  privacy, U-Net D x2      the gate open: U-Net D, two D steps per O step, distillation from the cache
and the one-time cost of that cache per image against the per-batch forward it replaces.

`--compare codec`: the game step (train/game.py: game_step) with the codec as shipped (stride-2 depthwise
convolutions in fp32 under CPU autocast, nets/codec.py: StridedDepthwise) against the whole step in bf16.

Same weights and batches within a comparison, the variants interleaved round by round; the median is compared.

    python bench/game_step.py [--compare recipe|codec] [--codec-width 8] [--classifier-width 16] [--batch 64]
                              [--rounds 7] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts src/ on the path)
import numpy as np
import torch
from torch import nn

from privoffload import nets
from privoffload.config import ObfuscatorConfig, OptimConfig
from privoffload.data import Dataset
from privoffload.nets.codec import StridedDepthwise
from privoffload.runtime import frozen
from privoffload.train.game import Readability, game_step, reconstruction_loss
from privoffload.train.loop import Context, make_optimizer
from privoffload.train.obfuscator import ObfuscatorTask


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


def codec_steps(a) -> dict:
    def make_step(obf, deobf, classifier, x, y):
        adam = OptimConfig(name="adam", lr=1e-3, weight_decay=0.0)
        opt_o, opt_d = make_optimizer(obf.parameters(), adam), make_optimizer(deobf.parameters(), adam)
        readability, recon = Readability(classifier), reconstruction_loss("mse")
        return lambda: game_step(obf, deobf, readability, x, y, opt_o, opt_d, lam=4.0, recon=recon, device=x.device,
                                 bf16=True)

    cl = torch.channels_last
    obf, deobf = nets.codec(a.codec_width).to(memory_format=cl), nets.codec(a.codec_width).to(memory_format=cl)
    classifier = frozen(nets.resnet18(a.classifier_width).to(memory_format=cl))
    x = torch.rand(a.batch, 3, 32, 32).contiguous(memory_format=cl)
    y = torch.randint(0, 10, (a.batch,))
    return {"shipped (strided depthwise fp32)": make_step(obf, deobf, classifier, x, y),
            "before (all bf16)": make_step(as_before(obf), as_before(deobf), classifier, x, y)}


RECIPES = {  # name -> (settings, whether the step reads the cached logits)
    "paper (codec D, labels)": ({}, False),
    "utility, logits per batch": ({"distill": 1.0, "gate_epoch": 1000, "d_idle": True}, False),
    "utility, logits cached": ({"distill": 1.0, "gate_epoch": 1000, "d_idle": True}, True),
    "privacy, U-Net D x2": ({"distill": 1.0, "d_arch": "unet", "d_steps": 2}, True),
}


def recipe_steps(a, folder: Path) -> tuple[dict, dict]:
    """The trainer's step under each recipe, and the cache's cost per image beside the per-batch forward's."""
    rng = np.random.default_rng(0)
    n = 16 * a.batch
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    data = Dataset(images, rng.integers(0, 10, n), images[:a.batch], rng.integers(0, 10, a.batch), source="random")
    classifier_run = folder / "c"
    classifier_run.mkdir()
    nets.save(nets.resnet18(a.classifier_width, **data.classifier_args()), classifier_run / "classifier.safetensors")
    steps, tasks = {}, {}
    for i, (name, (settings, cached)) in enumerate(RECIPES.items()):
        cfg = ObfuscatorConfig(classifier=str(classifier_run), width=a.codec_width, batch_size=a.batch, flip=True,
                               epochs=1000, lam=4.0, subset="all", test_subset="all", **settings)
        cfg.validate()
        torch.manual_seed(0)
        task = ObfuscatorTask(Context.open(cfg, folder / f"run{i}", data=data))
        task.begin_epoch(0)
        tasks[name] = task
        batches = [b if cached else b[:2] for b in task.ctx.batches(0, indices=True)]
        cycle = iter(())

        def step(task=task, batches=batches, state={"it": cycle}):
            batch = next(state["it"], None)
            if batch is None:
                state["it"] = iter(batches)
                batch = next(state["it"])
            task.step(*batch)

        steps[name] = step
    task = tasks["utility, logits cached"]
    t0 = time.perf_counter()
    task.logits = None
    task.clean_logits(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.bool))
    cache_s = (time.perf_counter() - t0) / n  # both orientations of every image
    x = next(task.ctx.batches(0))[0]
    t0 = time.perf_counter()
    for _ in range(a.rounds):
        with torch.no_grad(), task.ctx.autocast():
            task.classifier(x)
    batch_s = (time.perf_counter() - t0) / a.rounds / a.batch
    return steps, {"cache_ms_per_image": 1000 * cache_s, "per_batch_ms_per_image": 1000 * batch_s,
                   "break_even_epochs": cache_s / batch_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", choices=("recipe", "codec"), default="recipe")
    ap.add_argument("--codec-width", type=int, default=8)
    ap.add_argument("--classifier-width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--profile", action="store_true", help="print the top ops of each variant")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    info = _common.print_machine(f"one step of the obfuscation game: {a.compare}")
    torch.manual_seed(0)
    extra = {}
    with tempfile.TemporaryDirectory() as tmp:
        if a.compare == "codec":
            steps, base_name = codec_steps(a), "before (all bf16)"
        else:
            steps, extra = recipe_steps(a, Path(tmp))
            base_name = "paper (codec D, labels)"
        times = _common.interleaved(steps, a.rounds)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, codec width {a.codec_width}, "
              f"classifier width {a.classifier_width}, batch {a.batch}, median of {a.rounds} interleaved rounds")
        base = _common.median(times[base_name])
        results = {}
        for name, ts in times.items():
            t = _common.median(ts)
            results[name] = {"ms": 1000 * t, "images_per_s": a.batch / t, "speedup": base / t}
            print(f"{name:36s} {1000 * t:7.1f} ms/step  {a.batch / t:6.0f} images/s  x{base / t:.2f}")
        if extra:
            print(f"C's clean logits: cache {extra['cache_ms_per_image']:.3f} ms per image (both orientations, batches "
                  f"of 512), per batch {extra['per_batch_ms_per_image']:.3f} ms per image and epoch: the cache pays "
                  f"for itself after {extra['break_even_epochs']:.2f} epochs")
        if a.profile:
            from torch.profiler import ProfilerActivity, profile

            for name, step in steps.items():
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(3):
                        step()
                print(f"\n{name}: top ops by self CPU time (3 steps)")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    _common.save_json(a.json, {"machine": info, "args": vars(a), "results": results, **extra})


if __name__ == "__main__":
    main()
