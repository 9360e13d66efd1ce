"""`lmforge scale` on real stdlib shards: a 2 × 3 grid of tiny pretraining runs plus a held-out one, interrupted by
SIGINT in the middle of a run and re-run; each run's schedule ends at its own budget, finished runs are not
trained again, and scale.json holds points whose N, D and losses match the runs, the fit and the frontier."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml

from engine_fixtures import bpe_data, write_config  # noqa: F401

from lmforge import cli
from lmforge.config import ConfigError, load_config
from lmforge.engine.schedule import ScheduleConfig, lr_multiplier
from lmforge.stages import pretrain, scale

SIZES = [{"num_layers": 1, "hidden_size": 32, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 64},
         {"num_layers": 2, "hidden_size": 64, "name": "wide"}]
TOKENS = [1024, 2048, 4096]  # 512 tokens per step (micro_batch 4 × grad_accum 2 × seq_len 64): 2, 4, 8 steps
LR, MIN_RATIO = 3.0e-3, 0.1


def scale_config(tmp_path: Path, shards: Path, **extra) -> Path:
    base = write_config(tmp_path / "base.yaml", tmp_path / "unused", shards, eval_every=0, save_every=2,
                        schedule={"name": "cosine", "min_lr_ratio": MIN_RATIO}, optimizer={"lr": LR})
    cfg = {"base": str(base), "run_dir": str(tmp_path / "scale"), "sizes": SIZES, "tokens": TOKENS,
           "holdout": {"size": SIZES[1], "tokens": 6144}, "warmup": 0.25, "bootstrap": 5, **extra}
    path = tmp_path / "scale.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_grid_is_interrupted_resumed_and_fitted(tmp_path: Path, bpe_data, monkeypatch, capsys) -> None:  # noqa: F811
    from lmforge.data.loader import PackedLoader
    from lmforge.models.presets import preset
    from lmforge.models.transformer import Transformer

    path = scale_config(tmp_path, bpe_data.shards)
    calls: list[str] = []
    real_main, real_next = pretrain.main, PackedLoader.next_batch

    def counted(cfg):
        calls.append(Path(cfg.run_dir).name)
        return real_main(cfg)

    def next_batch(self):  # SIGINT in the middle of the 6th run (8 steps), at its 3rd step's first micro batch
        if len(calls) == 6 and self.windows[0].split == "train" and self.pos == 2 * 2 * self.micro_batch:
            os.kill(os.getpid(), signal.SIGINT)
        return real_next(self)

    monkeypatch.setattr(pretrain, "main", counted)
    monkeypatch.setattr(PackedLoader, "next_batch", next_batch)
    assert cli.main(["scale", "--config", str(path)]) == 130
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "run the same command to continue" in out.out
    run = tmp_path / "scale"
    assert not (run / "scale.json").exists()
    sixth = run / "runs" / calls[5]
    assert list((sixth / "checkpoints").glob("step-*")) and not (sixth / "eval.json").exists()
    finished = {c: (run / "runs" / c / "metrics.jsonl").stat().st_mtime_ns for c in calls[:5]}

    calls.clear()
    monkeypatch.setattr(PackedLoader, "next_batch", real_next)
    assert cli.main(["scale", "--config", str(path)]) == 0
    assert calls == [sixth.name, "holdout-wide-6.144k"]  # the interrupted run resumed, then the held-out one
    assert {c: (run / "runs" / c / "metrics.jsonl").stat().st_mtime_ns for c in finished} == finished

    result = json.loads((run / "scale.json").read_text())
    points = result["points"]
    assert len(points) == 6 and result["params"] == "non_embedding"
    for size in SIZES:
        mine = sorted((p for p in points if p["size"] == size), key=lambda p: p["D"])
        assert [p["D"] for p in mine] == TOKENS
        assert all(a["loss"] > b["loss"] for a, b in zip(mine, mine[1:])), [p["loss"] for p in mine]
        vocab = json.loads((Path(mine[0]["folder"]) / "final" / "config.json").read_text())["vocab_size"]
        model = Transformer(preset("llama-tiny", **{k: v for k, v in size.items() if k != "name"}, vocab_size=vocab))
        total = sum(p.numel() for p in model.parameters())
        assert mine[0]["N_total"] == total
        assert mine[0]["N"] == total - model.embed.tokens.weight.numel()
    for p in points:  # each run's cosine schedule (warmup 25% of its steps) ends at its own budget
        rows = [json.loads(line) for line in (Path(p["folder"]) / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == p["D"] // 512 == p["steps"]
        own = ScheduleConfig(name="cosine", min_lr_ratio=MIN_RATIO, warmup_steps=p["steps"] // 4)
        for r in rows:  # the lr logged at step s is the one of the update s - 1
            assert r["lr"] == pytest.approx(LR * lr_multiplier(r["step"] - 1, p["steps"], own), rel=1e-6)
        assert p["C"] == 6.0 * p["N"] * p["D"]
    assert set(result["fits"]) == {"non_embedding", "total"} and result["fit"]["points"] == 6
    assert result["fit"]["bootstrap"] > 0 and len(result["frontier"]) == 21 or result["fit"]["alpha"] == 0
    hold = result["holdout"]
    assert hold["D"] == 6144 and hold["error_pct"] == pytest.approx(100 * (hold["predicted"] / hold["loss"] - 1))


def test_report_shows_the_law_the_points_and_the_held_out_run(tmp_path: Path) -> None:
    """`lmforge report` on a scale run directory: the law with its intervals, each run against the law's value."""
    import numpy as np

    from lmforge.plan.fit import LawFit, compute_optimal, fit_law, predict
    from lmforge.report import read_run, scale_rows, write_report

    truth = LawFit(E=1.7, A=400.0, B=410.0, alpha=0.34, beta=0.28)
    n, d = (g.ravel() for g in np.meshgrid([1e6, 1e7, 1e8], [1e9, 1e10, 1e11], indexing="ij"))
    fit = fit_law(n, d, predict(truth, n, d), bootstrap=5)
    points = [{"name": f"p{i}", "N": int(a), "N_total": int(a) + 1000, "D": int(b), "C": 6.0 * a * b,
               "loss": float(predict(truth, a, b))} for i, (a, b) in enumerate(zip(n, d))]
    hold = {"name": "holdout-big", "N": 10 ** 9, "N_total": 10 ** 9, "D": 10 ** 12, "C": 6e21, "loss": 2.0,
            "predicted": float(predict(fit, 1e9, 1e12))}
    (tmp_path / "scale.json").write_text(json.dumps({
        "params": "non_embedding", "points": points, "fit": fit.to_dict(), "holdout": hold,
        "frontier": [compute_optimal(fit, c).to_dict() for c in (1e16, 1e18, 1e20)]}))
    [stage] = read_run(tmp_path)
    law, rows = scale_rows(stage)
    assert [r[0] for r in law][:5] == ["E", "A", "B", "α", "β"] and float(law[3][1]) == pytest.approx(0.34, rel=1e-3)
    assert rows[-1][0] == "holdout-big"
    assert rows[-1][6] == f"{100 * (hold['predicted'] - 2.0) / 2.0:+.2f}%"
    assert all(abs(float(r[6].rstrip("%"))) < 0.1 for r in rows[:-1])  # the law fits its own noiseless points
    page, summary = write_report(tmp_path)
    text = page.read_text()
    assert "Scaling law" in text and "data:image/png;base64," in text and "holdout-big" in summary


def test_bad_grids_are_one_clear_error(tmp_path: Path, bpe_data) -> None:  # noqa: F811
    path = scale_config(tmp_path, bpe_data.shards)
    with pytest.raises(ConfigError, match="sizes × tokens >= 5"):
        load_config(scale.Config, path, ["tokens=[2048, 4096]"])
    with pytest.raises(ConfigError, match="positive token budgets"):
        load_config(scale.Config, path, ["tokens=[2048, 0, 4096]"])
    with pytest.raises(ConfigError, match="base: expected a pretrain YAML"):
        load_config(scale.Config, path, ["base="])
    bad = load_config(scale.Config, path, ["sizes=[{num_layerz: 2}, {hidden_size: 32}]"])
    with pytest.raises(ConfigError, match="'num_layerz' is not a model config field"):
        scale.main(bad)  # before any run trains
    assert not (tmp_path / "scale" / "runs").exists()
    cfg = load_config(scale.Config, path, ["overrides={train.schedule.name: constant}"])
    assert cli.main(["scale", "--config", str(path), "overrides={train.schedule.name: constant}"]) == 2
    with pytest.raises(ConfigError, match="decays to each run's end"):
        scale.main(cfg)
