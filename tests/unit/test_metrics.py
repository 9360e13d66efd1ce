"""The metrics sink: metrics.jsonl rows and TensorBoard scalars; truncation on resume."""

from __future__ import annotations

import math

from lmforge.engine.metrics import MetricsSink, read_metrics


def test_jsonl_and_tensorboard(tmp_path):
    sink = MetricsSink(tmp_path, tensorboard=True)
    for step in range(1, 4):
        sink.log(step, {"loss": 1.0 / step, "lr": 0.1})
    sink.log(4, {"loss": float("nan")})
    sink.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[3]["loss"] == "nan"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("loss")]
    assert [round(v, 6) for v in losses] == [1.0, 0.5, round(1 / 3, 6)]
    assert all(math.isfinite(v) for v in losses)


def test_truncate_after_keeps_each_step_once(tmp_path):
    sink = MetricsSink(tmp_path, tensorboard=False)
    for step in range(1, 6):
        sink.log(step, {"loss": float(step)})
    sink.truncate_after(3)
    sink.log(4, {"loss": 40.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_disabled_sink_writes_nothing(tmp_path):
    sink = MetricsSink(tmp_path, enabled=False)
    sink.log(1, {"loss": 1.0})
    assert not (tmp_path / "metrics.jsonl").exists()


def _torn(tmp_path) -> MetricsSink:
    """A sink whose metrics.jsonl ends in the half-written row of a killed append (appends are not fsynced)."""
    sink = MetricsSink(tmp_path, tensorboard=False)
    for step in range(1, 4):
        sink.log(step, {"loss": float(step)})
    with (tmp_path / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"step": 4, "loss": 4.')
    return sink


def test_a_torn_last_line_is_skipped_by_readers(tmp_path):
    _torn(tmp_path)
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0)]


def test_truncate_after_drops_a_torn_last_line(tmp_path):
    sink = _torn(tmp_path)
    sink.truncate_after(3)
    sink.log(4, {"loss": 40.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert (tmp_path / "metrics.jsonl").read_text().endswith('"loss": 40.0}\n')
