import pytest

from privoffload import config
from privoffload.config import ClassifierConfig
from privoffload.errors import UserError


def test_defaults_file_sets_and_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('epochs = 7\nsubset = "first:100"\n[optim]\nlr = 0.2\n')
    cfg = config.load(ClassifierConfig, f, sets=["optim.momentum=0.5", "flip=true"], overrides={"epochs": 3, "width": None})
    assert (cfg.epochs, cfg.subset, cfg.optim.lr, cfg.optim.momentum, cfg.flip, cfg.width) == (3, "first:100", 0.2, 0.5, True, 64)
    again = config.from_dict(ClassifierConfig, __import__("tomllib").loads(config.to_toml(cfg)))
    assert again == cfg


@pytest.mark.parametrize("sets, words", [
    (["epoch=3"], "unknown key epoch"),
    (["optim.lrr=1"], "unknown key optim.lrr"),
    (["epochs=\"many\""], "epochs must be int"),
    (["epochs=0"], "must be > 0"),
    (["precision=fp8"], "not one of"),
    (["subset=\"last:5\""], "not one of"),
    (["optim.name=\"rmsprop\""], "optim.name"),
    (["width"], "not key=value"),
])
def test_bad_settings_are_named(sets, words):
    with pytest.raises(UserError, match=words):
        config.load(ClassifierConfig, sets=sets)


def test_bad_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        config.load(ClassifierConfig, tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("epochs = = 3")
    with pytest.raises(UserError, match="not valid TOML"):
        config.load(ClassifierConfig, tmp_path / "bad.toml")


def test_a_nested_table_overrides_the_fields_own_default_key_by_key():
    """`--set optim.lr=...` keeps the attack's Adam (its field's default), not the SGD of OptimConfig's class defaults."""
    from privoffload.config import AttackConfig, UtilitySweepConfig

    attack = config.load(AttackConfig, sets=["obfuscator=\"o\"", "optim.lr=0.01"])
    assert (attack.optim.name, attack.optim.lr, attack.optim.schedule) == ("adam", 0.01, "constant")
    sweep = config.load(UtilitySweepConfig, sets=["obfuscator.classifier=\"c\"", "obfuscator.patience=3"])
    assert (sweep.obfuscator.lam, sweep.obfuscator.d_idle, sweep.obfuscator.patience) == (0.0, True, 3)
    assert sweep.obfuscator.val_subset == "range:48000:50000"


def test_the_papers_recipe_at_quick_scale_is_two_sets_away():
    """docs/reproduction.md's two --set options give the quick profile's obfuscator stages back their former settings:
    Table I's codec at width 8 and the plain game, every utility-first option at its default."""
    import re
    from pathlib import Path

    from privoffload.config import ObfuscatorConfig, OptimConfig
    from privoffload.experiments.protocol import load_profile

    doc = (Path(__file__).resolve().parents[1] / "docs" / "reproduction.md").read_text()
    sets = re.findall(r"--set '((?:baseline_obfuscator|recovery)=\{.*?\}\})'", doc)
    assert len(sets) == 2
    cfg = load_profile("quick", sets)
    adam = OptimConfig(name="adam", lr=0.01, weight_decay=0.0, schedule="linear", warmup_epochs=0.2)
    former = ObfuscatorConfig(width=8, epochs=3, batch_size=64, subset="first:10000", flip=False, test_subset="random:1000",
                              eval_every=1, optim_o=adam)
    assert cfg.baseline_obfuscator == former
    assert cfg.recovery == ObfuscatorConfig(**{**former.__dict__, "flip": True})
    assert load_profile("quick").baseline_obfuscator != former  # the profile itself trains by the new recipe
