"""Tests for lmforge.config: typed loading, precedence, error messages, round trips."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pytest
import yaml

from lmforge.config import (
    ConfigError, config_hash, dump_yaml, field_docs, iter_fields, load_config, save_config, to_dict,
)


@dataclass
class TrainConfig:
    lr: float = 3e-4
    """Peak learning rate."""
    steps: int = 100
    """Number of optimizer steps."""
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    """Learning-rate schedule."""
    betas: tuple[float, ...] = (0.9, 0.95)
    """Adam betas."""
    compile: bool = False
    """Compile the model with torch.compile."""

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class SampleConfig:
    temperature: float = 1.0
    """Sampling temperature; 0 means greedy."""
    stop: list[str] = field(default_factory=list)
    """Stop strings."""
    seed: Optional[int] = None
    """Random seed (null: nondeterministic)."""


@dataclass
class RunConfig:
    name: str = "run"
    """Run name."""
    out: Path = Path("runs")
    """Output folder."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training options."""
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(temperature=0.7))
    """Sampling options."""
    extra: dict[str, int] = field(default_factory=dict)
    """Free-form integer knobs."""
    tag: str | None = None
    """Optional tag."""
    anything: Any = None
    """Any value at all."""


@dataclass
class Required:
    model: str
    """Model folder (required)."""
    n: int = 1
    """A count."""


@dataclass
class Child(TrainConfig):
    warmup: int = 10
    """Warmup steps."""


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_nested_default_factory():
    cfg = load_config(RunConfig)
    assert cfg == RunConfig()
    assert cfg.sample.temperature == 0.7  # the parent's default factory, not the class default


def test_precedence_defaults_yaml_command_line(tmp_path):
    path = write(tmp_path, "name: fromyaml\ntrain:\n  lr: 1.0e-3\n  steps: 5\n")
    cfg = load_config(RunConfig, path, ["train.steps=7", "sample.seed=3"])
    assert cfg.name == "fromyaml"            # YAML over default
    assert cfg.train.lr == 1e-3              # YAML
    assert cfg.train.steps == 7              # command line over YAML
    assert cfg.train.schedule == "cosine"    # default kept
    assert cfg.sample.seed == 3
    assert cfg.sample.temperature == 0.7     # partial section keeps the parent's default


def test_empty_yaml_changes_nothing(tmp_path):
    assert load_config(RunConfig, write(tmp_path, "")) == RunConfig()


def test_yaml_top_level_must_be_mapping(tmp_path):
    path = write(tmp_path, "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="x.yaml.*mapping"):
        load_config(RunConfig, path)


def test_unknown_key_from_yaml_names_file_line_and_suggestion(tmp_path):
    path = write(tmp_path, "name: a\ntrain:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, path)
    msg = str(e.value)
    assert "unknown key 'train.lrr'" in msg
    assert f"{path} line 3" in msg
    assert "did you mean 'train.lr'" in msg


def test_unknown_key_from_command_line():
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, None, ["trian.lr=0.1"])
    msg = str(e.value)
    assert "unknown key 'trian.lr'" in msg and "command line" in msg and "did you mean 'train.lr'" in msg


def test_unknown_leaf_at_top_level_suggests_nested_key():
    with pytest.raises(ConfigError, match="did you mean 'train.steps'"):
        load_config(RunConfig, None, ["steps=3"])


def test_wrong_type_from_yaml(tmp_path):
    path = write(tmp_path, "train:\n  lr: abc\n")
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, path)
    msg = str(e.value)
    assert "train.lr: expected float, found 'abc' (str)" in msg
    assert f"{path} line 2" in msg


@pytest.mark.parametrize("yaml_text, key", [
    ("train:\n  steps: '3'\n", "train.steps"),     # YAML typed it as a string
    ("train:\n  steps: 3.5\n", "train.steps"),
    ("train:\n  compile: 1\n", "train.compile"),   # int is not a bool
    ("train:\n  steps: true\n", "train.steps"),    # nor a bool an int
    ("name: 5\n", "name"),
    ("sample:\n  stop: [a, 3]\n", "sample.stop[1]"),
    ("extra:\n  k: x\n", "extra.k"),
])
def test_yaml_values_are_strictly_typed(tmp_path, yaml_text, key):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: expected"):
        load_config(RunConfig, write(tmp_path, yaml_text))


def test_yaml_int_for_float_and_exponent_strings(tmp_path):
    cfg = load_config(RunConfig, write(tmp_path, "train:\n  lr: 1\nsample:\n  temperature: 3e-4\n"))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.sample.temperature == 3e-4


def test_command_line_values_are_parsed_by_field_type():
    cfg = load_config(RunConfig, None, [
        "train.lr=1e-3", "train.compile=true", "train.betas=[0.8,0.9]", "sample.seed=null",
        "name=yes", "tag=a: b", "out=/tmp/o", "sample.stop=[a, '1', 2]", "extra.k=4", "anything={a: 1}",
    ])
    assert cfg.train.lr == 1e-3
    assert cfg.train.compile is True
    assert cfg.train.betas == (0.8, 0.9)
    assert cfg.sample.seed is None
    assert cfg.name == "yes"          # str fields keep the raw text
    assert cfg.tag == "a: b"            # even when it looks like a YAML mapping
    assert cfg.out == Path("/tmp/o")
    assert cfg.sample.stop == ["a", "1", "2"]
    assert cfg.extra == {"k": 4}
    assert cfg.anything == {"a": 1}
    assert load_config(RunConfig, None, ["tag=null"]).tag is None
    assert load_config(RunConfig, None, ["train.betas=0.5,0.6"]).train.betas == (0.5, 0.6)


def test_command_line_wrong_type_names_command_line():
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, None, ["train.steps=many"])
    assert str(e.value) == "train.steps: expected int, found 'many' (str) on the command line"


def test_override_must_be_key_value():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(RunConfig, None, ["train.lr"])


def test_mapping_overrides_are_typed():
    cfg = load_config(RunConfig, None, {"train.steps": 9, "name": "m"})
    assert (cfg.train.steps, cfg.name) == (9, "m")
    with pytest.raises(ConfigError, match="train.steps: expected int, found '9' "):
        load_config(RunConfig, None, {"train.steps": "9"})


def test_invalid_literal_lists_allowed_and_suggests(tmp_path):
    path = write(tmp_path, "train:\n  schedule: cosin\n")
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, path)
    msg = str(e.value)
    assert "train.schedule: expected one of 'constant', 'cosine', 'linear', found 'cosin'" in msg
    assert "line 2" in msg and "did you mean 'cosine'" in msg


def test_validate_hook_error_names_dotted_key():
    with pytest.raises(ConfigError, match=r"^train: lr must be > 0, got -1.0$"):
        load_config(RunConfig, None, ["train.lr=-1"])


def test_validate_hook_runs_on_defaults_too():
    @dataclass
    class Bad:
        x: int = -1
        """A value the hook rejects."""

        def validate(self) -> None:
            if self.x < 0:
                raise ConfigError("x must be >= 0")

    with pytest.raises(ConfigError, match="x must be >= 0"):
        load_config(Bad)


def test_missing_required_field():
    with pytest.raises(ConfigError, match="missing required key 'model'"):
        load_config(Required)
    assert load_config(Required, None, ["model=m"]).model == "m"


def test_wrong_section_type(tmp_path):
    with pytest.raises(ConfigError, match="train: expected a mapping of TrainConfig fields, found 5"):
        load_config(RunConfig, write(tmp_path, "train: 5\n"))


def test_cannot_set_inside_a_scalar():
    with pytest.raises(ConfigError, match="not a section"):
        load_config(RunConfig, None, ["train.lr.x=1"])


def test_save_and_load_round_trip(tmp_path):
    cfg = load_config(RunConfig, None, [
        "name=yes", "tag=0.5", "train.lr=1e-10", "train.betas=[0.1,0.2,0.3]", "sample.stop=['null', x]",
        "extra={a: 1}", "anything=[1, two]", "sample.seed=7",
    ])
    path = tmp_path / "sub" / "config.yaml"
    save_config(cfg, path)
    assert load_config(RunConfig, path) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left behind
    assert config_hash(load_config(RunConfig, path)) == config_hash(cfg)


def test_to_dict_and_dump_yaml():
    d = to_dict(RunConfig())
    assert d["out"] == "runs" and d["train"]["betas"] == [0.9, 0.95]
    text = dump_yaml(RunConfig())
    assert list(yaml.safe_load(text)) == ["name", "out", "train", "sample", "extra", "tag", "anything"]


def test_config_hash_changes_with_values():
    h = config_hash(RunConfig())
    assert len(h) == 16 and int(h, 16) >= 0
    assert h == config_hash(RunConfig())
    assert h != config_hash(load_config(RunConfig, None, ["train.steps=101"]))


def test_field_docs_and_inheritance():
    assert field_docs(TrainConfig)["lr"] == "Peak learning rate."
    docs = field_docs(Child)
    assert docs["warmup"] == "Warmup steps." and docs["schedule"] == "Learning-rate schedule."


def test_iter_fields_lists_leaves_with_defaults_and_docs():
    rows = {key: (tp, default, doc) for key, tp, default, doc in iter_fields(RunConfig)}
    assert rows["train.lr"] == (float, 3e-4, "Peak learning rate.")
    assert rows["sample.temperature"][1] == 0.7
    assert "train" not in rows and "sample.stop" in rows
    assert list(rows)[0] == "name"


def test_cli_list_of_glob_patterns_is_not_a_yaml_alias():
    from dataclasses import dataclass, field

    from lmforge.config import load_config

    @dataclass
    class C:
        include: list[str] = field(default_factory=list)
        """Patterns."""

    assert load_config(C, overrides=["include=[*.py, *.md]"]).include == ["*.py", "*.md"]
    assert load_config(C, overrides=["include=*.py"]).include == ["*.py"]
