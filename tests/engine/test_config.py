from dataclasses import dataclass

import pytest

from pyssl.engine.config import ConfigError, TrainConfig, apply_overrides, parse_overrides
from pyssl.engine.run import build_configs


@dataclass
class _C:
    scale: tuple[float, float] = (0.1, 1.0)
    flag: bool = False
    name: str = "x"
    maybe: int | None = None


def test_overrides_are_typed():
    t, c = TrainConfig(), _C()
    done = apply_overrides([t, c], ["lr=3e-4", "epochs=7", "progress=false", "flag=yes",
                                    "scale=0.2,0.9", "name=abc", "maybe=none", "batch-size=8"])
    assert t.lr == 3e-4 and t.epochs == 7 and t.progress is False and t.batch_size == 8
    assert c.flag is True and c.scale == (0.2, 0.9) and c.name == "abc" and c.maybe is None
    assert set(done) == {"lr", "epochs", "progress", "flag", "scale", "name", "maybe",
                         "batch_size"}
    apply_overrides([c], ["maybe=3"])
    assert c.maybe == 3


@pytest.mark.parametrize("item, match", [
    ("lr=fast", r"lr='fast': expected a number"),
    ("epochs=2.5", r"epochs='2.5': expected an integer"),
    ("progress=maybe", r"progress='maybe': expected a boolean"),
    ("scale=1", r"scale='1': expected 2 comma-separated values"),
])
def test_wrong_types_name_the_key(item, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides([TrainConfig(), _C()], [item])


@pytest.mark.parametrize("item", ["lr=nan", "clip_grad=nan", "final_weight_decay=nan", "lr=inf",
                                  "warmup_epochs=-inf", "min_lr=NaN"])
def test_non_finite_numbers_are_refused_by_name(item):
    """NaN passed `x < 0` checks (clip_grad=nan silently meant "off") and inf diverged."""
    key = item.split("=")[0]
    with pytest.raises(ConfigError, match=f"{key}=.*expected a finite number"):
        apply_overrides([TrainConfig()], [item])


def test_validate_catches_values_set_in_code():
    for key, value, match in (("clip_grad", float("nan"), "clip_grad=nan: must be >= 0"),
                              ("final_weight_decay", float("inf"), "must be a finite number"),
                              ("momentum", 5.0, r"momentum=5.0: must be in \[0, 1\)"),
                              ("epochs", float("nan"), "epochs=nan: must be > 0")):
        t = TrainConfig()
        setattr(t, key, value)
        with pytest.raises(ConfigError, match=match):
            t.validate()


def test_a_key_given_twice_takes_the_last_value():
    assert parse_overrides(["lr=1", "epochs=3", "lr=2"]) == {"lr": "2", "epochs": "3"}


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        apply_overrides([TrainConfig(), _C()], ["learning_rate=1"])
    msg = str(e.value)
    assert "'learning_rate'" in msg and "lr" in msg and "scale" in msg
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lr"])


def test_recipe_configs_resolve_and_validate():
    cls, train, rcfg = build_configs("rotnet", ["head_hidden=32", "lr=0.5"], data="digits",
                                     epochs=2)
    assert cls.name == "rotnet" and rcfg.head_hidden == 32 and train.lr == 0.5
    assert train.data == "digits" and train.epochs == 2
    with pytest.raises(ConfigError, match="optimizer='lamb'"):
        build_configs("rotnet", ["optimizer=lamb"])
    with pytest.raises(ConfigError, match="batch_size=0"):
        build_configs("rotnet", ["batch_size=0"])
    with pytest.raises(ConfigError, match="--epochs"):
        build_configs("rotnet", [], epochs=0)
    with pytest.raises(ConfigError, match="backbone_width=-8: must be an integer >= 0"):
        build_configs("rotnet", ["backbone_width=-8"])
    with pytest.raises(ValueError, match="unknown recipe 'nope'; valid recipes: .*rotnet"):
        build_configs("nope")
    with pytest.raises(ConfigError, match="unknown config key 'tile_size'"):
        build_configs("rotnet", ["tile_size=3"])   # a jigsaw key is not a rotnet key
