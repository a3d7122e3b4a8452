"""The package's layers import only downward: an AST check of every import, function-level ones included.

Data flows one way, data -> nets -> training -> experiments -> service/client, and this test is that
sentence as code. The cloud and the client are apps beside each other: the cloud never reaches a
trainer, and the client reaches training (its re-sync algorithms) but never privacy or experiments.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "privoffload"

RANK = {  # a module may import the modules of its own component and of components of a lower rank
    "__init__": 0, "errors": 0, "oip": 0,
    "config": 1, "runtime": 1,  # settings are data (no torch); runtime is the base of everything that runs
    "data": 2, "nets": 2, "ldp": 2,
    "metrics": 4,
    "runs": 5,
    "train": 6,
    "privacy": 7,
    "experiments": 8, "evaluate": 8,
    "cloud": 9, "client": 9,
    "live": 10,
    "cli": 11,
    "__main__": 12,
}
REACH = {"cloud": RANK["nets"], "client": RANK["train"]}  # the apps reach less far down than their rank


def component(module: str) -> str:
    """privoffload.train.loop -> train; privoffload -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, name: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module) of every privoffload import in module `name`'s source, wherever it stands."""
    package = name if is_package else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "privoffload"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "privoffload":
                continue
            for a in node.names:  # `from . import nets` imports a module; `from .. import __version__` the package
                sub = f"{target}.{a.name}"
                is_module = (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists() or \
                    (PACKAGE.parent / sub.replace(".", "/") / "__init__.py").exists()
                found.append((node.lineno, sub if is_module else target))
    return found


def file_imports(path: Path) -> list[tuple[int, str]]:
    return imports(path.read_text(), module_name(path), path.name == "__init__.py")


def test_every_component_has_a_rank():
    names = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert names <= RANK.keys(), names - RANK.keys()


def test_imports_only_go_down():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = component(module_name(path))
        limit = REACH.get(own, RANK[own] - 1)
        for line, target in file_imports(path):
            other = component(target)
            if other != own and not RANK[other] <= limit:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} ({own}) imports {target} ({other})")
    assert not upward, "\n".join(upward)


def test_the_checker_sees_function_level_and_relative_imports():
    """The AST walk must catch what a look at the file's head would miss."""
    source = "import json\n\ndef later():\n    from ..train import loop\n    import privoffload.client.drift\n"
    targets = [t for _, t in imports(source, "privoffload.cloud.probe")]
    assert targets == ["privoffload.train.loop", "privoffload.client.drift"]
    assert [t for _, t in imports("from .. import __version__, nets", "privoffload.cloud.app")] == \
        ["privoffload", "privoffload.nets"]


def test_the_apps_load_no_trainer_and_the_client_no_torchmetrics():
    """Importing the service loads no training code; the on-device client loads no metrics library."""
    probe = ("import sys, privoffload.cloud.app, privoffload.client.drift; "
             "print(sorted(m for m in sys.modules if m.startswith(('privoffload.train', 'privoffload.privacy', "
             "'privoffload.experiments', 'torchmetrics'))))")
    cloud = subprocess.run([sys.executable, "-c", probe.replace(", privoffload.client.drift", "")], capture_output=True,
                           text=True, check=True).stdout
    assert cloud.strip() == "[]", cloud
    client = subprocess.run([sys.executable, "-c", probe.replace("privoffload.cloud.app, ", "")], capture_output=True,
                            text=True, check=True).stdout
    assert "torchmetrics" not in client and "privoffload.privacy" not in client and "experiments" not in client, client


def test_settings_and_the_command_line_load_without_torch():
    """config/ is data: loading every setting, and the CLI's --help, imports no torch (and no network code)."""
    probe = ("import sys, privoffload.config, privoffload.cli; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", loaded
