"""Knowledge distillation: a student trained on a frozen teacher's output distributions.

Losses on logits (all in float32, rows whose label is -100 left out, reduced to a mean per labelled token, or per
example for classifiers), p = softmax(z / T) for teacher (t) and student (s) logits z at temperature T:

- forward KL (Hinton et al. 2015, §2): T² · KL(p_t ‖ p_s), mixed with the hard-label cross-entropy,
  L = α · KD + (1 − α) · CE;
- reverse KL (MiniLLM, Gu et al. 2023, eq. 1): T² · KL(p_s ‖ p_t), mode-seeking;
- generalised Jensen–Shannon (GKD, Agarwal et al. 2024, eq. 4, TRL's `generalized_jsd_loss` convention: β weights
  the teacher's side): T² · [β · KL(p_t ‖ m) + (1 − β) · KL(p_s ‖ m)], m = β p_t + (1 − β) p_s. It vanishes as
  β → 0 or 1; JSD(β)/β → KL(p_t ‖ p_s) and JSD(β)/(1 − β) → KL(p_s ‖ p_t), so β = 0 and β = 1 exactly are
  taken as the forward and reverse KL (as TRL does).

The divergence used with any of them is mixed with CE the same way (α = 1: distillation alone). T² keeps the
gradients' size when T changes (Hinton §2.1); at T = 1 each loss is its paper's formula.

`Distillation` is the engine objective: next-token distributions of causal LMs (computed in chunks of positions
from the hidden states, so no (B, T, V) float32 logits of either model are kept, V = 49152 for SmolLM2) or class
distributions of classifiers. With `OnPolicyMix` a fraction λ of micro batches is on-policy (GKD §3): the
student samples continuations of the batch's prefixes with the inference engine, the teacher scores them, and the
divergence alone is the loss on those tokens (the samples are no ground truth for CE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .causal_lm import IGNORE

__all__ = ["LOSSES", "DistillSpec", "forward_kl", "reverse_kl", "jsd", "distillation_loss", "chunked_distillation",
           "check_shared_vocabulary", "output_weight", "build_student", "Distillation",
           "OnPolicyMix"]

LossName = Literal["forward_kl", "reverse_kl", "jsd"]
Reduction = Literal["mean", "sum", "none"]
LOSSES = ("forward_kl", "reverse_kl", "jsd")


@dataclass(frozen=True)
class DistillSpec:
    """Which divergence, at which temperature, mixed how with the hard-label cross-entropy."""

    loss: LossName = "forward_kl"
    """forward_kl (Hinton), reverse_kl (MiniLLM) or jsd (GKD's generalised JSD)."""
    temperature: float = 1.0
    """Softmax temperature T of both distributions (the divergence is scaled by T²)."""
    alpha: float = 0.5
    """Weight of the divergence: L = α · divergence + (1 − α) · CE on the labels."""
    beta: float = 0.5
    """jsd: weight of the teacher's side (0 = forward KL, 1 = reverse KL)."""

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, found {self.loss!r}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be > 0, found {self.temperature}")
        if not 0 <= self.alpha <= 1 or not 0 <= self.beta <= 1:
            raise ValueError(f"alpha and beta must be in [0, 1], found alpha {self.alpha}, beta {self.beta}")


# ---- losses on logits (..., V)


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    return torch.log_softmax(logits.float() / temperature, dim=-1)  # (..., V) fp32


def _kl_rows(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ_v p_v (log p_v − log q_v) per row (...,); p_v = 0 contributes 0 (also where log p_v = −inf)."""
    terms = logp.exp() * (logp - logq)  # (..., V)
    return torch.where(torch.isneginf(logp), 0.0, terms).sum(-1)


def _divergence(ls: Tensor, lt: Tensor, loss: LossName, beta: float, grad: bool) -> tuple[Tensor, Tensor | None]:
    """The divergence per row (...,) of student / teacher log-probs ls, lt (..., V) at temperature T (unscaled)
    and, with `grad`, its gradient with respect to the student's tempered logits u = z / T in closed form: p_s − p_t
    for the forward KL; p_s ⊙ (d − Σ p_s d) for the others, d = ∂D/∂p_s up to a constant (log p_s − log p_t for
    the reverse KL, (1 − β)(log p_s − log m) for the JSD)."""
    if loss == "forward_kl" or (loss == "jsd" and beta == 0):
        return _kl_rows(lt, ls), (ls.exp() - lt.exp()) if grad else None
    if loss == "reverse_kl" or (loss == "jsd" and beta == 1):
        rows, d = _kl_rows(ls, lt), (ls - lt if grad else None)
    elif loss == "jsd":
        lm = torch.logaddexp(lt + math.log(beta), ls + math.log(1 - beta))  # log m, m = β p_t + (1 − β) p_s
        rows = beta * _kl_rows(lt, lm) + (1 - beta) * _kl_rows(ls, lm)
        d = (1 - beta) * (ls - lm) if grad else None
    else:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, found {loss!r}")
    if not grad:
        return rows, None
    ps = ls.exp()
    return rows, ps * (d - (ps * d).sum(-1, keepdim=True))


def _divergence_rows(student: Tensor, teacher: Tensor, loss: LossName, temperature: float, beta: float) -> Tensor:
    """The divergence per row (...,) in float32, scaled by T² (see the module docstring); autograd differentiates
    it."""
    ls, lt = _log_probs(student, temperature), _log_probs(teacher, temperature)  # (..., V)
    return _divergence(ls, lt, loss, beta, False)[0] * temperature ** 2


def _chunk(z: Tensor, zt: Tensor | None, y: Tensor, spec: DistillSpec, grad: bool
           ) -> tuple[Tensor, Tensor, Tensor | None]:
    """(Σ divergence, Σ CE, d(α·divergence + (1 − α)·CE)/dz or None) of student logits z (n, V) against teacher
    logits zt (n, V) and labels y (n,), all rows labelled; the gradient in closed form (dD/dz = T · dD/du for the
    T²-scaled divergence; dCE/dz = softmax(z) − onehot(y))."""
    temp, alpha = spec.temperature, spec.alpha
    zero = torch.zeros((), device=z.device)
    ls = _log_probs(z, temp)  # (n, V)
    div, ce, g = zero, zero, None
    if alpha > 0:
        rows, gu = _divergence(ls, _log_probs(zt, temp), spec.loss, spec.beta, grad)
        div = rows.sum() * temp ** 2
        g = gu.mul_(alpha * temp) if grad else None
    if alpha < 1:
        lp = ls if temp == 1 else torch.log_softmax(z.float(), -1)  # (n, V)
        picked = torch.arange(len(y), device=z.device), y
        ce = -lp[picked].sum()
        if grad:
            gc = lp.exp()
            gc[picked] -= 1.0
            g = gc.mul_(1 - alpha) if g is None else g.add_(gc, alpha=1 - alpha)
    return div, ce, g


def _reduce(rows: Tensor, labels: Tensor | None, reduction: Reduction) -> Tensor:
    """Rows (...,) with label -100 zeroed; then their sum, mean over the labelled rows, or the rows themselves."""
    if labels is not None:
        rows = torch.where(labels == IGNORE, 0.0, rows)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        n = rows.numel() if labels is None else int((labels != IGNORE).sum())
        return rows.sum() / max(n, 1)
    raise ValueError(f"reduction must be mean, sum or none, found {reduction!r}")


def forward_kl(student: Tensor, teacher: Tensor, labels: Tensor | None = None, temperature: float = 1.0,
               reduction: Reduction = "mean") -> Tensor:
    """T² · KL(p_t ‖ p_s) = T² Σ_v p_t,v (log p_t,v − log p_s,v), p = softmax(z / T) (Hinton et al. 2015), per row
    of logits (..., V); the mean over rows whose label is not -100 (all rows without labels)."""
    return _reduce(_divergence_rows(student, teacher, "forward_kl", temperature, 0.0), labels, reduction)


def reverse_kl(student: Tensor, teacher: Tensor, labels: Tensor | None = None, temperature: float = 1.0,
               reduction: Reduction = "mean") -> Tensor:
    """T² · KL(p_s ‖ p_t) = T² Σ_v p_s,v (log p_s,v − log p_t,v) (MiniLLM, Gu et al. 2023), per row of logits
    (..., V); the mean over labelled rows."""
    return _reduce(_divergence_rows(student, teacher, "reverse_kl", temperature, 0.0), labels, reduction)


def jsd(student: Tensor, teacher: Tensor, labels: Tensor | None = None, beta: float = 0.5, temperature: float = 1.0,
        reduction: Reduction = "mean") -> Tensor:
    """T² · [β KL(p_t ‖ m) + (1 − β) KL(p_s ‖ m)], m = β p_t + (1 − β) p_s (GKD, Agarwal et al. 2024; β on the
    teacher's side as TRL); β = 0 is KL(p_t ‖ p_s) and β = 1 is KL(p_s ‖ p_t), the limits of JSD/β and JSD/(1 − β).
    The mean over labelled rows."""
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], found {beta}")
    return _reduce(_divergence_rows(student, teacher, "jsd", temperature, beta), labels, reduction)


def _parts(student: Tensor, teacher: Tensor | None, labels: Tensor, spec: DistillSpec) -> tuple[Tensor, Tensor]:
    """(Σ divergence, Σ cross-entropy) over rows of logits (N, V) whose label is not -100; a term with weight 0 is
    not computed (teacher may then be None)."""
    zero = torch.zeros((), device=student.device)
    div = zero if spec.alpha == 0 else _reduce(
        _divergence_rows(student, teacher, spec.loss, spec.temperature, spec.beta), labels, "sum")
    ce = zero if spec.alpha == 1 else F.cross_entropy(student.float(), labels, ignore_index=IGNORE, reduction="sum")
    return div, ce


def distillation_loss(student: Tensor, teacher: Tensor, labels: Tensor, spec: DistillSpec = DistillSpec(),
                      reduction: Literal["mean", "sum"] = "mean") -> Tensor:
    """L = α · divergence(student, teacher) + (1 − α) · CE(student, labels), both summed over rows whose label is
    not -100 and divided by their count (mean) or not (sum); logits (..., V), labels (...)."""
    s, t, y = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1]), labels.reshape(-1)
    div, ce = _parts(s, t, y, spec)
    total = spec.alpha * div + (1 - spec.alpha) * ce
    return total / max(int((y != IGNORE).sum()), 1) if reduction == "mean" else total


# ---- chunked over positions, from hidden states


class _ChunkedDistill(torch.autograd.Function):
    """Σ of α · divergence + (1 − α) · CE over chunks of labelled positions of logits h Wᵀ; d loss / d logits of a
    chunk is computed at once (closed form) and turned into gradients of h and W, so only one chunk's (n, V) logits
    of the student and of the teacher exist at a time. Returns (total, [Σ divergence, Σ CE])."""

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, teacher_logits: Callable[[Tensor], Tensor] | None, labels: Tensor,
                spec: DistillSpec, chunk: int, dtype: torch.dtype, need_grad: bool):
        rows = (labels != IGNORE).nonzero().squeeze(1)  # (M,)
        hc, wc, y = h.detach()[rows].to(dtype), w.detach().to(dtype), labels[rows]  # (M, C), (V, C), (M,)
        need_h, need_w = need_grad and ctx.needs_input_grad[0], need_grad and ctx.needs_input_grad[1]
        grad_h = torch.zeros(h.shape, dtype=dtype, device=h.device) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        sums = torch.zeros(2, dtype=torch.float32, device=h.device)  # Σ divergence, Σ CE
        for a in range(0, hc.shape[0], chunk):
            b = min(a + chunk, hc.shape[0])
            zt = teacher_logits(rows[a:b]) if teacher_logits is not None else None  # (n, V), no grad
            div, ce, g = _chunk((hc[a:b] @ wc.t()).float(), zt, y[a:b], spec, need_h or need_w)  # g: (n, V)
            sums += torch.stack([div, ce])
            g = g.to(dtype) if g is not None else None
            if need_h:
                grad_h[rows[a:b]] = g @ wc
            if need_w:
                grad_w += (g.t() @ hc[a:b]).float()
        ctx.grads = (grad_h, grad_w)
        ctx.input_dtypes = (h.dtype, w.dtype)
        total = spec.alpha * sums[0] + (1 - spec.alpha) * sums[1]
        ctx.mark_non_differentiable(sums)
        return total, sums

    @staticmethod
    def backward(ctx, grad_total: Tensor, _grad_sums: Tensor):
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        return (None if grad_h is None else grad_h.to(ctx.input_dtypes[0]) * grad_total,
                None if grad_w is None else grad_w.to(ctx.input_dtypes[1]) * grad_total,
                None, None, None, None, None, None)


def chunked_distillation(h: Tensor, weight: Tensor, teacher_logits: Callable[[Tensor], Tensor] | None,
                         labels: Tensor, spec: DistillSpec, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """(Σ loss, [Σ divergence, Σ CE]) of student logits h Wᵀ (h (N, C), weight (V, C)) against
    `teacher_logits(rows)` (the teacher's (n, V) logits of those row indices) over rows with labels (N,) not -100,
    `chunk` rows at a time (default: 256 on CPU, 1024 on accelerators); differentiable in h and weight."""
    dev = h.device.type
    chunk = chunk or (256 if dev == "cpu" else 1024)
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    with torch.autocast(dev, enabled=False):
        return _ChunkedDistill.apply(h, weight, teacher_logits, labels, spec, chunk, dtype, need_grad)


# ---- the objective


def output_weight(model: nn.Module) -> Tensor:
    """The LM output matrix (V, C) of a Transformer: what `Transformer.project` multiplies by (tied or lm_head)."""
    return model.embed.tokens.weight if model.cfg.tie_embeddings else model.lm_head.weight


def check_shared_vocabulary(teacher_size: int, student_size: int, teacher_tok: Any = None,
                            student_tok: Any = None) -> None:
    """ValueError unless teacher and student share the vocabulary: the same output size and (given tokenizers) the
    same token strings at the same ids; a mapped vocabulary between two tokenizers is not supported."""
    if teacher_tok is not None and student_tok is not None and teacher_tok.fingerprint() != student_tok.fingerprint():
        tv, sv = teacher_tok.backend.get_vocab(), student_tok.backend.get_vocab()
        if tv != sv:
            diff = sorted(set(tv.items()) ^ set(sv.items()), key=lambda kv: kv[1])[:1]
            raise ValueError(f"teacher tokenizer ({len(tv)} tokens) and student tokenizer ({len(sv)} tokens) differ "
                             f"(e.g. {diff[0][0]!r} at id {diff[0][1]} is in one only); distillation needs a shared "
                             f"tokenizer, a mapped vocabulary is not supported")
    if teacher_size != student_size:
        raise ValueError(f"teacher outputs {teacher_size} tokens/classes, the student {student_size}; distillation "
                         f"needs the same vocabulary (a mapped vocabulary is not supported)")


def build_student(student: str, teacher: nn.Module, tok: Any, *, head: str = "lm", num_labels: int | None = None,
                  id2label: dict[int, str] | None = None, seed: int = 0, overrides: dict[str, Any] | None = None,
                  positions: int = 0) -> nn.Module:
    """The student in train mode: preset `student` built with the teacher's vocabulary and special tokens after
    seeding torch (`overrides` set ModelConfig fields; at least `positions` positions), or the model folder
    `student` (fp32), whose tokenizer must be the teacher's; `head` / `num_labels` / `id2label` set its head."""
    from ..models.presets import PRESETS, preset
    from ..models.transformer import Transformer
    from ..transforms.peft import load

    t = teacher.cfg
    if student in PRESETS:
        torch.manual_seed(seed)
        extra = {"pooler": True} if head == "classifier" and not t.causal else {}  # BERT classifiers pool [CLS]
        cfg = preset(student, vocab_size=t.vocab_size, pad_token_id=t.pad_token_id, bos_token_id=t.bos_token_id,
                     eos_token_id=t.eos_token_id, head=head, num_labels=num_labels or 2, id2label=id2label,
                     **extra, **(overrides or {}))
        if cfg.causal != t.causal:
            kind = {True: "a decoder", False: "an encoder"}
            raise ValueError(f"student preset {student!r} is {kind[cfg.causal]}, the teacher {kind[t.causal]}; "
                             f"expected the same kind")
        cfg.max_position_embeddings = max(cfg.max_position_embeddings, positions)
        model, student_tok = Transformer(cfg), tok
    else:
        model, student_tok = load(student, dtype=torch.float32, head=head, num_labels=num_labels)
        model.cfg.id2label = id2label or model.cfg.id2label
    lm = head == "lm"
    check_shared_vocabulary(t.vocab_size if lm else t.num_labels, model.cfg.vocab_size if lm else model.cfg.num_labels,
                            tok, student_tok or tok)
    check_shared_vocabulary(t.vocab_size, model.cfg.vocab_size)
    return model.train()


class Distillation:
    """The engine objective of knowledge distillation (see the module docstring): `teacher` is frozen, in eval
    mode, in its own dtype and run under no_grad; the student is the model the trainer passes. Causal LMs: next-token
    distributions at every labelled position; classifiers (head "classifier"): class distributions. Metrics: loss,
    kd (the divergence), ce (hard labels) per token / example, and accuracy for classifiers."""

    per_token_nll = False  # its loss mixes a divergence with CE: evaluations report ce and kd, not perplexity

    def __init__(self, teacher: nn.Module, loss: LossName = "forward_kl", temperature: float = 1.0,
                 alpha: float = 0.5, beta: float = 0.5, *, prompt_tokens: int = 32, new_tokens: int = 64,
                 sample_temperature: float = 1.0, chunk: int | None = None):
        self.spec = DistillSpec(loss, temperature, alpha, beta)
        self.spec.validate()
        if prompt_tokens < 1 or new_tokens < 1 or not sample_temperature >= 0:
            raise ValueError(f"prompt_tokens and new_tokens must be >= 1 and sample_temperature >= 0, found "
                             f"{prompt_tokens}, {new_tokens}, {sample_temperature}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.prompt_tokens, self.new_tokens, self.sample_temperature = prompt_tokens, new_tokens, sample_temperature
        self.chunk = chunk

    def _teacher_on(self, device: torch.device) -> nn.Module:
        if self.teacher.device != device:
            self.teacher.to(device)
        return self.teacher

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        student = getattr(model, "module", model)  # the Transformer inside a DDP wrapper
        if student.cfg.head == "classifier":
            if "on_policy_seed" in batch:
                raise ValueError("on-policy distillation samples text: it needs causal LMs, not classifiers")
            return self._classify(model, batch)
        if student.cfg.head != "lm":
            raise ValueError(f"distillation needs a causal LM (head 'lm') or a classifier, found head "
                             f"{student.cfg.head!r}")
        spec = self.spec
        if "on_policy_seed" in batch:
            batch = self.sample(student, batch)
            spec = DistillSpec(spec.loss, spec.temperature, 1.0, spec.beta)  # own samples: the divergence alone
        kw = dict(attention_mask=batch.get("attention_mask"), position_ids=batch.get("position_ids"))
        labels = batch["labels"].reshape(-1)  # (N,)
        ht = None
        if spec.alpha > 0:
            teacher = self._teacher_on(batch["input_ids"].device)
            check_shared_vocabulary(teacher.cfg.vocab_size, student.cfg.vocab_size)
            with torch.no_grad():
                ht = teacher(batch["input_ids"], logits_to_keep=1, **kw).hidden  # (B, T, Ct)
                ht = ht.reshape(-1, ht.shape[-1])  # (N, Ct)
        out = model(batch["input_ids"], logits_to_keep=1, **kw)  # hidden states; logits of one position only
        h = out.hidden.reshape(-1, out.hidden.shape[-1])  # (N, C)

        def teacher_logits(rows: Tensor) -> Tensor:
            with torch.no_grad():
                return self.teacher.project(ht[rows])  # (n, V)

        total, sums = chunked_distillation(h, output_weight(student), teacher_logits if ht is not None else None,
                                           labels, spec, self.chunk)
        n = (labels != IGNORE).sum()
        denom = n.clamp(min=1)
        loss = total / denom
        return loss, {"loss": loss.detach(), "kd": sums[0] / denom, "ce": sums[1] / denom, "tokens": n}

    def _classify(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        kw = dict(attention_mask=batch.get("attention_mask"), token_type_ids=batch.get("token_type_ids"))
        logits = model(batch["input_ids"], **kw).logits.float()  # (B, K)
        labels = batch["labels"]  # (B,)
        teacher_logits = None
        if self.spec.alpha > 0:
            teacher = self._teacher_on(batch["input_ids"].device)
            with torch.no_grad():
                teacher_logits = teacher(batch["input_ids"], **kw).logits.float()  # (B, K)
            check_shared_vocabulary(teacher_logits.shape[-1], logits.shape[-1])
        div, ce = _parts(logits, teacher_logits, labels, self.spec)
        n = labels.shape[0]
        loss = (self.spec.alpha * div + (1 - self.spec.alpha) * ce) / n
        return loss, {"loss": loss.detach(), "kd": div.detach() / n, "ce": ce.detach() / n, "tokens": n,
                      "accuracy": (logits.argmax(-1) == labels).float().mean().detach()}

    @torch.no_grad()
    def sample(self, student: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The on-policy batch: the first `prompt_tokens` of each row, continued by the student with lmforge's engine
        (up to `new_tokens`, at `sample_temperature`, row i seeded with on_policy_seed + i), laid out as
        input_ids = (prefix + sample)[:-1] with labels on the sampled tokens only, right-padded (B, P + G − 1)."""
        from ..inference.engine import Engine, EngineConfig
        from ..inference.paged import PagedKVCache
        from ..inference.sampling import SamplingParams

        ids = batch["input_ids"]  # (B, T)
        p = min(self.prompt_tokens, ids.shape[1])
        prompts = ids[:, :p].tolist()
        seed = int(batch["on_policy_seed"].reshape(-1)[0])
        params = [SamplingParams(max_new_tokens=self.new_tokens, temperature=self.sample_temperature, seed=seed + i)
                  for i in range(len(prompts))]
        dtype = next(student.parameters()).dtype
        bs, longest = 16, p + self.new_tokens
        gb = len(prompts) * (-(-longest // bs) + 1) * bs * PagedKVCache.bytes_per_token(student.cfg, dtype) / 2**30
        training = student.training
        try:
            engine = Engine(student, None, EngineConfig(block_size=bs, kv_cache_gb=max(gb, 1e-3),
                                                        max_running=len(prompts), pack_weights=False))
            outs = engine.generate(prompts, params)
        finally:
            student.train(training)
        rows = [pr + list(o.token_ids) for pr, o in zip(prompts, outs)]
        width = max(len(r) for r in rows) - 1
        pad = student.cfg.pad_token_id if student.cfg.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, P + G − 1)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # (B, P + G − 1)
        for i, r in enumerate(rows):
            input_ids[i, :len(r) - 1] = torch.tensor(r[:-1])
            labels[i, p - 1:len(r) - 1] = torch.tensor(r[p:])
        return {"input_ids": input_ids.to(ids.device), "labels": labels.to(ids.device)}


class OnPolicyMix:
    """A batch source that marks a fraction λ of micro batches on-policy (GKD's λ, Agarwal et al. 2024, Alg. 1):
    micro batch k is on-policy when u_k < λ, u_k uniform from a generator seeded by (seed, k); it then carries
    `on_policy_seed` (the seed of its samples). The draw depends on the counter alone, so resume is exact."""

    def __init__(self, source: Any, fraction: float, seed: int = 0):
        if not 0 <= fraction <= 1:
            raise ValueError(f"on-policy fraction must be in [0, 1], found {fraction}")
        self.source, self.fraction, self.seed, self.k = source, fraction, seed, 0

    def next_batch(self) -> dict[str, Tensor]:
        batch = self.source.next_batch()
        rng = np.random.default_rng([self.seed, 7, self.k])
        if rng.random() < self.fraction:
            batch["on_policy_seed"] = torch.tensor([int(rng.integers(2**31))])
        self.k += 1
        return batch

    def __getattr__(self, name: str) -> Any:  # epoch, seq_len, windows ... of the wrapped source
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k, "source": self.source.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.k = int(state["k"])
        self.source.load_state_dict(state["source"])
