"""Atomic saves: `lmforge.save` over an existing model folder, killed at every moment between two of its file-system
changes, leaves the old model or the new one whole (and the next save cleans what the kill left behind)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge import atomic
from lmforge.models import ModelConfig, Transformer


class Killed(BaseException):
    """Stands for SIGKILL: raised instead of a file-system change, it passes every `except Exception` cleanup."""


HOOKS = [(os, "rename"), (os, "replace"), (os, "unlink"), (os, "rmdir"), (os, "link"), (atomic, "exchange")]
"""The calls that change what a folder holds (shutil.rmtree deletes through os.unlink / os.rmdir)."""


def _kill_before(monkeypatch, n: int) -> list[str]:
    """Let the first `n` file-system changes happen, raise Killed instead of the next; returns the changes made."""
    done: list[str] = []

    def hook(owner, name):
        real = getattr(owner, name)

        def call(*args, **kwargs):
            if len(done) == n:
                raise Killed(f"before {name}{args}")
            done.append(f"{name} {args[0]}")
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, call)

    for owner, name in HOOKS:
        hook(owner, name)
    return done


def _model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                   intermediate_size=128, max_position_embeddings=64))


def _which(folder: Path, old: Transformer, new: Transformer) -> str:
    """'old' or 'new': the model the folder holds, whole (every weight of one of them)."""
    loaded = lmforge.load(folder)[0].state_dict()
    for name, model in (("old", old), ("new", new)):
        sd = model.state_dict()
        if sd.keys() == loaded.keys() and all(torch.equal(sd[k], loaded[k]) for k in sd):
            return name
    raise AssertionError(f"{folder} holds neither the old nor the new model whole")


@pytest.mark.parametrize("swap", ["exchange", "renames"])
def test_save_killed_at_any_moment_leaves_the_old_or_the_new_model_whole(swap, tmp_path, monkeypatch):
    """The old folder is sharded (so stale shards must go) and the new one is not. With renameat2 the folder is
    whole at every instant; with plain renames a kill between them leaves a whole `.final.new-*` that
    `recover_folder` puts back (the next load or save runs it)."""
    old, new = _model(0), _model(1)
    if swap == "renames":
        monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    seen = set()
    for n in itertools.count():
        folder = tmp_path / f"kill-{n}" / "final"
        lmforge.save(old, None, folder, max_shard_bytes=40_000)
        assert (folder / "model.safetensors.index.json").exists()
        with monkeypatch.context() as m:
            done = _kill_before(m, n)
            try:
                lmforge.save(new, None, folder)
                finished = True
            except Killed:
                finished = False
        seen.add(_which(folder, old, new))
        if finished:
            break
    if swap == "exchange" and not any(c.startswith("exchange") for c in done):
        pytest.skip("this file system has no renameat2(RENAME_EXCHANGE)")
    assert _which(folder, old, new) == "new" and seen == {"old", "new"}
    assert n >= 2, done  # the kill landed between file-system changes of the save

    lmforge.save(new, None, folder)  # the next save cleans the leftovers of a killed one
    for k in range(n):
        leftover = tmp_path / f"kill-{k}" / "final"
        lmforge.save(new, None, leftover)
        assert [p.name for p in leftover.parent.iterdir()] == ["final"], f"kill {k} left files behind"
        assert sorted(p.name for p in leftover.iterdir()) == ["config.json", "generation_config.json",
                                                              "model.safetensors"]


def test_files_of_other_tools_in_the_folder_are_kept(tmp_path):
    """Replacing a model folder replaces the model (weights, config, tokenizer) and keeps what else it holds."""
    folder = lmforge.save(_model(0), None, tmp_path / "m", max_shard_bytes=40_000)
    (folder / "README.md").write_text("notes\n")
    (folder / "extra").mkdir()
    (folder / "extra" / "data.txt").write_text("kept\n")
    lmforge.save(_model(1), None, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "extra",
                                                        "generation_config.json", "model.safetensors"]
    assert (folder / "README.md").read_text() == "notes\n" and (folder / "extra" / "data.txt").read_text() == "kept\n"
    assert _which(folder, _model(0), _model(1)) == "new"


def test_write_text_killed_before_the_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "eval.json"
    atomic.write_text(path, "old\n")
    with monkeypatch.context() as m:
        _kill_before(m, 0)
        with pytest.raises(Killed):
            atomic.write_text(path, "new\n")
    assert path.read_text() == "old\n"
    atomic.write_text(path, "new\n")
    assert path.read_text() == "new\n"
