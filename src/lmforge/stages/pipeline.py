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

`bars:` states what each stage must achieve: a number from a JSON file a stage wrote (an eval.json, compress.json,
serve.json), compared with a constant or another stage's number, optionally by more than k standard errors
(stages/_bars.py). They are checked when the pipeline ends; the table of verdicts is printed, written to
pipeline.json and put at the top of the report.
"""

from __future__ import annotations

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

from ._bars import Bar, check_bars
from ._resolve import fingerprint, resolve

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


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
    bars: list[Bar] = field(default_factory=list)
    """What each stage must achieve, checked when the pipeline ends (see stages/_bars.py): each reads a number
    from a JSON file a stage wrote and compares it with a constant or another stage's number."""

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
        for i, bar in enumerate(self.bars):
            if bar.stage not in self.stages:
                raise ValueError(f"bars[{i}].stage: no stage {bar.stage!r}; stages: {', '.join(self.stages)}")
            bar.validate()


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

    def write_summary(status: str, bars: list[dict[str, Any]] | None = None) -> None:
        _write_json(run / "pipeline.json", {"status": status, "run_dir": str(run), "lmforge": __version__,
                                            "seconds": round(time.perf_counter() - t_all, 1), "stages": summary,
                                            **({"bars": bars} if bars is not None else {})})

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
    bars = check_bars(cfg.bars, run)
    write_summary("done", bars if cfg.bars else None)
    _print_end(cfg, run, summary, time.perf_counter() - t_all, bars)
    return 0


def _print_end(cfg: Config, run: Path, summary: list[dict[str, Any]], seconds: float,
               bars: list[dict[str, Any]]) -> None:
    """Where everything is, what each stage achieved against its bar, and the one command to chat with the last
    model."""
    print(f"\npipeline: {len(summary)} stages done in {seconds / 60:.1f} min; everything is in {run}")
    for r in summary:
        note = " (skipped: done before)" if r.get("skipped") else ""
        print(f"  {r['name']:<14} {r['verb']:<10} {r.get('seconds', 0):>7.1f} s  {r['output']}{note}")
    if bars:
        rows = [["stage", "bar", "measured", "needed", ""],
                *([b["stage"], b["what"], b["measured"], b["needed"], "✓" if b["pass"] else "✗"] for b in bars)]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        print(f"\nwhat each stage achieved ({sum(b['pass'] for b in bars)} of {len(bars)} bars met; pipeline.json, "
              "report.html):")
        for r in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
    models = [r["output"] for r in summary if (Path(r["output"]) / "config.json").is_file()]  # model folders
    try:
        from ..report import write_report

        print(f"report: {write_report(run)[0]} (again: lmforge report {run})")
    except ImportError as e:  # the plots need matplotlib (the `report` extra)
        print(f"report: lmforge report {run} ({e.name or e} is not installed: pip install 'lmforge[report]')")
    except (OSError, ValueError, KeyError) as e:
        print(f"report: not written ({type(e).__name__}: {e}); try lmforge report {run} --debug")
    if models:
        print(f"next: chat with the model: lmforge chat --model {models[-1]}")
