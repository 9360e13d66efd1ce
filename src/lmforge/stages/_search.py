"""The machinery of `lmforge tune`: a search space applied to a verb's config, Optuna studies on storage that
several workers share, the ledger that makes N workers together run exactly `trials` trials, and the trial
itself (a normal run of the verb, reported to the pruner from the engine's evaluation hook).

Optuna: Akiba et al. 2019, "Optuna: A Next-generation Hyperparameter Optimization Framework" (TPE sampling,
median pruning); Li et al. 2018, "Hyperband" (successive halving over brackets of budgets).

Workers and failures. A trial is RUNNING while its worker holds an exclusive lock on RUN_DIR/.locks/trial-N.lock
(taken before the worker records its host on the trial). Before each trial a worker fails the RUNNING trials of
its host whose lock it can take (their worker died: killed, crashed) and, while the study is short of `trials`,
enqueues the parameters of every failed trial not yet retried (killed, interrupted by Ctrl-C, or stopped by an
error) as a new trial that takes over the old run directory and resumes from its checkpoint. Across machines
(a database URL) Optuna's heartbeat fails the trials of dead workers. Trials whose loss diverged (NaN/Inf) count
as done: their parameters are a result.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

HOST, PID, RUN, RETRY, REASON = "lmforge_host", "lmforge_pid", "lmforge_run_dir", "lmforge_retry_of", "lmforge_reason"
"""User attributes lmforge keeps on a trial: its worker (host, pid), run directory, the trial it retries, and why it
failed (diverged | surplus | interrupted | error: ...; none: its worker died)."""
STALE_UNCLAIMED_S = 600.0
"""A RUNNING trial no worker has claimed (no host recorded) for this long was left by a worker that died at once."""
IMPORT_HINT = "pip install 'lmforge[tune]'"


def import_optuna():
    """optuna, quiet (lmforge prints its own table; Optuna's per-trial logs and warnings would repeat it)."""
    try:
        import optuna
    except ImportError:
        raise ImportError(f"lmforge tune needs Optuna: {IMPORT_HINT}") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna


class Surplus(Exception):
    """A trial asked for when the study already had its `trials` (workers racing); failed and never counted."""


# ---------------------------------------------------------------------------------------------------- the space

def suggest(trial, space: dict[str, Any]) -> dict[str, Any]:
    """Sample every dimension of `space` (dotted key -> SpaceParam) from `trial`: dotted key -> value."""
    out: dict[str, Any] = {}
    for key, p in space.items():
        if p.type == "categorical":
            out[key] = trial.suggest_categorical(key, list(p.choices))
        elif p.type == "int":
            out[key] = trial.suggest_int(key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            out[key] = trial.suggest_float(key, float(p.low), float(p.high), step=p.step, log=p.log)
    return out


def verb_config(stage, base: str, overrides: dict[str, Any], run_dir: str | Path, where: str = "in tune overrides"):
    """The verb's config: its YAML `base`, then the dotted `overrides` (the tune's and the sampled values), with
    `run_dir` set; loaded and validated exactly as `lmforge VERB --config BASE key=value ...` would."""
    from ..config import load_config

    return load_config(stage.Config, base, {**overrides, "run_dir": str(run_dir)}, where=where)


# ---------------------------------------------------------------------------------------------------- storage

def open_storage(spec: str, run_dir: Path):
    """A journal file (a path; several processes on one machine or a shared file system append to it under a
    lock) or a database (a URL such as postgresql://..., with Optuna's heartbeat so workers on other machines that
    die have their trials failed)."""
    optuna = import_optuna()
    if "://" in spec:
        try:
            with warnings.catch_warnings():  # the heartbeat is "experimental" since Optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(spec, heartbeat_interval=30, grace_period=120)
        except ImportError as e:
            raise ImportError(f"storage {spec.split('://')[0]}:// needs SQLAlchemy and the database's driver "
                              f"({e}); pip install sqlalchemy") from None
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = Path(spec) if spec else run_dir / "study.journal"
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def storage_name(spec: str, run_dir: Path) -> str:
    """Where the study lives, for messages and tune.json (a database URL without its password)."""
    if "://" not in spec:
        return str(Path(spec) if spec else run_dir / "study.journal")
    scheme, _, rest = spec.partition("://")
    creds, at, host = rest.rpartition("@")
    return f"{scheme}://{creds.split(':')[0]}:***@{host}" if at and ":" in creds else spec


# ---------------------------------------------------------------------------------------------------- the ledger

@dataclasses.dataclass
class Ledger:
    """The study as lmforge counts it: `counted` trials in number order (done, running, waiting, diverged); failed
    trials to retry; duplicate or surplus ones that count for nothing."""

    counted: list[Any]
    retry: list[Any]
    ignored: list[Any]

    def members(self, n: int) -> list[int]:
        """Numbers of the trials that make the study: the first `n` counted ones."""
        return [t.number for t in self.counted[:n]]

    def finished(self, n: int) -> bool:
        """Whether a worker may stop: `n` trials counted and none of them still waiting for a worker."""
        waiting = any(t.state.name == "WAITING" for t in self.counted[:n])
        return len(self.counted) >= n and not waiting


def ledger(trials: list[Any]) -> Ledger:
    """Sort `trials` (FrozenTrials) into the ledger. A failed trial counts only when its loss diverged; a failed
    trial not yet retried is to retry; a second retry of the same trial is a duplicate (two workers that enqueued
    it at once) and counts for nothing, like a surplus trial."""
    retried = {t.user_attrs[RETRY] for t in trials if RETRY in t.user_attrs and t.user_attrs.get(REASON) != "surplus"}
    counted, retry, ignored, seen = [], [], [], set()
    for t in sorted(trials, key=lambda t: t.number):
        reason = t.user_attrs.get(REASON)
        if reason == "surplus":
            ignored.append(t)
            continue
        if t.state.name == "FAIL" and reason != "diverged":
            (ignored if t.number in retried else retry).append(t)
            continue
        source = t.user_attrs.get(RETRY)
        if source is not None:
            if source in seen:
                ignored.append(t)
                continue
            seen.add(source)
        counted.append(t)
    return Ledger(counted, retry, ignored)


def lock_path(run_dir: Path, number: int) -> Path:
    return run_dir / ".locks" / f"trial-{number:04d}.lock"


def reap(study, run_dir: Path, n: int) -> Ledger:
    """Fail the RUNNING trials of dead workers on this host (their lock is free) or never claimed; then, while the
    study is short of `n`, enqueue the failed trials not yet retried. Returns the ledger after that."""
    optuna = import_optuna()
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        host = t.user_attrs.get(HOST)
        started = t.datetime_start.timestamp() if t.datetime_start else now
        dead = (host == socket.gethostname() and _lock_is_free(lock_path(run_dir, t.number))) or \
            (host is None and now - started > STALE_UNCLAIMED_S)
        if dead:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    book = ledger(study.get_trials(deepcopy=False))
    for t in book.retry[:max(0, n - len(book.counted))]:
        study.enqueue_trial(dict(t.params), user_attrs={RETRY: t.number})
    return ledger(study.get_trials(deepcopy=False)) if book.retry else book


def _lock_is_free(path: Path) -> bool:
    """Whether nobody holds `path`'s lock (a missing file: its worker never took it, so it is not alive either)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


class Claim:
    """This worker's lock on a trial, held while the trial runs (the OS drops it if the process dies)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        os.close(self.fd)
