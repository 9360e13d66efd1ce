"""The run report: one self-contained HTML page (plots as embedded PNG data, no scripts, no fonts or files from
elsewhere) and a compact text summary, from what run directories already hold.

A run is a pipeline folder (pipeline.json: its stages in order, each in a sub-folder) or one stage's run
directory. Per stage the page shows: curves from metrics.jsonl (training and validation loss, learning rate,
gradient norm, tokens/s, and the other logged validation and rollout metrics), the evaluation table (eval.json:
before -> after for training stages; task, metric, value and uncertainty for `evaluate`), the lineage (parents,
config hash, data fingerprints, lmforge version, from stage.json / lmforge.json) and the resolved config. Several
`evaluate` stages are also put side by side in one table (before vs after across the pipeline). A curation stage
(curate.json) shows its funnel (documents kept and removed per step, with the reasons) and the first removed
documents of each reason. Compress stages (quantize, prune, distill, export: compress.json) are put on one size /
quality plot — size on disk against held-out bits per byte, each point labelled with its decode tokens/s — with
their before -> after table. A scale run (scale.json) shows its points, the fitted law's curves, the held-out run
and the compute-optimal frontier, with the law's bootstrap intervals.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["StageRun", "read_run", "render_html", "text_summary", "write_report", "funnel_rows",
           "compress_rows", "scale_rows", "bar_rows"]

CURVES = (("loss", ("loss", "val_loss")), ("learning rate", ("lr",)), ("gradient norm", ("grad_norm",)),
          ("tokens / s", ("tokens_per_s",)))
"""The standard panels: title -> metrics.jsonl keys plotted in it."""


@dataclass
class StageRun:
    """What one stage's folder holds."""

    name: str
    verb: str
    folder: Path
    status: str = "done"
    seconds: float | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, Any] | None = None
    lineage: dict[str, Any] = field(default_factory=dict)
    config: str = ""
    curate: dict[str, Any] | None = None
    """curate.json of a curation stage: the funnel."""
    removed: dict[str, list[str]] = field(default_factory=dict)
    """A curation stage's first removed documents per `step: reason` (excerpts)."""
    compress: dict[str, Any] | None = None
    """compress.json of a compress stage (quantize, prune, distill, export): before, after."""
    scale: dict[str, Any] | None = None
    """scale.json of a `scale` run: the grid's points, the fitted law, the frontier, the held-out run."""


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _stage(name: str, verb: str, folder: Path, info: dict[str, Any]) -> StageRun:
    import yaml

    from .engine.metrics import read_metrics

    metrics = read_metrics(folder) if (folder / "metrics.jsonl").exists() else []
    lineage = {**(_json(folder / "lmforge.json") or {})}
    lineage.pop("config", None)
    for k in ("parents", "config_hash", "fingerprint", "lmforge", "output"):
        if k in info and k not in lineage:
            lineage[k] = info[k]
    config = ""
    if (folder / "config.yaml").exists():
        config = (folder / "config.yaml").read_text(encoding="utf-8")
    elif info.get("config") is not None:
        config = yaml.safe_dump(info["config"], sort_keys=False)
    curated = _json(folder / "curate.json")
    return StageRun(name, verb, folder, info.get("status", "done"), info.get("seconds"), metrics,
                    _json(folder / "eval.json"), lineage, config, curated,
                    _removed_examples(folder / "removed") if curated else {}, _compress_json(folder),
                    _json(folder / "scale.json"))


def _compress_json(folder: Path) -> dict[str, Any] | None:
    """The compress.json a stage wrote: in its folder, its final/ model (distill) or beside a file (x.compress.json)."""
    for path in (folder / "compress.json", folder / "final" / "compress.json", *sorted(folder.glob("*.compress.json"))):
        found = _json(path)
        if isinstance(found, dict) and "before" in found and "after" in found:
            return found
    return None


def _removed_examples(folder: Path, per_reason: int = 2, chars: int = 300) -> dict[str, list[str]]:
    """The first `per_reason` removed documents of each `step: reason` (read lazily, in file order)."""
    import gzip

    out: dict[str, list[str]] = {}
    for path in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            for line in f:
                r = json.loads(line)
                shown = out.setdefault(f"{r['step']}: {r['reason']}", [])
                if len(shown) < per_reason:
                    text = " ".join(str(r.get("text", "")).split())
                    shown.append(f"{r.get('key', '')}: {text[:chars]}{'…' if len(text) > chars else ''}")
    return out


def funnel_rows(stage: StageRun) -> list[list[str]]:
    """(step, documents in, kept, removed, top reasons, seconds) of a curation stage."""
    rows = []
    for st in (stage.curate or {}).get("steps", []):
        removed = st.get("removed", {})
        top = ", ".join(f"{k} {v:,}" for k, v in sorted(removed.items(), key=lambda kv: -kv[1])[:4])
        extra = ", ".join(f"{k} {v:,}" for k, v in st.get("extra", {}).items())
        rows.append([st["step"], f"{st['docs_in']:,}", f"{st['kept']:,}", f"{sum(removed.values()):,}",
                     "; ".join(x for x in (top, extra) if x), f"{st.get('seconds', 0):.1f}"])
    return rows


def read_run(run_dir: str | Path) -> list[StageRun]:
    """The stages of a pipeline folder in order, or a single run directory as one stage."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run directory")
    pipe = _json(run / "pipeline.json")
    if pipe is not None:
        return [_stage(s["name"], s["verb"], run / s["name"], {**(_json(run / s["name"] / "stage.json") or {}), **s})
                for s in pipe["stages"]]
    info = _json(run / "lmforge.json") or {}
    if (run / "curate.json").exists():
        return [_stage(run.name, "curate", run, info)]
    if (run / "scale.json").exists():
        return [_stage(run.name, "scale", run, info)]
    found = _compress_json(run)
    if found is not None and not (run / "metrics.jsonl").exists():
        return [_stage(run.name, str(found.get("command", "compress")), run, info)]
    if not (run / "metrics.jsonl").exists() and not (run / "eval.json").exists():
        raise FileNotFoundError(f"{run}: neither a pipeline (pipeline.json) nor a run directory (metrics.jsonl, "
                                "eval.json) nor a curation output (curate.json) nor a compress output "
                                "(compress.json) nor a scale run (scale.json)")
    return [_stage(run.name, info.get("stage", "run"), run, info)]


# ---- numbers


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r
           and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _skipped(key: str) -> bool:
    """Keys without a panel or a table row of their own: val_loss has the loss panel; token counts and
    perplexities (exp of a loss already shown) repeat what is there."""
    return key == "val_loss" or key.endswith(("_tokens", "_ppl"))


def _extra_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Logged validation, task and rollout metrics beyond the standard panels (at most 8, one panel each)."""
    keys: list[str] = []
    for r in rows:
        for k, v in r.items():
            if (k.startswith(("val_", "task/", "rollout/")) and not _skipped(k) and k not in keys
                    and isinstance(v, (int, float)) and not k.endswith(("_s", "/round"))):
                keys.append(k)
    return keys[:8]


def eval_rows(stage: StageRun) -> list[tuple[str, str, str]]:
    """(metric, before, after) rows of a training stage's eval.json, or (task · metric, value, uncertainty) of an
    `evaluate` stage's."""
    ev = stage.eval or {}
    if "tasks" in ev:
        from .eval.runners import headline_metrics, uncertainty

        out = []
        for task, r in ev["tasks"].items():
            for metric, value in headline_metrics(r).items():
                try:
                    unc = uncertainty(r, metric)
                except (KeyError, TypeError):
                    unc = ""
                out.append((f"{task} · {metric}", _fmt(value), unc))
        return out
    before = ev.get("before", {})
    return [(k, _fmt(before.get(k)), _fmt(v)) for k, v in ev.items()
            if k.startswith("val_") and isinstance(v, (int, float)) and not k.endswith("_tokens")]


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _evaluations(stages: list[StageRun]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The evaluate stages side by side: (stage names, [(task · metric, values per stage)])."""
    evals = [s for s in stages if s.eval and "tasks" in s.eval]
    if len(evals) < 2:
        return [], []
    table: dict[str, list[str]] = {}
    for i, s in enumerate(evals):
        for metric, value, _ in eval_rows(s):
            table.setdefault(metric, ["–"] * len(evals))[i] = value
    return [s.name for s in evals], list(table.items())


# ---- plots


def _figure_png(stage: StageRun) -> str | None:
    """The stage's curves as one PNG (base64), or None when it logged no metrics."""
    rows = stage.metrics
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(title, keys) for title, keys in CURVES if any(_series(rows, k)[0] for k in keys)]
    panels += [(k, (k,)) for k in _extra_keys(rows)]
    if not panels:
        return None
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 2.6 * nrows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for k in keys:
            x, y = _series(rows, k)
            if x:
                ax.plot(x, y, marker="o" if len(x) < 12 else None, markersize=3, linewidth=1.4, label=k)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{stage.name} ({stage.verb})", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _funnel_png(stage: StageRun) -> str | None:
    """A curation stage's funnel: documents entering each step, the part it removed stacked on what it kept."""
    steps = (stage.curate or {}).get("steps", [])
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [st["step"] for st in steps][::-1]
    kept = [st["kept"] for st in steps][::-1]
    removed = [st["docs_in"] - st["kept"] for st in steps][::-1]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(steps) + 1.2))
    ax.barh(names, kept, color="#3a7d44", label="kept")
    ax.barh(names, removed, left=kept, color="#c0392b", label="removed")
    for y, (k, r) in enumerate(zip(kept, removed)):
        ax.text(k + r, y, f"  {k:,} kept, {r:,} removed", va="center", fontsize=7)
    ax.set_xlabel("documents", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"{stage.name}: curation funnel", fontsize=10)
    ax.margins(x=0.35)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _quality(side: dict[str, Any]) -> float | None:
    """Held-out bits per byte of one side of compress.json (the first task reporting it)."""
    for v in side.values():
        if isinstance(v, dict) and isinstance(v.get("bits_per_byte"), (int, float)):
            return float(v["bits_per_byte"])
    return None


def _task_metric(side: dict[str, Any]) -> str:
    for task, v in side.items():
        if isinstance(v, dict) and "bits_per_byte" not in v and v:
            metric, value = next(iter(v.items()))
            if isinstance(value, (int, float)):
                return f"{task} {metric} {value:.4f}"
    return "–"


def compress_rows(stages: list[StageRun]) -> list[list[str]]:
    """(stage, command, size MB, bits per byte, task metric, decode tokens/s), each as before → after."""
    def mb(side: dict[str, Any]) -> str:
        n = side.get("size_bytes")
        return "–" if not isinstance(n, (int, float)) else f"{n / 1e6:.1f}"

    def arrow(a: str, b: str) -> str:
        return f"{a} → {b}"

    rows = []
    for s in stages:
        if not s.compress:
            continue
        b, a = s.compress["before"], s.compress["after"]
        rows.append([s.name, str(s.compress.get("command", s.verb)), arrow(mb(b), mb(a)),
                     arrow(_fmt(_quality(b)), _fmt(_quality(a))), arrow(_task_metric(b), _task_metric(a)),
                     arrow(_fmt(b.get("decode_tokens_per_s")), _fmt(a.get("decode_tokens_per_s")))])
    return rows


def _tradeoff_png(stages: list[StageRun]) -> str | None:
    """Size on disk (MB) against held-out bits per byte: each compress stage's input and output, arrows between,
    labelled with decode tokens/s."""
    pairs = [(s, s.compress["before"], s.compress["after"]) for s in stages if s.compress]
    pts = [(s.name, b, a) for s, b, a in pairs if _quality(b) is not None and _quality(a) is not None
           and b.get("size_bytes") and a.get("size_bytes")]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for name, b, a in pts:
        (x0, y0), (x1, y1) = ((side["size_bytes"] / 1e6, _quality(side)) for side in (b, a))
        ax.annotate("", (x1, y1), (x0, y0), arrowprops={"arrowstyle": "->", "color": "#888", "lw": 1})
        ax.scatter([x0], [y0], color="#555", s=24, zorder=3)
        ax.scatter([x1], [y1], s=36, zorder=3, label=name)
        for x, y, side in ((x0, y0, b), (x1, y1, a)):
            speed = side.get("decode_tokens_per_s")
            ax.text(x, y, f"  {speed:.0f} tok/s" if isinstance(speed, (int, float)) else "", fontsize=7,
                    va="center")
    ax.set_xlabel("size on disk (MB)", fontsize=8)
    ax.set_ylabel("held-out bits per byte (lower is better)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("compression: size, quality and decode speed (grey: before)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def scale_rows(stage: StageRun) -> tuple[list[list[str]], list[list[str]]]:
    """A scale run's (law rows: parameter, value, interval; point rows: run, N, D, C, loss, law, error)."""
    sc = stage.scale or {}
    fit = sc.get("fit")
    if not fit:
        return [], []
    from .plan.fit import law_from_dict, predict

    law, ci = law_from_dict(fit), fit.get("ci", {})
    names = {"E": "E", "A": "A", "B": "B", "alpha": "α", "beta": "β", "a": "a (N_opt ∝ C^a)",
             "b": "b (D_opt ∝ C^b)"}
    values = {**{k: fit[k] for k in ("E", "A", "B", "alpha", "beta")}, "a": law.exponents[0], "b": law.exponents[1]}
    law_rows = [[names[k], f"{v:.4g}", f"[{ci[k][0]:.4g}, {ci[k][1]:.4g}]" if k in ci else "–"]
                for k, v in values.items()]
    points = [*sc.get("points", []), *([sc["holdout"]] if sc.get("holdout") else [])]
    rows = []
    for p in points:
        pred = predict(law, p["N"], p["D"])
        rows.append([p["name"], f"{p['N']:,}", f"{p['D']:,}", f"{p['C']:.3g}", f"{p['loss']:.4f}", f"{pred:.4f}",
                     f"{100 * (pred - p['loss']) / p['loss']:+.2f}%"])
    return law_rows, rows


def _scale_png(stage: StageRun) -> str | None:
    """A scale run: loss against tokens per size with the law's curves (the held-out run starred), loss against
    compute with the compute-optimal frontier, and N_opt, D_opt against compute."""
    sc = stage.scale or {}
    if not sc.get("fit") or not sc.get("points"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .plan.fit import law_from_dict, predict

    law, pts, hold, front = law_from_dict(sc["fit"]), sc["points"], sc.get("holdout"), sc.get("frontier") or []
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.8))
    sizes = sorted({p["N"] for p in pts} | ({hold["N"]} if hold else set()))
    d_all = [p["D"] for p in pts] + ([hold["D"]] if hold else [])
    d_line = np.geomspace(min(d_all) / 1.5, max(d_all) * 1.5, 60)
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(sizes)))
    for n, color in zip(sizes, colors):
        mine = [p for p in pts if p["N"] == n]
        axes[0].scatter([p["D"] for p in mine], [p["loss"] for p in mine], color=color, s=22, zorder=3)
        axes[0].plot(d_line, predict(law, n, d_line), color=color, lw=1.2, label=f"N = {n:,}")
        axes[1].scatter([p["C"] for p in mine], [p["loss"] for p in mine], color=color, s=22, zorder=3)
    if hold:
        for ax, x in ((axes[0], hold["D"]), (axes[1], hold["C"])):
            ax.scatter([x], [hold["loss"]], marker="*", s=110, color="#c0392b", zorder=4, label="held out")
            ax.scatter([x], [hold["predicted"]], marker="x", s=50, color="#c0392b", zorder=4, label="law")
    if front:
        c = [f["flops"] for f in front]
        axes[1].plot(c, [f["loss"] for f in front], color="#333", lw=1.2, ls="--", label="compute-optimal")
        axes[2].plot(c, [f["params"] for f in front], label="N_opt")
        axes[2].plot(c, [f["tokens"] for f in front], label="D_opt")
        axes[2].scatter([p["C"] for p in pts], [p["N"] for p in pts], s=12, color="#1f77b4", alpha=0.5)
        axes[2].scatter([p["C"] for p in pts], [p["D"] for p in pts], s=12, color="#ff7f0e", alpha=0.5)
    titles = (("tokens D", "validation loss", "loss against tokens, law per size"),
              ("compute C = 6ND (FLOPs)", "validation loss", "loss against compute"),
              ("compute C = 6ND (FLOPs)", "parameters / tokens", "compute-optimal N, D (dots: the grid)"))
    for ax, (xl, yl, title) in zip(axes, titles):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no crowded labels between decades
        if ax is axes[2]:
            ax.set_yscale("log")
        ax.set(xlabel=xl, ylabel=yl)
        ax.set_title(title, fontsize=10)
        ax.xaxis.label.set_size(8)
        ax.yaxis.label.set_size(8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.suptitle(f"{stage.name}: L(N, D) = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}"
                 f" (N {sc.get('params', '')})", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ---- output


_CSS = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1100px;
color:#1c1c1c;background:#fff;padding:0 1em}h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:2em}table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;
font-size:.9em;text-align:left}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.8em;max-height:28em}.done{color:#17672b}
.failed,.interrupted{color:#a01010}.running{color:#8a6100}details{margin:.5em 0}"""


def _table(head: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    out = ["<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows]
    return "".join(out) + "</table>"


def bar_rows(bars: list[dict[str, Any]]) -> list[list[str]]:
    """A pipeline's bars (pipeline.json "bars"): stage, bar, measured, needed, met."""
    return [[b["stage"], b["what"], b["measured"], b["needed"], "yes" if b["pass"] else "NO"] for b in bars]


def render_html(stages: list[StageRun], title: str, bars: list[dict[str, Any]] | None = None) -> str:
    """The report page (with a pipeline's bars, what each stage achieved, first)."""
    e = html.escape
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1>"]
    if bars:
        parts.append(f"<h2>What each stage achieved ({sum(b['pass'] for b in bars)} of {len(bars)} bars met)</h2>"
                     + _table(["stage", "bar", "measured", "needed", "met"], bar_rows(bars)))
    overview = [[s.name, s.verb, s.status, _fmt(s.seconds), str(len(s.metrics)), _fmt(_last(s, "loss")),
                 str(s.lineage.get("output", ""))] for s in stages]
    parts.append("<h2>Stages</h2>" + _table(["stage", "verb", "status", "seconds", "logged steps", "last loss",
                                               "output"], overview))
    crows = compress_rows(stages)
    if crows:
        plot = _tradeoff_png(stages)
        parts.append("<h2>Compression</h2>" + (f"<img alt='size and quality' src='data:image/png;base64,{plot}'>"
                                                if plot else "")
                     + _table(["stage", "command", "size MB", "bits/byte", "task", "decode tok/s"], crows))
    names, table = _evaluations(stages)
    if names:
        parts.append("<h2>Evaluations side by side</h2>" + _table(["task · metric", *names],
                                                                   [[m, *v] for m, v in table]))
    for s in stages:
        parts.append(f"<h2 id='{e(s.name)}'>{e(s.name)} <small>({e(s.verb)}, <span class='{e(s.status)}'>"
                     f"{e(s.status)}</span>)</small></h2>")
        png = _figure_png(s)
        if png:
            parts.append(f"<img alt='{e(s.name)} curves' src='data:image/png;base64,{png}'>")
        if s.curate:
            funnel = _funnel_png(s)
            if funnel:
                parts.append(f"<img alt='{e(s.name)} funnel' src='data:image/png;base64,{funnel}'>")
            parts.append("<h3>Curation</h3>" + _table(["step", "in", "kept", "removed", "reasons", "seconds"],
                                                      funnel_rows(s)))
            for reason, texts in s.removed.items():
                items = "".join(f"<li>{e(t)}</li>" for t in texts)
                parts.append(f"<details><summary>removed by {e(reason)}</summary><ul>{items}</ul></details>")
        law_rows, point_rows = scale_rows(s)
        if law_rows:
            plot = _scale_png(s)
            parts.append("<h3>Scaling law</h3>" + (f"<img alt='scaling law' src='data:image/png;base64,{plot}'>"
                                                   if plot else "")
                         + _table(["parameter", "value", "95% interval (bootstrap)"], law_rows)
                         + _table(["run", "N", "D", "C", "val loss", "law", "error"], point_rows))
        rows = eval_rows(s)
        if rows:
            head = ["task · metric", "value", "uncertainty"] if "tasks" in (s.eval or {}) else \
                ["metric", "before", "after"]
            parts.append("<h3>Evaluation</h3>" + _table(head, [list(r) for r in rows]))
        if s.lineage:
            lin = [[k, json.dumps(v, default=str) if not isinstance(v, str) else v] for k, v in s.lineage.items()]
            parts.append("<h3>Lineage</h3>" + _table(["field", "value"], lin))
        if s.config:
            parts.append(f"<details><summary>resolved config</summary><pre>{e(s.config)}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _last(s: StageRun, key: str) -> float | None:
    _, y = _series(s.metrics, key)
    return y[-1] if y else None


def text_summary(stages: list[StageRun], bars: list[dict[str, Any]] | None = None) -> str:
    """A compact terminal summary: a pipeline's bars, then one line per stage and its evaluation rows."""
    lines = [f"bar met? {r[4]:<3}  {r[0]}: {r[1]}: {r[2]} (needed {r[3]})" for r in bar_rows(bars or [])]
    for s in stages:
        secs = f"{s.seconds:.0f} s" if s.seconds is not None else ""
        loss = _last(s, "loss")
        lines.append(f"{s.name:<14} {s.verb:<10} {s.status:<11} {secs:>7}"
                     + (f"  loss {loss:.4g}" if loss is not None else ""))
        for step, n_in, kept, removed, why, _ in funnel_rows(s):
            lines.append(f"    {step}: {n_in} in, {kept} kept" + (f" ({why})" if why else ""))
        for _, command, size, bpb, task, speed in compress_rows([s]):
            lines.append(f"    {command}: size MB {size}, bits/byte {bpb}, decode tok/s {speed}")
        law_rows, point_rows = scale_rows(s)
        if law_rows:
            lines.append("    law: " + ", ".join(f"{r[0].split()[0]} {r[1]} {r[2]}" for r in law_rows[:5]))
            lines += [f"    {r[0]}: loss {r[4]}, law {r[5]} ({r[6]})" for r in point_rows if r[0].startswith("holdout")]
        for metric, a, b in eval_rows(s)[:8]:
            arrow = f"{a} -> {b}" if "tasks" not in (s.eval or {}) else f"{a} {b}".rstrip()
            lines.append(f"    {metric}: {arrow}")
    return "\n".join(lines)


def write_report(run_dir: str | Path, output: str | Path | None = None) -> tuple[Path, str]:
    """Write RUN_DIR/report.html (or `output`); returns (its path, the text summary)."""
    run = Path(run_dir)
    stages = read_run(run)
    bars = (_json(run / "pipeline.json") or {}).get("bars")
    path = Path(output) if output else run / "report.html"
    path.write_text(render_html(stages, f"lmforge run: {run.resolve().name}", bars), encoding="utf-8")
    return path, text_summary(stages, bars)
