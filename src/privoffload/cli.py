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
DataOpt = Annotated[Optional[Path], typer.Option("--data", help="data root: cifar-10-batches-bin or -py, pneumoniamnist.npz, "
                                                                 "ORL's s1/ ... s40/ (default: the cache, then ../shared/data)")]
DatasetOpt = Annotated[Optional[str], typer.Option("--dataset", help="cifar10 | pneumoniamnist | orl | folder:PATH "
                                                                     "(PATH/train/CLASS/*.png, PATH/test/CLASS/...)")]
SizeOpt = Annotated[Optional[str], typer.Option("--image-size", help="resize to HEIGHTxWIDTH, multiples of 8 "
                                                                     "(default: the data set's; orl 64x56, pneumoniamnist 32x32)")]
EpsOpt = Annotated[float, typer.Option("--ldp-epsilon", help="local DP: epsilon per upload (inf = no noise)")]
DeltaOpt = Annotated[float, typer.Option("--ldp-delta", help="local DP: delta per upload")]
ClipOpt = Annotated[float, typer.Option("--ldp-clip", help="local DP: L2 radius of the upload around mid-grey "
                                                           "(0 = the whole pixel cube, nothing clipped)")]
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


def defaults(cls: type) -> str:
    """A command's settings where no option, --config or --set gives them: the end of its --help."""
    import dataclasses

    cfg = cls()
    shown = [f"{f.name} = {getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
             if not dataclasses.is_dataclass(getattr(cfg, f.name))]
    return "Defaults (change them with an option, --config FILE.toml or --set key=value): " + "; ".join(shown) + "."


def command(*args, **kwargs):
    """`@app.command` with the one-line error handling."""

    def deco(fn):
        return app.command(*args, **kwargs)(user_errors(fn))

    return deco


# options the trainers share; a value left out keeps the config's (or the default's)
SubsetOpt = Annotated[Optional[str], typer.Option(help="training images: all | first:N | random:N | range:START:END")]
EpochsOpt = Annotated[Optional[int], typer.Option()]
BatchOpt = Annotated[Optional[int], typer.Option()]
FlipOpt = Annotated[Optional[bool], typer.Option("--flip/--no-flip", help="random horizontal flips")]
PrecisionOpt = Annotated[Optional[str], typer.Option(help="auto | bf16 | fp32")]
SeedOpt = Annotated[Optional[int], typer.Option()]
OutOpt = Annotated[Path, typer.Option("--out", help="run folder to write")]


def settings(cls: type, config: Path | None, sets: list[str] | None, **options):
    """A trainer's config: defaults <- --config file <- --set key=value <- the options given (paths as strings)."""
    given = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    return config_mod.load(cls, config, sets=sets, overrides=given)


def data_of(run: Path | None, dataset: str | None, image_size: str | None) -> dict:
    """The data set options given, else those of the run this one builds on (its config.toml)."""
    if run is not None and dataset is None and Path(run).is_dir() and (Path(run) / "config.toml").exists():
        from .runs import run_dataset

        dataset, saved_size = run_dataset(run)
        image_size = saved_size if image_size is None else image_size
    return {"dataset": dataset, "image_size": image_size}


@command("train-classifier", epilog=defaults(config_mod.ClassifierConfig))
def train_classifier_cmd(
    out: OutOpt, subset: SubsetOpt = None, epochs: EpochsOpt = None,
    width: Annotated[Optional[int], typer.Option(help="ResNet18 width (64 = the real one)")] = None,
    batch_size: BatchOpt = None, flip: FlipOpt = None,
    init: Annotated[Optional[Path], typer.Option(help="classifier run to start from")] = None,
    compatible_with: Annotated[Optional[list[Path]], typer.Option(
        "--compatible-with", help="a published obfuscator run whose uploads this update must keep working "
                                  "(repeatable; the term's weight and loss: --set compat.weight=1 compat.loss=kl|focal)")] = None,
    precision: PrecisionOpt = None, seed: SeedOpt = None, dataset: DatasetOpt = None, image_size: SizeOpt = None,
    config: ConfigOpt = None, set_: SetOpt = None, resume: ResumeOpt = False, data: DataOpt = None,
    device: DeviceOpt = "auto",
):
    """Train the cloud's classifier (a ResNet18 for the data set's images); with --compatible-with, as an update that
    keeps the published obfuscators working."""
    from .config import ClassifierConfig
    from .train.classifier import train_classifier

    cfg = settings(ClassifierConfig, config, set_, subset=subset, epochs=epochs, width=width, batch_size=batch_size,
                   flip=flip, init=init, precision=precision, seed=seed, dataset=dataset, image_size=image_size,
                   **{"compat.obfuscators": [str(p) for p in compatible_with] if compatible_with else None})
    train_classifier(cfg, out, resume=resume, device=device, data_root=data)


@command("train-obfuscator", epilog=defaults(config_mod.ObfuscatorConfig))
def train_obfuscator_cmd(
    out: OutOpt,
    classifier: Annotated[Optional[Path], typer.Option("--classifier", help="classifier run folder (C, kept frozen)")] = None,
    subset: SubsetOpt = None, epochs: EpochsOpt = None,
    width: Annotated[Optional[int], typer.Option(help="codec width of O and D (32 = Table I)")] = None,
    batch_size: BatchOpt = None,
    lam: Annotated[Optional[float], typer.Option("--lam", help="weight of D's reconstruction loss in O's objective")] = None,
    recon_loss: Annotated[Optional[str], typer.Option(help="mse | l1")] = None,
    flip: FlipOpt = None,
    init: Annotated[Optional[Path], typer.Option(help="obfuscator run whose O and D to continue from")] = None,
    precision: PrecisionOpt = None, seed: SeedOpt = None, dataset: DatasetOpt = None, image_size: SizeOpt = None,
    config: ConfigOpt = None, set_: SetOpt = None, resume: ResumeOpt = False, data: DataOpt = None,
    device: DeviceOpt = "auto",
):
    """Train an obfuscator O (and its deobfuscator D) against a frozen classifier."""
    from .config import ObfuscatorConfig
    from .train.obfuscator import train_obfuscator

    cfg = settings(ObfuscatorConfig, config, set_, classifier=classifier, subset=subset, epochs=epochs, width=width,
                   batch_size=batch_size, lam=lam, recon_loss=recon_loss, flip=flip, init=init, precision=precision,
                   seed=seed, **data_of(classifier, dataset, image_size))
    train_obfuscator(cfg, out, resume=resume, device=device, data_root=data)


KINDS = ("decoder", "inversion", "adaptive")


@command("attack", epilog="Decoder " + defaults(config_mod.AttackConfig))
def attack_cmd(
    out: OutOpt,
    obfuscator: Annotated[Optional[Path], typer.Option("--obfuscator", help="obfuscator run folder (O, kept frozen)")] = None,
    kind: Annotated[str, typer.Option(help="decoder (trained on pairs) | inversion (white-box on O) | adaptive "
                                           "(own O' from O's recipe)")] = "decoder",
    arch: Annotated[Optional[str], typer.Option(help="decoder: unet | codec (Table I layout) | answer (from C's answer "
                                                    "alone: the label-only decoder)")] = None,
    subset: Annotated[Optional[str], typer.Option(help="training images whose originals the attacker knows")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="decoder: epochs at most (early stopping may end sooner)")] = None,
    width: Annotated[Optional[int], typer.Option(help="decoder width")] = None,
    batch_size: BatchOpt = None,
    recon_loss: Annotated[Optional[str], typer.Option(help="decoder: mse | l1")] = None,
    steps: Annotated[Optional[int], typer.Option(help="inversion: Adam steps per image")] = None,
    test_subset: Annotated[Optional[str], typer.Option(help="test images to score (inversion: to invert)")] = None,
    precision: PrecisionOpt = None, seed: SeedOpt = None, dataset: DatasetOpt = None, image_size: SizeOpt = None,
    ldp_epsilon: Annotated[Optional[float], typer.Option("--ldp-epsilon", help="decoder: attack uploads with local-DP noise")] = None,
    ldp_delta: Annotated[Optional[float], typer.Option("--ldp-delta")] = None,
    config: ConfigOpt = None, set_: SetOpt = None, resume: ResumeOpt = False, data: DataOpt = None,
    device: DeviceOpt = "auto",
):
    """Attack an obfuscator, one run folder: a decoder trained until validation stops improving on (upload, image)
    training pairs (`--set answer=true`: it also reads C's answer), white-box inversion of O for each test upload, or
    the adaptive attack (the attacker trains its own O' by O's recipe)."""
    from .config import AdaptiveConfig, AttackConfig, InversionConfig

    if kind not in KINDS:
        raise UserError(f"--kind {kind!r} is not one of {', '.join(KINDS)}")
    options = {"arch": arch, "epochs": epochs, "width": width, "recon_loss": recon_loss, "batch_size": batch_size,
               "steps": steps}
    applies = {"inversion": {"steps", "batch_size"}}.get(kind, set(options) - {"steps"})
    wrong = [k for k, v in options.items() if v is not None and k not in applies]
    if wrong:
        raise UserError(f"--{wrong[0].replace('_', '-')} does not apply to --kind {kind}")
    if kind != "decoder" and (ldp_epsilon is not None or ldp_delta is not None):
        raise UserError(f"--ldp-epsilon and --ldp-delta apply to --kind decoder, not {kind}")
    prefix = "decoder." if kind == "adaptive" else ""  # the adaptive attack's decoders
    given = {prefix + k: v for k, v in options.items() if v is not None}
    which = data_of(obfuscator, dataset, image_size)  # the attacked obfuscator's data set unless given
    common = {"obfuscator": obfuscator, "subset": subset, "test_subset": test_subset, "seed": seed}
    if kind == "decoder":
        from .privacy.attack import train_attack as runner

        cfg = settings(AttackConfig, config, set_, **common, **given, precision=precision, **which,
                       **{"ldp.epsilon": ldp_epsilon, "ldp.delta": ldp_delta})
    elif kind == "inversion":
        from .privacy.inversion import run_inversion as runner

        cfg = settings(InversionConfig, config, set_, **common, **given, precision=precision)
    else:
        from .privacy.adaptive import run_adaptive as runner

        cfg = settings(AdaptiveConfig, config, set_, **common, **given, **{"decoder.precision": precision})
    if kind == "decoder":  # its config records the data set
        runner(cfg, out, resume=resume, device=device, data_root=data)
    else:  # inversion and adaptive are handed the attacked obfuscator's data set
        from .data import load_dataset

        images = load_dataset(which["dataset"] or "cifar10", data, which["image_size"] or "")
        runner(cfg, out, resume=resume, device=device, data_root=data, data=images)


@command("attack-suite", epilog=defaults(config_mod.SuiteConfig))
def attack_suite_cmd(
    out: OutOpt,
    obfuscator: Annotated[Optional[Path], typer.Option("--obfuscator", help="obfuscator run folder")] = None,
    attacks: Annotated[Optional[str], typer.Option(help="comma-separated, of decoder, label-aware, adaptive, "
                                                        "decoder+inversion, inversion")] = None,
    test_subset: Annotated[Optional[str], typer.Option(help="the test images every row is scored on")] = None,
    config: ConfigOpt = None, set_: SetOpt = None, data: DataOpt = None, device: DeviceOpt = "auto",
):
    """Every attack and the reference rows on one obfuscator, on the same test images: suite.json and a table with,
    per row, PSNR, SSIM, identifiability and convergence, and the leakage beyond the class (rerun to continue;
    finished rows and the cached uploads are reused)."""
    from .config import SuiteConfig
    from .experiments.privacy_table import suite_table
    from .privacy.suite import run_suite

    names = [a.strip() for a in attacks.split(",") if a.strip()] if attacks is not None else None
    cfg = settings(SuiteConfig, config, set_, obfuscator=obfuscator, attacks=names, test_subset=test_subset)
    from .data import load_dataset

    which = data_of(obfuscator, None, None)  # the attacked obfuscator's data set
    images = load_dataset(which["dataset"] or "cifar10", data, which["image_size"] or "")
    path = run_suite(cfg, out, device=device, data_root=data, data=images)
    typer.echo("\n".join(suite_table({"": json.loads(path.read_text())})))
    typer.echo(f"suite: {path}")


@command("sweep-lambda", epilog=defaults(config_mod.SweepConfig))
def sweep_lambda_cmd(
    classifier: Annotated[Optional[Path], typer.Option("--classifier", help="classifier run folder (C, kept frozen)")] = None,
    lams: Annotated[Optional[str], typer.Option("--lams", help="comma-separated lambdas, e.g. 0,0.5,1,2")] = None,
    seeds: Annotated[Optional[int], typer.Option("--seeds", min=1, help="seeds per lambda (0..N-1), each its own runs")] = None,
    out: Annotated[Path, typer.Option("--out", help="folder for the runs, frontier.json and frontier.png")] = ...,
    subset: Annotated[Optional[str], typer.Option(help="training images, for the obfuscators and the attacks")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="obfuscator epochs")] = None,
    width: Annotated[Optional[int], typer.Option(help="codec width of O and D")] = None,
    attack_arch: Annotated[Optional[str], typer.Option(help="the suite's decoder: codec | unet")] = None,
    attack_epochs: Annotated[Optional[int], typer.Option(help="the suite's decoder: epochs at most")] = None,
    attack_width: Annotated[Optional[int], typer.Option()] = None,
    config: ConfigOpt = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override, e.g. obfuscator.recon_cap=true or "
                                                                    "suite.decoder.epochs=5")] = None,
    data: DataOpt = None, device: DeviceOpt = "auto",
):
    """Train one obfuscator per lambda and seed and attack each with the suite: the privacy-utility frontier
    against the strongest attack, with 95 % intervals over seeds (rerun to continue)."""
    from .config import SweepConfig
    from .experiments.sweep import sweep_lambda

    lam_list = None
    if lams is not None:
        try:
            lam_list = [float(v) for v in lams.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--lams {lams!r} is not a comma-separated list of numbers, e.g. 0,0.5,1") from None
    cfg = settings(SweepConfig, config, set_, **{
        "lams": lam_list, "seeds": list(range(seeds)) if seeds else None, "obfuscator.classifier": classifier,
        "obfuscator.subset": subset, "suite.decoder.subset": subset, "suite.inversion.subset": subset,
        "suite.adaptive.subset": subset, "obfuscator.epochs": epochs, "obfuscator.width": width,
        "suite.decoder.arch": attack_arch, "suite.decoder.epochs": attack_epochs, "suite.decoder.width": attack_width})
    path = sweep_lambda(cfg, out, device=device, data_root=data)
    typer.echo(f"frontier: {path} and {path.with_suffix('.png')}")


def int_list(text: str | None, option: str) -> list[int] | None:
    """"8,16" -> [8, 16]; a bad list is one line."""
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option} {text!r} is not a comma-separated list of whole numbers, e.g. 8,16") from None


@command("sweep-utility")
def sweep_utility_cmd(
    classifier: Annotated[Optional[Path], typer.Option("--classifier", help="classifier run folder (C, kept frozen)")] = None,
    out: Annotated[Path, typer.Option("--out", help="folder for the runs, utility.json and utility.png")] = ...,
    widths: Annotated[Optional[str], typer.Option("--widths", help="codec widths of O, e.g. 8,16")] = None,
    epochs: Annotated[Optional[str], typer.Option("--epochs", help="epoch budgets, e.g. 4,16 (a point stops earlier "
                                                                   "once converged)")] = None,
    subsets: Annotated[Optional[str], typer.Option("--subsets", help="training images, e.g. first:10000,first:20000")] = None,
    losses: Annotated[Optional[str], typer.Option("--losses", help="ce, distill or both: ce,distill")] = None,
    val_subset: Annotated[Optional[str], typer.Option("--val-subset", help="the validation split (training images no "
                                                                           "point trains on)")] = None,
    config: ConfigOpt = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override, e.g. obfuscator.patience=3 or "
                                                                    "obfuscator.flip=true")] = None,
    data: DataOpt = None, device: DeviceOpt = "auto",
):
    """O alone (lam = 0) against a frozen C over width, epochs, training images and loss, each point trained until its
    validation utility stops improving: a table of share-of-clean against training seconds (rerun to continue)."""
    from .config import UtilitySweepConfig
    from .experiments.utility import sweep_utility, table

    cfg = settings(UtilitySweepConfig, config, set_, **{
        "widths": int_list(widths, "--widths"), "epochs": int_list(epochs, "--epochs"),
        "subsets": [v.strip() for v in subsets.split(",") if v.strip()] if subsets is not None else None,
        "losses": [v.strip() for v in losses.split(",") if v.strip()] if losses is not None else None,
        "obfuscator.classifier": classifier, "obfuscator.val_subset": val_subset,
        **{f"obfuscator.{k}": v for k, v in data_of(classifier, None, None).items()}})
    path = sweep_utility(cfg, out, device=device, data_root=data)
    typer.echo("\n".join(table(json.loads(path.read_text())["points"])))
    typer.echo(f"sweep: {path} and {path.with_suffix('.png')}")


@command("sweep-epsilon")
def sweep_epsilon_cmd(
    obfuscator: Annotated[Optional[Path], typer.Option("--obfuscator", help="obfuscator run folder")] = None,
    out: Annotated[Path, typer.Option("--out", help="folder for the attacks, epsilon.json, .png and .md")] = ...,
    epsilons: Annotated[Optional[str], typer.Option("--epsilons", help="comma-separated, e.g. 1,4,16,64,inf")] = None,
    delta: Annotated[Optional[float], typer.Option("--delta", help="delta per upload")] = None,
    clip: Annotated[Optional[float], typer.Option("--clip", help="L2 radius around mid-grey (0 = nothing clipped)")] = None,
    attack_arch: Annotated[Optional[str], typer.Option(help="codec | unet")] = None,
    attack_epochs: Annotated[Optional[int], typer.Option()] = None,
    attack_width: Annotated[Optional[int], typer.Option()] = None,
    attack_subset: Annotated[Optional[str], typer.Option(help="training images of the attacks")] = None,
    config: ConfigOpt = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override, e.g. attack.batch_size=32")] = None,
    data: DataOpt = None, device: DeviceOpt = "auto",
):
    """Accuracy and a fresh attacker's PSNR/SSIM against epsilon, with local-DP noise on the uploads (rerun to continue)."""
    from .config import EpsilonSweepConfig
    from .experiments.epsilon import sweep_epsilon

    eps_list = None
    if epsilons is not None:
        try:
            eps_list = [float(v) for v in epsilons.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--epsilons {epsilons!r} is not a comma-separated list of numbers, e.g. 1,4,16,64,inf") from None
    cfg = settings(EpsilonSweepConfig, config, set_, **{
        "obfuscator": obfuscator, "epsilons": eps_list, "delta": delta, "clip": clip, "attack.arch": attack_arch,
        "attack.epochs": attack_epochs, "attack.width": attack_width, "attack.subset": attack_subset})
    typer.echo(f"table: {sweep_epsilon(cfg, out, device=device, data_root=data)}")


@command("samples")
def samples_cmd(
    obfuscator: Annotated[Path, typer.Option("--obfuscator", help="obfuscator run folder")],
    out: Annotated[Path, typer.Option("--out", help="PNG file to write")],
    attack: Annotated[Optional[Path], typer.Option("--attack", help="attack run folder, adds the attacker's row")] = None,
    suite: Annotated[Optional[Path], typer.Option("--suite", help="attack-suite folder, adds one row per attack")] = None,
    n: Annotated[int, typer.Option("--n", min=1, max=32, help="test images (columns)")] = 8,
    data: DataOpt = None, device: DeviceOpt = "auto",
):
    """Fig. 4: original, uploaded (8-bit O(x)) and reconstructed test images, one row per adversary, as a PNG grid."""
    from .experiments.figures import sample_grid
    from .privacy.samples import sample_rows

    rows = sample_rows(obfuscator, attack_runs={"fresh attacker": attack} if attack else None, suite=suite, n=n,
                       device=device, data_root=data)
    typer.echo(f"wrote {sample_grid(rows, out)}")


@command("evaluate")
def evaluate_cmd(run: Annotated[Path, typer.Argument(help="a classifier, obfuscator or attack run folder")],
                 subset: Annotated[str, typer.Option(help="test images: all | first:N | random:N | range:START:END")] = "all",
                 seed: Annotated[int, typer.Option(help="seed of a random:N subset, and of the local-DP noise")] = 0,
                 ldp_epsilon: EpsOpt = float("inf"), ldp_delta: DeltaOpt = 1e-5, ldp_clip: ClipOpt = 0.0,
                 data: DataOpt = None, device: DeviceOpt = "auto",
                 json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False):
    """Score a run on the whole test set: accuracy; for an obfuscator also privacy (PSNR, SSIM); with
    --ldp-epsilon, on uploads with local-DP noise."""
    from .evaluate import evaluate_run

    result = evaluate_run(run, data_root=data, device=device, test_subset=subset, seed=seed, ldp_epsilon=ldp_epsilon,
                          ldp_delta=ldp_delta, ldp_clip=ldp_clip)
    if json_out:
        typer.echo(json.dumps(result))
    else:
        for k, v in result.items():
            typer.echo(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")


@command("download-data")
def download_cmd(root: Annotated[Optional[Path], typer.Option("--root", help="folder to unpack into (default: the data "
                                                                            "root, PRIVOFFLOAD_DATA or .cache/data, where "
                                                                            "every command looks first)")] = None,
                 layout: Annotated[str, typer.Option(help="CIFAR-10's layout: bin | py")] = "bin",
                 dataset: Annotated[str, typer.Option("--dataset", help="cifar10 | pneumoniamnist | orl")] = "cifar10"):
    """Download a data set's official files (needs internet), check the md5 where one is published, and unpack."""
    from .data import default_root, download_dataset

    typer.echo(f"wrote {download_dataset(dataset, root or default_root(), layout)}")

# ---------------------------------------------------------------- the offload system: cloud and client

@command("serve")
def serve_cmd(
    repo: Annotated[Optional[Path], typer.Option("--repo", help="model repository folder")] = None,
    host: Annotated[Optional[str], typer.Option(help="address to listen on")] = None,
    port: Annotated[Optional[int], typer.Option(help="TCP port")] = None,
    batch_window_ms: Annotated[Optional[float], typer.Option(help="micro-batching window; 0 = off")] = None,
    serve_weights: Annotated[Optional[bool], typer.Option("--serve-weights/--no-serve-weights",
                                                          help="let clients download each version's weights")] = None,
    no_auth: Annotated[Optional[bool], typer.Option("--no-auth", help="no tokens (trusted networks only)")] = None,
    ssl_certfile: Annotated[Optional[Path], typer.Option("--ssl-certfile", help="PEM certificate: serve https")] = None,
    ssl_keyfile: Annotated[Optional[Path], typer.Option("--ssl-keyfile", help="PEM private key of the certificate")] = None,
    web: Annotated[Optional[Path], typer.Option("--web", help="serve the browser client at /web/ with the files of "
                                                              "this folder: obfuscator.onnx [, attack.onnx]")] = None,
    config: ConfigOpt = None, set_: SetOpt = None, device: Annotated[Optional[str], typer.Option("--device")] = None,
):
    """Serve the repository's classifiers over the Open Inference Protocol v2 (tokens from PRIVOFFLOAD_TOKEN,
    PRIVOFFLOAD_ADMIN_TOKEN and optionally PRIVOFFLOAD_METRICS_TOKEN)."""
    from .cloud.server import serve
    from .config import ServeConfig

    cfg = settings(ServeConfig, config, set_, repo=repo, host=host, port=port, batch_window_ms=batch_window_ms,
                   serve_weights=serve_weights, no_auth=no_auth, device=device, ssl_certfile=ssl_certfile,
                   ssl_keyfile=ssl_keyfile, web=web)
    serve(cfg)


@command("publish")
def publish_cmd(run: Annotated[Path, typer.Argument(help="a classifier run folder (or its .safetensors file), or an "
                                                     "obfuscator run folder (or its file) to register")],
                repo: Annotated[Path, typer.Option("--repo", help="model repository folder")],
                name: Annotated[Optional[str], typer.Option(help="model name (default: DATASET-resnet18)")] = None,
                signing_key: Annotated[Optional[Path], typer.Option(
                    "--signing-key", help="Ed25519 private key (PEM) to sign the manifest with")] = None,
                gate_images: Annotated[str, typer.Option(
                    "--gate-images", help="the model's test images the swap gate measures on (all, first:N, "
                                          "random:N, range:A:B)")] = "random:1000",
                max_flip_rate: Annotated[float, typer.Option(
                    "--max-flip-rate", help="refuse a classifier whose negative-flip rate on a registered "
                                            "obfuscator's uploads is above this")] = 0.05,
                allow_breaking: Annotated[bool, typer.Option(
                    "--allow-breaking", help="publish anyway; the obfuscators it breaks are marked unsupported by "
                                             "it and their clients keep an older version")] = False):
    """Add a trained classifier to the repository as the next version (atomically), after the swap gate: it is
    refused if it breaks a registered obfuscator (docs/service.md). Given an obfuscator run, register it with the
    model instead. Publishing serves nothing: an admin load makes a version the served one, on every replica."""
    from . import nets
    from .cloud.repository import Repository
    from .config import model_name

    classifier = run / "classifier.safetensors" if run.is_dir() else run
    if (run / "obfuscator.safetensors").is_file() and not classifier.exists() or \
            run.is_file() and nets.read_metadata(run).get("arch") == "codec":
        from .client.obfuscator import dataset_of, obfuscator_path

        name = name or model_name(dataset_of(run))
        r = Repository(repo).register(obfuscator_path(run), name, source=str(run))
        typer.echo(f"registered obfuscator version {r.version} with {name} (works with version {r.works_with}, "
                   f"sha256 {r.sha256[:16]}...); clients announce it as obfuscator_version {r.version}")
        return
    if not 0 <= max_flip_rate <= 1:
        raise UserError(f"--max-flip-rate {max_flip_rate:g} is not a rate in [0, 1]")
    name = name or model_name(nets.read_metadata(classifier).get("dataset", "cifar10"))
    repository = Repository(repo)
    m = repository.publish(classifier, name, source=str(run), signing_key=signing_key,
                           gate=_swap_gate(repository, name, classifier, gate_images, max_flip_rate, allow_breaking))
    typer.echo(f"published {m.name} version {m.version} ({m.architecture} width {m.width}, sha256 {m.sha256[:16]}..."
               f"{', signed' if signing_key else ''}); not served until loaded: POST /v2/repository/models/{m.name}/load "
               f'with {{"parameters": {{"version": "{m.version}"}}}} on each replica')
    for k, r in m.obfuscators.items():
        typer.echo(f"obfuscator version {k}: accuracy {r['accuracy']:.4f}, negative-flip rate "
                   f"{r['negative_flip_rate']:.4f} against version {r['reference']} on {r['images']} images, "
                   f"{'supported' if r['supported'] else 'NOT supported (its clients keep an older version)'}")


def _swap_gate(repository, name: str, classifier: Path, spec: str, max_flip_rate: float, allow_breaking: bool):
    """The gate `publish` runs on the classifier, or None where no obfuscator is registered with `name`."""
    if not repository.obfuscators(name):
        return None
    from . import nets
    from .cloud import gate
    from .data import load_dataset, select

    meta = nets.read_metadata(classifier)

    def check(model) -> dict:
        c, h, w = nets.image_shape(model)
        data = load_dataset(meta.get("dataset", "cifar10"), image_size=f"{h}x{w}")
        if data.shape != (c, h, w):
            raise UserError(f"{classifier} takes {c}x{h}x{w} images; its data set {data.name!r} has "
                            f"{'x'.join(map(str, data.shape))}")
        x, y = select(data, spec, 0, "test")
        return gate.decide(gate.measure(repository, name, model, x, y), max_flip_rate, allow_breaking)

    return check


@command("classify")
def classify_cmd(
    images: Annotated[list[Path], typer.Argument(help="PNG/JPEG files")],
    server: Annotated[str, typer.Option("--server", help="URL of the cloud, e.g. https://cloud.example:8000")],
    obfuscator: Annotated[Path, typer.Option("--obfuscator", help="obfuscator run folder or .safetensors file")],
    model: Annotated[Optional[str], typer.Option(help="model name on the server (default: the one the obfuscator's "
                                                     "data set is published under, DATASET-resnet18)")] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for an answer")] = 30.0,
    ca_cert: Annotated[Optional[Path], typer.Option("--ca-cert", help="CA certificate (PEM) that signed the "
                                                                     "server's, e.g. a self-signed one")] = None,
    allow_http: Annotated[bool, typer.Option("--allow-http", help="send the token over plain http to another "
                                                                  "machine (trusted networks only)")] = False,
    proxy: Annotated[Optional[str], typer.Option("--proxy", help="HTTP(S) proxy URL to go through (HTTP_PROXY and "
                                                                 "the like are ignored)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    ldp_epsilon: EpsOpt = float("inf"), ldp_delta: DeltaOpt = 1e-5, ldp_clip: ClipOpt = 0.0,
    obfuscator_version: Annotated[Optional[int], typer.Option(
        "--obfuscator-version", min=1, help="the version the cloud registered this obfuscator under; the cloud then "
                                            "answers with a classifier version that supports it")] = None,
):
    """Obfuscate images here and have the cloud classify them; only obfuscated pixels leave this machine.
    With --ldp-epsilon, each upload is (epsilon, delta)-locally differentially private (docs/threat-model.md).
    The token comes from PRIVOFFLOAD_TOKEN."""
    import os

    from .client import Client

    with Client(server, obfuscator, token=os.environ.get("PRIVOFFLOAD_TOKEN"), model=model, timeout=timeout,
                ca_cert=ca_cert, allow_http=allow_http, proxy=proxy, ldp_epsilon=ldp_epsilon, ldp_delta=ldp_delta,
                ldp_clip=ldp_clip, obfuscator_version=obfuscator_version) as client:
        result = client.classify_files(images)
    rows = [{"file": str(p), "class": int(c), "label": lab, "probability": round(float(pr[c]), 4), "model_version": v}
            for p, c, lab, pr, v in zip(images, result.classes, result.labels, result.probabilities, result.versions)]
    if json_out:
        typer.echo(json.dumps(rows))
    else:
        for r in rows:
            typer.echo(f"{r['file']}\t{r['label']}\t{r['probability']:.3f}\tversion {r['model_version']}")


@command("export")
def export_cmd(
    run: Annotated[Path, typer.Argument(help="an obfuscator run folder (or an attack run, for the browser demo), "
                                             "or its .safetensors file")],
    fmt: Annotated[str, typer.Option("--format", help="onnx (ONNX Runtime, the browser) | executorch (.pte, XNNPACK) "
                                                      "| tflite (LiteRT)")],
    out: Annotated[Path, typer.Option("--out", help="file to write; FILE.json beside it says what it takes")],
):
    """Write the obfuscator as a file that a phone or browser runtime loads; it records the image shape and the
    weights' sha256. executorch and tflite need extras (`make edge`)."""
    from .client.export import export

    m = export(run, fmt, out)
    checked = f", {m['max_abs_diff']} from PyTorch" if "max_abs_diff" in m else ", not run: no runtime here"
    typer.echo(f"wrote {out} ({m['format']}: {m['kind']} {m['arch']} width {m['width']}, images {m['image']}, "
               f"{int(m['bytes']):,} bytes, {m['seconds']} s{checked}; sha256 {m['sha256'][:16]}...)")


@command("reproduce")
def reproduce_cmd(
    out: Annotated[Path, typer.Option("--out", help="protocol folder (give the same command again to continue)")],
    profile: Annotated[str, typer.Option(help="smoke | quick | paper | auto (paper on CUDA, quick on a CPU)")] = "auto",
    stages: Annotated[str, typer.Option(help="main (the paper's stages and the attack suite on the final obfuscator) | "
                                             "all | groups paper, privacy, beyond | stage names, comma-separated")] = "main",
    seeds: Annotated[int, typer.Option(help="independent runs of the whole protocol; the report gives mean and 95 % CI")] = 1,
    jobs: Annotated[int, typer.Option(help="seeds run side by side on this machine, sharing its cores")] = 1,
    ray: Annotated[Optional[str], typer.Option(help="run the seeds as tasks on the Ray cluster at this address")] = None,
    dataset: DatasetOpt = None, set_: SetOpt = None, data: DataOpt = None, device: DeviceOpt = "auto",
):
    """Run the paper's protocol per seed (C0, O0, drift, recovery, the attack suite on the final obfuscator; more with
    --stages), then its figures and report.md. With --dataset, on that data set (profiles/PROFILE-DATASET.toml where
    there is one)."""
    from .experiments.protocol import auto_profile, load_profile, reproduce
    from .live import hot_swap_stage

    name = auto_profile(device) if profile == "auto" else profile
    cfg = load_profile(name, set_, dataset)
    report = reproduce(cfg, out, stages=stages, seeds=seeds, jobs=jobs, ray=ray, data_root=data, device=device,
                       runners={"live": hot_swap_stage})
    typer.echo(f"report: {report}")


@command("plot")
def plot_cmd(run: Annotated[Path, typer.Argument(help="a protocol folder made by reproduce")], data: DataOpt = None):
    """Redraw a protocol folder's figures and report.md from its logs, without training."""
    from .experiments.report import write_report

    if not run.is_dir():
        raise UserError(f"{run} is not a folder; give the --out of a reproduce run")
    typer.echo(f"report: {write_report(run, data_root=data)}")


@command("tensorboard")
def tensorboard_cmd(run: Annotated[Path, typer.Argument(help="a run folder, or a protocol folder with many")],
                    logdir: Annotated[Optional[Path], typer.Option(help="where to write (default RUN/tensorboard)")] = None,
                    serve: Annotated[bool, typer.Option("--serve", help="then start TensorBoard on that folder")] = False):
    """Write TensorBoard event files from the runs' metrics.jsonl (again each time), and optionally serve them."""
    import subprocess

    from .experiments.tensorboard import export

    path = export(run, logdir)
    typer.echo(f"event files in {path}; view them with: tensorboard --logdir {path}")
    if serve:
        subprocess.run([sys.executable, "-m", "tensorboard.main", "--logdir", str(path)], check=False)


def main() -> None:
    app(prog_name="privoffload")


if __name__ == "__main__":
    sys.exit(main())
