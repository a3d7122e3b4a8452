"""The experiments' settings: the sweeps, and the names of the protocol's profiles.

The protocol's own settings are its stages' sections, assembled from the stage registry (experiments/stages/).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import UserError
from .loader import choice, positive, subset
from .training import AttackConfig, LdpConfig, ObfuscatorConfig, SuiteConfig


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


LOSSES = ("ce", "distill")


@dataclass
class UtilitySweepConfig:
    """What utility costs: O at lam = 0 against a frozen C, one run per width x epochs x training images x loss, each
    trained until its validation utility stops improving (`obfuscator.patience`) or flagged, and scored on the
    validation split `obfuscator.val_subset` (training images no point trains on), never on the test split."""

    widths: list[int] = field(default_factory=lambda: [8, 16])
    epochs: list[int] = field(default_factory=lambda: [4, 16])  # budgets: a point may stop earlier (converged)
    subsets: list[str] = field(default_factory=lambda: ["first:10000"])
    losses: list[str] = field(default_factory=lambda: list(LOSSES))  # ce: labels; distill: + T^2 KL to C's clean logits
    distill: float = 1.0  # the distillation weight of the "distill" points
    # the rest of every point (its width, epochs, subset, loss and lam = 0 are set per point): D rests, validation
    # on 2,000 training images beyond the first 45,000, stopping after 2 epochs without a better validation utility
    obfuscator: ObfuscatorConfig = field(default_factory=lambda: ObfuscatorConfig(
        lam=0.0, d_idle=True, val_subset="range:48000:50000", patience=2, eval_every=1000))

    def validate(self) -> None:
        for name in ("widths", "epochs", "subsets", "losses"):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values):
                raise UserError(f"config: {name} {values} must be a non-empty list without repeats")
        for loss in self.losses:
            choice("losses[]", loss, LOSSES)
        positive("distill", self.distill)
        if not self.obfuscator.val_subset:
            raise UserError("config: obfuscator.val_subset is empty: every point is scored on a validation split of "
                            "training images, e.g. range:48000:50000")
        for point in self.points():
            point.validate()

    def points(self) -> list[ObfuscatorConfig]:
        """Every point's config, in the order they run (cheapest widths and budgets first)."""
        return [dataclasses.replace(self.obfuscator, width=w, epochs=e, subset=s, lam=0.0, soft_targets=False,
                                    distill=self.distill if loss == "distill" else 0.0)
                for w in self.widths for e in self.epochs for s in self.subsets for loss in self.losses]


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


PROFILES = ("smoke", "quick", "paper")
