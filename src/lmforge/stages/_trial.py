"""One trial of `lmforge tune`: the verb's normal run in RUN_DIR/trial-NNNN with the sampled values, its
evaluations reported to Optuna's pruner through the engine's hook (`observe_evaluations`), its result read from
the run's own record; and the study's summary (tune.json and the printed table). Akiba et al. 2019 (Optuna)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from ._search import HOST, PID, REASON, RETRY, RUN, Claim, Ledger, Surplus, import_optuna, ledger, lock_path, \
    suggest, verb_config

@dataclasses.dataclass
class TrialPlan:
    """What every trial of one study shares."""

    stage: Any
    """The verb's module (Config, main)."""
    base: str
    """The verb's YAML config."""
    overrides: dict[str, Any]
    """Dotted keys set over the base in every trial."""
    space: dict[str, Any]
    """Dotted key -> SpaceParam."""
    metric: str
    """The evaluation metric reported and optimised."""
    run_dir: Path
    """The study's folder; trial N runs in RUN_DIR/trial-NNNN."""
    n: int
    """Trials the study runs, all workers together."""
    report: Callable[[str], None] = print
    """Where one line per trial goes."""
    sampler: Callable[[int], Any] | None = None
    """Trial number -> the sampler that draws its values (seeded by the number: one worker's study is
    reproducible, and workers that start together do not draw the same values)."""


def trial_dir(run_dir: Path, number: int) -> Path:
    return run_dir / f"trial-{number:04d}"


def objective(plan: TrialPlan) -> Callable[[Any], float]:
    """Optuna's objective: claim the trial, check it is one of the study's `n`, run the verb in RUN_DIR/trial-N
    with the sampled values while the engine's evaluation hook reports `metric` to the pruner, and return the
    final value. Raises optuna.TrialPruned for a pruned trial and KeyboardInterrupt when Ctrl-C stopped it."""
    optuna = import_optuna()
    from ..engine.trainer import NonFiniteLossError, observe_evaluations

    def run(trial) -> float:
        claim = Claim(lock_path(plan.run_dir, trial.number))
        try:
            trial.set_user_attr(HOST, socket.gethostname())
            trial.set_user_attr(PID, os.getpid())
            if trial.number not in ledger(trial.study.get_trials(deepcopy=False)).members(plan.n):
                trial.set_user_attr(REASON, "surplus")
                raise Surplus(f"trial {trial.number}: the study already has its {plan.n} trials")
            out = trial_dir(plan.run_dir, trial.number)
            trial.set_user_attr(RUN, str(out))
            if plan.sampler is not None:
                trial.study.sampler = plan.sampler(trial.number)
            values = suggest(trial, plan.space)
            t0 = time.perf_counter()
            try:
                cfg = verb_config(plan.stage, plan.base, {**plan.overrides, **values}, out,
                                  where=f"in trial {trial.number}'s sampled values")
                seen: dict[str, Any] = {"reported": _take_over(trial, out)}
                end = getattr(getattr(cfg, "train", None), "steps", None)
                with observe_evaluations(_observer(trial, plan.metric, seen, end)):
                    code = plan.stage.main(cfg)
            except KeyboardInterrupt:
                code = 130
            except NonFiniteLossError as e:
                trial.set_user_attr(REASON, "diverged")
                plan.report(f"trial {trial.number}: diverged ({_short(values)}): {e}")
                raise
            except Exception as e:
                trial.set_user_attr(REASON, f"error: {type(e).__name__}: {e}"[:500])
                raise
            if code == 130:
                trial.set_user_attr(REASON, "interrupted")
                raise KeyboardInterrupt(f"trial {trial.number} interrupted; checkpoint saved in {out}")
            if code:
                trial.set_user_attr(REASON, f"error: exit status {code}")
                raise RuntimeError(f"trial {trial.number}: {plan.stage.__name__} exited with status {code}")
            secs = time.perf_counter() - t0
            if seen.get("pruned"):
                plan.report(f"trial {trial.number}: pruned at step {seen['step']} ({_short(values)}): "
                            f"{plan.metric} {seen['value']:.4g}  [{secs:.1f}s]")
                raise optuna.TrialPruned(f"{plan.metric} {seen['value']:.4g} at step {seen['step']}")
            value = final_value(out, plan.metric, seen)
            plan.report(f"trial {trial.number}: {plan.metric} {value:.4g} ({_short(values)})  [{secs:.1f}s]")
            return value
        finally:
            claim.release()

    return run


def _observer(trial, metric: str, seen: dict[str, Any], end: int | None) -> Callable[[int, dict[str, Any]], bool]:
    """The engine's evaluation hook: report `metric` at each evaluation (once per step: a resumed run evaluates
    again the steps after its checkpoint); True (stop the run there) when Optuna prunes the trial. The evaluation
    at the last step (`end`) is the trial's result, never a reason to prune: nothing is left to save."""
    from ..config import ConfigError

    reported: set[int] = seen.setdefault("reported", set())

    def observe(step: int, row: dict[str, Any]) -> bool:
        if metric not in row:
            found = ", ".join(sorted(k for k in row if k.startswith(("val_", "task/")))) or "none"
            raise ConfigError(f"metric: the evaluation at step {step} has no '{metric}'; expected one of its "
                              f"metrics: {found}")
        value = float(row[metric])
        seen.update(step=step, value=value)
        if math.isfinite(value) and step not in reported:
            trial.report(value, step)
            reported.add(step)
        if (end is None or step < end) and trial.should_prune():
            seen["pruned"] = True
            return True
        return False

    return observe


def _take_over(trial, out: Path) -> set[int]:
    """A retried trial continues the run of the trial it retries: that run directory becomes this trial's (the
    engine resumes from its newest checkpoint) and its reported values are this trial's history. A fresh trial
    needs a fresh folder: one that exists was left by another study in the same run_dir."""
    from ..config import ConfigError
    from ..engine.checkpoint import list_checkpoints

    source = trial.user_attrs.get(RETRY)
    old = trial_dir(out.parent, source) if source is not None else None
    if old is not None and old.exists() and not out.exists():
        os.replace(old, out)
        done = max((s for s, _ in list_checkpoints(out / "checkpoints")), default=0)
        previous = trial.study.get_trials(deepcopy=False)
        values = next((t.intermediate_values for t in previous if t.number == source), {})
        kept = {step: value for step, value in values.items() if step <= done}
        for step, value in sorted(kept.items()):
            trial.report(value, step)
        return set(kept)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists but the study has no record of it (another study used this run_dir?); "
                          f"expected no folder there: remove it or choose another run_dir")
    return set()


def final_value(out: Path, metric: str, seen: dict[str, Any]) -> float:
    """The trial's result: `metric` in its eval.json (the run's own record of its end), else the last evaluation
    the hook saw, else the last row of metrics.jsonl that has it."""
    path = out / "eval.json"
    if path.exists():
        record = json.loads(path.read_text())
        if isinstance(record.get(metric), (int, float)):
            return float(record[metric])
    if "value" in seen:
        return float(seen["value"])
    from ..engine.metrics import read_metrics

    rows = [r for r in read_metrics(out) if metric in r] if (out / "metrics.jsonl").exists() else []
    if not rows:
        from ..config import ConfigError

        raise ConfigError(f"metric: the run {out} logged no '{metric}'; expected a metric its evaluations log "
                          f"(val_loss, val_bpb, ...) and train.eval_every or the final evaluation enabled")
    return float(rows[-1][metric])


def _short(values: dict[str, Any]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                     for k, v in values.items())


# ---------------------------------------------------------------------------------------------------- the end

def summary(study, book: Ledger, n: int, metric: str, direction: str) -> dict[str, Any]:
    """tune.json: the study's trials (number, state, value, params, run dir, last reported step, why it failed,
    what it retried), the best complete trial, counts by state, and the trials that count for nothing."""
    def row(t) -> dict[str, Any]:
        return {"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": dict(t.params),
                "run_dir": t.user_attrs.get(RUN), "last_step": max(t.intermediate_values, default=None),
                "reason": t.user_attrs.get(REASON), "retry_of": t.user_attrs.get(RETRY),
                "seconds": round(t.duration.total_seconds(), 2) if t.duration else None}

    members = book.counted[:n]
    done = [t for t in members if t.state.name == "COMPLETE" and t.value is not None]
    best = (min if direction == "minimize" else max)(done, key=lambda t: t.value) if done else None
    states = [t.state.name.lower() for t in members]
    return {"study": study.study_name, "metric": metric, "direction": direction, "trials_wanted": n,
            "counts": {s: states.count(s) for s in ("complete", "pruned", "fail", "running", "waiting")},
            "trials": [row(t) for t in members], "best": row(best) if best else None,
            "retried": [row(t) for t in book.retry] + [row(t) for t in book.ignored
                                                         if t.user_attrs.get(REASON) != "surplus"],
            "surplus": [t.number for t in book.ignored if t.user_attrs.get(REASON) == "surplus"]}


def table(record: dict[str, Any]) -> Iterator[str]:
    """The study as a short text table, best trial marked."""
    keys = sorted({k for t in record["trials"] for k in t["params"]})
    best = (record.get("best") or {}).get("number")
    head = ["trial", "state", record["metric"], "step", *[k.rsplit(".", 1)[-1] for k in keys]]
    rows = [[f"{t['number']}{' *' if t['number'] == best else ''}", t["state"],
             f"{t['value']:.4f}" if t["value"] is not None else "-", str(t["last_step"] or "-"),
             *[_fmt(t["params"].get(k)) for k in keys]] for t in record["trials"]]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        yield "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
