"""Checkpoints as safetensors + JSON (no pickle): full model and optimizer state, written atomically.

Layout: checkpoints/step-NNNNNN/{model.safetensors, optimizer.safetensors, trainer.json}. A checkpoint is
written into a temporary directory and swapped into place (`atomic.replace_folder`), so a kill mid-write leaves the
previous one intact; pruning renames a checkpoint out of the `step-` names before deleting it (`atomic.remove_folder`),
so a kill mid-prune never leaves a half checkpoint that counts as one. `tidy` removes what kills left behind.
Full (unsharded) state dicts make checkpoints independent of world size and parallelism (DDP, FSDP2).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..atomic import recover_all, remove_folder, replace_folder

_STEP = re.compile(r"^step-(\d{6,})$")
FILES = ("model.safetensors", "optimizer.safetensors", "trainer.json")
"""What a complete checkpoint directory holds."""


def _flatten_optimizer(osd: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors of optimizer state under 'state/<param>/<key>' and everything else as JSON."""
    tensors: dict[str, Tensor] = {}
    plain: dict[str, Any] = {"param_groups": osd["param_groups"], "state": {}}
    for pname, st in osd["state"].items():
        entry = {}
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"state/{pname}/{k}"] = v.detach().cpu().contiguous()
            else:
                entry[k] = v
        plain["state"][str(pname)] = entry
    return tensors, plain


def _unflatten_optimizer(tensors: dict[str, Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {k: dict(v) for k, v in plain["state"].items()}
    for key, v in tensors.items():
        _, pname, k = key.split("/", 2)
        state.setdefault(pname, {})[k] = v
    return {"state": state, "param_groups": plain["param_groups"]}


def rng_state() -> dict[str, str]:
    """Python, NumPy and torch RNG states, JSON-safe."""
    import random

    import numpy as np

    st: dict[str, Any] = {"python": repr(random.getstate()), "torch": _b64(torch.get_rng_state())}
    npst = np.random.get_state()
    st["numpy"] = [npst[0], npst[1].tolist(), npst[2], npst[3], npst[4]]
    if torch.cuda.is_available():
        st["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    import ast
    import random

    import numpy as np

    random.setstate(ast.literal_eval(st["python"]))
    torch.set_rng_state(_unb64(st["torch"]))
    n = st["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in st["cuda"]])


def _b64(t: Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def save_checkpoint(root: Path, step: int, model_sd: dict[str, Tensor], optim_sd: dict[str, Any],
                    trainer_state: dict[str, Any]) -> Path:
    """Write checkpoint `step` under root atomically and return its directory."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in model_sd.items()}, str(tmp / "model.safetensors"))
    tensors, plain = _flatten_optimizer(optim_sd)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = dict(trainer_state, optimizer=plain, step=step)
    (tmp / "trainer.json").write_text(json.dumps(state, indent=1))
    return replace_folder(tmp, final)


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """(model state, optimizer state, trainer state) of a checkpoint directory."""
    state = json.loads((path / "trainer.json").read_text())
    optim = _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), state.pop("optimizer"))
    return load_file(str(path / "model.safetensors")), optim, state


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under root (every file of FILES present), oldest first."""
    if not root.exists():
        return []
    out = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and _complete(p)]
    return sorted(out)


def _complete(path: Path) -> bool:
    return all((path / f).is_file() for f in FILES)


def prune(root: Path, keep_last: int, keep: set[int] = frozenset()) -> None:
    """Delete all but the newest `keep_last` checkpoints and those whose step is in `keep` (e.g. the best)."""
    ckpts = list_checkpoints(root)
    for step, path in ckpts[:-keep_last] if keep_last > 0 else ckpts:
        if step not in keep:
            remove_folder(path)  # renamed out of the step- names first: a kill midway leaves no half checkpoint
    tidy(root)


def tidy(root: Path) -> None:
    """Remove what killed writes and prunes left in root: temporary and half-deleted directories, and `step-`
    directories that miss a file (a prune cut short before prunes renamed first); a swap cut short is completed."""
    if not root.is_dir():
        return
    recover_all(root)
    for p in root.iterdir():
        if p.name.startswith(".tmp-step-"):
            shutil.rmtree(p, ignore_errors=True)
        elif _STEP.match(p.name) and not _complete(p):
            remove_folder(p)


def set_aside(path: Path) -> Path:
    """Rename an unreadable checkpoint to NAME.unreadable (out of the checkpoints that count, kept to inspect)."""
    aside = path.with_name(path.name + ".unreadable")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(path, aside)
    return aside
