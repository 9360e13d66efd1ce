"""`lmforge pipeline --config recipes/quickstart.yaml [--from STAGE]`: several verbs in order, in one run directory.

A pipeline YAML names its stages in order; each is a verb with the config that verb takes (optionally on top of
one of its recipes), and may refer to earlier stages' outputs:

    run_dir: runs/quickstart
    stages:
      tokenizer: {verb: tokenizer, config: {inputs: ["{stdlib}"], vocab_size: 4096}}
      data:      {verb: prepare, config: {inputs: ["{stdlib}"], tokenizer: "${tokenizer.output}"}}
      pretrain:  {config: {data: {train: ["${data.output}"]}}}          # verb: the stage's name

Each stage runs in RUN_DIR/NAME (its `run_dir`, or its `output` for tokenizer / prepare / evaluate, is set by the
pipeline). `${NAME.output}` is what the stage made for the next one: a training stage's final/ model, the folder of
any other stage; `${NAME.dir}` its folder; `${run_dir}` the pipeline's. A stage records in NAME/stage.json its
fingerprint (verb, resolved config, and the runs of the stages it refers to), status, wall time and parents; a
re-run skips the stages that finished with the same fingerprint, resumes one that was interrupted (training stages
continue from their checkpoint), and starts afresh one whose config or inputs changed. `--from NAME` re-runs NAME
and every stage after it. A failure names the stage, keeps what earlier stages made and stops. RUN_DIR/pipeline.json
lists the stages and their status; `lmforge report RUN_DIR` turns the run into one HTML page.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import shutil
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_REF = re.compile(r"\$\{([A-Za-z0-9_-]+)(?:\.(output|dir))?\}")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
PLACED = ("run_dir", "output", "dst")
"""The config field that says where a verb writes (the first one its Config has); the pipeline sets it."""


@dataclass
class Stage:
    verb: str | None = None
    """The verb this stage runs (default: the stage's name)."""
    recipe: str | None = None
    """A YAML config of that verb to start from (as `--config`); `config` keys apply on top."""
    config: dict[str, Any] = field(default_factory=dict)
    """The verb's config keys (nested as in its YAML); strings may use ${NAME.output}, ${NAME.dir}, ${run_dir}."""


@dataclass
class Config:
    stages: dict[str, Stage]
    """The stages, in the order they run: NAME -> {verb, recipe, config}."""
    run_dir: str = "runs/pipeline"
    """The pipeline's folder: pipeline.json, pipeline.yaml, and one sub-folder per stage."""
    from_: str | None = None
    """Re-run this stage and every stage after it, even when they finished (`--from NAME`)."""

    def validate(self) -> None:
        from ..cli import VERBS

        if not self.stages:
            raise ValueError("stages: give at least one stage")
        for name, st in self.stages.items():
            if not _NAME.match(name):
                raise ValueError(f"stages: stage name {name!r} must be letters, digits, '_' or '-'")
            verb = st.verb or name
            if verb not in VERBS or verb in ("pipeline", "report", "chat"):
                raise ValueError(f"stages.{name}.verb: {verb!r} is not a verb a pipeline can run; one of "
                                 f"{', '.join(v for v in VERBS if v not in ('pipeline', 'report', 'chat'))}")
        if self.from_ is not None and self.from_ not in self.stages:
            raise ValueError(f"from: no stage {self.from_!r}; stages: {', '.join(self.stages)}")


# ---- references and configs


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


def stage_config(name: str, st: Stage, run: Path, done: dict[str, dict[str, Any]]) -> tuple[Any, Any, set[str]]:
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


def resolve(cfg: Config) -> list[Resolved]:
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
        output = _output(scfg, run / name)
        done[name] = {"output": output, "dir": str(run / name)}
        out.append(Resolved(name, verb, module, scfg, refs, output))
    return out


def _output(verb_cfg: Any, folder: Path) -> str:
    """What a stage hands on: a training stage's final/ model, the folder of any other."""
    return str(folder / "final") if hasattr(verb_cfg, "run_dir") else str(folder)


def fingerprint(verb: str, cfg: Any, parents: dict[str, str], run: Path) -> str:
    """sha256 of the verb, the resolved config and the run ids of the stages it refers to; paths inside the
    pipeline's folder count relative to it (a moved run folder keeps its finished stages)."""
    from ..config import to_dict

    text = json.dumps({"verb": verb, "config": to_dict(cfg), "parents": parents}, sort_keys=True, default=str)
    return hashlib.sha256(text.replace(str(run), "${run_dir}").encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from ..atomic import write_text

    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


# ---- the run


def main(cfg: Config) -> int:
    from ..version import __version__
    from ..config import config_hash, save_config, to_dict

    stages = resolve(cfg)  # config errors (exit 2) before anything runs or is written
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "pipeline.yaml")
    names = list(cfg.stages)
    rerun = set(names[names.index(cfg.from_):]) if cfg.from_ else set()
    done: dict[str, dict[str, Any]] = {}  # name -> {"output", "dir", "run_id"}
    summary: list[dict[str, Any]] = []
    t_all = time.perf_counter()

    def write_summary(status: str) -> None:
        _write_json(run / "pipeline.json", {"status": status, "run_dir": str(run), "lmforge": __version__,
                                            "seconds": round(time.perf_counter() - t_all, 1), "stages": summary})

    for i, st in enumerate(stages):
        name, verb, module, scfg, refs = st.name, st.verb, st.module, st.config, st.refs
        folder = run / name
        parents = {r: done[r]["run_id"] for r in sorted(refs)}
        fp = fingerprint(verb, scfg, parents, run)
        marker = folder / "stage.json"
        prev = _read_json(marker)
        same = prev is not None and prev.get("fingerprint") == fp and name not in rerun
        record = {"name": name, "verb": verb, "fingerprint": fp, "config_hash": config_hash(scfg),
                  "parents": {r: done[r]["output"] for r in sorted(refs)}, "output": st.output,
                  "dir": str(folder), "lmforge": __version__}
        if same and prev.get("status") == "done":
            print(f"pipeline: stage {i + 1}/{len(names)} {name!r} ({verb}) finished before with this config and "
                  f"inputs: skipped ({prev.get('seconds', 0):.0f} s then)", flush=True)
            done[name] = {"output": record["output"], "dir": str(folder), "run_id": prev["run_id"]}
            summary.append({**prev, **record, "status": "done", "run_id": prev["run_id"], "skipped": True})
            write_summary("running")
            continue
        resume = same and hasattr(scfg, "run_dir")  # an interrupted training stage continues from its checkpoint
        if folder.exists() and not resume:
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        record.update(status="running", run_id=uuid.uuid4().hex[:12], config=to_dict(scfg))
        _write_json(marker, record)
        print(f"pipeline: stage {i + 1}/{len(names)} {name!r} ({verb}){' resuming' if resume else ''} in {folder}",
              flush=True)
        t0 = time.perf_counter()
        error = None
        try:
            code = int(module.main(scfg) or 0)
        except KeyboardInterrupt:
            code = 130
        except Exception as e:  # the stage's own error: report it with the stage's name, keep earlier stages
            from ..cli import describe_error
            from ..errors import debug_requested

            code, error = describe_error(e)  # 2 for bad input, 1 for a runtime failure
            if debug_requested():
                traceback.print_exc()
        record["seconds"] = round(time.perf_counter() - t0, 1)
        if code != 0:
            record.update(status="interrupted" if code == 130 else "failed", exit_code=code, error=error)
            _write_json(marker, record)
            summary.append(record)
            write_summary(record["status"])
            what = "was interrupted (run again to resume)" if code == 130 else f"failed (exit {code})"
            print(f"pipeline: stage {i + 1}/{len(names)} {name!r} ({verb}) {what}"
                  f"{': ' + error if error else ''}; earlier stages are kept in {run}", file=sys.stderr)
            return code
        record["status"] = "done"
        _write_json(marker, record)
        done[name] = {"output": record["output"], "dir": str(folder), "run_id": record["run_id"]}
        summary.append(record)
        write_summary("running")
    write_summary("done")
    _print_end(cfg, run, summary, time.perf_counter() - t_all)
    return 0


def _print_end(cfg: Config, run: Path, summary: list[dict[str, Any]], seconds: float) -> None:
    """Where everything is, and the one command to chat with the last model."""
    print(f"\npipeline: {len(summary)} stages done in {seconds / 60:.1f} min; everything is in {run}")
    for r in summary:
        note = " (skipped: done before)" if r.get("skipped") else ""
        print(f"  {r['name']:<14} {r['verb']:<10} {r.get('seconds', 0):>7.1f} s  {r['output']}{note}")
    models = [r["output"] for r in summary if (Path(r["output"]) / "config.json").is_file()]  # model folders
    print(f"report: lmforge report {run}")
    if models:
        print(f"chat with the model: lmforge chat --model {models[-1]}")
