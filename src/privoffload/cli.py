"""The `privoffload` command: thin wrappers over the modules; every user mistake is one line, exit 2."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from . import config as config_mod
from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Private image classification offloading: train, reproduce, serve, classify.")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="TOML file with settings")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a setting, e.g. optim.lr=0.1 (repeatable)")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="continue the run in --out where it stopped")]
DataOpt = Annotated[Optional[Path], typer.Option("--data", help="folder holding cifar-10-batches-bin or -py")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]


def user_errors(fn: Callable) -> Callable:
    """Turn UserError (and a few OS errors a user causes) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; rerun with --resume to continue", err=True)
            raise typer.Exit(130) from None

    return wrapper


def command(*args, **kwargs):
    """`@app.command` with the one-line error handling."""

    def deco(fn):
        return app.command(*args, **kwargs)(user_errors(fn))

    return deco


@command("train-classifier")
def train_classifier_cmd(
    out: Annotated[Path, typer.Option("--out", help="run folder to write")],
    subset: Annotated[Optional[str], typer.Option(help="all | first:N | random:N | range:A:B")] = None,
    epochs: Annotated[Optional[int], typer.Option()] = None,
    width: Annotated[Optional[int], typer.Option(help="ResNet18 width (64 = the real one)")] = None,
    batch_size: Annotated[Optional[int], typer.Option()] = None,
    flip: Annotated[Optional[bool], typer.Option("--flip/--no-flip")] = None,
    init: Annotated[Optional[Path], typer.Option(help="classifier run to start from")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto | bf16 | fp32")] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    config: ConfigOpt = None, set_: SetOpt = None, resume: ResumeOpt = False, data: DataOpt = None,
    device: DeviceOpt = "auto",
):
    """Train the cloud's classifier (CIFAR ResNet18)."""
    from .config import ClassifierConfig
    from .train.classifier import train_classifier

    cfg = config_mod.load(ClassifierConfig, config, sets=set_, overrides={
        "subset": subset, "epochs": epochs, "width": width, "batch_size": batch_size, "flip": flip,
        "init": str(init) if init else None, "precision": precision, "seed": seed})
    train_classifier(cfg, out, resume=resume, device=device, data_root=str(data) if data else None)


@command("train-obfuscator")
def train_obfuscator_cmd(
    classifier: Annotated[Optional[Path], typer.Option("--classifier", help="classifier run folder (C, kept frozen)")] = None,
    out: Annotated[Path, typer.Option("--out", help="run folder to write")] = ...,
    subset: Annotated[Optional[str], typer.Option(help="all | first:N | random:N | range:A:B")] = None,
    epochs: Annotated[Optional[int], typer.Option()] = None,
    width: Annotated[Optional[int], typer.Option(help="codec width of O and D (32 = Table I)")] = None,
    batch_size: Annotated[Optional[int], typer.Option()] = None,
    lam: Annotated[Optional[float], typer.Option("--lam", help="weight of D's reconstruction loss in O's objective")] = None,
    recon_loss: Annotated[Optional[str], typer.Option(help="mse | l1")] = None,
    flip: Annotated[Optional[bool], typer.Option("--flip/--no-flip")] = None,
    init: Annotated[Optional[Path], typer.Option(help="obfuscator run whose O and D to continue from")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto | bf16 | fp32")] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    config: ConfigOpt = None, set_: SetOpt = None, resume: ResumeOpt = False, data: DataOpt = None,
    device: DeviceOpt = "auto",
):
    """Train an obfuscator O (and its deobfuscator D) against a frozen classifier."""
    from .config import ObfuscatorConfig
    from .train.obfuscator import train_obfuscator

    cfg = config_mod.load(ObfuscatorConfig, config, sets=set_, overrides={
        "classifier": str(classifier) if classifier else None, "subset": subset, "epochs": epochs, "width": width,
        "batch_size": batch_size, "lam": lam, "recon_loss": recon_loss, "flip": flip,
        "init": str(init) if init else None, "precision": precision, "seed": seed})
    train_obfuscator(cfg, out, resume=resume, device=device, data_root=str(data) if data else None)


@command("attack")
def attack_cmd(
    obfuscator: Annotated[Optional[Path], typer.Option("--obfuscator", help="obfuscator run folder (O, kept frozen)")] = None,
    out: Annotated[Path, typer.Option("--out", help="run folder to write")] = ...,
    arch: Annotated[Optional[str], typer.Option(help="codec (Table I layout) | unet")] = None,
    subset: Annotated[Optional[str], typer.Option(help="training images whose originals the attacker knows")] = None,
    epochs: Annotated[Optional[int], typer.Option()] = None,
    width: Annotated[Optional[int], typer.Option(help="attacker width")] = None,
    batch_size: Annotated[Optional[int], typer.Option()] = None,
    recon_loss: Annotated[Optional[str], typer.Option(help="mse | l1")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto | bf16 | fp32")] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    config: ConfigOpt = None, set_: SetOpt = None, resume: ResumeOpt = False, data: DataOpt = None,
    device: DeviceOpt = "auto",
):
    """Train a fresh deobfuscator on (O(x), x) training pairs with O frozen; score it on the test set."""
    from .config import AttackConfig
    from .privacy.attack import train_attack

    cfg = config_mod.load(AttackConfig, config, sets=set_, overrides={
        "obfuscator": str(obfuscator) if obfuscator else None, "arch": arch, "subset": subset, "epochs": epochs,
        "width": width, "batch_size": batch_size, "recon_loss": recon_loss, "precision": precision, "seed": seed})
    train_attack(cfg, out, resume=resume, device=device, data_root=str(data) if data else None)


@command("sweep-lambda")
def sweep_lambda_cmd(
    classifier: Annotated[Optional[Path], typer.Option("--classifier", help="classifier run folder (C, kept frozen)")] = None,
    lams: Annotated[Optional[str], typer.Option("--lams", help="comma-separated lambdas, e.g. 0,0.5,1,2")] = None,
    out: Annotated[Path, typer.Option("--out", help="folder for the runs, frontier.json and frontier.png")] = ...,
    subset: Annotated[Optional[str], typer.Option(help="training images, for the obfuscators and the attacks")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="obfuscator epochs")] = None,
    width: Annotated[Optional[int], typer.Option(help="codec width of O and D")] = None,
    attack_arch: Annotated[Optional[str], typer.Option(help="codec | unet")] = None,
    attack_epochs: Annotated[Optional[int], typer.Option()] = None,
    attack_width: Annotated[Optional[int], typer.Option()] = None,
    config: ConfigOpt = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override, e.g. obfuscator.recon_loss=l1 or attack.epochs=5")] = None,
    data: DataOpt = None, device: DeviceOpt = "auto",
):
    """Train and attack one obfuscator per lambda: the privacy-utility frontier (rerun to continue)."""
    from .config import SweepConfig
    from .privacy.sweep import sweep_lambda

    lam_list = None
    if lams is not None:
        try:
            lam_list = [float(v) for v in lams.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--lams {lams!r} is not a comma-separated list of numbers, e.g. 0,0.5,1") from None
    cfg = config_mod.load(SweepConfig, config, sets=set_, overrides={
        "lams": lam_list, "obfuscator.classifier": str(classifier) if classifier else None,
        "obfuscator.subset": subset, "attack.subset": subset, "obfuscator.epochs": epochs, "obfuscator.width": width,
        "attack.arch": attack_arch, "attack.epochs": attack_epochs, "attack.width": attack_width})
    path = sweep_lambda(cfg, out, device=device, data_root=str(data) if data else None)
    typer.echo(f"frontier: {path} and {path.with_suffix('.png')}")


@command("samples")
def samples_cmd(
    obfuscator: Annotated[Path, typer.Option("--obfuscator", help="obfuscator run folder")],
    out: Annotated[Path, typer.Option("--out", help="PNG file to write")],
    attack: Annotated[Optional[Path], typer.Option("--attack", help="attack run folder, adds the attacker's row")] = None,
    n: Annotated[int, typer.Option("--n", min=1, max=32, help="test images (columns)")] = 8,
    data: DataOpt = None, device: DeviceOpt = "auto",
):
    """Fig. 4: original, uploaded (obfuscated) and reconstructed test images, as a PNG grid."""
    from .experiments.figures import sample_grid
    from .privacy.samples import sample_rows

    rows = sample_rows(obfuscator, attack_run=attack, n=n, device=device, data_root=str(data) if data else None)
    typer.echo(f"wrote {sample_grid(rows, out)}")


@command("evaluate")
def evaluate_cmd(run: Annotated[Path, typer.Argument(help="a classifier, obfuscator or attack run folder")],
                 subset: Annotated[str, typer.Option(help="test images: all | first:N | random:N | range:A:B")] = "all",
                 seed: Annotated[int, typer.Option(help="seed of a random:N subset")] = 0,
                 data: DataOpt = None, device: DeviceOpt = "auto",
                 json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False):
    """Score a run on the whole test set: accuracy; for an obfuscator also privacy (PSNR, SSIM)."""
    from .evaluate import evaluate_run

    result = evaluate_run(run, data_root=str(data) if data else None, device=device, test_subset=subset, seed=seed)
    if json_out:
        typer.echo(json.dumps(result))
    else:
        for k, v in result.items():
            typer.echo(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")


@command("download-data")
def download_cmd(root: Annotated[Path, typer.Option("--root", help="folder to unpack into")],
                 layout: Annotated[str, typer.Option(help="bin | py")] = "bin"):
    """Download the official CIFAR-10 tarball (needs internet), check its md5 and unpack it."""
    from .data import URLS, download

    if layout not in URLS:
        raise UserError(f"--layout {layout!r} is not bin or py")
    typer.echo(f"unpacked into {download(root, layout)}")


def main() -> None:
    app(prog_name="privoffload")


if __name__ == "__main__":
    sys.exit(main())
