"""Tests for lmforge.cli: argument parsing, help, --print-config, exit codes (with a fake stage)."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from lmforge import cli
from lmforge.config import load_config


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate."""
    schedule: Literal["constant", "cosine"] = "cosine"
    """Learning-rate schedule."""


@dataclass
class FakeConfig:
    src: str = ""
    """Input model folder."""
    dst: Path | None = None
    """Output path."""
    max_tokens: int = 16
    """Tokens to generate."""
    verbose: bool = False
    """Print more."""
    chat: bool = True
    """Apply the chat template."""
    prompt: str = "hi"
    """Prompt text."""
    temperature: float = 1.0
    """Sampling temperature."""
    train: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer options."""

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


@pytest.fixture
def stage(monkeypatch):
    """Register ``lmforge fake`` whose main records the config it was given."""
    module = types.ModuleType("lmforge.stages.fake")
    module.Config = FakeConfig
    module.POSITIONAL = ("src", "dst")
    module.calls = []

    def main(cfg: FakeConfig) -> int:
        module.calls.append(cfg)
        return 0

    module.main = main
    monkeypatch.setitem(sys.modules, "lmforge.stages.fake", module)
    monkeypatch.setitem(cli.VERBS, "fake", "A fake verb for tests")
    return module


def run(stage, *argv: str) -> FakeConfig:
    assert cli.main(["fake", *argv]) == 0
    return stage.calls[-1]


def test_positionals_flags_and_dotted_overrides(stage):
    cfg = run(stage, "in_dir", "out.gguf", "--max-tokens", "5", "--train.lr=1e-3", "train.schedule=constant",
              "--prompt", "123", "--temperature", "-0")
    assert cfg.src == "in_dir" and cfg.dst == Path("out.gguf")
    assert cfg.max_tokens == 5
    assert cfg.train.lr == 1e-3 and cfg.train.schedule == "constant"
    assert cfg.prompt == "123"  # str fields keep the raw text


def test_bool_flags(stage):
    assert run(stage).verbose is False
    assert run(stage, "--verbose").verbose is True
    assert run(stage, "--verbose", "--max-tokens", "3").verbose is True      # next token is a flag
    assert run(stage, "--verbose", "max_tokens=3").verbose is True           # next token is key=value
    assert run(stage, "--verbose", "false").verbose is False                 # explicit value
    assert run(stage, "--verbose", "src_dir").src == "src_dir"               # not a bool: a positional
    assert run(stage, "--no-chat").chat is False
    assert run(stage, "--chat=false").chat is False
    assert run(stage, "--no-chat", "--chat").chat is True                     # last one wins


def test_double_dash_makes_positionals(stage):
    assert run(stage, "--", "a=b", "--x").dst == Path("--x")
    assert stage.calls[-1].src == "a=b"


def test_command_line_over_yaml_over_defaults(stage, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("max_tokens: 7\ntrain:\n  lr: 0.5\n")
    cfg = run(stage, "--config", str(path), "train.lr=0.25")
    assert (cfg.max_tokens, cfg.train.lr, cfg.prompt) == (7, 0.25, "hi")
    assert run(stage, f"--config={path}").train.lr == 0.5


def test_print_config_parses_back(stage, tmp_path, capsys):
    assert cli.main(["fake", "a", "--max-tokens", "4", "--no-chat", "--print-config"]) == 0
    assert stage.calls == []  # did not run
    out = capsys.readouterr().out
    path = tmp_path / "c.yaml"
    path.write_text(out)
    assert yaml.safe_load(out)["max_tokens"] == 4
    assert load_config(FakeConfig, path) == FakeConfig(src="a", max_tokens=4, chat=False)


def test_verb_help_lists_every_field(stage, capsys):
    assert cli.main(["fake", "--help"]) == 0
    out = capsys.readouterr().out
    assert "A fake verb for tests" in out and "SRC DST" in out
    expected = [("max_tokens", "16", "Tokens to generate."), ("train.lr", "0.0003", "Peak learning rate."),
                ("train.schedule", "cosine", "Learning-rate schedule."), ("dst", "null", "Output path.")]
    for key, default, doc in expected:
        line = next(line for line in out.splitlines() if line.split()[:1] == [key])
        assert default in line and doc in line
    assert stage.calls == []


def test_top_level_help_and_version(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "generate" in out and cli.VERBS["convert"] in out
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("lmforge ")


@pytest.mark.parametrize("argv, message", [
    (["--max-tokns", "3"], "unknown key 'max_tokns' on the command line; did you mean 'max_tokens'?"),
    (["train.lrr=1"], "unknown key 'train.lrr' on the command line; did you mean 'train.lr'?"),
    (["--max-tokens", "many"], "max_tokens: expected int, found 'many' (str) on the command line"),
    (["--train.schedule", "cosin"], "did you mean 'cosine'?"),
    (["a", "b", "c"], "unexpected argument 'c'"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--max-tokens"], "needs a value"),
    (["-x"], "unknown option '-x'"),
])
def test_config_errors_exit_2_with_message(stage, capsys, argv, message):
    assert cli.main(["fake", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert stage.calls == []


def test_yaml_error_names_file_and_line(stage, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("prompt: x\ntrain:\n  lrr: 1\n")
    assert cli.main(["fake", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path} line 3" in err and "did you mean 'train.lr'" in err


def test_unknown_verb(capsys):
    assert cli.main(["generat"]) == 2
    assert "did you mean 'generate'" in capsys.readouterr().err


def test_exit_codes_from_main(stage, monkeypatch, capsys):
    monkeypatch.setattr(stage, "main", lambda cfg: 3)
    assert cli.main(["fake"]) == 3

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(stage, "main", interrupted)
    assert cli.main(["fake"]) == 130

    def broken(cfg):
        raise RuntimeError("boom")

    monkeypatch.setattr(stage, "main", broken)  # a runtime failure: one line, status 1, traceback on request
    capsys.readouterr()
    assert cli.main(["fake"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: RuntimeError: boom") and err.count("\n") == 1 and "--debug" in err
    assert cli.main(["fake", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
