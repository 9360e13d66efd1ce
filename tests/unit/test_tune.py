"""`lmforge tune` without token data: the search space checked against the verb's config, the ledger that makes
several workers run exactly `trials` trials, dead workers' trials failed and retried, and whole studies over a
toy training verb whose validation loss is known in closed form (full-batch gradient descent on a quadratic), run
through the real engine, its evaluation hook and Optuna."""

from __future__ import annotations

import json
import math
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

optuna = pytest.importorskip("optuna")

from lmforge import cli  # noqa: E402
from lmforge.config import ConfigError, load_config  # noqa: E402
from lmforge.engine.trainer import EvalSet, TrainConfig, Trainer  # noqa: E402
from lmforge.stages import _search as S  # noqa: E402
from lmforge.stages import tune  # noqa: E402

TrialState = optuna.trial.TrialState

# ---------------------------------------------------------------------------------------------- the toy verb
# Full-batch gradient descent on L(w) = |X w - y|^2 / (2m) with X^T X / m = diag(LAMBDAS), from w = 0 to w* = 1:
# each error component shrinks by (1 - lr * lambda) per step, so after k steps
#     L_k(lr) = 1/2 * sum_i lambda_i * (1 - lr * lambda_i)^(2k)
# Its best lr is near 2 / (min + max lambda); above 2 / max lambda it diverges.
LAMBDAS = (1.0, 3.0)
STEPS = 10


def exact_loss(lr: float, steps: int = STEPS) -> float:
    return 0.5 * sum(lam * (1 - lr * lam) ** (2 * steps) for lam in LAMBDAS)


def _data(m: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    q, _ = torch.linalg.qr(torch.randn(m, len(LAMBDAS), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64))
    x = q * torch.tensor(LAMBDAS, dtype=torch.float64).sqrt() * math.sqrt(m)  # X^T X / m = diag(LAMBDAS)
    return x.float(), x.sum(1, keepdim=True).float()  # y = X w* with w* = 1


class _Batches:
    def __init__(self):
        self.x, self.y = _data()

    def next_batch(self):
        return {"input_ids": self.x, "y": self.y}  # the engine counts input_ids

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _mse(model, batch):
    loss = 0.5 * ((model(batch["input_ids"]) - batch["y"]) ** 2).mean()
    return loss, {"loss": loss.detach(), "tokens": torch.tensor(float(len(batch["input_ids"])))}


@dataclass
class ToyConfig:
    run_dir: str = "runs/toy"
    """Run directory."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The engine."""


def toy_main(cfg: ToyConfig) -> int:
    from lmforge.engine import runs

    world, run = runs.start(cfg)  # config.yaml, as every training stage
    model = torch.nn.Linear(len(LAMBDAS), 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    data = _Batches()
    trainer = Trainer(model, _mse, data, cfg.train, run, [EvalSet("validation", lambda: [data.next_batch()])], world)
    trainer.fit()
    return 0


@pytest.fixture
def toy(monkeypatch, tmp_path):
    """`verb: toy` runs toy_main; returns the path of its base YAML."""
    module = types.ModuleType("lmforge.stages.toy")
    module.Config, module.main = ToyConfig, toy_main
    monkeypatch.setitem(sys.modules, "lmforge.stages.toy", module)
    monkeypatch.setattr(tune, "TRAINING_VERBS", (*tune.TRAINING_VERBS, "toy"))
    base = tmp_path / "toy.yaml"
    base.write_text(yaml.safe_dump({"train": {
        "steps": STEPS, "micro_batch": 1, "eval_every": 2, "log_every": 1, "clip_grad": None, "precision": "fp32",
        "device": "cpu", "tensorboard": False, "progress_bar": False, "save_every": 0,
        "optimizer": {"name": "sgd", "lr": 0.01, "weight_decay": 0.0},
        "schedule": {"name": "constant", "warmup_steps": 0}}}))
    return base


def tune_config(tmp_path: Path, base: Path, **kw) -> tune.Config:
    raw = {"base": str(base), "verb": "toy", "run_dir": str(tmp_path / "study"), "trials": 12,
           "space": {"train.optimizer.lr": {"type": "float", "low": 0.01, "high": 0.6, "log": True}},
           "startup_trials": 4, "pruner": "none", **kw}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(tune.Config, path)


def test_exact_loss_is_what_the_toy_trains_to():
    # the closed form the studies below are checked against, against torch's own gradient descent
    x, y = _data()
    w = torch.zeros(len(LAMBDAS), 1)
    for _ in range(STEPS):
        w.requires_grad_(True)
        loss = 0.5 * ((x @ w - y) ** 2).mean()
        (g,) = torch.autograd.grad(loss, w)
        w = (w - 0.3 * g).detach()
    assert float(0.5 * ((x @ w - y) ** 2).mean()) == pytest.approx(exact_loss(0.3), rel=1e-4)


# ---------------------------------------------------------------------------------------------- whole studies

def test_tpe_finds_the_known_best_learning_rate_and_every_value_is_the_true_loss(toy, tmp_path, capsys):
    grid = [10 ** (-2 + 1.78 * i / 2000) for i in range(2001)]  # the search range, finely
    best_lr = min(grid, key=exact_loss)
    cfg = tune_config(tmp_path, toy)
    assert tune.main(cfg) == 0
    record = json.loads((tmp_path / "study" / "tune.json").read_text())
    trials = record["trials"]
    assert len(trials) == 12 and [t["number"] for t in trials] == list(range(12))
    for t in trials:  # sampled lr -> config -> engine -> evaluation hook -> Optuna: the value is the true loss
        assert t["state"] == "complete"
        assert t["value"] == pytest.approx(exact_loss(t["params"]["train.optimizer.lr"]), rel=2e-3, abs=1e-7)
        run = Path(t["run_dir"])
        assert run.name == f"trial-{t['number']:04d}" and (run / "config.yaml").exists()
        assert yaml.safe_load((run / "config.yaml").read_text())["train"]["optimizer"]["lr"] == \
            t["params"]["train.optimizer.lr"]
    found = record["best"]["params"]["train.optimizer.lr"]
    assert abs(math.log(found / best_lr)) < math.log(1.5), (found, best_lr)
    assert record["best"]["value"] < 0.1 * exact_loss(0.01)  # far better than the bottom of the range
    best = yaml.safe_load((tmp_path / "study" / "best.yaml").read_text())
    assert best["train"]["optimizer"]["lr"] == found and best["run_dir"] == str(tmp_path / "study" / "best")
    assert "trial  state" in capsys.readouterr().out


def test_median_pruning_stops_bad_trials_early_and_a_rerun_adds_nothing(toy, tmp_path):
    cfg = tune_config(tmp_path, toy, pruner="median", pruner_startup_trials=2, sampler="random", trials=10)
    assert tune.main(cfg) == 0
    record = json.loads((tmp_path / "study" / "tune.json").read_text())
    pruned = [t for t in record["trials"] if t["state"] == "pruned"]
    assert pruned and record["counts"]["pruned"] == len(pruned)
    assert record["counts"]["complete"] + len(pruned) == 10
    for t in pruned:  # the engine stopped at the pruning step: its run ends there, not at STEPS
        rows = [json.loads(line) for line in (Path(t["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert t["last_step"] < STEPS and rows[-1]["step"] == t["last_step"]
        done = [d["value"] for d in record["trials"][:t["number"]] if d["state"] == "complete"]
        assert exact_loss(t["params"]["train.optimizer.lr"]) > min(done)  # never the best of those before it
    before = sorted(p.name for p in (tmp_path / "study").iterdir())
    assert tune.main(cfg) == 0  # finished: a re-run only rewrites the summary
    assert sorted(p.name for p in (tmp_path / "study").iterdir()) == before
    assert len(json.loads((tmp_path / "study" / "tune.json").read_text())["trials"]) == 10


def test_a_study_resumes_with_more_trials_and_hyperband_prunes(toy, tmp_path):
    cfg = tune_config(tmp_path, toy, trials=3, pruner="hyperband", min_resource=2, sampler="random")
    assert tune.main(cfg) == 0
    cfg = tune_config(tmp_path, toy, trials=9, pruner="hyperband", min_resource=2, sampler="random")
    assert tune.main(cfg) == 0
    record = json.loads((tmp_path / "study" / "tune.json").read_text())
    assert [t["number"] for t in record["trials"]] == list(range(9))
    assert record["counts"]["pruned"] >= 1 and record["counts"]["complete"] + record["counts"]["pruned"] == 9


# ---------------------------------------------------------------------------------------------- the ledger

def _t(number, state, **attrs):
    return types.SimpleNamespace(number=number, state=state, user_attrs=attrs, params={"x": number},
                                 intermediate_values={}, value=None, duration=None, datetime_start=None)


def test_ledger_counts_done_running_diverged_and_one_retry_and_nothing_else():
    trials = [_t(0, TrialState.COMPLETE), _t(1, TrialState.FAIL), _t(2, TrialState.PRUNED),
              _t(3, TrialState.FAIL, **{S.REASON: "diverged"}), _t(4, TrialState.RUNNING),
              _t(5, TrialState.WAITING, **{S.RETRY: 1}), _t(6, TrialState.WAITING, **{S.RETRY: 1}),
              _t(7, TrialState.FAIL, **{S.REASON: "surplus"}), _t(8, TrialState.FAIL, **{S.REASON: "interrupted"})]
    book = S.ledger(trials[::-1])
    assert [t.number for t in book.counted] == [0, 2, 3, 4, 5]
    assert [t.number for t in book.retry] == [8]  # 1 is retried by 5 (6 duplicates that retry)
    assert sorted(t.number for t in book.ignored) == [1, 6, 7]
    assert book.members(4) == [0, 2, 3, 4] and book.finished(4)
    assert not book.finished(5)  # trial 5 waits for a worker
    assert not book.finished(6)


def test_reap_fails_dead_workers_trials_keeps_live_ones_and_enqueues_retries(tmp_path):
    import socket

    study = optuna.create_study(storage=S.open_storage("", tmp_path), study_name="s")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    study.add_trial(optuna.trial.create_trial(params={"x": 0.1}, distributions=dist, value=1.0))
    dead, alive = study.ask(dist), study.ask(dist)
    for t in (dead, alive):
        t.set_user_attr(S.HOST, socket.gethostname())
    S.lock_path(tmp_path, dead.number).parent.mkdir(parents=True)
    S.lock_path(tmp_path, dead.number).touch()  # its worker died: nobody holds the lock
    claim = S.Claim(S.lock_path(tmp_path, alive.number))
    try:
        book = S.reap(study, tmp_path, n=3)
        again = S.reap(study, tmp_path, n=3)
    finally:
        claim.release()
    states = {t.number: t.state for t in study.get_trials()}
    assert states[dead.number] == TrialState.FAIL and states[alive.number] == TrialState.RUNNING
    retry = [t for t in study.get_trials() if t.user_attrs.get(S.RETRY) == dead.number]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING
    assert [t.number for t in book.counted] == [0, alive.number, retry[0].number]
    assert [t.number for t in again.counted] == [t.number for t in book.counted]  # enqueued once
    after = [t.number for t in S.reap(study, tmp_path, n=3).counted]  # the live worker has died now too
    assert after == [0, retry[0].number, retry[0].number + 1]
    again = study.ask()  # the next worker's trial is the retry, with the dead trial's values
    assert again.number == retry[0].number and again.suggest_float("x", 0, 1) == dead.params["x"]


# ---------------------------------------------------------------------------------------------- bad input

def test_unknown_space_key_is_one_line_naming_the_nearest(tmp_path, capsys):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"base": "recipes/pretrain/tiny.yaml", "space": {
        "train.optimizer.lrr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}))
    assert cli.main(["tune", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "train.optimizer.lrr" in err and "did you mean 'train.optimizer.lr'" in err


@pytest.mark.parametrize("space, needle", [
    ({"train.micro_batch": {"type": "float", "low": 1, "high": 8}}, "integer field"),
    ({"train.optimizer.lr": {"type": "float", "low": 0.0, "high": 1e-2, "log": True}}, "needs low > 0"),
    ({"train.optimizer.lr": {"type": "float", "low": 1e-2, "high": 1e-3}}, "low <= high"),
    ({"train.optimizer.name": {"type": "categorical", "choices": []}}, "non-empty list of choices"),
    ({"run_dir": {"type": "categorical", "choices": ["a"]}}, "run_dir is set by tune"),
    ({}, "at least one dotted key"),
])
def test_bad_spaces_are_config_errors(tmp_path, space, needle):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"base": "x.yaml", "space": space}))
    with pytest.raises(ConfigError, match=needle):
        load_config(tune.Config, path)


def test_only_training_verbs_can_be_tuned():
    with pytest.raises(ConfigError, match="did you mean 'pretrain'"):
        load_config(tune.Config, None, {"base": "x.yaml", "verb": "pretrian",
                                        "space": {"train.steps": {"type": "int", "low": 1, "high": 2}}})
    with pytest.raises(ConfigError, match="expected a verb that trains"):
        load_config(tune.Config, None, {"base": "x.yaml", "verb": "plan",
                                        "space": {"train.steps": {"type": "int", "low": 1, "high": 2}}})


def test_without_optuna_the_error_is_one_line_naming_the_extra(toy, tmp_path, monkeypatch, capsys):
    cfg = tune_config(tmp_path, toy)
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump({"base": cfg.base, "verb": "toy", "run_dir": cfg.run_dir,
                                    "space": {"train.optimizer.lr": {"low": 0.01, "high": 0.1}}}))
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    assert cli.main(["tune", "--config", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'lmforge[tune]'" in err
    assert not (tmp_path / "study" / "trial-0000").exists()


def test_a_database_url_is_rdb_storage_with_a_heartbeat(toy, tmp_path):
    pytest.importorskip("sqlalchemy")
    url = f"sqlite:///{tmp_path / 'studies.db'}"  # one worker here; several machines would share a server database
    cfg = tune_config(tmp_path, toy, trials=3, storage=url, sampler="random")
    assert tune.main(cfg) == 0
    storage = S.open_storage(url, tmp_path)
    assert isinstance(storage, optuna.storages.RDBStorage) and storage.get_heartbeat_interval() == 30
    trials = optuna.load_study(study_name="study", storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert not (tmp_path / "study" / "study.journal").exists()
    assert S.storage_name("postgresql://ann:secret@db.example/hpo", tmp_path) == "postgresql://ann:***@db.example/hpo"
