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


@command("evaluate")
def evaluate_cmd(run: Annotated[Path, typer.Argument(help="a classifier run folder")],
                 data: DataOpt = None, device: DeviceOpt = "auto",
                 json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False):
    """Print the test accuracy of a run's classifier."""
    from .evaluate import evaluate_run

    result = evaluate_run(run, data_root=str(data) if data else None, device=device)
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


@command("reproduce")
def reproduce_cmd(
    out: Annotated[Path, typer.Option("--out", help="protocol folder (give the same command again to continue)")],
    profile: Annotated[str, typer.Option(help="smoke | quick | paper | auto (paper on CUDA, quick on a CPU)")] = "auto",
    set_: SetOpt = None, data: DataOpt = None, device: DeviceOpt = "auto",
):
    """Run the paper's whole protocol (C0, O0, drift, recovery, fresh attack), its figures and report.md."""
    from .experiments.protocol import auto_profile, load_profile, reproduce

    name = auto_profile(device) if profile == "auto" else profile
    cfg = load_profile(name, set_)
    report = reproduce(cfg, out, data_root=str(data) if data else None, device=device)
    typer.echo(f"report: {report}")


@command("plot")
def plot_cmd(run: Annotated[Path, typer.Argument(help="a protocol folder made by reproduce")], data: DataOpt = None):
    """Redraw a protocol folder's figures and report.md from its logs, without training."""
    from .experiments.report import write_report

    if not run.is_dir():
        raise UserError(f"{run} is not a folder; give the --out of a reproduce run")
    typer.echo(f"report: {write_report(run, data_root=str(data) if data else None)}")


def main() -> None:
    app(prog_name="privoffload")


if __name__ == "__main__":
    sys.exit(main())
