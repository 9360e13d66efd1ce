"""`Trainer.fit()` on tiny models and in-memory batches: learning, the NaN/Inf guard, gradient accumulation,
clipping, early stopping with checkpoint pruning, bf16 autocast on CPU, and resumes that lose nothing (a kill
before the first checkpoint, a torn metrics line, a truncated checkpoint, an interrupted prune, bf16)."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import pytest
import torch

from lmforge.engine.checkpoint import list_checkpoints, load_checkpoint, prune, save_checkpoint
from lmforge.engine.metrics import read_metrics
from lmforge.engine.optim import OptimConfig
from lmforge.engine.schedule import ScheduleConfig
from lmforge.engine.trainer import EvalSet, NonFiniteLossError, Trainer, TrainConfig
from lmforge.models import ModelConfig, Transformer
from lmforge.objectives.causal_lm import CausalLM

VOCAB, T = 96, 16


class Batches:
    """In-memory batch source: cycles over `samples` (N, T + 1) in order, `micro_batch` at a time."""

    def __init__(self, samples: torch.Tensor, micro_batch: int):
        assert len(samples) % micro_batch == 0
        self.samples, self.micro_batch, self.pos = samples, micro_batch, 0
        self.seq_len = samples.shape[1] - 1

    def next_batch(self) -> dict[str, torch.Tensor]:
        n = len(self.samples) // self.micro_batch
        i = self.pos % n
        self.pos += 1
        x = self.samples[i * self.micro_batch:(i + 1) * self.micro_batch]
        return {"input_ids": x[:, :-1].clone(), "labels": x[:, 1:].clone()}

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                   intermediate_size=64, max_position_embeddings=64))


def samples(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, T + 1), generator=torch.Generator().manual_seed(seed))


def config(**kw) -> TrainConfig:
    base = dict(steps=10, micro_batch=4, grad_accum=1, precision="fp32", device="cpu", log_every=1,
                tensorboard=False, progress_bar=False, clip_grad=None,
                optimizer=OptimConfig(name="adamw", lr=1e-2, weight_decay=0.0),
                schedule=ScheduleConfig(name="constant", warmup_steps=0))
    base.update(kw)
    return TrainConfig(**base)


def sgd(lr: float) -> OptimConfig:
    return OptimConfig(name="sgd", lr=lr, weight_decay=0.0)


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def train_rows(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "skipped_nonfinite" not in r and "loss" in r]


def test_loss_falls_on_a_repeated_batch_and_every_parameter_changes(tmp_path):
    model = tiny_model()
    before = params(model)
    trainer = Trainer(model, CausalLM(), Batches(samples(), 4), config(steps=40), tmp_path)
    trainer.fit()
    losses = [r["loss"] for r in train_rows(tmp_path)]
    assert len(losses) == 40
    assert losses[0] == pytest.approx(math.log(VOCAB), abs=0.5)  # a fresh model is near uniform
    assert losses[-1] < 0.5 * losses[0], losses
    unchanged = [k for k, v in model.named_parameters() if torch.equal(v, before[k])]
    assert not unchanged, f"parameters that did not train: {unchanged}"


class NaNOn:
    """Causal LM whose loss is NaN on the (1-based) steps in `bad`, and whose loss is finite but gradient NaN on
    those in `bad_grad`; records the parameters each step starts from.

    With grad_accum 1 and no eval sets, call k is step k."""

    def __init__(self, bad: set[int] | range, bad_grad: set[int] = frozenset()):
        self.bad, self.bad_grad, self.calls, self.start = set(bad), set(bad_grad), 0, {}
        self.inner = CausalLM()

    def __call__(self, model, batch):
        self.calls += 1
        self.start[self.calls] = params(model)
        loss, m = self.inner(model, batch)
        if self.calls in self.bad:
            loss = loss * float("nan")
            m = dict(m, loss=loss.detach())
        if self.calls in self.bad_grad:  # d/dp sqrt(0 * p) = 0 * inf = NaN; the loss itself stays finite
            loss = loss + torch.sqrt(0.0 * next(model.parameters()).sum())
        return loss, m


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_nan_steps_are_skipped_and_training_continues(tmp_path):
    obj = NaNOn({3, 6, 7}, bad_grad={9})
    model = tiny_model()
    trainer = Trainer(model, obj, Batches(samples(), 4), config(steps=10, max_bad_steps=3), tmp_path)
    trainer.fit()
    assert trainer.step == 10 and obj.calls == 10
    # a NaN step leaves the parameters as they were; a finite one moves them
    assert _same(obj.start[3], obj.start[4])
    assert _same(obj.start[6], obj.start[7]) and _same(obj.start[7], obj.start[8])
    assert _same(obj.start[9], obj.start[10])  # finite loss, NaN gradient: skipped too
    assert not _same(obj.start[2], obj.start[3]) and not _same(obj.start[8], obj.start[9])
    rows = read_metrics(tmp_path)
    assert sorted(r["step"] for r in rows if r.get("skipped_nonfinite") == 1) == [3, 6, 7, 9]
    finite = [r for r in train_rows(tmp_path) if isinstance(r["loss"], float) and math.isfinite(r["loss"])]
    assert [r["step"] for r in finite] == [1, 2, 4, 5, 8, 10]  # one row per step: 9 is logged as skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_consecutive_nan_steps_raise_naming_the_step(tmp_path):
    obj = NaNOn(range(4, 100))
    model = tiny_model()
    trainer = Trainer(model, obj, Batches(samples(), 4), config(steps=20, max_bad_steps=3), tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive.*step 6"):
        trainer.fit()
    assert obj.calls == 6
    assert _same(obj.start[4], params(model))  # none of the bad steps touched the weights
    assert sorted(r["step"] for r in read_metrics(tmp_path) if r.get("skipped_nonfinite") == 1) == [4, 5, 6]


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    data = samples(4)
    base = tiny_model()
    init = copy.deepcopy(base)
    runs = {}
    for micro, accum in ((2, 2), (4, 1)):
        model = copy.deepcopy(base)
        cfg = config(steps=3, micro_batch=micro, grad_accum=accum, optimizer=sgd(0.5))
        Trainer(model, CausalLM(), Batches(data, micro), cfg, tmp_path / f"m{micro}a{accum}").fit()
        runs[(micro, accum)] = (model, train_rows(tmp_path / f"m{micro}a{accum}"))
    (m_acc, rows_acc), (m_big, rows_big) = runs[(2, 2)], runs[(4, 1)]
    for (k, a), b in zip(m_acc.named_parameters(), m_big.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), (k, (a - b).abs().max().item())
    assert not _same(params(m_acc), params(init))
    for ra, rb in zip(rows_acc, rows_big):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5)
        assert ra["tokens"] == rb["tokens"]
    # the logged loss is the mean of the micro-batch losses
    with torch.no_grad():
        micro_losses = [CausalLM()(init, Batches(data[i:i + 2], 2).next_batch())[0].item()
                        for i in (0, 2)]
    assert rows_acc[0]["loss"] == pytest.approx(sum(micro_losses) / 2, abs=1e-6)


def test_clipping_logs_the_preclip_norm_and_applies_the_clipped_update(tmp_path):
    data = samples(4)
    model = tiny_model()
    ref = copy.deepcopy(model)
    loss, _ = CausalLM()(ref, Batches(data, 4).next_batch())
    loss.backward()
    grads = {k: p.grad.clone() for k, p in ref.named_parameters()}
    gnorm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    clip, lr = 1e-2, 1.0
    assert gnorm > 10 * clip
    before = params(model)
    Trainer(model, CausalLM(), Batches(data, 4), config(steps=1, clip_grad=clip, optimizer=sgd(lr)), tmp_path).fit()
    row = train_rows(tmp_path)[0]
    assert row["grad_norm"] == pytest.approx(gnorm, rel=1e-5)  # the norm before clipping
    assert row["lr"] == pytest.approx(lr)
    scale = min(1.0, clip / gnorm)
    delta = {k: (v.detach().double() - before[k].double()) for k, v in model.named_parameters()}
    want = {k: -lr * scale * grads[k].double() for k in grads}
    err = torch.sqrt(sum(((delta[k] - want[k]) ** 2).sum() for k in delta)).item()
    size = torch.sqrt(sum((d ** 2).sum() for d in delta.values())).item()
    assert size == pytest.approx(lr * clip, rel=1e-3)  # ||Δθ|| = lr · c
    assert err < 1e-3 * size


def test_early_stopping_keeps_best_and_prunes_to_keep_last(tmp_path):
    evals = [0]
    data = samples(4)

    def batches():
        evals[0] += 1
        return [Batches(data, 4).next_batch()]

    class WorseEachEval:
        """Causal LM plus a `score` that grows with every evaluation (lower is better: never improves)."""

        def __call__(self, model, batch):
            loss, m = CausalLM()(model, batch)
            return loss, dict(m, score=torch.tensor(float(evals[0])))

    cfg = config(steps=100, eval_every=2, early_stopping_patience=3, save_every=1, keep_last=2,
                 best_metric="val_score")
    trainer = Trainer(tiny_model(), WorseEachEval(), Batches(data, 4), cfg, tmp_path, [EvalSet("validation", batches)])
    last = trainer.fit()
    # evaluations at steps 2 (best), 4, 6, 8: three without improvement -> stop at 8
    assert trainer.step == 8 and evals[0] == 4
    assert last["step"] == 8 and last["val_score"] == 4.0
    assert [(r["step"], r["val_score"]) for r in read_metrics(tmp_path) if "val_score" in r] == \
        [(2, 1.0), (4, 2.0), (6, 3.0), (8, 4.0)]
    assert trainer.best_step == 2 and trainer.best == 1.0
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [2, 7, 8]


def test_bf16_autocast_runs_on_cpu_close_to_fp32(tmp_path):
    data = samples(4)
    base = tiny_model()
    losses, models = {}, {}
    for precision in ("fp32", "bf16"):
        model = copy.deepcopy(base)
        cfg = config(steps=5, precision=precision, optimizer=sgd(0.1))
        Trainer(model, CausalLM(), Batches(data, 4), cfg, tmp_path / precision).fit()
        losses[precision] = [r["loss"] for r in train_rows(tmp_path / precision)]
        models[precision] = model
    assert len(losses["bf16"]) == 5 and all(math.isfinite(x) for x in losses["bf16"])
    assert losses["bf16"] != losses["fp32"], "bf16 autocast did not change the arithmetic"
    for a, b in zip(losses["bf16"], losses["fp32"]):
        assert a == pytest.approx(b, rel=2e-2)
    for p in models["bf16"].parameters():
        assert p.dtype == torch.float32  # parameters stay fp32 under autocast


# ---- resumes that lose nothing ------------------------------------------------------------------------------


class Killed(BaseException):
    """Stands for SIGKILL: it passes every `except Exception`, so nothing is saved on the way out."""


class KillAt(Batches):
    """Batches that raise Killed when asked for the first micro batch of (1-based) step `step`."""

    def __init__(self, samples: torch.Tensor, micro_batch: int, step: int, grad_accum: int = 1):
        super().__init__(samples, micro_batch)
        self.kill_pos = (step - 1) * grad_accum

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.pos == self.kill_pos:
            raise Killed(f"killed at batch {self.pos}")
        return super().next_batch()


def _fit(run: Path, cfg: TrainConfig, data: torch.Tensor, kill_at: int | None = None):
    """(last metrics or None when killed, the trained model) of a fresh model trained in `run` (resuming there)."""
    model = tiny_model()
    batches = KillAt(data, cfg.micro_batch, kill_at, cfg.grad_accum) if kill_at else Batches(data, cfg.micro_batch)
    evals = [EvalSet("validation", lambda: [Batches(data, cfg.micro_batch).next_batch()])]
    try:
        return Trainer(model, CausalLM(), batches, cfg, run, evals).fit(), model
    except Killed:
        return None, model


def _assert_same_run(a: Path, b: Path, model_a: torch.nn.Module, model_b: torch.nn.Module) -> None:
    """Each step logged once, with bit-identical metrics, and bit-identical parameters."""
    rows_a = [{k: v for k, v in r.items() if k not in ("tokens_per_s", "rss_gb")} for r in read_metrics(a)]
    rows_b = [{k: v for k, v in r.items() if k not in ("tokens_per_s", "rss_gb")} for r in read_metrics(b)]
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a], "each step must be logged exactly once"
    assert rows_b == rows_a
    differ = [k for k, v in model_a.named_parameters() if not torch.equal(v, dict(model_b.named_parameters())[k])]
    assert not differ, f"parameters differ from the straight run: {differ}"


def test_a_run_killed_before_its_first_checkpoint_logs_every_step_once(tmp_path):
    data, cfg = samples(16), config(steps=8, save_every=5)
    _, straight = _fit(tmp_path / "a", cfg, data)
    assert _fit(tmp_path / "b", cfg, data, kill_at=4)[0] is None
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [1, 2, 3]
    assert not list_checkpoints(tmp_path / "b" / "checkpoints")
    _, resumed = _fit(tmp_path / "b", cfg, data)
    _assert_same_run(tmp_path / "a", tmp_path / "b", straight, resumed)


def test_resume_survives_a_torn_last_metrics_line(tmp_path):
    data, cfg = samples(16), config(steps=8, save_every=3)
    _, straight = _fit(tmp_path / "a", cfg, data)
    assert _fit(tmp_path / "b", cfg, data, kill_at=6)[0] is None
    with (tmp_path / "b" / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"step": 6, "loss": 1.2')  # the append a kill cut short
    _, resumed = _fit(tmp_path / "b", cfg, data)
    _assert_same_run(tmp_path / "a", tmp_path / "b", straight, resumed)


def test_a_truncated_newest_checkpoint_falls_back_to_the_older_one(tmp_path):
    data, cfg = samples(16), config(steps=8, save_every=3, keep_last=2)
    _, straight = _fit(tmp_path / "a", cfg, data)
    assert _fit(tmp_path / "b", cfg, data, kill_at=8)[0] is None
    ckdir = tmp_path / "b" / "checkpoints"
    assert [s for s, _ in list_checkpoints(ckdir)] == [3, 6]
    torn = ckdir / "step-000006" / "optimizer.safetensors"
    os.truncate(torn, torn.stat().st_size // 2)
    _, resumed = _fit(tmp_path / "b", cfg, data)  # from step 3: steps 4-8 again
    _assert_same_run(tmp_path / "a", tmp_path / "b", straight, resumed)
    assert [s for s, _ in list_checkpoints(ckdir)] == [6, 8]
    for _, path in list_checkpoints(ckdir):
        load_checkpoint(path)  # whole
    assert (ckdir / "step-000006.unreadable").is_dir(), "the unreadable checkpoint is set aside, not deleted"


@pytest.mark.parametrize("cut", ["after-optimizer-unlink", "before-rmdir"])
def test_an_interrupted_prune_leaves_no_half_checkpoint_and_the_next_prune_cleans_up(cut, tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        save_checkpoint(root, step, {"w": torch.full((4,), float(step))},
                        {"state": {0: {"exp_avg": torch.ones(4)}}, "param_groups": [{"params": [0]}]}, {})
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        real_unlink(path, *args, **kwargs)
        if cut == "after-optimizer-unlink" and Path(path).name == "optimizer.safetensors":
            raise Killed(f"after unlinking {path}")

    def rmdir(path, *args, **kwargs):
        raise Killed(f"before rmdir {path}")

    with monkeypatch.context() as m:
        m.setattr(os, "unlink", unlink)
        if cut == "before-rmdir":
            m.setattr(os, "rmdir", rmdir)
        with pytest.raises(Killed):
            prune(root, keep_last=1)
    listed = list_checkpoints(root)
    assert [s for s, _ in listed] == [2, 3], "a half-deleted checkpoint must not count as one"
    for _, path in listed:
        load_checkpoint(path)
    prune(root, keep_last=1)
    assert [p.name for p in root.iterdir()] == ["step-000003"]


def test_bf16_resume_is_exact(tmp_path):
    """Recipes train under bf16 autocast: N steps straight == N/2, a kill, a resume, N/2 more, bit for bit."""
    data = samples(16)
    kw = dict(steps=8, save_every=4, grad_accum=2, micro_batch=2, clip_grad=1.0,
              schedule=ScheduleConfig(name="cosine", warmup_steps=2))
    cfg = config(precision="bf16", **kw)
    _, straight = _fit(tmp_path / "a", cfg, data)
    assert _fit(tmp_path / "b", cfg, data, kill_at=6)[0] is None
    assert [s for s, _ in list_checkpoints(tmp_path / "b" / "checkpoints")] == [4]
    _, resumed = _fit(tmp_path / "b", cfg, data)
    _assert_same_run(tmp_path / "a", tmp_path / "b", straight, resumed)
    _fit(tmp_path / "fp32", config(precision="fp32", **kw), data)
    assert train_rows(tmp_path / "fp32") != train_rows(tmp_path / "a"), "bf16 autocast did not change the arithmetic"


def test_a_run_resumed_at_its_end_returns_its_last_metrics(tmp_path):
    """A finished run re-run (or one killed after its last checkpoint) trains nothing and returns what it logged
    at its last step, validation metrics included (eval.json is written from them)."""
    data, cfg = samples(16), config(steps=6, save_every=3)
    last, _ = _fit(tmp_path, cfg, data)
    assert last["step"] == 6 and "val_loss" in last
    again, _ = _fit(tmp_path, cfg, data)
    assert again == last
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 7))


# ---- on CUDA (run whenever a GPU is lent: pytest -m gpu) ------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_resume_is_exact(tmp_path, precision):
    """bf16 autocast, and fp16 with the gradient scaler (its scale comes back with the checkpoint), on CUDA."""
    data = samples(16)
    cfg = config(precision=precision, device="cuda", steps=8, save_every=4, grad_accum=2, micro_batch=2,
                 clip_grad=1.0, schedule=ScheduleConfig(name="cosine", warmup_steps=2))
    _, straight = _fit(tmp_path / "a", cfg, data)
    assert _fit(tmp_path / "b", cfg, data, kill_at=6)[0] is None
    _, resumed = _fit(tmp_path / "b", cfg, data)
    assert next(resumed.parameters()).is_cuda
    _assert_same_run(tmp_path / "a", tmp_path / "b", straight, resumed)
    if precision == "fp16":
        state = load_checkpoint(list_checkpoints(tmp_path / "b" / "checkpoints")[-1][1])[2]
        assert state["scaler"] and state["scaler"]["scale"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_adamw_on_cuda_follows_the_plain_loop(tmp_path):
    data = samples(16)
    runs = {}
    for fused in (True, False):
        cfg = config(device="cuda", steps=6, optimizer=OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1,
                                                                   fused=fused))
        _, runs[fused] = _fit(tmp_path / str(fused), cfg, data)
    for (name, a), b in zip(runs[True].named_parameters(), runs[False].parameters()):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name
    assert not torch.equal(next(runs[True].parameters()).cpu(), next(tiny_model().parameters())), "nothing trained"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attention_kernels_on_cuda_agree_with_the_cpu_model():
    """The flash / memory-efficient SDPA kernels (bf16 on CUDA) against the fp32 CPU model's logits."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny_model().eval()
    ids = samples(2)[:, :T]
    with torch.no_grad():
        expected = model(ids).logits.float()
        gpu = copy.deepcopy(model).cuda()
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
            with sdpa_kernel(backend), torch.autocast("cuda", dtype=torch.bfloat16):
                got = gpu(ids.cuda()).logits.float().cpu()
            assert (got - expected).abs().max() < 0.05 * expected.abs().max(), backend
