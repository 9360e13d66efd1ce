"""Where curation tasks run: `local` (worker processes on this machine, nothing to start) or `dask` (an existing
Dask distributed cluster at `address`, or a local one bound to 127.0.0.1). The same tasks, the same results in
the same order, whichever runs them; a task is a picklable `run.Task`, its function `run.run_task`."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Sequence

from ..progress import progress

__all__ = ["ExecutorConfig", "executor", "share_cpus", "start_worker"]


@dataclass
class ExecutorConfig:
    """How curation tasks run."""

    kind: Literal["local", "dask"] = "local"
    """local: worker processes on this machine; dask: a Dask distributed cluster (pip install lmforge[dask])."""
    workers: int = 2
    """Worker processes (local, or a local Dask cluster); 1 runs tasks in this process."""
    address: str | None = None
    """dask: the scheduler's address (tcp://host:8786); null starts a local cluster on 127.0.0.1 for the run."""

    def validate(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, found {self.workers}")
        if self.address is not None and self.kind != "dask":
            raise ValueError(f"address is for kind dask, found kind {self.kind}")


Map = Callable[[Callable[[Any], Any], Sequence[Any], str], list[Any]]


@contextmanager
def executor(cfg: ExecutorConfig) -> Iterator[Map]:
    """A `map(fn, tasks, description) -> results in task order` over the configured engine, with a progress bar;
    the pool or cluster lives as long as the context. Ctrl-C cancels what has not started."""
    if cfg.kind == "dask":
        with _dask(cfg) as m:
            yield m
    elif cfg.workers == 1:
        yield _serial
    else:
        # spawn: workers import what they need (torch, spaCy) themselves instead of inheriting a forked state
        threads = max(1, (os.cpu_count() or 1) // cfg.workers)
        with cf.ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"),
                                    initializer=start_worker, initargs=(threads,)) as pool:
            yield lambda fn, tasks, what: _gather([pool.submit(fn, t) for t in tasks], cf.as_completed, what,
                                                  lambda f: f.result())


def start_worker(threads: int) -> None:
    """A local worker's start: its share of the CPUs, and Ctrl-C left to the driver (which cancels the tasks not
    started and waits for the running ones), so a terminal's SIGINT to the whole group never breaks the pool."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    share_cpus(threads)


def share_cpus(threads: int) -> None:
    """A worker's share of the CPUs for the math libraries (torch, numpy's BLAS): workers x threads = cores, so a
    model-scoring step in every worker does not oversubscribe the machine."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def _serial(fn: Callable[[Any], Any], tasks: Sequence[Any], what: str) -> list[Any]:
    out = []
    with progress(len(tasks), what, "parts") as bar:
        for t in tasks:
            out.append(fn(t))
            bar.advance()
    return out


def _gather(futures: list[Any], as_completed: Callable, what: str, result: Callable[[Any], Any]) -> list[Any]:
    """Results in submission order, the bar advancing as tasks finish; on an error or Ctrl-C the rest is cancelled."""
    index = {id(f): i for i, f in enumerate(futures)}
    out: list[Any] = [None] * len(futures)
    try:
        with progress(len(futures), what, "parts") as bar:
            for f in as_completed(futures):
                out[index[id(f)]] = result(f)
                bar.advance()
    except BaseException:
        for f in futures:
            f.cancel()
        raise
    return out


@contextmanager
def _dask(cfg: ExecutorConfig) -> Iterator[Map]:
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise ImportError("executor kind dask needs Dask distributed: pip install 'lmforge[dask]'") from None
    if cfg.address is not None:
        client, cluster = Client(cfg.address), None
    else:  # loopback only: nothing of the run is reachable from the network
        cluster = LocalCluster(n_workers=cfg.workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None, silence_logs=40)
        client = Client(cluster)
    try:
        yield lambda fn, tasks, what: _gather(client.map(fn, list(tasks), pure=False), as_completed, what,
                                              lambda f: f.result())
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
