from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from lmforge.config import dump_config, iter_help, load_config, opt
from lmforge.core.errors import ConfigError
from lmforge.train.config import TrainConfig


@dataclass
class Inner:
    lr: float = opt(1e-3, "learning rate")
    name: str = opt("x", "a name")
    tags: list[str] = opt([], "tags")
    mode: Literal["a", "b"] = opt("a", "mode")
    limit: Optional[int] = opt(None, "optional")


@dataclass
class Root:
    inner: Inner = opt(Inner, "section")
    steps: int = opt(10, "steps")
    flag: bool = opt(False, "flag")


def test_overrides_apply_and_coerce():
    cfg = load_config(Root, None, ["inner.lr=3e-4", "steps=20", "inner.tags=x,y", "inner.name=007", "flag=true",
                                   "inner.limit=5"])
    assert cfg.inner.lr == pytest.approx(3e-4) and cfg.steps == 20 and cfg.inner.tags == ["x", "y"]
    assert cfg.inner.name == "007" and cfg.flag is True and cfg.inner.limit == 5


def test_yaml_then_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\ninner:\n  lr: 0.1\n")
    cfg = load_config(Root, path, ["steps=7"])
    assert cfg.steps == 7 and cfg.inner.lr == 0.1


def test_unknown_key_names_valid_ones():
    with pytest.raises(ConfigError, match=r"inner\.lrr.*valid keys under inner: limit, lr, mode, name, tags"):
        load_config(Root, None, ["inner.lrr=1"])


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stepz: 5\n")
    with pytest.raises(ConfigError, match="stepz"):
        load_config(Root, path)


def test_missing_file_names_path(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(Root, tmp_path / "nope.yaml")


@pytest.mark.parametrize("override,match", [
    ("steps=abc", "steps='abc' is not an integer"),
    ("steps=1.5", "not an integer"),
    ("flag=maybe", "not a boolean"),
    ("inner.mode=c", r"inner.mode='c' is not one of \['a', 'b'\]"),
    ("inner.lr=fast", "not a number"),
    ("steps", "must look like key.sub=value"),
])
def test_bad_values_are_named(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Root, None, [override])


def test_validate_hook_runs():
    with pytest.raises(ConfigError, match="train.max_steps=0"):
        load_config(TrainConfig, None, ["max_steps=0"])


def test_dump_roundtrip(tmp_path):
    cfg = load_config(Root, None, ["inner.lr=0.5", "inner.tags=a"])
    dump_config(cfg, tmp_path / "out.yaml")
    assert load_config(Root, tmp_path / "out.yaml") == cfg


def test_help_lists_every_leaf():
    keys = [k for k, _, _ in iter_help(Root)]
    assert keys == ["inner.lr", "inner.name", "inner.tags", "inner.mode", "inner.limit", "steps", "flag"]
