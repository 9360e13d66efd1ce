"""Training methods shared by the stages that tune a pretrained model (finetune, reward, dpo): load the model for
training, apply the method's transform (full, freeze, LoRA, QLoRA, prompt tuning, bottleneck adapters), and write
the result in the formats other tools read.

With a parameter-efficient method the frozen base is kept in the autocast dtype (bf16) while the trainable weights
stay fp32. `save_trained` writes `final/` (a model folder for full / freeze / LoRA merged; an adapter folder in the
PEFT layout for prompt tuning and adapters, which `lmforge.load` resolves through its base) and, for LoRA / QLoRA,
`adapter/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import nn

from ..models.transformer import TASK_HEADS
from .adapters import AdapterConfig
from .lora import LoraConfig
from .prompt_tuning import PromptConfig

__all__ = ["Method", "ModelSection", "FreezeSection", "build_model", "save_trained", "train_head"]

Method = Literal["full", "freeze", "lora", "qlora", "prompt", "adapter"]
HEAD_MODULES = ("score", "pooler", "qa_outputs")


@dataclass
class ModelSection:
    """The pretrained model to start from."""

    init_from: str = "smollm2-135m-instruct"
    """Model folder, .gguf file, local alias or hub id."""
    random_init: bool = False
    """Keep init_from's architecture and tokenizer but start from freshly initialised weights: the baseline that
    shows what pretraining contributes."""


@dataclass
class FreezeSection:
    """method: freeze."""

    train_top: int = 2
    """Train only the last N blocks, the final norm and the head."""


def build_model(init_from: str, method: str, *, head: str = "lm", num_labels: int | None = None,
                id2label: dict[int, str] | None = None, tok=None, precision: str = "bf16",
                lora: LoraConfig | None = None, prompt: PromptConfig | None = None,
                adapter: AdapterConfig | None = None, freeze: FreezeSection | None = None,
                random_init: bool = False) -> nn.Module:
    """The pretrained model (with `head` / `num_labels` replacing its head when given; re-initialised with
    `random_init`) with `method`'s transform applied, in train mode; a new task head trains with every method (it
    starts random)."""
    import torch

    from ..models.transformer import Transformer
    from .peft import load

    model, _ = load(init_from, head=head, num_labels=num_labels, dtype=torch.float32)
    if random_init:
        model = Transformer(model.cfg)  # (the caller seeds torch)
    model.train()
    if id2label is not None:
        model.cfg.id2label = id2label
    if method in ("lora", "qlora"):
        from .lora import apply_lora

        lcfg = lora or LoraConfig()
        if method == "qlora" and lcfg.quantize == "none":
            lcfg.quantize = "nf4"
        apply_lora(model, lcfg)  # a classifier head trains and is saved as PEFT's modules_to_save
    elif method == "prompt":
        from .prompt_tuning import apply_prompt_tuning

        apply_prompt_tuning(model, prompt or PromptConfig(), tok)
        train_head(model)
    elif method == "adapter":
        from .adapters import apply_adapters

        apply_adapters(model, adapter or AdapterConfig())
        train_head(model)
    elif method == "freeze":
        from .freeze import train_top_blocks

        train_top_blocks(model, (freeze or FreezeSection()).train_top)
    elif method != "full":
        raise ValueError(f"method must be one of full, freeze, lora, qlora, prompt, adapter; found {method!r}")
    if method != "full" and precision != "fp32":
        low = torch.bfloat16 if precision == "bf16" else torch.float16
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(low)
    return model


def train_head(model: nn.Module) -> None:
    """Make a task head (classifier: score, pooler; span: qa_outputs) trainable: a new head starts random, so it
    trains with any method."""
    if getattr(getattr(model, "cfg", None), "head", None) in TASK_HEADS:
        for name in HEAD_MODULES:
            if hasattr(model, name):
                for p in getattr(model, name).parameters():
                    p.requires_grad_(True)


def save_trained(model: nn.Module, tok, run: Path, method: str, init_from: str, *, save_merged: bool = True,
                 prompt: PromptConfig | None = None, adapter: AdapterConfig | None = None) -> Path:
    """Write the trained model under `run` (see the module docstring); returns final/ (or adapter/ for LoRA
    without `save_merged`)."""
    import torch

    from ..models.loading import instantiate, save
    from .peft import load

    final = run / "final"
    base_ref = str(Path(init_from).resolve()) if Path(init_from).expanduser().exists() else init_from
    if method in ("full", "freeze"):
        sd = {k: v.float() for k, v in model.state_dict().items()}
        return save(instantiate(model.cfg, sd), tok, final)
    if method in ("lora", "qlora"):
        from .lora import merge_lora, unwrap_lora
        from .peft import save_adapter

        folder = save_adapter(model, run / "adapter", base_model_name_or_path=base_ref)
        tok.save(folder)
        if not save_merged:
            return Path(folder)
        merged, _ = load(folder, dtype=torch.float32)  # a full-precision base, not the bf16 / NF4 training copy
        merge_lora(merged)
        unwrap_lora(merged)
        if model.cfg.id2label:
            merged.cfg.id2label = model.cfg.id2label
        return save(merged, tok, final)
    head = {k: p for k, p in model.named_parameters()
            if p.requires_grad and k.startswith(tuple(f"{m}." for m in HEAD_MODULES))}
    if method == "prompt":
        from .peft import save_prompt

        path = save_prompt(model, final, base_model_name_or_path=base_ref,
                           init_text=(prompt or PromptConfig()).init_text, extra=head)
    else:
        from .peft import save_adapters

        path = save_adapters(model, final, adapter or AdapterConfig(), base_model_name_or_path=base_ref, extra=head)
    tok.save(path)
    return path

