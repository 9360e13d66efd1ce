"""How a pipeline's stages become runnable (`lmforge pipeline`, stages/pipeline.py): `${NAME.output}`,
`${NAME.dir}` and `${run_dir}` references replaced by what earlier stages make, each verb's config loaded (on top of
its recipe) and placed in RUN_DIR/NAME, and the fingerprint that tells a finished stage from a changed one."""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PLACED", "Resolved", "resolve", "stage_config", "fingerprint"]

_REF = re.compile(r"\$\{([A-Za-z0-9_-]+)(?:\.(output|dir))?\}")
PLACED = ("run_dir", "output", "dst")
"""The config field that says where a verb writes (the first one its Config has); the pipeline sets it."""


def _substitute(value: Any, run: Path, done: dict[str, dict[str, Any]], key: str, refs: set[str]) -> Any:
    """`value` with ${...} references replaced; the names it refers to go into `refs`."""
    from ..config import ConfigError

    if isinstance(value, str):
        def one(m: re.Match) -> str:
            name, what = m[1], m[2] or "output"
            if name == "run_dir" and m[2] is None:
                return str(run)
            if name not in done:
                raise ConfigError(f"{key}: {m[0]} refers to no earlier stage (earlier stages: "
                                  f"{', '.join(done) or 'none'})")
            refs.add(name)
            return done[name][what]
        return _REF.sub(one, value)
    if isinstance(value, list):
        return [_substitute(v, run, done, f"{key}[{i}]", refs) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _substitute(v, run, done, f"{key}.{k}", refs) for k, v in value.items()}
    return value


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys (lists and scalars are values)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _placed_field(cls: type) -> str | None:
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return next((p for p in PLACED if p in names), None)


def stage_config(name: str, st: Any, run: Path, done: dict[str, dict[str, Any]]) -> tuple[Any, Any, set[str]]:
    """(stage module, its resolved Config placed in RUN_DIR/NAME, names of the stages it refers to)."""
    from ..config import ConfigError, load_config

    verb = st.verb or name
    module = importlib.import_module(f"lmforge.stages.{verb.replace('-', '_')}")
    refs: set[str] = set()
    tree = _substitute(st.config, run, done, f"stages.{name}.config", refs)
    place = _placed_field(module.Config)
    if place in tree:
        raise ConfigError(f"stages.{name}.config.{place}: the pipeline puts each stage in RUN_DIR/NAME "
                          f"({run / name}); remove this key")
    flat = {**_flatten(tree), **({place: str(run / name)} if place else {})}
    cfg = load_config(module.Config, st.recipe, flat, where=f"in stage {name!r} ({verb}) of the pipeline")
    return module, cfg, refs


@dataclass
class Resolved:
    """A stage ready to run: its module, resolved config, and the stages it refers to."""

    name: str
    verb: str
    module: Any
    config: Any
    refs: set[str]
    output: str


def resolve(cfg: Any) -> list[Resolved]:
    """Every stage's resolved config, before anything runs (a mistake in the last stage stops the pipeline before
    the first one starts). Raises ConfigError naming the stage."""
    from ..config import ConfigError

    run = Path(cfg.run_dir)
    done: dict[str, dict[str, Any]] = {}
    out = []
    for i, (name, st) in enumerate(cfg.stages.items()):
        verb = st.verb or name
        try:
            module, scfg, refs = stage_config(name, st, run, done)
        except Exception as e:
            raise ConfigError(f"stage {i + 1}/{len(cfg.stages)} {name!r} ({verb}) has a bad config: {e}") from e
        output = _output(module, scfg, run / name)
        done[name] = {"output": output, "dir": str(run / name)}
        out.append(Resolved(name, verb, module, scfg, refs, output))
    return out


def _output(module: Any, verb_cfg: Any, folder: Path) -> str:
    """What a stage hands on: a training stage's final/ model, the sub-folder a verb names in its module's OUTPUT
    (curate: data/, the kept documents), the folder of any other."""
    if hasattr(verb_cfg, "run_dir"):
        return str(folder / "final")
    return str(folder / getattr(module, "OUTPUT", ""))


def fingerprint(verb: str, cfg: Any, parents: dict[str, str], run: Path) -> str:
    """sha256 of the verb, the resolved config and the run ids of the stages it refers to; paths inside the
    pipeline's folder count relative to it (a moved run folder keeps its finished stages)."""
    from ..config import to_dict

    text = json.dumps({"verb": verb, "config": to_dict(cfg), "parents": parents}, sort_keys=True, default=str)
    return hashlib.sha256(text.replace(str(run), "${run_dir}").encode()).hexdigest()[:16]
