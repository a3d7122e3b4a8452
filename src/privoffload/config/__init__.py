"""Settings in one place, as data: dataclasses loaded from TOML and overridden by `key=value` strings.

    loader.py       TOML in and out, --set overrides, type checks (from_dict, load, to_toml)
    values.py       the grammar of data settings: data set names, image sizes, subsets; a data set's model name
    training.py     the trainers and the attacks (classifier, obfuscator, decoder, inversion, adaptive, suite, re-sync)
    experiments.py  the sweeps (the protocol's settings are its stages' sections: experiments/stages/)
    service.py      the cloud service
    client.py       the client's automatic re-sync

Every trainer takes one of these dataclasses and saves it, resolved, as `config.toml` beside its outputs, so a
run folder always says how it was made. Nothing here imports torch: settings load, validate and print `--help`
in milliseconds.

Settings that are not part of a run (they change where or how loudly it runs, never what it computes)
come from the environment instead:

    PRIVOFFLOAD_DATA        the data root: cifar-10-batches-bin or -py, pneumoniamnist.npz, the ORL faces' s1/ ... s40/
                            (default: .cache/data in the checkout)
    PRIVOFFLOAD_SHARED      the shared folder with the read-only data copies (data/README.md; default: ../shared)
    PRIVOFFLOAD_PROGRESS    0 turns the progress bar off on a terminal (per-epoch lines stay)
    PRIVOFFLOAD_TOKEN, PRIVOFFLOAD_ADMIN_TOKEN, PRIVOFFLOAD_METRICS_TOKEN   the service's bearer tokens (docs/service.md)
"""

from .client import DriftConfig
from .experiments import PROFILES, EpsilonSweepConfig, SweepConfig, UtilitySweepConfig
from .loader import from_dict, load, parse_override, to_dict, to_toml
from .service import ServeConfig
from .values import model_name
from .training import (ATTACKS, COMPAT_LOSSES, QUERY_KINDS, AdaptiveConfig, AttackConfig, ClassifierConfig, CompatConfig,
                       DataConfig, IdentifyConfig, InversionConfig, LdpConfig, ObfuscatorConfig, OptimConfig,
                       ResyncConfig, SuiteConfig, TrainConfig)
