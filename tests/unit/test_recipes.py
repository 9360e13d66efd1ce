"""Every shipped recipe parses and validates against its verb's config (a broken recipe fails here, not on a user)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from lmforge.cli import VERBS
from lmforge.config import load_config

RECIPES = sorted((Path(__file__).parents[2] / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_recipe_loads(path):
    # recipes/<verb>/NAME.yaml, a folder of several verbs (recipes/align/) with recipes named <verb>-NAME.yaml, or a
    # pipeline (recipes/quickstart.yaml, recipes/pipelines/), whose every stage's config must resolve
    if path.parent.name == "pipelines" or path.parent.name == "recipes":
        from lmforge.stages import pipeline

        stages = pipeline.resolve(load_config(pipeline.Config, path))
        assert len(stages) >= 5 and all(s.config is not None for s in stages)
        return
    verb = path.parent.name if path.parent.name in VERBS else path.stem.split("-")[0]
    stage = importlib.import_module(f"lmforge.stages.{verb}")
    cfg = load_config(stage.Config, path)
    assert cfg is not None


def test_there_are_recipes_for_each_step():
    names = {f"{p.parent.name}/{p.stem}" for p in RECIPES}
    assert {"tokenizer/stdlib-bpe-8k", "prepare/stdlib", "pretrain/stdlib-small", "pretrain/stdlib-encoder",
            "pretrain/tiny", "tokenizer/stdlib-wordpiece-8k", "prepare/stdlib-wordpiece", "prepare/stdlib-smollm2",
            "finetune/sentiment-minilm", "finetune/lora-smollm2", "align/reward-smollm2", "align/dpo-smollm2",
            "recipes/quickstart", "pipelines/smollm2-assistant"} <= names
