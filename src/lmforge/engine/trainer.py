"""`Trainer.fit()`: the one training loop. A stage brings an objective, a batch source and a config.

Each step: `grad_accum` micro batches (objective -> backward), global-norm clipping, a NaN/Inf guard, an
optimizer and scheduler step; then logging, evaluation, early stopping and checkpoints as configured. Resume
is exact: model, optimizer, scheduler, grad scaler, RNG states, data position and counters come back.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import resource
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from torch import Tensor, nn

from ..atomic import write_text
from . import checkpoint as ckpt
from . import distributed as D
from .metrics import MetricsSink
from .optim import OptimConfig, build_optimizer
from .zero import ZeroSharding
from .. import precision
from ..progress import progress
from .schedule import ScheduleConfig, build_scheduler

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """The engine's settings, shared by every training stage."""

    steps: int = 1000
    """Optimizer steps to run."""
    micro_batch: int = 8
    """Sequences per micro batch on each process."""
    grad_accum: int = 1
    """Micro batches accumulated per optimizer step (global batch = micro_batch x grad_accum x processes)."""
    clip_grad: float | None = 1.0
    """Clip the global gradient norm to this value (None = no clipping)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "bf16"
    """Autocast dtype for forward/backward (parameters stay fp32); fp16 uses a gradient scaler on CUDA. auto: the
    fastest of them on this device (`precision.resolve`: bf16 unless the hardware multiplies it slowly), decided
    when the config is made, so the run's config.yaml records the choice."""
    activation_checkpointing: bool = False
    """Recompute block activations in backward to save memory."""
    compile: bool = False
    """Compile each block with torch.compile."""
    parallel: D.ParallelConfig = field(default_factory=D.ParallelConfig)
    """Parallelism under torchrun: dp (ddp | zero1 | zero2 | fsdp) and tp; `parallel: fsdp` sets dp alone."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)."""
    seed: int = 0
    """Seed of model initialisation, data order and every random choice."""
    log_every: int = 10
    """Log training metrics every N steps."""
    eval_every: int = 0
    """Evaluate every N steps (0 = only at the end)."""
    eval_at_start: bool = False
    """Also evaluate before the first step (the baseline a fine-tune is measured against), logged at step 0."""
    eval_batches: int | None = 50
    """Validation sequences per evaluation, in micro batches (shared by the processes; None = the whole split)."""
    eval_tasks: list[str] = field(default_factory=list)
    """Benchmark tasks (as `lmforge evaluate --tasks`, e.g. stdlib-mc) run at every evaluation by the main process
    and logged as task/<task>/<metric>; not under FSDP (parameters are sharded)."""
    eval_tasks_limit: int | None = 50
    """Examples per benchmark task at each evaluation (None = all)."""
    save_every: int = 0
    """Write a checkpoint every N steps (0 = only at the end and on interruption)."""
    keep_last: int = 2
    """Checkpoints to keep (the best one is kept in addition)."""
    best_metric: str = "val_loss"
    """Metric that decides the best checkpoint and early stopping (lower is better)."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations without improvement of best_metric (0 = never)."""
    max_bad_steps: int = 5
    """Abort after this many consecutive steps with a NaN/Inf loss or gradient (each one is skipped)."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device for MFU (None = not reported)."""
    tensorboard: bool = True
    """Also write TensorBoard events."""
    progress_bar: bool = True
    """Show a progress bar on a terminal."""
    resume: bool = True
    """Continue from the newest checkpoint in the run directory when there is one."""
    optimizer: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and weight decay."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""

    def __post_init__(self) -> None:
        self.precision = precision.resolve(self.precision, self.device)

    def validate(self) -> None:
        for name in ("steps", "micro_batch", "grad_accum", "log_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, found {getattr(self, name)}")
        if self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (the newest checkpoint is what resume needs), found "
                             f"{self.keep_last}")
        for name in ("eval_every", "save_every", "early_stopping_patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, found {getattr(self, name)}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"clip_grad must be > 0 or null, found {self.clip_grad}")


EvaluationObserver = Callable[[int, dict[str, Any]], bool]
"""Called on the main process with (step, metrics) after each evaluation; True asks the run to stop there (saved
and resumable, as an early stop). `lmforge tune` prunes trials this way."""

_OBSERVERS: contextvars.ContextVar[tuple[EvaluationObserver, ...]] = contextvars.ContextVar(
    "lmforge_evaluation_observers", default=())


@contextlib.contextmanager
def observe_evaluations(observer: EvaluationObserver):
    """Within this block every `Trainer.fit` (whichever stage builds it) reports its evaluations to `observer`."""
    token = _OBSERVERS.set(_OBSERVERS.get() + (observer,))
    try:
        yield
    finally:
        _OBSERVERS.reset(token)


@dataclass
class EvalSet:
    """A named validation set: fresh batches on each call; `bytes_per_token` enables bits per byte."""

    name: str
    batches: Callable[[], Iterable[dict[str, Tensor]]]
    bytes_per_token: float | None = None


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with NaN/Inf loss or gradients."""


class Trainer:
    """Runs `objective` over `data` on `model`, logging and checkpointing into `run_dir`."""

    def __init__(self, model: nn.Module, objective: Callable, data: Any, cfg: TrainConfig, run_dir: str | Path,
                 eval_sets: list[EvalSet] | None = None, world: D.World | None = None,
                 evaluators: Sequence[Callable[[nn.Module], dict[str, float]]] = ()):
        self.model, self.objective, self.data, self.cfg = model, objective, data, cfg
        self.run_dir = Path(run_dir)
        self.eval_sets = eval_sets or []
        self.evaluators = list(evaluators)  # the evaluation hook: model -> metrics, e.g. stages.evaluate.task_evaluator
        self.world = world or D.init(cfg.device)  # honours cfg.device when the stage passes no world
        self.step, self.tokens = 0, 0
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_steps, self.evals_without_improvement = 0, 0
        self.history: list[dict[str, Any]] = []
        self._stop_signal: int | None = None

    # ---- setup
    def autocast(self):
        """The precision context of training (autocast to bf16 / fp16, or nothing for fp32)."""
        return precision.autocast(self.cfg.precision, self.world.device)

    def _setup(self) -> None:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.model.to(self.world.device)
        self.wrapped = D.wrap(self.model, cfg.parallel, self.world, cfg.activation_checkpointing, cfg.compile)
        self.sharded = D.sharded(cfg.parallel, self.world)  # no process holds the whole model
        self.zero = None
        if cfg.parallel.zero_stage in (1, 2) and self.world.distributed:
            if cfg.precision == "fp16" and self.world.device.type == "cuda":
                raise ValueError("train.parallel: zero1/zero2 with fp16 would let processes disagree on skipped "
                                 "steps; use bf16 (or ddp/fsdp)")
            self.zero = ZeroSharding(self.model, self.world, cfg.parallel.zero_stage)
        self.optimizer = build_optimizer(self.model, cfg.optimizer, self.zero.owned if self.zero else None)
        self.scheduler = build_scheduler(self.optimizer, cfg.steps, cfg.schedule)
        use_scaler = cfg.precision == "fp16" and self.world.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.sink = MetricsSink(self.run_dir, enabled=self.world.main, tensorboard=cfg.tensorboard)
        body = sum(p.numel() for n, p in self.model.named_parameters() if not n.startswith("embed."))
        tied = getattr(getattr(self.model, "cfg", None), "tie_embeddings", False)
        emb = self.model.embed.tokens.weight.numel() if tied and hasattr(self.model, "embed") else 0
        self.matmul_params = body + emb  # parameters that take part in matmuls (a tied embedding as output)

    # ---- checkpoints
    def _full_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, get_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        params = dict(self.model.named_parameters())
        trainable = {n: p for n, p in params.items() if p.requires_grad}
        if self.zero is not None:  # every process holds the whole model; the optimizer state is gathered
            return {n: p.detach().cpu() for n, p in trainable.items()}, self.zero.gather_optimizer_state(
                self.optimizer)
        if len(trainable) == len(params):
            return get_state_dict(self.model, self.optimizer, options=opts)
        # frozen weights (maybe quantized) come back from the parent model: save only the trainable ones
        osd = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        if self.sharded:
            msd = get_model_state_dict(self.model, options=opts)
            return {k: v for k, v in msd.items() if k in trainable}, osd
        return {n: p.detach().cpu() for n, p in trainable.items()}, osd

    def save(self) -> Path | None:
        """Checkpoint the full training state (every rank takes part; rank 0 writes)."""
        msd, osd = self._full_state()
        path = None
        if self.world.main:
            state = {"tokens": self.tokens, "scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict() if self.scaler else None, "data": self.data.state_dict(),
                     "rng": ckpt.rng_state(), "best": self.best, "best_step": self.best_step,
                     "bad_steps": self.bad_steps, "evals_without_improvement": self.evals_without_improvement,
                     "world": self.world.world}
            self.sink.sync()  # the rows up to this step last as long as the checkpoint
            path = ckpt.save_checkpoint(self.run_dir / "checkpoints", self.step, msd, osd, state)
            keep = {self.best_step} if self.best_step is not None else set()
            ckpt.prune(self.run_dir / "checkpoints", self.cfg.keep_last, keep)
        D.barrier(self.world)
        return path

    def _resume(self) -> None:
        """Continue from the newest readable checkpoint (an unreadable one is set aside, with a warning), or start
        afresh; either way metrics.jsonl keeps exactly the rows of the steps behind us."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_optimizer_state_dict,
                                                             set_state_dict)

        root = self.run_dir / "checkpoints"
        if self.world.main:
            ckpt.tidy(root)  # what a kill mid-write or mid-prune left behind
        D.barrier(self.world)
        found = self._newest_readable(root) if self.cfg.resume else None
        if found is None:
            self.sink.clear()
            return
        step, path, (msd, osd, st) = found
        frozen = {n for n, p in self.model.named_parameters() if not p.requires_grad}
        if (frozen and not self.sharded) or self.zero is not None:
            with torch.no_grad():
                params = dict(self.model.named_parameters())
                for k, v in msd.items():
                    params[k].copy_(v)
            if self.zero is not None:
                self.zero.load_optimizer_state(self.optimizer, osd)
            else:
                set_optimizer_state_dict(self.model, self.optimizer, osd,
                                         options=StateDictOptions(full_state_dict=True))
        else:
            set_state_dict(self.model, self.optimizer, model_state_dict=msd, optim_state_dict=osd,
                           options=StateDictOptions(full_state_dict=True, strict=not frozen))
        self.scheduler.load_state_dict(st["scheduler"])
        if self.scaler and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        self.data.load_state_dict(st["data"])
        ckpt.set_rng_state(st["rng"])
        self.step, self.tokens = step, st["tokens"]
        self.best, self.best_step = st["best"], st["best_step"]
        self.bad_steps, self.evals_without_improvement = st["bad_steps"], st["evals_without_improvement"]
        self.sink.truncate_after(step)
        log.info("resumed from %s (step %d)", path, step)

    def _newest_readable(self, root: Path) -> tuple[int, Path, tuple] | None:
        """(step, path, loaded state) of the newest checkpoint that reads back. The main process chooses: a
        truncated or garbled newer one is set aside as NAME.unreadable and the next older one tried."""
        chosen, loaded = None, None
        if self.world.main:
            for step, path in reversed(ckpt.list_checkpoints(root)):
                try:
                    chosen, loaded = (step, path), ckpt.load_checkpoint(path)
                    break
                except Exception as e:  # noqa: BLE001 - safetensors, JSON and OS errors: cannot resume from it
                    log.warning("checkpoint %s is unreadable (%s: %s); set aside as %s, trying the one before it",
                                path, type(e).__name__, str(e)[:200], ckpt.set_aside(path))
        chosen = D.broadcast_object(chosen, self.world)
        if chosen is None:
            return None
        return chosen[0], chosen[1], loaded if self.world.main else ckpt.load_checkpoint(chosen[1])

    # ---- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted means of the objective's metrics over each eval set (+ perplexity, bits per byte)."""
        out: dict[str, float] = {}
        self.wrapped.eval()
        for es in self.eval_sets:
            sums: dict[str, Tensor] = {}
            for batch in es.batches():
                batch = {k: v.to(self.world.device) for k, v in batch.items()}
                with self.autocast():
                    _, m = self.objective(self.wrapped, batch)
                n = m["tokens"].double().cpu() if isinstance(m["tokens"], Tensor) else torch.tensor(float(m["tokens"]))
                for k, v in m.items():
                    val = torch.as_tensor(v, dtype=torch.float64).cpu()
                    sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64)) + (val if k == "tokens" else val * n)
            keys = sorted(sums)
            vec = D.all_reduce_sum(torch.stack([sums[k] for k in keys]), self.world, self.world.dp_group)
            total = dict(zip(keys, vec.tolist()))
            prefix = "val_" if es.name == "validation" else f"val_{es.name}_"
            count = max(total["tokens"], 1.0)
            for k in keys:
                if k != "tokens":
                    out[prefix + k] = total[k] / count
            out[prefix + "tokens"] = total["tokens"]
            if getattr(self.objective, "per_token_nll", False):
                out[prefix + "ppl"] = math.exp(min(out[prefix + "loss"], 50.0))
                if es.bytes_per_token:
                    out[prefix + "bpb"] = out[prefix + "loss"] / math.log(2) / es.bytes_per_token
        out.update(self._run_evaluators())
        self.wrapped.train()
        return out

    def _run_evaluators(self) -> dict[str, float]:
        """The evaluation hook: each evaluator gets the plain model on the main process; every process receives
        the results, so decisions that depend on them (best checkpoint, early stop) agree."""
        if not self.evaluators:
            return {}
        if self.sharded:
            log.warning("evaluators skipped: under FSDP or tensor parallelism no process holds the whole model")
            return {}
        out: dict[str, float] = {}
        if self.world.main:
            model = D.unwrap(self.wrapped)
            for evaluator in self.evaluators:
                out.update(evaluator(model))
        return D.broadcast_object(out, self.world)

    # ---- the loop
    def fit(self) -> dict[str, Any]:
        """Train to `cfg.steps` (or an early stop / interruption); returns the last metrics."""
        cfg = self.cfg
        self._setup()
        self._resume()
        handlers = self._install_signals()
        last: dict[str, Any] = {}
        if cfg.eval_at_start and self.step == 0 and (self.eval_sets or self.evaluators):
            last = self.sink.log(0, self.evaluate())
            self.history.append(last)
        self.wrapped.train()
        t_last, tok_last, resumed_at = time.perf_counter(), self.tokens, self.step
        try:
            with progress(cfg.steps, "train", "steps", enabled=cfg.progress_bar and self.world.main,
                          completed=self.step) as bar:
                while self.step < cfg.steps:
                    metrics = self._train_step()
                    self.step += 1
                    row: dict[str, Any] = {}
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps or "skipped_nonfinite" in metrics:
                        now = time.perf_counter()
                        row = self._log_row(metrics, (self.tokens - tok_last) / max(now - t_last, 1e-9))
                        t_last, tok_last = now, self.tokens
                    stop = False
                    if (self.eval_sets or self.evaluators) and ((cfg.eval_every and self.step % cfg.eval_every == 0)
                                           or self.step == cfg.steps):
                        row.update(self.evaluate())
                        stop = self._track_best(row)
                        stop = self._observers_stop(row) or stop
                    if row:
                        last = self.sink.log(self.step, row)
                        self.history.append(last)
                    bar.advance(1, loss=float(metrics["loss"]))
                    interrupted = self._agreed_stop()
                    if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.steps or stop \
                            or interrupted:
                        self.save()
                    if stop or interrupted:
                        break
        finally:
            self._restore_signals(handlers)
            self.sink.close()
        if resumed_at >= cfg.steps and resumed_at > 0:  # a finished run re-run, or killed after its last checkpoint
            last = self._logged_row(resumed_at)
        if self._stop_signal is not None:
            raise KeyboardInterrupt(f"stopped by signal {self._stop_signal} at step {self.step}; checkpoint saved, "
                                    "re-run the same command to resume")
        return last

    def _logged_row(self, step: int) -> dict[str, Any]:
        """What the run that reached `step` logged there (read by the main process, sent to every process)."""
        return D.broadcast_object(self.sink.row(step) if self.world.main else {}, self.world)

    def _train_step(self) -> dict[str, Any]:
        cfg = self.cfg
        sums: dict[str, Tensor] = {}  # kept on the device: one host sync per step, not one per metric
        tokens = torch.zeros((), dtype=torch.float64)
        for micro in range(cfg.grad_accum):
            batch = {k: v.to(self.world.device, non_blocking=True) for k, v in self.data.next_batch().items()}
            sync = micro == cfg.grad_accum - 1 or not isinstance(self.wrapped, nn.parallel.DistributedDataParallel)
            with contextlib.nullcontext() if sync else self.wrapped.no_sync():
                with self.autocast():
                    loss, m = self.objective(self.wrapped, batch)
                scaled = loss / cfg.grad_accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            for k, v in m.items():
                if k != "tokens":
                    sums[k] = sums.get(k, 0.0) + torch.as_tensor(v).detach().double() / cfg.grad_accum
            tokens = tokens + torch.as_tensor(m.get("tokens", batch["input_ids"].numel())).double()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = cfg.clip_grad if cfg.clip_grad is not None else float("inf")
        if self.zero is not None:
            self.zero.finish_gradients()
            gnorm = self.zero.clip_grad_norm(clip)
        else:
            gnorm = D.clip_grad_norm(self.model.parameters(), clip)
        keys = sorted(sums)
        vec = torch.stack([sums[k].cpu() for k in keys] + [tokens.cpu()])
        vec = D.all_reduce_sum(vec, self.world, self.world.dp_group)  # tensor-parallel ranks share their batch
        metrics = {k: vec[i].item() / self.world.data_world for i, k in enumerate(keys)}
        self.tokens += int(vec[-1].item())
        metrics["grad_norm"] = float(gnorm)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        finite_loss = math.isfinite(metrics["loss"])
        if self.scaler and finite_loss:  # inf gradients under fp16 are the scaler's business: it skips and backs off
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.bad_steps = 0
        elif not (finite_loss and math.isfinite(metrics["grad_norm"])):
            self.bad_steps += 1
            metrics["skipped_nonfinite"] = 1
            log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", self.step + 1,
                        self.bad_steps)
            if self.bad_steps >= cfg.max_bad_steps:
                self.sink.log(self.step + 1, metrics)
                raise NonFiniteLossError(
                    f"{self.bad_steps} consecutive steps had NaN/Inf loss or gradients (last at step "
                    f"{self.step + 1}); lower the learning rate, use bf16 instead of fp16, or check the data")
            if self.scaler:
                self.scaler.update()
        else:
            self.bad_steps = 0
            self.optimizer.step()
            if self.zero is not None:
                self.zero.broadcast_parameters()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return metrics

    def _log_row(self, metrics: dict[str, Any], tokens_per_s: float) -> dict[str, Any]:
        row = dict(metrics, tokens=self.tokens, tokens_per_s=tokens_per_s, epoch=getattr(self.data, "epoch", None))
        seq = getattr(self.data, "seq_len", 0)
        cfgm = getattr(self.model, "cfg", None)
        if self.cfg.peak_flops and cfgm is not None:
            attn = 12 * cfgm.num_layers * cfgm.hidden_size * seq  # attention scores and values, per token
            flops = (6 * self.matmul_params + attn) * tokens_per_s / self.world.world
            row["mfu"] = flops / self.cfg.peak_flops
        if self.world.device.type == "cuda":
            row["mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        else:
            row["rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        return {k: v for k, v in row.items() if v is not None}

    def _track_best(self, row: dict[str, Any]) -> bool:
        """Update the best metric; True when early stopping says stop."""
        value = row.get(self.cfg.best_metric)
        if value is None:
            return False
        if self.best is None or value < self.best:
            self.best, self.best_step, self.evals_without_improvement = value, self.step, 0
            return False
        self.evals_without_improvement += 1
        patience = self.cfg.early_stopping_patience
        if patience and self.evals_without_improvement >= patience:
            log.info("early stop at step %d: %s did not improve for %d evaluations (best %.4f at step %d)",
                     self.step, self.cfg.best_metric, patience, self.best, self.best_step)
            return True
        return False

    def _observers_stop(self, row: dict[str, Any]) -> bool:
        """Report an evaluation to the active observers (main process); every process gets their verdict."""
        observers = _OBSERVERS.get()
        if not observers:
            return False
        stop = False
        if self.world.main:
            for observer in observers:
                stop = bool(observer(self.step, dict(row))) or stop
        return bool(D.broadcast_object(stop, self.world))

    # ---- interruption
    def _install_signals(self):
        def handler(signum, frame):
            self._stop_signal = signum

        try:
            return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread
            return {}

    def _restore_signals(self, handlers) -> None:
        for s, h in handlers.items():
            signal.signal(s, h)

    def _agreed_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_signal is not None else 0.0])
        return bool(D.all_reduce_sum(flag, self.world).item() > 0)

    def export_state_dict(self) -> dict[str, Tensor]:
        """The full model weights (gathered from every rank under FSDP)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def write_json(self, name: str, obj: Any) -> None:
        """Write RUN_DIR/NAME atomically from the main process (e.g. eval.json)."""
        if self.world.main:
            write_text(self.run_dir / name, json.dumps(obj, indent=2) + "\n")
