"""The experiments' settings: the sweeps and the protocol (experiments/)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import UserError
from .loader import choice, positive, subset
from .training import (AttackConfig, ClassifierConfig, DataConfig, IdentifyConfig, LdpConfig, ObfuscatorConfig,
                       OptimConfig, ResyncConfig, SuiteConfig)


@dataclass
class SweepConfig:
    """One obfuscator per lambda and seed, each attacked by the whole suite: the privacy-utility frontier."""

    lams: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0])
    seeds: list[int] = field(default_factory=lambda: [0])  # one obfuscator (and suite) per seed and lambda
    obfuscator: ObfuscatorConfig = field(default_factory=ObfuscatorConfig)  # its lam and seed are set per point
    suite: SuiteConfig = field(default_factory=SuiteConfig)  # its obfuscator is set per point

    def validate(self) -> None:
        if not self.lams:
            raise UserError("config: lams is empty; give at least one lambda, e.g. --lams 0,1,4")
        if len(set(self.lams)) != len(self.lams):
            raise UserError(f"config: lams {self.lams} repeats a value")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"config: seeds {self.seeds} must be one or more different seeds")
        for lam in self.lams:
            dataclasses.replace(self.obfuscator, lam=lam).validate()
        dataclasses.replace(self.suite, obfuscator="(each obfuscator of the sweep)").validate()


@dataclass
class EpsilonSweepConfig:
    """What formal privacy costs: one obfuscator's uploads with local-DP noise at each epsilon, scored for accuracy
    (its own classifier) and attacked by a fresh decoder trained on uploads with that noise."""

    obfuscator: str = ""  # obfuscator run folder; its classifier and data set come from its config
    epsilons: list[float] = field(default_factory=lambda: [1.0, 4.0, 16.0, 64.0, float("inf")])
    delta: float = 1e-5
    clip: float = 0.0  # L2 radius of the upload around mid-grey; 0 = the whole pixel cube (LdpConfig)
    test_subset: str = "all"  # test images the accuracy is scored on
    seed: int = 0  # the noise drawn when scoring
    precision: str = "auto"
    attack: AttackConfig = field(default_factory=AttackConfig)  # its obfuscator, data set and noise are set per point

    def validate(self) -> None:
        if not self.obfuscator:
            raise UserError("config: obfuscator is required: the obfuscator run whose uploads get the noise (--obfuscator RUN)")
        if not self.epsilons or len(set(self.epsilons)) != len(self.epsilons):
            raise UserError(f"config: epsilons {self.epsilons} must be a non-empty list without repeats, e.g. 1,4,16,64,inf")
        for eps in self.epsilons:
            LdpConfig(eps, self.delta, self.clip).validate("sweep")
        subset(self.test_subset)
        choice("precision", self.precision, ("auto", "bf16", "fp32"))
        dataclasses.replace(self.attack, obfuscator="(the sweep's obfuscator)").validate()


@dataclass
class RobustConfig:
    """The drift-robust obfuscator (docs/drift-robustness.md): O0 trained on against C0 and stand-ins for the cloud's
    next update, snapshots along one fine-tune of C0 on the client's own images; beside a compute-matched control."""

    # the stand-ins: C0 fine-tuned with flips at a high constant rate on images the drift never sees, a snapshot
    # every epoch (its width is always C0's); epochs = 0 turns the robust stages off
    trajectory: ClassifierConfig = field(default_factory=lambda: ClassifierConfig(
        epochs=4, subset="range:45000:50000", flip=True, eval_every=1, snapshot_every=1,
        optim=OptimConfig(lr=0.05, schedule="constant", warmup_epochs=0.0)))
    weight: float = 1.0  # ensemble_weight: the stand-ins' weight in O's classification loss, C0's being 1
    per_step: int = 1  # ensemble_per_step: stand-ins drawn per step (0 = all)
    flip_consistency: bool = True  # C0 and the stand-ins also read mirrored uploads: the update trains with flips
    fine_tune: bool = True  # start from O0 and D0 (cheap); false: from scratch, like O0
    epochs: int = 0  # 0 = the baseline obfuscator's epochs
    lam: float = -1.0  # the robust obfuscator's lambda; < 0 = the baseline obfuscator's
    control: bool = True  # also train the control: O0 given the same steps against C0 alone
    attack: AttackConfig = field(default_factory=AttackConfig)  # the same fresh attack on O0 and on the robust O


@dataclass
class RemapConfig(DataConfig):
    """The output-mapping baseline beside re-sync: relabel the API's answers on O0's uploads, no game (train/resync.py)."""

    queries: int = 4096  # labelled images of the client's, uploaded once through O0, to fit the remapping on
    subset: str = "first:20000"  # the client's own labelled images (the first `queries` of them are used)
    test_subset: str = "all"
    api_top_k: int = 0
    seed: int = 0
    precision: str = "auto"

    def validate(self) -> None:
        super().validate()
        positive("queries", self.queries)
        choice("precision", self.precision, ("auto", "bf16", "fp32"))
        subset(self.subset)
        subset(self.test_subset)


@dataclass
class ScoresConfig(DataConfig):
    """The points that enter the protocol's ratios, scored once more, on many test images (inference only)."""

    test_subset: str = "all"  # all 10,000 test images: a ratio's two ends carry the least noise
    precision: str = "auto"

    def validate(self) -> None:
        super().validate()
        choice("precision", self.precision, ("auto", "bf16", "fp32"))
        subset(self.test_subset)


@dataclass
class LiveConfig:
    """The live hot swap after each seed (live.py): the service, a client, a model update, an automatic re-sync."""

    enabled: bool = True
    test_subset: str = "random:1000"  # the images the client classifies before the swap, after it, after the re-sync
    resync: ResyncConfig = field(default_factory=lambda: ResyncConfig(steps=100))  # white-box, on the client's images

    def validate(self) -> None:
        subset(self.test_subset)
        self.resync.validate()


PROFILES = ("smoke", "quick", "paper")


@dataclass
class ProtocolConfig:
    """A whole reproduction (experiments/protocol.py). Each stage's `classifier`/`init`/`obfuscator` links are filled in there."""

    profile: str = "paper"
    dataset: str = "cifar10"  # every stage's data set (DataConfig); a profile or --dataset sets it
    image_size: str = ""
    baseline_classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    baseline_obfuscator: ObfuscatorConfig = field(default_factory=ObfuscatorConfig)
    drift: ClassifierConfig = field(default_factory=lambda: ClassifierConfig(subset="range:0:45000", flip=True))
    recovery: ObfuscatorConfig = field(default_factory=lambda: ObfuscatorConfig(subset="range:0:45000", flip=True))
    privacy: SuiteConfig = field(default_factory=SuiteConfig)  # the attack suite on O0 and on the final O
    robust: RobustConfig = field(default_factory=RobustConfig)
    resync: ResyncConfig = field(default_factory=ResyncConfig)  # the white-box and black-box re-syncs of O0
    remap: RemapConfig = field(default_factory=RemapConfig)
    identify: IdentifyConfig = field(default_factory=IdentifyConfig)  # off unless its epochs > 0
    scores: ScoresConfig = field(default_factory=ScoresConfig)
    live: LiveConfig = field(default_factory=LiveConfig)

    def validate(self) -> None:
        choice("profile", self.profile, PROFILES)
        DataConfig.validate(self)  # type: ignore[arg-type]
        for stage in (self.baseline_classifier, self.baseline_obfuscator, self.drift, self.recovery, self.privacy.decoder,
                      self.privacy.adaptive.decoder, self.robust.trajectory, self.robust.attack, self.resync, self.remap, self.scores, self.identify,
                      self.live.resync):
            stage.dataset, stage.image_size = self.dataset, self.image_size  # every stage works on the protocol's data
        self.live.validate()


