"""A stage of the protocol is one object: its name, its profile section, how it runs, what it records.

    Stage(name, section, settings, configure, run, read, needs, group, main, report, figures)

`configure` turns the profile's section into this seed's config (links to earlier stages' run folders filled
in; None = off in this profile); `run` makes the stage's run folder from it (resumable, DONE at the end);
`read` turns a finished run folder into the stage's typed record; `report` and `figures` turn the records of
every seed into report.md's lines and the figures. The protocol (protocol.py) is the registered stages in
order (stages/__init__.py); the report (report.py) is their sections in the same order.

Records are dataclasses read through `Log`: a field that a finished stage should have logged and did not is
an error naming the file, never a silent NaN.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ..config import DataConfig
from ..errors import UserError
from ..runs import read_metrics

SEED_STRIDE = 1000  # seed s of a protocol adds SEED_STRIDE * s to every stage's own seed
GROUPS = ("paper", "privacy", "beyond")



class RecordError(UserError):
    """A finished stage's log lacks what its record needs: the stage is from another version or was cut short."""


@dataclass
class Records:
    """One seed's finished stages, each as its record: what the report reads."""

    name: str  # the seed's folder name, seed-<s>
    dataset: str  # the protocol's data set
    records: dict[str, Any]

    def __getitem__(self, stage: str) -> Any:
        if stage not in self.records:
            raise RecordError(f"{self.name} has no finished stage {stage!r}; run `privoffload reproduce` again")
        return self.records[stage]

    def __contains__(self, stage: str) -> bool:
        return stage in self.records


@dataclass
class Seed:
    """What a stage of one seed is configured and run with: its folder, its index, the protocol's settings."""

    index: int
    folder: Path
    protocol: Any  # the ProtocolConfig
    device: str = "auto"
    data_root: str | Path | None = None
    _data: Any = None  # the data set, loaded on first use (a stage that is skipped never loads it)

    def path(self, stage: str) -> str:
        """The run folder of another stage of this seed, as a config link."""
        return str(self.folder / stage)

    @property
    def data(self) -> Any:
        if self._data is None:
            from ..data import load_dataset  # here: settings and selection work without torch

            self._data = load_dataset(self.protocol.dataset, self.data_root, self.protocol.image_size)
        return self._data


@dataclass(frozen=True)
class Stage:
    """One step of the protocol. `report(seeds)` and `figures(seeds, out, folders, data_root)` take one Records per
    seed that has this stage's record (every finished stage of that seed), in seed order."""

    name: str  # its run folder seed-<s>/<name>, and its name in `reproduce --stages`
    section: str  # the profile table that holds its settings (several stages may share one)
    settings: Callable[[], Any]  # that table's default settings
    configure: Callable[[Any, Seed], Any]  # (section settings, seed) -> this seed's config; None = off in this profile
    run: Callable[[Any, Path, Seed], Any] | None  # (config, run folder, seed): make the run folder, resumably
    read: Callable[[Path], Any]  # finished run folder -> its record
    needs: tuple[str, ...] = ()  # stages whose run folders it reads (run first, selected with it)
    group: str = "beyond"  # paper | privacy | beyond: what `reproduce --stages GROUP` selects
    main: bool = False  # part of the main job (`make run`, reproduce's default)
    report: Callable[[list[Records]], list[str]] | None = None
    figures: Callable[..., list[Path]] | None = None


def configured(stage: Stage, seed: Seed) -> Any:
    """The stage's config for this seed: the profile's section, linked, moved by the seed, on the protocol's data
    set (every nested setting that names a data set is set to it), validated. None where the profile turns it off."""
    cfg = stage.configure(getattr(seed.protocol, stage.section), seed)
    if cfg is None:
        return None
    if hasattr(cfg, "seed"):
        cfg = dataclasses.replace(cfg, seed=cfg.seed + SEED_STRIDE * seed.index)
    cfg = on_dataset(cfg, seed.protocol.dataset, seed.protocol.image_size)
    try:
        cfg.validate()
    except UserError as e:
        raise UserError(f"stage {stage.name}: {e}") from None
    return cfg


def on_dataset(cfg: Any, dataset: str, image_size: str) -> Any:
    """A copy of `cfg` with every (nested) DataConfig set to the protocol's data set."""
    changes = {f.name: on_dataset(getattr(cfg, f.name), dataset, image_size) for f in dataclasses.fields(cfg)
               if dataclasses.is_dataclass(getattr(cfg, f.name))}
    if isinstance(cfg, DataConfig):
        changes.update(dataset=dataset, image_size=image_size)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def protocol_config(stages: list[Stage], module: str) -> type:
    """The protocol's settings, one table per section of the stages: a dataclass like every other config, named
    `module`.ProtocolConfig (so that it pickles: seeds run in other processes)."""
    sections: dict[str, Stage] = {}
    for s in stages:
        sections.setdefault(s.section, s)
    fields = [("profile", str, field(default="paper")), ("dataset", str, field(default="cifar10")),
              ("image_size", str, field(default=""))]
    fields += [(name, type(s.settings()), field(default_factory=s.settings)) for name, s in sections.items()]

    def validate(self) -> None:
        from ..config.loader import choice
        from ..config import PROFILES

        choice("profile", self.profile, PROFILES)
        DataConfig.validate(self)  # type: ignore[arg-type]

    cls = dataclasses.make_dataclass("ProtocolConfig", fields, namespace={
        "validate": validate, "__doc__": "A whole reproduction: the data set and each stage's section of the profile."})
    cls.__module__ = module
    return cls


def select(stages: list[Stage], spec: str) -> list[Stage]:
    """The stages `reproduce --stages SPEC` runs, in protocol order: SPEC is `main`, `all`, or a comma-separated list
    of groups (paper, privacy, beyond) and stage names; every stage a chosen one needs comes with it."""
    by_name = {s.name: s for s in stages}
    wanted: set[str] = set()
    for word in (w.strip() for w in spec.split(",") if w.strip()):
        if word == "all":
            wanted |= set(by_name)
        elif word == "main":
            wanted |= {s.name for s in stages if s.main}
        elif word in GROUPS:
            wanted |= {s.name for s in stages if s.group == word}
        elif word in by_name:
            wanted.add(word)
        else:
            raise UserError(f"--stages: {word!r} is not main, all, a group ({', '.join(GROUPS)}) or a stage "
                            f"({', '.join(by_name)})")
    if not wanted:
        raise UserError("--stages is empty; give main, all, a group or stage names")
    todo = list(wanted)
    while todo:  # what the chosen stages read
        for need in by_name[todo.pop()].needs:
            if need not in wanted:
                wanted.add(need)
                todo.append(need)
    return [s for s in stages if s.name in wanted]


# ---------------------------------------------------------------- reading records

class Log:
    """A finished stage's metrics.jsonl, read for its record: what is missing is an error that names the file."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.records = read_metrics(self.folder)

    def missing(self, what: str) -> RecordError:
        return RecordError(f"{self.folder}/metrics.jsonl has no {what}: the stage was cut short or written by another "
                           f"version; delete {self.folder} and run `privoffload reproduce` again")

    def last(self, key: str) -> dict[str, Any]:
        """The last record that has `key` (the last evaluation of that score)."""
        for r in reversed(self.records):
            if key in r:
                return r
        raise self.missing(repr(key))

    def value(self, key: str) -> float:
        return float(self.last(key)[key])

    def series(self, x: str, y: str) -> dict[Any, float]:
        """{record[x]: record[y]} over the records that have both (a curve: epoch -> score)."""
        return {r[x]: float(r[y]) for r in self.records if x in r and y in r}


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        raise RecordError(f"{path} is missing or unreadable: delete {Path(path).parent} and run "
                          "`privoffload reproduce` again") from None


def need(record: Mapping[str, Any], key: str, where: Path | str) -> Any:
    """record[key], or an error naming where it should have been."""
    if key not in record:
        raise RecordError(f"{where} has no {key!r}: delete that stage's folder and run `privoffload reproduce` again")
    return record[key]
