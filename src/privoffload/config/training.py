"""The trainers' and the attacks' settings: one dataclass each, saved resolved as a run folder's config.toml."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from .loader import choice, positive, subset
from .values import check_dataset, parse_size


@dataclass
class OptimConfig:
    """One optimiser and its schedule (per step: linear warm-up, then `schedule` down to 0)."""

    name: str = "sgd"  # sgd (Nesterov momentum) | adam
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "linear"  # linear | cosine | constant
    warmup_epochs: float = 1.0

    def validate(self, where: str) -> None:
        choice(f"{where}.name", self.name, ("sgd", "adam"))
        choice(f"{where}.schedule", self.schedule, ("linear", "cosine", "constant"))
        positive(f"{where}.lr", self.lr)
        if self.weight_decay < 0 or self.warmup_epochs < 0:
            raise UserError(f"{where}: weight_decay and warmup_epochs must be >= 0")


@dataclass
class DataConfig:
    """Which data set a run uses (data/__init__.py), recorded in every run folder's config.toml."""

    dataset: str = "cifar10"  # cifar10 | pneumoniamnist | orl | folder:PATH (your images: PATH/{train,test}/CLASS/*)
    image_size: str = ""  # HEIGHTxWIDTH, multiples of 8; "" = the data set's default (orl 64x56, pneumoniamnist 32x32)

    def validate(self) -> None:
        check_dataset(self.dataset)
        parse_size(self.image_size)


@dataclass
class LdpConfig:
    """Local differential privacy of each upload (ldp.py): O(x) clipped to an L2 ball and Gaussian noise added,
    calibrated by the analytic Gaussian mechanism to (epsilon, delta) per upload. epsilon = inf: no noise, exactly
    the plain upload."""

    epsilon: float = float("inf")
    delta: float = 1e-5
    clip: float = 0.0  # L2 radius around mid-grey; 0 = sqrt(C*H*W)/2, the whole pixel cube (nothing is clipped)

    def validate(self, where: str = "ldp") -> None:
        if not self.epsilon > 0:
            raise UserError(f"config: {where}.epsilon = {self.epsilon!r} must be > 0 (inf = no noise)")
        if not 0 < self.delta < 1:
            raise UserError(f"config: {where}.delta = {self.delta!r} must lie strictly between 0 and 1")
        if not self.clip >= 0:
            raise UserError(f"config: {where}.clip = {self.clip!r} must be >= 0")


@dataclass
class TrainConfig(DataConfig):
    """What every trainer shares: how long, on which images, scored on which, how often, from which seed, how fast."""

    epochs: int = 1
    batch_size: int = 128
    subset: str = "all"  # training images: all | first:N | random:N | range:A:B (the paper: first:20000, its profile)
    flip: bool = False  # random horizontal flips
    test_subset: str = "all"  # test images every score is computed on
    eval_every: int = 5  # epochs between test evaluations (the last epoch is always evaluated)
    seed: int = 0  # initialisation, order and flips (and the draw of a random:N subset)
    precision: str = "auto"  # auto (bf16 where it is fast: CUDA, CPUs with AVX512-BF16/AMX) | bf16 | fp32
    channels_last: bool = True
    snapshot_every: int = 0  # also keep every N-th epoch's weights in epoch-<N>/ (a run folder of its own); 0 = no

    def validate(self) -> None:
        DataConfig.validate(self)
        for name in ("epochs", "batch_size", "eval_every"):
            positive(name, getattr(self, name))
        if self.snapshot_every < 0:
            raise UserError(f"config: snapshot_every = {self.snapshot_every} must be >= 0")
        choice("precision", self.precision, ("auto", "bf16", "fp32"))
        subset(self.subset)
        subset(self.test_subset)


COMPAT_LOSSES = ("kl", "focal")


@dataclass
class CompatConfig:
    """Compatible-update training (docs/drift-robustness.md): while C trains on clean images, its answers on the 8-bit
    uploads of the same images by each obfuscator the cloud has published are kept close to the answers of the
    classifier that obfuscator was trained against, so that the update does not break it."""

    obfuscators: list[str] = field(default_factory=list)  # published obfuscator run folders; empty = no term
    weight: float = 1.0  # the term's weight beside the clean cross-entropy (its mean over the obfuscators)
    loss: str = "kl"  # kl: KL(old C || new C) on every upload | focal: only where the old C named the right class
    val_split: float = 0.0  # share of `subset` held out: each epoch scores the term's effect there (choosing loss and weight)
    max_grad_norm: float = 5.0  # with the term, each step's gradient norm is clipped to this (it diverged without, at toy sizes)

    def validate(self) -> None:
        choice("compat.loss", self.loss, COMPAT_LOSSES)
        if not self.weight >= 0:
            raise UserError(f"config: compat.weight = {self.weight!r} must be >= 0")
        if not self.max_grad_norm > 0:
            raise UserError(f"config: compat.max_grad_norm = {self.max_grad_norm!r} must be > 0")
        if not 0 <= self.val_split < 1:
            raise UserError(f"config: compat.val_split = {self.val_split!r} is a share of the subset, from 0 to below 1")
        if len(set(self.obfuscators)) != len(self.obfuscators):
            raise UserError(f"config: compat.obfuscators {self.obfuscators} names a run twice")


@dataclass
class ClassifierConfig(TrainConfig):
    """Training of the cloud classifier C (a CIFAR ResNet18)."""

    epochs: int = 50
    width: int = 64  # channels of the first stage; 64 is the real ResNet18
    init: str = ""  # run folder whose classifier weights to start from ("" = random init)
    optim: OptimConfig = field(default_factory=OptimConfig)
    compat: CompatConfig = field(default_factory=CompatConfig)  # keep published obfuscators working (off when empty)

    def validate(self) -> None:
        super().validate()
        positive("width", self.width)
        self.optim.validate("optim")
        self.compat.validate()


def _adam(lr: float, warmup_epochs: float = 0.0, schedule: str = "constant") -> OptimConfig:
    """The obfuscation game's optimisers: Adam, no weight decay (docs/method-decisions.md). O's rate warms up and
    decays to zero over its stage: a stage that continues an O then starts gently and ends settled; D, the
    adversary, keeps a constant rate so that it never stops adapting."""
    return OptimConfig(name="adam", lr=lr, weight_decay=0.0, schedule=schedule, warmup_epochs=warmup_epochs)


@dataclass
class ObfuscatorConfig(TrainConfig):
    """Training of the obfuscator O and its co-trained deobfuscator D against a frozen classifier C.

    O minimises CE(C(O(x)), y) - lam * R(D(O(x)), x); D minimises R(D(O(x)), x).
    """

    epochs: int = 100
    batch_size: int = 64
    classifier: str = ""  # run folder holding classifier.safetensors (C, kept frozen)
    width: int = 32  # codec width of O and D; 32 is Table I
    lam: float = 4.0  # weight of D's reconstruction loss in O's objective (chosen by a sweep, docs/method-decisions.md)
    recon_loss: str = "mse"  # mse | l1: R, the reconstruction loss
    init: str = ""  # obfuscator run folder whose O and D to continue from ("" = random init)
    # drift robustness (docs/drift-robustness.md): O must also stay readable for these extra classifiers
    ensemble: list[str] = field(default_factory=list)  # classifier run folders or .safetensors files
    ensemble_weight: float = 1.0  # weight of each extra classifier's loss; C's weight is 1
    ensemble_per_step: int = 0  # extras drawn at random per step (0 = all of them, every step)
    flip_consistency: bool = False  # the classifiers also read mirrored uploads (a random half of each batch)
    # recipe options (docs/method-decisions.md); the defaults are the plain game
    recon_cap: bool = False  # O gains nothing for pushing D's error on an image past the mean image's error on it
    d_steps: int = 1  # D's steps per O step (on the same batch)
    soft_targets: bool = False  # O's readability loss: CE to C's soft outputs on the clean x instead of the labels
    # the utility-first recipe (docs/method-decisions.md): utility first, privacy on top; every default is the plain game
    distill: float = 0.0  # weight of T^2 * KL(C(x) || C(O(x))) at temperature T, added to CE on the labels
    temperature: float = 4.0  # T of `distill`
    val_subset: str = ""  # training images held out of `subset` as O's validation split ("" = none): the gate and stopping read it
    patience: int = 0  # epochs without a better validation utility: at lam = 0 training stops, before the gate it opens
    utility_target: float = 0.0  # the gate: lam stays 0 until validation upload accuracy / C's clean accuracy reaches this,
    #                              and is halved whenever it falls below (0 = no gate: lam from the first step); a stage
    #                              that continues an O (init) starts with the gate open, its utility held all the same
    gate_epoch: int = 0  # the gate opens after this epoch at the latest (0 = only by the target or a plateau)
    lam_ramp_epochs: float = 0.0  # once the gate is open, lam rises linearly from 0 over this many epochs
    d_arch: str = "codec"  # D: codec (Table I) | unet (the stronger decoder)
    d_width: int = 0  # D's width (0 = width)
    d_reset_every: int = 0  # D (weights and optimiser) starts afresh every this many epochs (0 = never)
    d_idle: bool = False  # D takes no steps while lam is 0 (the gate closed, or a lam = 0 run): its scores are then stale
    autoencoder_epochs: int = 0  # O's first epochs rebuild x (MSE; no C, no D), unless it continues an O (init)
    optim_o: OptimConfig = field(default_factory=lambda: _adam(3e-3, warmup_epochs=0.2, schedule="linear"))
    optim_d: OptimConfig = field(default_factory=lambda: _adam(1e-3))

    def validate(self) -> None:
        if not self.classifier:
            raise UserError("config: classifier is required: the run folder of the classifier to obfuscate for (--classifier RUN)")
        super().validate()
        positive("width", self.width)
        if not self.lam >= 0:
            raise UserError(f"config: lam = {self.lam!r} must be >= 0")
        if not self.ensemble_weight >= 0:
            raise UserError(f"config: ensemble_weight = {self.ensemble_weight!r} must be >= 0")
        if not 0 <= self.ensemble_per_step <= len(self.ensemble):
            raise UserError(f"config: ensemble_per_step = {self.ensemble_per_step} must be between 0 (all) and "
                            f"the {len(self.ensemble)} ensemble classifiers")
        choice("recon_loss", self.recon_loss, ("mse", "l1"))
        positive("d_steps", self.d_steps)
        choice("d_arch", self.d_arch, ("codec", "unet"))
        positive("temperature", self.temperature)
        for name in ("distill", "lam_ramp_epochs", "d_width", "d_reset_every", "patience", "gate_epoch", "autoencoder_epochs"):
            if not getattr(self, name) >= 0:
                raise UserError(f"config: {name} = {getattr(self, name)!r} must be >= 0")
        if not 0 <= self.utility_target <= 1:
            raise UserError(f"config: utility_target = {self.utility_target!r} is a share of clean accuracy, from 0 to 1")
        if self.val_subset:
            subset(self.val_subset)
        elif self.utility_target or self.patience:
            raise UserError("config: utility_target and patience read a validation split: set val_subset, "
                            "e.g. val_subset = \"range:48000:50000\"")
        self.optim_o.validate("optim_o")
        self.optim_d.validate("optim_d")


@dataclass
class AttackConfig(TrainConfig):
    """A decoder attack: a fresh network trained on (8-bit upload, original) pairs with O frozen, until validation
    stops improving.

    The uploads of `subset` (and of the test images) are computed once and cached (privacy/uploads.py); the last
    `val_split` of `subset` is a validation split, scored after every epoch. The rate stays at `optim`'s until the
    validation PSNR has gone `patience` epochs without improving by `min_delta` dB; then it is cut by `lr_factor`,
    at most `lr_cuts` times, and the next such plateau stops training: the decoder converged. The weights kept are
    those of the best validation epoch. A run that spends its `epochs` first (or whose best epoch is its last) did
    not converge, and every table says so."""

    epochs: int = 60  # the budget: at most this many passes over the training pairs
    subset: str = "all"  # the training images whose originals the attacker knows (the last val_split validate)
    obfuscator: str = ""  # run folder holding obfuscator.safetensors (kept frozen)
    arch: str = "unet"  # unet (skip connections) | codec (the Table I layout) | answer (from C's answer alone)
    width: int = 32
    answer: bool = False  # unet: also read C's answer (softmax) for each upload, as the cloud can: label-aware
    recon_loss: str = "mse"  # mse | l1
    val_split: float = 0.1  # share of `subset` held out for early stopping (0 = no validation: train all epochs)
    patience: int = 2  # epochs without a better validation PSNR before the rate is cut (or training stops)
    min_delta: float = 0.01  # dB: a smaller gain is no improvement
    lr_cuts: int = 2  # rate cuts on a plateau before the next plateau stops training
    lr_factor: float = 0.3  # each cut multiplies the rate by this
    init: str = ""  # attack run whose decoder to start from ("" = random init); a label-aware U-Net may start from a plain one
    extra_obfuscators: list[str] = field(default_factory=list)  # training images take turns through O and these
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adam", lr=2e-3, weight_decay=0.0,
                                                                   schedule="constant", warmup_epochs=0.0))
    ldp: LdpConfig = field(default_factory=LdpConfig)  # the uploads it learns from and is scored on carry this noise

    def validate(self) -> None:
        if not self.obfuscator:
            raise UserError("config: obfuscator is required: the run folder of the obfuscator to attack (--obfuscator RUN)")
        super().validate()
        positive("width", self.width)
        choice("arch", self.arch, ("codec", "unet", "answer"))
        choice("recon_loss", self.recon_loss, ("mse", "l1"))
        if self.answer and self.arch != "unet":
            reads = "C's answer alone" if self.arch == "answer" else "the upload alone"
            raise UserError(f"config: answer = true needs arch = \"unet\" (a {self.arch} decoder reads {reads})")
        if self.flip:
            raise UserError("config: flip = true does not apply to attacks: the upload of a mirrored image is not the mirrored upload")
        if not 0 <= self.val_split < 1:
            raise UserError(f"config: val_split = {self.val_split!r} must be a share in [0, 1)")
        if self.patience < 0 or self.lr_cuts < 0 or not self.min_delta >= 0:
            raise UserError("config: patience, lr_cuts and min_delta must be >= 0")
        if not 0 < self.lr_factor < 1:
            raise UserError(f"config: lr_factor = {self.lr_factor!r} must lie strictly between 0 and 1")
        if self.patience and not self.val_split:
            raise UserError("config: patience needs a validation split: set val_split > 0 (or patience = 0)")
        self.optim.validate("optim")
        self.ldp.validate()
        if self.reads_answer and self.ldp.epsilon != float("inf"):
            raise UserError("config: a decoder that reads C's answer does not run with local DP (the answers are those "
                            "on the plain uploads)")

    @property
    def reads_answer(self) -> bool:
        return self.answer or self.arch == "answer"


QUERY_KINDS = ("plain", "flip", "mixup", "noise", "lookahead")


@dataclass
class IdentifyConfig(ClassifierConfig):
    """A fresh classifier trained on what the attacker rebuilds from the uploads (ORL: can it tell who it is?).
    epochs = 0: no such stage."""

    epochs: int = 0
    attack: str = ""  # attack run folder: its decoder and the obfuscator it attacked

    def validate(self) -> None:
        if self.epochs == 0:
            DataConfig.validate(self)
            return
        if not self.attack:
            raise UserError("config: attack is required: the attack run whose reconstructions to classify")
        super().validate()


@dataclass
class InversionConfig:
    """White-box inversion of O: for each upload u, the x' in [0, 1] that minimises
    ||quantise8(O(x')) - u||^2 + tv * TV(x'), by Adam from a decoder's reconstruction (or the mean image).

    Its rate and TV weight are tuned on the last `val_images` images of `subset` (training images whose
    originals the attacker knows): every pair of `lrs` x `tvs` runs there, and the one with the best validation
    PSNR runs on the test uploads. A search that moves the validation images' pixels by less than `min_change`
    on average (against its start) is empty at this budget. Test images are inverted in chunks of `batch_size`,
    each saved when done (resumable)."""

    obfuscator: str = ""  # run folder holding obfuscator.safetensors (its weights ship with every client)
    test_subset: str = "random:2000"  # the uploads to invert
    subset: str = "all"  # training images: their mean is the "mean" start; the last val_images tune the search
    val_images: int = 256
    steps: int = 100  # Adam steps per image: the budget
    lrs: list[float] = field(default_factory=lambda: [0.003, 0.01, 0.03])  # rates tried on the validation images
    tvs: list[float] = field(default_factory=lambda: [0.0, 0.3])  # TV weights tried (mean |neighbour difference|)
    min_change: float = 0.004  # mean absolute pixel change below which the search is empty (about one 8-bit level)
    batch_size: int = 500  # images optimised together
    start: str = "mean"  # mean (the mean training image) | decoder (the output of the attack run `decoder`)
    decoder: str = ""  # attack run folder, for start = "decoder"
    seed: int = 0  # the draw of a random:N training subset (test subsets are the same whatever the seed)
    precision: str = "fp32"  # auto | bf16 | fp32 (O's forward and backward)

    def validate(self) -> None:
        if not self.obfuscator:
            raise UserError("config: obfuscator is required: the run folder of the obfuscator to invert (--obfuscator RUN)")
        for name in ("steps", "batch_size", "val_images"):
            positive(name, getattr(self, name))
        if not self.lrs or not all(lr > 0 for lr in self.lrs):
            raise UserError(f"config: lrs = {self.lrs} must list rates > 0")
        if not self.tvs or not all(tv >= 0 for tv in self.tvs):
            raise UserError(f"config: tvs = {self.tvs} must list TV weights >= 0")
        if not self.min_change >= 0:
            raise UserError(f"config: min_change = {self.min_change!r} must be >= 0")
        choice("start", self.start, ("mean", "decoder"))
        if self.start == "decoder" and not self.decoder:
            raise UserError("config: start = \"decoder\" needs decoder = an attack run folder")
        choice("precision", self.precision, ("auto", "bf16", "fp32"))
        subset(self.subset)
        subset(self.test_subset)


@dataclass
class AdaptiveConfig:
    """The adaptive attack: the attacker knows how O was trained (its run's config.toml) and trains its own O' that
    way, on its own images with its own seed. It continues a decoder (`decoder`, from its `init`: in the suite, the
    suite's decoder; else a plain decoder it trains first) on pairs from O and O' alike, and keeps whichever of
    that decoder, the plain decoder and the mean image scores best on the real O's validation split."""

    obfuscator: str = ""  # the target O's run folder (its config.toml is the recipe)
    subset: str = "all"  # the attacker's own training images (never the test split) for O'
    epochs: int = 0  # O''s epochs (0 = the recipe's)
    seed: int = 1  # O''s seed: the attacker does not know O's
    test_subset: str = "random:2000"  # where O' and the decoders are scored (never trained on)
    decoder: AttackConfig = field(default_factory=AttackConfig)  # the continued decoder's recipe and budget

    def validate(self) -> None:
        if not self.obfuscator:
            raise UserError("config: obfuscator is required: the run folder of the obfuscator to attack (--obfuscator RUN)")
        if self.epochs < 0:
            raise UserError("config: epochs must be >= 0")
        subset(self.subset)
        subset(self.test_subset)
        dataclasses.replace(self.decoder, obfuscator=self.obfuscator).validate()


ATTACKS = ("decoder", "label-aware", "adaptive", "decoder+inversion", "inversion")


@dataclass
class SuiteConfig:
    """Every attack and the reference rows on the same test images (privacy/suite.py).

    One decoder recipe (`decoder`) serves every trained row: the plain decoder; the label-aware decoder and the
    adaptive attack continue from it with the same budget; the label-only decoder (a reference: C's answer alone)
    is trained from scratch by it."""

    obfuscator: str = ""  # the obfuscator run folder to attack
    attacks: list[str] = field(default_factory=lambda: ["decoder", "label-aware", "adaptive", "decoder+inversion"])
    label_only: bool = True  # the label-only decoder (needs O's recipe, for C); the leakage beyond the class needs it
    test_subset: str = "random:2000"  # the images every row is scored on (overrides each attack's; the same for every seed)
    seed: int = 0  # the attacks' seed; added to the adaptive attack's O' seed
    identify: list[int] = field(default_factory=lambda: [10, 100])  # candidates per image for identifiability
    decoder: AttackConfig = field(default_factory=AttackConfig)
    inversion: InversionConfig = field(default_factory=InversionConfig)
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)

    def validate(self) -> None:
        if not self.obfuscator:
            raise UserError("config: obfuscator is required: the run folder of the obfuscator to attack (--obfuscator RUN)")
        if not self.attacks or len(set(self.attacks)) != len(self.attacks):
            raise UserError(f"config: attacks = {self.attacks} must name each attack once, of {', '.join(ATTACKS)}")
        for a in self.attacks:
            choice("attacks[]", a, ATTACKS)
        if not self.identify or not all(n >= 2 for n in self.identify):
            raise UserError(f"config: identify = {self.identify} must list candidate counts >= 2")
        subset(self.test_subset)
        for a in self.attacks + (["label-only"] if self.label_only else []):  # each part as the suite runs it
            try:
                self.part(a).validate()
            except UserError as e:
                raise UserError(f"{a}: {e}") from None

    def part(self, attack: str, folder: str = "(the suite's decoder run)") -> Any:
        """The config the suite runs `attack` (or the label-only decoder) with: the suite's obfuscator, seed and test
        images; `folder` is the suite's plain decoder run, where the others start."""
        decoder = dataclasses.replace(self.decoder, obfuscator=self.obfuscator, test_subset=self.test_subset, seed=self.seed)
        if attack == "decoder":
            return decoder
        if attack == "label-aware":
            return dataclasses.replace(decoder, answer=True, init=folder)
        if attack == "label-only":
            return dataclasses.replace(decoder, arch="answer", answer=False)
        if attack == "adaptive":  # O''s seed stays its own (O's is unknown to it), moved along with the suite's
            return dataclasses.replace(self.adaptive, obfuscator=self.obfuscator, test_subset=self.test_subset,
                                       seed=self.adaptive.seed + self.seed, decoder=dataclasses.replace(decoder, init=folder))
        start = "decoder" if attack == "decoder+inversion" else "mean"
        return dataclasses.replace(self.inversion, obfuscator=self.obfuscator, test_subset=self.test_subset, seed=self.seed,
                                   subset=self.decoder.subset, start=start, decoder=folder if start == "decoder" else "")


@dataclass
class ResyncConfig(DataConfig):
    """Re-syncing an obfuscator O (and its D) to a classifier that changed, within budgets (train/resync.py).

    White-box (the cloud publishes the new weights): `steps` steps of the game against them. Black-box (only
    the API's probabilities): `rounds` rounds, each uploading max_queries/rounds obfuscated images of several
    kinds (`queries`), distilling a local surrogate of the new classifier from the answers, then steps/rounds
    steps of the game against it. Every image sent counts against `max_queries`.
    """

    mode: str = "auto"  # auto (white-box where the server publishes weights, else black-box) | white-box | black-box
    steps: int = 200  # steps of O and D, either mode
    batch_size: int = 64
    lam: float = -1.0  # the game's lambda; < 0: the lambda O was trained with (its weights' metadata)
    flip: bool = True
    max_queries: int = 4096  # black-box: images uploaded to the API, at most
    rounds: int = 4  # black-box: query rounds
    query_growth: float = 1.0  # black-box: each round sends this many times the queries of the one before
    surrogate_steps: int = 150  # black-box: distillation steps of the surrogate per round
    # black-box: what a round uploads, in equal shares: O(x) of the client's images, of mirrored ones, mix-ups of two
    # uploads, uploads with noise, and uploads of a copy of O advanced `lookahead_steps` steps against the surrogate
    queries: list[str] = field(default_factory=lambda: ["plain", "flip", "mixup", "noise", "lookahead"])
    lookahead_steps: int = 5
    held_out: float = 0.1  # black-box: share of each round's queries kept to measure the surrogate's agreement
    api_top_k: int = 0  # black-box: the API answers only its k most likely classes (0 = every probability)
    eval_every: int = 50  # steps between evaluations (in the protocol)
    subset: str = "all"  # in the protocol: the client's own labelled images
    test_subset: str = "all"
    seed: int = 0
    precision: str = "auto"  # auto | bf16 | fp32
    optim_o: OptimConfig = field(default_factory=lambda: _adam(3e-3, warmup_epochs=0.05, schedule="linear"))
    optim_d: OptimConfig = field(default_factory=lambda: _adam(1e-3))
    optim_surrogate: OptimConfig = field(default_factory=lambda: OptimConfig(name="adam", lr=3e-4, weight_decay=0.0,
                                                                             schedule="constant", warmup_epochs=0.0))

    def validate(self) -> None:
        super().validate()
        choice("mode", self.mode, ("auto", "white-box", "black-box"))
        for name in ("steps", "batch_size", "max_queries", "rounds", "eval_every"):
            positive(name, getattr(self, name))
        if not self.query_growth >= 1:
            raise UserError(f"config: query_growth = {self.query_growth} must be >= 1")
        if self.surrogate_steps < 0 or self.lookahead_steps < 0 or self.api_top_k < 0:
            raise UserError("config: surrogate_steps, lookahead_steps and api_top_k must be >= 0")
        if not 0 <= self.held_out < 0.5:
            raise UserError(f"config: held_out = {self.held_out} must be a share in [0, 0.5)")
        for kind in self.queries:
            choice("queries", kind, QUERY_KINDS)
        if not self.queries:
            raise UserError("config: queries is empty; give at least one kind, e.g. queries = [\"plain\"]")
        if self.max_queries < self.rounds:
            raise UserError(f"config: max_queries = {self.max_queries} leaves no query for each of {self.rounds} rounds")
        choice("precision", self.precision, ("auto", "bf16", "fp32"))
        subset(self.subset)
        subset(self.test_subset)
        for name in ("optim_o", "optim_d", "optim_surrogate"):
            getattr(self, name).validate(name)


