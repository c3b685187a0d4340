from dataclasses import dataclass, field

import pytest

from vla_rft_engine.config import ConfigError, load_config, save_config


@dataclass
class Inner:
    levels: list[int] = field(default_factory=lambda: [7, 5, 5, 5, 5])
    name: str = "fsq"


@dataclass
class Outer:
    steps: int = 10
    lr: float = 1e-3
    flag: bool = False
    out: str | None = None
    model: Inner = field(default_factory=Inner)


def test_overrides_and_types(tmp_path):
    c = load_config(Outer, None, ["steps=20", "lr=5e-5", "flag=true", "model.levels=[8,5,5]", "model.name=001"])
    assert c.steps == 20 and c.lr == 5e-5 and c.flag is True and c.model.levels == [8, 5, 5] and c.model.name == "001"
    save_config(c, tmp_path / "c.yaml")
    c2 = load_config(Outer, tmp_path / "c.yaml", ["steps=3"])
    assert c2.model.levels == [8, 5, 5] and c2.steps == 3 and c2.lr == 5e-5
    assert load_config(Outer, None, ["out=null"]).out is None


def test_bad_keys_and_values():
    with pytest.raises(ConfigError, match="unknown config key 'stepz'.*steps"):
        load_config(Outer, None, ["stepz=1"])
    with pytest.raises(ConfigError, match="expected int"):
        load_config(Outer, None, ["steps=abc"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Outer, None, ["steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, "/nonexistent.yaml")
