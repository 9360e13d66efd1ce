"""Knowledge distillation: the losses against hand computations (2 tokens × 3 classes), T² scaling, the CE mix, GKD's
JSD limits, chunked = unchunked (values and gradients), the objective (frozen teacher, on-policy samples, shared
vocabulary), and `lmforge distill` end to end on tiny models (lm and classify) with exact resume after a crash.
Real-model figures (SmolLM2 → llama-7m, MiniLM → small BERT) are the slow tests at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine_fixtures import dump_config, stdlib_files

from lmforge import cli
from lmforge.objectives.distill import (DistillSpec, Distillation, OnPolicyMix, check_shared_vocabulary,
                                        chunked_distillation, distillation_loss, forward_kl, jsd, reverse_kl)

# two tokens, three classes
S = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
T = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])


def _softmax(row: list[float], temp: float = 1.0) -> list[float]:
    e = [math.exp(z / temp) for z in row]
    return [x / sum(e) for x in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _hand(fn, temp: float = 1.0) -> float:
    """Mean over the two rows of fn(p_student, p_teacher), by hand in Python floats."""
    return sum(fn(_softmax(s, temp), _softmax(t, temp)) for s, t in zip(S.tolist(), T.tolist())) / 2


# ---- losses


def test_forward_and_reverse_kl_match_the_formulas_by_hand():
    assert forward_kl(S, T).item() == pytest.approx(_hand(lambda ps, pt: _kl(pt, ps)), rel=1e-6)
    assert reverse_kl(S, T).item() == pytest.approx(_hand(lambda ps, pt: _kl(ps, pt)), rel=1e-6)
    assert forward_kl(S, T).item() != pytest.approx(reverse_kl(S, T).item(), rel=1e-3)  # KL is not symmetric
    # a masked row is left out of the mean
    first = _kl(_softmax(T[0].tolist()), _softmax(S[0].tolist()))
    assert forward_kl(S, T, labels=torch.tensor([1, -100])).item() == pytest.approx(first, rel=1e-6)
    assert forward_kl(S, T, reduction="sum").item() == pytest.approx(2 * forward_kl(S, T).item(), rel=1e-6)


def test_temperature_softens_both_and_scales_by_t_squared():
    for temp in (2.0, 4.0):
        hand = temp ** 2 * _hand(lambda ps, pt: _kl(pt, ps), temp)
        assert forward_kl(S, T, temperature=temp).item() == pytest.approx(hand, rel=1e-6)
        # the same as torch's kl_div (batchmean) on the softened distributions, times T²
        ref = F.kl_div(F.log_softmax(S / temp, -1), F.log_softmax(T / temp, -1), log_target=True,
                       reduction="batchmean") * temp ** 2
        assert forward_kl(S, T, temperature=temp).item() == pytest.approx(ref.item(), rel=1e-6)
    hand_r = 9 * _hand(lambda ps, pt: _kl(ps, pt), 3.0)
    assert reverse_kl(S, T, temperature=3.0).item() == pytest.approx(hand_r, rel=1e-6)


def test_jsd_matches_the_formula_and_its_limits():
    beta = 0.3

    def gjsd(ps, pt):
        m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
        return beta * _kl(pt, m) + (1 - beta) * _kl(ps, m)

    assert jsd(S, T, beta=beta).item() == pytest.approx(_hand(gjsd), rel=1e-6)
    assert jsd(S, T, beta=0.5).item() <= math.log(2) + 1e-6  # the symmetric JSD is bounded by ln 2
    # GKD: JSD(β)/β → KL(p_t ‖ p_s) as β → 0 and JSD(β)/(1 − β) → KL(p_s ‖ p_t) as β → 1; the ends are those KLs
    eps = 1e-4
    assert (jsd(S, T, beta=eps) / eps).item() == pytest.approx(forward_kl(S, T).item(), rel=1e-3)
    assert (jsd(S, T, beta=1 - eps) / eps).item() == pytest.approx(reverse_kl(S, T).item(), rel=1e-3)
    assert jsd(S, T, beta=0.0).item() == forward_kl(S, T).item()
    assert jsd(S, T, beta=1.0).item() == reverse_kl(S, T).item()
    assert jsd(T, T, beta=beta).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="beta must be in"):
        jsd(S, T, beta=1.5)


def test_alpha_mixes_the_divergence_with_hard_label_cross_entropy():
    labels = torch.tensor([2, -100])
    ce = F.cross_entropy(S, labels, ignore_index=-100)
    assert distillation_loss(S, T, labels, DistillSpec(alpha=0.0)).item() == pytest.approx(ce.item(), rel=1e-6)
    kd = forward_kl(S, T, labels, temperature=2.0)
    assert distillation_loss(S, T, labels, DistillSpec("forward_kl", 2.0, 1.0)).item() == pytest.approx(kd.item())
    mixed = distillation_loss(S, T, labels, DistillSpec("forward_kl", 2.0, 0.7)).item()
    assert mixed == pytest.approx(0.7 * kd.item() + 0.3 * ce.item(), rel=1e-6)
    with pytest.raises(ValueError, match="alpha and beta must be in"):
        DistillSpec(alpha=1.5).validate()


@pytest.mark.parametrize("loss,temp,alpha,beta", [("forward_kl", 2.0, 0.6, 0.3), ("reverse_kl", 2.0, 0.6, 0.3),
                                                   ("jsd", 2.0, 0.6, 0.3), ("jsd", 1.0, 1.0, 0.0), ("jsd", 3.0, 1.0, 1.0),
                                                   ("forward_kl", 1.0, 0.0, 0.5), ("reverse_kl", 1.0, 0.9, 0.5)])
def test_chunked_equals_unchunked_in_value_and_gradient(loss, temp, alpha, beta):
    """The chunked pass's closed-form gradients are autograd's through the plain formula."""
    torch.manual_seed(0)
    n, c, v = 11, 8, 17
    h = torch.randn(n, c, requires_grad=True)  # (N, C)
    w = torch.randn(v, c, requires_grad=True)  # (V, C)
    zt = torch.randn(n, v)  # (N, V) teacher logits
    labels = torch.randint(0, v, (n,))
    labels[[2, 7]] = -100
    spec = DistillSpec(loss, temp, alpha, beta)
    ref = distillation_loss(h @ w.t(), zt, labels, spec, reduction="sum")
    gh, gw = torch.autograd.grad(ref, [h, w])
    for chunk in (1, 4, 64):
        total, sums = chunked_distillation(h, w, lambda rows: zt[rows], labels, spec, chunk=chunk)
        assert total.item() == pytest.approx(ref.item(), rel=1e-5)
        assert (spec.alpha * sums[0] + (1 - spec.alpha) * sums[1]).item() == pytest.approx(ref.item(), rel=1e-5)
        gh2, gw2 = torch.autograd.grad(total, [h, w])
        torch.testing.assert_close(gh2, gh, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gw2, gw, rtol=1e-5, atol=1e-6)
        assert gh2[2].abs().sum() == 0  # unlabelled positions get no gradient


# ---- the objective on tiny models


def _tok(bpe_data):
    from lmforge.tokenizer import Tokenizer

    return Tokenizer.from_dir(bpe_data.tokenizer)


def _llama(tok, seed: int, **over):
    from lmforge.models.presets import preset
    from lmforge.models.transformer import Transformer

    torch.manual_seed(seed)
    return Transformer(preset("llama-tiny", **{"vocab_size": tok.vocab_size, "eos_token_id": tok.eos_id, **over}))


def _loader(bpe_data, seq_len: int = 32, micro_batch: int = 4, seed: int = 0):
    from lmforge.data.loader import PackedLoader, SourceSpec

    return PackedLoader([SourceSpec(str(bpe_data.shards))], seq_len, micro_batch, seed=seed)


@pytest.fixture(scope="module")
def trained_teacher(bpe_data):
    """A llama-tiny after 40 next-token steps on the shards: a teacher with something to teach."""
    tok = _tok(bpe_data)
    teacher = _llama(tok, 1)
    loader = _loader(bpe_data, micro_batch=8, seed=1)
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-2)
    for _ in range(40):
        batch = loader.next_batch()
        out = teacher(batch["input_ids"], labels=batch["labels"])
        (out.extra["loss_sum"] / out.extra["loss_tokens"]).backward()
        opt.step()
        opt.zero_grad()
    return teacher.eval()


def test_distilling_trains_the_student_lowers_kd_and_leaves_the_teacher_alone(bpe_data, trained_teacher):
    import copy

    tok = _tok(bpe_data)
    teacher = copy.deepcopy(trained_teacher)
    student = _llama(tok, 2, num_layers=1)
    objective = Distillation(teacher, "forward_kl", temperature=1.0, alpha=1.0)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    loader = _loader(bpe_data)
    held = [loader.next_batch() for _ in range(2)]
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    before_s = {k: v.clone() for k, v in student.state_dict().items()}

    def kd() -> float:
        with torch.no_grad():
            return sum(float(objective(student, b)[1]["kd"]) for b in held) / len(held)

    start = kd()
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    for _ in range(15):
        loss, metrics = objective(student, loader.next_batch())
        assert metrics["ce"] == 0 and metrics["tokens"] == 4 * 32
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert kd() < 0.5 * start
    assert all(torch.equal(v, before_t[k]) for k, v in teacher.state_dict().items())
    assert all(not torch.equal(v, before_s[k]) for k, v in student.state_dict().items() if v.is_floating_point())


def test_on_policy_batches_are_the_students_own_continuations(bpe_data):
    tok = _tok(bpe_data)
    teacher, student = _llama(tok, 1), _llama(tok, 2)
    objective = Distillation(teacher, "reverse_kl", prompt_tokens=5, new_tokens=6, sample_temperature=1.0)
    batch = _loader(bpe_data, micro_batch=3).next_batch()
    batch["on_policy_seed"] = torch.tensor([11])
    student.train()
    a, b = objective.sample(student, batch), objective.sample(student, batch)
    assert student.training  # the engine's eval mode is undone
    assert torch.equal(a["input_ids"], b["input_ids"])  # seeded: the same samples again
    ids, labels = a["input_ids"], a["labels"]  # (B, P + G - 1)
    assert ids.shape == (3, 5 + 6 - 1) and torch.equal(ids[:, :5], batch["input_ids"][:, :5])
    assert (labels[:, :4] == -100).all()  # prompt positions carry no loss
    real = labels[:, 4:] != -100
    assert torch.equal(labels[:, 4:-1][real[:, :-1]], ids[:, 5:][real[:, :-1]])  # label t is the token at t + 1
    loss, metrics = objective(student, batch)  # the objective samples, then scores with the teacher
    assert metrics["ce"] == 0 and 0 < metrics["tokens"] <= 3 * 6 and loss.requires_grad


def test_on_policy_mix_draws_a_fraction_and_resumes_at_the_same_draw(bpe_data):
    mix = OnPolicyMix(_loader(bpe_data), 0.5, seed=3)
    batches = [mix.next_batch() for _ in range(40)]
    flags = ["on_policy_seed" in b for b in batches]
    assert 10 < sum(flags) < 30
    again = OnPolicyMix(_loader(bpe_data), 0.5, seed=3)
    for _ in range(25):
        again.next_batch()
    state = again.state_dict()
    resumed = OnPolicyMix(_loader(bpe_data), 0.5, seed=3)
    resumed.load_state_dict(state)
    rest = [resumed.next_batch() for _ in range(15)]
    assert ["on_policy_seed" in b for b in rest] == flags[25:]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(rest, batches[25:]))
    assert all(torch.equal(a["on_policy_seed"], b["on_policy_seed"]) for a, b in zip(rest, batches[25:])
               if "on_policy_seed" in a)
    assert resumed.epoch == mix.epoch > 0  # the wrapped source's attributes show through
    never = OnPolicyMix(_loader(bpe_data), 0.0)
    assert not any("on_policy_seed" in never.next_batch() for _ in range(10))


def test_a_different_vocabulary_is_refused(bpe_data, wordpiece_data):
    from lmforge.tokenizer import Tokenizer

    bpe, wp = _tok(bpe_data), Tokenizer.from_dir(wordpiece_data.tokenizer)
    check_shared_vocabulary(512, 512, bpe, _tok(bpe_data))
    with pytest.raises(ValueError, match=r"teacher tokenizer \(\d+ tokens\) and student tokenizer \(\d+ tokens\).*"
                                         r"mapped vocabulary is not supported"):
        check_shared_vocabulary(512, 512, bpe, wp)
    teacher, student = _llama(bpe, 1), _llama(bpe, 2, vocab_size=576)
    with pytest.raises(ValueError, match="teacher outputs 512 tokens/classes, the student 576.*not supported"):
        Distillation(teacher)(student, _loader(bpe_data).next_batch())


# ---- the stage


@pytest.fixture(scope="module")
def lm_teacher(bpe_data, trained_teacher, tmp_path_factory) -> Path:
    from lmforge.models.loading import save

    return save(trained_teacher, _tok(bpe_data), tmp_path_factory.mktemp("teacher") / "model")


def _lm_config(path: Path, run: Path, teacher: Path, shards: Path, **over) -> Path:
    cfg = {"teacher": str(teacher), "student": "llama-tiny", "run_dir": str(run),
           "student_overrides": {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "num_kv_heads": 1,
                                 "intermediate_size": 64},
           "temperature": 2.0, "alpha": 0.7,
           "data": {"train": [str(shards)], "seq_len": 32},
           "train": {"steps": 8, "micro_batch": 2, "log_every": 1, "eval_every": 4, "eval_batches": 2,
                     "save_every": 4, "tensorboard": False, "progress_bar": False, "precision": "fp32",
                     "device": "cpu", "optimizer": {"lr": 3e-3}, "schedule": {"warmup_steps": 2}},
           "eval": {"tasks": ["stdlib-ppl", "stdlib-mc"], "limit": 2, "decode_tokens": 4, "repeats": 1}}
    return dump_config(cfg, path, **over)


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


def test_stage_lm_writes_the_student_and_compress_json(lm_teacher, bpe_data, tmp_path):
    import lmforge

    run = tmp_path / "run"
    config = _lm_config(tmp_path / "c.yaml", run, lm_teacher, bpe_data.shards, on_policy=0.5, on_policy_prompt=8,
                        on_policy_tokens=8)
    assert cli.main(["distill", "--config", str(config)]) == 0
    student, tok = lmforge.load(run / "final")
    assert student.cfg.num_layers == 1 and student.cfg.vocab_size == 512 and tok is not None
    report = json.loads((run / "final" / "compress.json").read_text())
    before, after = report["before"], report["after"]
    assert report["command"] == "distill" and report["config"]["teacher"] == str(lm_teacher)
    assert after["float32_bytes"] < before["float32_bytes"] and after["size_bytes"] < before["size_bytes"]
    for side in (before, after):
        assert side["stdlib-ppl"]["bits_per_byte"] > 0 and side["decode_tokens_per_s"] > 0
    ev = json.loads((run / "eval.json").read_text())
    assert ev["step"] == 8 and ev["val_kd"] > 0 and ev["val_bpb"] > 0
    lineage = json.loads((run / "final" / "lmforge.json").read_text())
    assert lineage["stage"] == "distill" and lineage["teacher"] == str(lm_teacher)


def test_stage_resumes_after_a_crash_exactly(lm_teacher, bpe_data, tmp_path, monkeypatch):
    """A run that dies at step 7 (after its step-4 checkpoint) and is re-run ends as the straight run: same
    per-step losses, same final weights; on-policy draws and samples included."""
    from lmforge.data.loader import PackedLoader

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: bitwise-repeatable kernels (see tests/stages/test_pretrain_resume.py)
    try:
        over = dict(on_policy=0.5, on_policy_prompt=8, on_policy_tokens=6, **{"eval.enabled": False})
        straight = tmp_path / "a"
        assert cli.main(["distill", "--config", str(_lm_config(tmp_path / "a.yaml", straight, lm_teacher,
                                                               bpe_data.shards, **over))]) == 0
        crashed = tmp_path / "b"
        config = _lm_config(tmp_path / "b.yaml", crashed, lm_teacher, bpe_data.shards, **over)
        real = PackedLoader.next_batch

        def dying(self):
            if self.windows[0].split == "train" and self.pos == 6 * self.micro_batch:  # step 7's batch
                raise RuntimeError("simulated crash")
            return real(self)

        monkeypatch.setattr(PackedLoader, "next_batch", dying)
        assert cli.main(["distill", "--config", str(config)]) == 1
        assert not (crashed / "final").exists() and [s for s, _ in _losses(crashed)] == list(range(1, 7))
        monkeypatch.setattr(PackedLoader, "next_batch", real)
        assert cli.main(["distill", "--config", str(config)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert _losses(crashed) == _losses(straight)
    a, b = _weights(straight), _weights(crashed)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _comment_vs_code(path: Path, n: int = 80) -> Path:
    """{"text", "label"} records: lines of standard-library source that define a function vs comment lines."""
    code, comments = [], []
    for f in stdlib_files():
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            s = line.strip()
            if s.startswith("def ") and len(code) < n // 2:
                code.append(s)
            elif s.startswith("# ") and len(s) > 12 and len(comments) < n // 2:
                comments.append(s)
    records = [{"text": t, "label": "code"} for t in code] + [{"text": t, "label": "comment"} for t in comments]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_stage_classify_distills_a_classifier(wordpiece_data, tmp_path):
    import lmforge
    from lmforge.models.loading import save
    from lmforge.models.presets import preset
    from lmforge.models.transformer import Transformer
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(wordpiece_data.tokenizer)
    torch.manual_seed(0)
    teacher = Transformer(preset("bert-tiny", vocab_size=tok.vocab_size, head="classifier", pooler=True,
                                 num_labels=2, id2label={0: "code", 1: "comment"}, pad_token_id=tok.pad_id))
    teacher_dir = save(teacher, tok, tmp_path / "teacher")
    cfg = {"teacher": str(teacher_dir), "student": "bert-tiny", "task": "classify", "run_dir": str(tmp_path / "run"),
           "student_overrides": {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64},
           "loss": "jsd", "beta": 0.5, "alpha": 0.5,
           "data": {"train": [str(_comment_vs_code(tmp_path / "d.jsonl"))], "validation_fraction": 0.25,
                    "classify": {"max_length": 32}},
           "train": {"steps": 4, "micro_batch": 8, "log_every": 1, "eval_batches": None, "tensorboard": False,
                     "progress_bar": False, "precision": "fp32", "device": "cpu", "optimizer": {"lr": 1e-3},
                     "schedule": {"warmup_steps": 0}},
           "eval": {"tasks": ["stdlib-ppl"], "limit": 2}}
    assert cli.main(["distill", "--config", str(dump_config(cfg, tmp_path / "c.yaml"))]) == 0
    student, _ = lmforge.load(tmp_path / "run" / "final")
    assert student.cfg.head == "classifier" and student.cfg.num_layers == 1
    assert student.cfg.id2label == {0: "code", 1: "comment"}
    report = json.loads((tmp_path / "run" / "final" / "compress.json").read_text())
    for side in (report["before"], report["after"]):
        assert 0 <= side["validation"]["accuracy"] <= 1 and side["validation"]["examples"] > 0
        assert "stdlib-ppl" not in side and side["decode_tokens_per_s"] is None  # LM tasks skip classifiers
    assert report["after"]["float32_bytes"] < report["before"]["float32_bytes"]
    assert 0 <= json.loads((tmp_path / "run" / "eval.json").read_text())["val_accuracy"] <= 1


def test_stage_refuses_a_student_with_another_tokenizer(lm_teacher, wordpiece_data, bpe_data, tmp_path, capsys):
    from lmforge.models.loading import save
    from lmforge.models.presets import preset
    from lmforge.models.transformer import Transformer
    from lmforge.tokenizer import Tokenizer

    wp = Tokenizer.from_dir(wordpiece_data.tokenizer)
    other = save(Transformer(preset("llama-tiny", vocab_size=wp.vocab_size)), wp, tmp_path / "other")
    config = _lm_config(tmp_path / "c.yaml", tmp_path / "run", lm_teacher, bpe_data.shards, student=str(other),
                        student_overrides={})
    assert cli.main(["distill", "--config", str(config)]) != 0
    err = capsys.readouterr().err
    assert "mapped vocabulary is not supported" in err and "Traceback" not in err


def test_config_errors_are_one_line(lm_teacher, bpe_data, tmp_path, capsys):
    config = _lm_config(tmp_path / "c.yaml", tmp_path / "run", lm_teacher, bpe_data.shards, task="classify",
                        on_policy=0.5)
    assert cli.main(["distill", "--config", str(config)]) == 2
    assert "on_policy 0.5 needs task lm" in capsys.readouterr().err


# ---- real models (slow): run with `pytest -m slow tests/unit/test_distill.py`


@pytest.mark.slow
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_jsd_matches_trl_generalized_jsd_loss(beta):
    """TRL's GKD loss (reduction batchmean over the labelled tokens) is ours at T = 1, and ours / T² at T = 2."""
    gkd = pytest.importorskip("trl.experimental.gkd")
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)  # (B, T, V)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = -100
    for temp in (1.0, 2.0):
        ref = gkd.GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=temp)
        ours = jsd(s, t, labels, beta=beta, temperature=temp) / temp ** 2
        assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
