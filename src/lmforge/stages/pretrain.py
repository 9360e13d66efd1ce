"""`lmforge pretrain --config recipes/pretrain/….yaml`: causal LM (decoders) or masked LM + NSP (encoders) on
token shards, from scratch or continued from a model; the same command runs under torchrun (DDP / FSDP2)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..data.loader import SourceSpec
from ..engine.trainer import TrainConfig
from ..objectives.masked_lm import MaskingConfig

log = logging.getLogger(__name__)


@dataclass
class ModelSection:
    """Which model to train."""

    preset: str | None = "llama-10m"
    """Named size from lmforge.models.presets (ignored with init_from)."""
    init_from: str | None = None
    """Continue pretraining this model (folder, .gguf, alias or hub id) instead of starting from scratch."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields set over the preset (e.g. num_layers: 4)."""

    def validate(self) -> None:
        if self.preset is not None and not self.init_from:
            from ..models.presets import check_preset

            try:
                check_preset(self.preset)
            except ValueError as e:
                raise ValueError(f"preset: {e}") from None


@dataclass
class DataSection:
    """Token shards to train on (written by `lmforge prepare`)."""

    train: list[str] = field(default_factory=list)
    """Shard directories; several form a mixture."""
    weights: list[float] | None = None
    """Mixture weights, one per directory (default: equal)."""
    seq_len: int = 256
    """Tokens per training sequence."""
    tokenizer: str | None = None
    """Tokenizer folder; default: the one recorded in the first shard index."""

    def validate(self) -> None:
        if not self.train:
            raise ValueError("train: give at least one shard directory (written by `lmforge prepare`)")
        if self.weights is not None and len(self.weights) != len(self.train):
            raise ValueError(f"weights has {len(self.weights)} entries for {len(self.train)} train directories")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, found {self.seq_len}")


@dataclass
class Config:
    run_dir: str = "runs/pretrain"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, final/ (a Hugging Face folder), eval.json."""
    objective: Literal["causal_lm", "masked_lm"] = "causal_lm"
    """Next-token prediction (decoders) or masked LM, plus NSP when masking.nsp (encoders)."""
    model: ModelSection = field(default_factory=ModelSection)
    """The model."""
    data: DataSection = field(default_factory=DataSection)
    """The data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The engine."""
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    """Masked-LM settings (objective masked_lm)."""


def build_model(cfg: Config, tok, world_seed: int):
    """A fresh model from the preset (sized to the tokenizer) or the init_from checkpoint."""
    import torch

    from ..transforms.peft import load
    from ..models.presets import preset

    mlm = cfg.objective == "masked_lm"
    head = ("pretraining" if cfg.masking.nsp else "mlm") if mlm else "lm"
    if cfg.model.init_from:
        model, _ = load(cfg.model.init_from, head=head, dtype=torch.float32)
        return model
    torch.manual_seed(world_seed)
    vocab = -(-tok.vocab_size // 64) * 64  # a multiple of 64 keeps the output matmul fast
    fields = {"vocab_size": vocab, "pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id,
              "eos_token_id": tok.eos_id, "head": head, **cfg.model.overrides}
    mcfg = preset(cfg.model.preset or "llama-10m", **fields)
    mcfg.max_position_embeddings = max(mcfg.max_position_embeddings, cfg.data.seq_len)
    if mlm and mcfg.causal:
        raise ValueError(f"objective masked_lm needs an encoder preset (bert-*), found {cfg.model.preset!r}")
    from ..models.transformer import Transformer

    return Transformer(mcfg)


def main(cfg: Config) -> int:
    from ..data.readers import DataError
    from ..data.shards import read_index
    from ..engine import runs
    from ..engine.trainer import Trainer
    from ..eval.runners import training_evaluators
    from ..models.loading import instantiate, load_tokenizer, save
    from ..objectives.causal_lm import CausalLM
    from ..objectives.masked_lm import MaskedLM, MLMCollate
    from ..transforms import count_parameters

    world, run = runs.start(cfg)
    index = read_index(cfg.data.train[0])
    tok = load_tokenizer(cfg.data.tokenizer or index["tokenizer"]["path"])
    if tok.fingerprint() != index["tokenizer"]["fingerprint"]:
        raise DataError(f"tokenizer {cfg.data.tokenizer or index['tokenizer']['path']} is not the one that wrote "
                        f"{cfg.data.train[0]} (fingerprint {tok.fingerprint()} != "
                        f"{index['tokenizer']['fingerprint']}); expected the tokenizer recorded in its index.json")
    model = build_model(cfg, tok, cfg.train.seed)
    kw: dict[str, Any] = {}
    if cfg.objective == "masked_lm":
        specials = [i for i in (tok.pad_id, tok.eos_id, tok.bos_id, tok.token_id(tok.unk_token)) if i is not None]
        cls_id, sep_id = tok.token_id(tok.cls_token or "[CLS]"), tok.token_id(tok.sep_token or "[SEP]")
        if None in (cls_id, sep_id, tok.mask_id):
            raise DataError(f"{cfg.data.tokenizer or index['tokenizer']['path']}: masked_lm needs a tokenizer with "
                            "[CLS], [SEP] and [MASK] tokens (a WordPiece one from `lmforge tokenizer kind=wordpiece`)")
        extra = 3 if cfg.masking.nsp else 2  # [CLS] A [SEP] B [SEP]
        kw = dict(collate=MLMCollate(cfg.masking, cls_id, sep_id, tok.mask_id, tok.vocab_size, specials,
                                     cfg.train.seed), window=cfg.data.seq_len - extra)
        objective = MaskedLM()
    else:
        objective = CausalLM()
    loader, evals = token_batches(cfg, world, bits_per_byte=cfg.objective == "causal_lm", **kw)
    if world.main:
        n = model.num_parameters()
        log.info("model %s: %.2fM parameters; %d train tokens", model.cfg.family, n / 1e6, loader.windows[0].total)
    trainer = Trainer(model, objective, loader, cfg.train, run, evals, world,
                      evaluators=training_evaluators(cfg.train, tok))

    def save_final(full: dict[str, Any] | None) -> Path:
        return save(instantiate(model.cfg, full if full is not None else trainer.export_state_dict()), tok,
                    run / "final")

    def summary(result: dict[str, Any]) -> str:
        return f"{trainer.tokens:,} tokens; " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()
                                                           if k.startswith("val_") and isinstance(v, float))

    data = [{"path": w.data_dir, "fingerprint": w.index.get("inputs_fingerprint"),
             "tokenizer": w.index["tokenizer"]["fingerprint"]} for w in loader.windows]
    return runs.finish(trainer, "pretrain", cfg, save_final, summary, *count_parameters(model), load_full=False,
                       data=data,
                       result=lambda last: {"step": trainer.step, **{k: v for k, v in last.items()
                                                                     if k.startswith("val_")}})


def token_batches(cfg, world, bits_per_byte: bool = True, **kw: Any) -> tuple[Any, list[Any]]:
    """(training loader, [the validation EvalSet] or []) over the token shards of cfg.data (train, weights, seq_len)
    with cfg.train's micro_batch, seed and eval_batches; `kw` formats the windows (masked LM). Pretrain and distill
    both read their shards through it."""
    from ..data.loader import PackedLoader, eval_batches
    from ..data.shards import read_index
    from ..engine.trainer import EvalSet

    sources = [SourceSpec(p, w) for p, w in zip(cfg.data.train, cfg.data.weights or [1.0] * len(cfg.data.train))]
    loader = PackedLoader(sources, cfg.data.seq_len, cfg.train.micro_batch, seed=cfg.train.seed, rank=world.data_rank,
                          world=world.data_world, **kw)
    bpt = _bytes_per_token(read_index(cfg.data.train[0]), "validation") if bits_per_byte else None

    def validation():
        return eval_batches(sources[:1], cfg.data.seq_len, cfg.train.micro_batch, max_batches=cfg.train.eval_batches,
                            rank=world.data_rank, world=world.data_world, seed=cfg.train.seed, **kw)

    return loader, [EvalSet("validation", validation, bytes_per_token=bpt)] if _has_validation(validation, cfg) else []


def _has_validation(batches, cfg) -> bool:
    """Whether the validation split gives a batch. Without one, a run that asks for evaluations (eval_every,
    eval_at_start) stops now, before training, with the reason; one that does not trains without a validation loss."""
    from ..data.readers import DataError

    try:
        next(iter(batches()))
    except DataError as e:
        if cfg.train.eval_every or cfg.train.eval_at_start:
            raise DataError(f"{e} (train.eval_every / train.eval_at_start evaluate on it; set both to 0 to train "
                            f"without a validation loss)") from None
        log.warning("%s; training without a validation loss", e)
        return False
    return True


def _bytes_per_token(index: dict[str, Any], split: str) -> float | None:
    """UTF-8 bytes per token of a split (for bits per byte), from the shard index."""
    meta = index["splits"].get(split) or {}
    return meta["bytes"] / meta["tokens"] if meta.get("tokens") else None
