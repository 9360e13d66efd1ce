"""`lmforge scale --config recipes/scale/….yaml`: a grid of small pretraining runs (model sizes × token budgets,
one normal resumable `pretrain` run each under RUN_DIR/runs/<size>-<tokens>/, its schedule ending at its own
budget), then the fit L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, approach 3: Huber loss in log space,
a grid of initialisations, bootstrap intervals), the compute-optimal frontier under C = 6·N·D, and a held-out
larger run predicted by the law, all in RUN_DIR/scale.json (plotted by `lmforge report RUN_DIR`). Finished runs
are read back, a half-finished one resumes: interrupt it and run the same command again. See docs/scaling.md.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass
class HoldoutSection:
    """A run outside the grid, bigger than every grid point, that the fitted law must predict."""

    size: dict[str, Any] = field(default_factory=dict)
    """Model overrides of the held-out run (as an entry of sizes; empty: the grid's largest size)."""
    tokens: float = 0.0
    """Its token budget (0: no held-out run)."""


@dataclass
class Config:
    base: str = ""
    """The pretrain YAML every grid run starts from (data, tokenizer, batch, optimizer, seed)."""
    run_dir: str = "runs/scale"
    """The grid's folder: runs/<size>-<tokens>/ (one pretrain run each), scale.json, config.yaml."""
    sizes: list[dict[str, Any]] = field(default_factory=list)
    """Model sizes: ModelConfig overrides over the base's model (e.g. {num_layers: 2, hidden_size: 64}), a
    `preset` key to change the preset, an optional `name` key for the folder."""
    tokens: list[float] = field(default_factory=list)
    """Token budgets D; each run takes steps = D / (micro_batch × grad_accum × seq_len), rounded."""
    holdout: HoldoutSection = field(default_factory=HoldoutSection)
    """The held-out run the law predicts (not fitted)."""
    params: Literal["non_embedding", "total"] = "non_embedding"
    """Which N the law uses: parameters without the token and position embeddings (Kaplan et al. 2020), or all."""
    warmup: float = 0.05
    """Warmup of each run as a fraction of its own steps (the schedule then decays to that run's end)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted pretrain keys set on every run (e.g. train.progress_bar: false)."""
    bootstrap: int = 200
    """Bootstrap refits for the confidence intervals (0: none)."""
    delta: float = 1e-3
    """Huber δ of the fit, on log-loss residuals (Hoffmann et al. use 1e-3)."""
    seed: int = 0
    """Seed of the bootstrap resampling (each run's seed comes from the base config)."""

    def validate(self) -> None:
        if not self.base:
            raise ValueError("base: expected a pretrain YAML (e.g. recipes/pretrain/tiny.yaml)")
        if not self.sizes or not self.tokens:
            raise ValueError(f"expected at least one size and one token budget; found {len(self.sizes)} sizes and "
                             f"{len(self.tokens)} budgets")
        if len(self.sizes) * len(self.tokens) < 5:
            raise ValueError(f"the law has 5 parameters: expected sizes × tokens >= 5 runs, found "
                             f"{len(self.sizes)} × {len(self.tokens)}")
        bad = [t for t in [*self.tokens, self.holdout.tokens] if not (t >= 0 and math.isfinite(t))] + \
            [t for t in self.tokens if t <= 0]
        if bad:
            raise ValueError(f"tokens: expected positive token budgets, found {bad[0]}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup: expected a fraction in [0, 1), found {self.warmup}")
        if self.bootstrap < 0 or self.delta <= 0:
            raise ValueError(f"expected bootstrap >= 0 and delta > 0, found {self.bootstrap} and {self.delta}")


@dataclass
class Point:
    """One run of the grid (or the held-out one): where it is, what it is, and its final validation loss."""

    name: str
    size: dict[str, Any]
    budget: float
    folder: Path
    steps: int = 0
    tokens: int = 0
    n_total: int = 0
    n_non_embedding: int = 0
    loss: float | None = None
    seconds: float = 0.0

    def n(self, which: str) -> int:
        return self.n_total if which == "total" else self.n_non_embedding

    def to_dict(self, which: str) -> dict[str, Any]:
        n = self.n(which)
        return {"name": self.name, "size": self.size, "steps": self.steps, "N": n, "N_total": self.n_total,
                "N_non_embedding": self.n_non_embedding, "D": self.tokens, "C": 6.0 * n * self.tokens,
                "loss": self.loss, "seconds": self.seconds, "folder": str(self.folder)}


def size_name(size: dict[str, Any]) -> str:
    """A folder name for a size: its `name`, else its overrides joined with short keys (L2-C64-H4-F192)."""
    if size.get("name"):
        return str(size["name"])
    short = {"num_layers": "L", "hidden_size": "C", "num_heads": "H", "num_kv_heads": "K", "intermediate_size": "F"}
    return "-".join(f"{short.get(k, k)}{v}" for k, v in size.items()) or "base"


def run_config(cfg: Config, size: dict[str, Any], budget: float, folder: Path):
    """The pretrain Config of one run: the base with this size's model, its steps from the budget, its warmup and
    schedule over its own steps, and cfg.overrides."""
    import dataclasses

    from ..config import ConfigError, load_config
    from ..models.transformer import ModelConfig
    from . import pretrain

    base = load_config(pretrain.Config, cfg.base, dict(cfg.overrides), where="in scale overrides")
    if base.train.schedule.name == "constant":
        raise ConfigError(f"{cfg.base}: train.schedule.name constant; expected a schedule that decays to each run's "
                          "end (cosine, linear, wsd): a scaling fit compares finished runs, not truncations")
    per_step = base.train.micro_batch * base.train.grad_accum * base.data.seq_len
    steps = max(1, round(budget / per_step))
    model = {k: v for k, v in size.items() if k not in ("name", "preset")}
    unknown = sorted(set(model) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:  # caught before any run trains
        raise ConfigError(f"sizes: {size_name(size)}: {unknown[0]!r} is not a model config field (ModelConfig)")
    keys: dict[str, Any] = {"run_dir": str(folder), "model.overrides": {**base.model.overrides, **model},
                            "train.steps": steps, "train.schedule.warmup_steps": int(cfg.warmup * steps)}
    if "preset" in size:
        keys["model.preset"] = size["preset"]
    return load_config(pretrain.Config, cfg.base, {**cfg.overrides, **keys}, where=f"in scale size {size_name(size)}")


def run_point(cfg: Config, p: Point) -> int:
    """Train `p` unless its eval.json says it finished; fill in its steps, tokens, parameter counts and loss."""
    from ..atomic import write_text
    from ..errors import InputError
    from ..plan.counts import count_parameters
    from ..plan.source import model_config
    from . import pretrain

    rc = run_config(cfg, p.size, p.budget, p.folder)
    p.steps = rc.train.steps
    p.tokens = rc.train.steps * rc.train.micro_batch * rc.train.grad_accum * rc.data.seq_len
    done = _read(p.folder / "eval.json")
    clock = p.folder / "seconds.json"  # training wall time, added up over interrupted and resumed attempts
    if not (done and done.get("step") == p.steps and (p.folder / "final" / "config.json").exists()):
        t0 = time.perf_counter()
        try:
            code = pretrain.main(rc)
        finally:
            spent = (_read(clock) or {}).get("seconds", 0.0) + time.perf_counter() - t0
            write_text(clock, json.dumps({"seconds": spent}) + "\n")
        if code:
            return code
        done = _read(p.folder / "eval.json") or {}
    p.seconds = float((_read(clock) or {}).get("seconds", 0.0))
    if not isinstance(done.get("val_loss"), (int, float)):
        raise InputError(f"{p.folder}/eval.json has no val_loss; expected the base's data to have a validation "
                         f"split (lmforge prepare validation_fraction > 0)")
    count = count_parameters(model_config(str(p.folder / "final")))
    p.n_total, p.n_non_embedding, p.loss = count.total, count.non_embedding, float(done["val_loss"])
    return 0


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def summarise(cfg: Config, grid: list[Point], holdout: Point | None) -> dict[str, Any]:
    """scale.json: the points, the fit (with both choices of N, so the choice can be checked), the frontier over
    the grid's compute range and beyond, and the held-out run's prediction."""
    from ..plan.fit import compute_optimal, fit_law, interval, predict

    out: dict[str, Any] = {"params": cfg.params, "points": [p.to_dict(cfg.params) for p in grid], "fits": {}}
    for which in ("non_embedding", "total"):
        fit = fit_law([p.n(which) for p in grid], [p.tokens for p in grid], [p.loss for p in grid], delta=cfg.delta,
                      bootstrap=cfg.bootstrap, seed=cfg.seed)
        entry: dict[str, Any] = {"fit": fit.to_dict()}
        if holdout is not None:
            pred = predict(fit, holdout.n(which), holdout.tokens)
            entry["holdout"] = {**holdout.to_dict(which), "predicted": pred,
                                "interval": list(interval(fit, holdout.n(which), holdout.tokens)),
                                "error_pct": 100.0 * (pred - holdout.loss) / holdout.loss}
        out["fits"][which] = entry
        if which == cfg.params:
            out.update(entry)
            c = [6.0 * p.n(which) * p.tokens for p in grid]
            lo, hi = math.log10(min(c)), math.log10(max(c)) + 2
            out["frontier"] = ([compute_optimal(fit, 10 ** (lo + (hi - lo) * i / 20)).to_dict() for i in range(21)]
                               if fit.alpha > 0 and fit.beta > 0 else [])
    return out


def main(cfg: Config) -> int:
    from ..atomic import write_text
    from ..config import save_config
    from ..plan.fit import require_scipy

    require_scipy()  # before hours of training, not after
    run = Path(cfg.run_dir)
    save_config(cfg, run / "config.yaml")

    def point(size: dict[str, Any], tokens: float, prefix: str = "") -> Point:
        name = f"{prefix}{size_name(size)}-{_tokens(tokens)}"
        return Point(name, size, tokens, run / "runs" / name)

    grid = [point(s, t) for s in cfg.sizes for t in cfg.tokens]
    holdout = point(cfg.holdout.size or cfg.sizes[-1], cfg.holdout.tokens, "holdout-") if cfg.holdout.tokens else None
    todo = grid + ([holdout] if holdout else [])
    for p in todo:  # every run's config is checked before the first one trains
        run_config(cfg, p.size, p.budget, p.folder)
    try:
        for i, p in enumerate(todo, 1):
            print(f"scale [{i}/{len(todo)}] {p.name}: D {p.budget:,.0f} tokens", flush=True)
            code = run_point(cfg, p)
            if code:
                print(f"scale: interrupted at {p.name} ({i}/{len(todo)}); run the same command to continue")
                return code
            print(f"scale [{i}/{len(todo)}] {p.name}: N {p.n(cfg.params):,} ({cfg.params}), D {p.tokens:,}, "
                  f"val_loss {p.loss:.4f}", flush=True)
    except KeyboardInterrupt:
        print("scale: interrupted; run the same command to continue")
        return 130
    if holdout and (holdout.n(cfg.params) < max(p.n(cfg.params) for p in grid)
                    or holdout.tokens < max(p.tokens for p in grid)):
        print("scale: warning: the held-out run is not at least as big in N and D as every grid point")
    out = summarise(cfg, grid, holdout)
    write_text(run / "scale.json", json.dumps(out, indent=1) + "\n")
    f, ci = out["fit"], out["fit"]["ci"]
    print(f"scale: L(N, D) = {f['E']:.3f} + {f['A']:.4g}/N^{f['alpha']:.3f} + {f['B']:.4g}/D^{f['beta']:.3f} "
          f"(N {cfg.params}; {len(grid)} runs, rms log error {f['rms_log_error']:.4f})"
          + (f"; 95% CI alpha [{ci['alpha'][0]:.3f}, {ci['alpha'][1]:.3f}], beta [{ci['beta'][0]:.3f}, "
             f"{ci['beta'][1]:.3f}]" if ci else ""))
    if "holdout" in out:
        h = out["holdout"]
        print(f"scale: held-out {h['name']}: predicted {h['predicted']:.4f}, measured {h['loss']:.4f} "
              f"({h['error_pct']:+.2f}%)")
    print(f"scale: {run / 'scale.json'}")
    return 0


def _tokens(t: float) -> str:
    """A token budget for a folder name: 250k, 1.5M."""
    for suffix, k in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if t >= k:
            return f"{t / k:g}{suffix}"
    return f"{t:g}"
