"""Prompt tuning: P trainable virtual-token embeddings prepended to every input; the model itself stays frozen.

The transform attaches a `PromptTuning` module as `model.prompt` (parameter `prompt.embedding`, shape (P, C));
`Transformer.forward` calls its `prepend` and drops the virtual positions from its outputs. Saved and loaded in
the PEFT layout by `transforms.peft` (`save_prompt`, `load_prompt`), so `peft` loads ours and we load `peft`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class PromptConfig:
    """Prompt tuning settings."""

    num_virtual_tokens: int = 20
    """Virtual tokens prepended to every input (P)."""
    init_text: str | None = "Answer the request helpfully and correctly."
    """Initialise the virtual tokens from the embeddings of this text (repeated to P tokens); None = random
    vocabulary embeddings."""

    def validate(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, found {self.num_virtual_tokens}")


class PromptTuning(nn.Module):
    """P learned input embeddings shared by every sequence."""

    def __init__(self, embedding: Tensor):
        super().__init__()
        self.embedding = nn.Parameter(embedding)  # (P, C)

    @property
    def num_virtual(self) -> int:
        return self.embedding.shape[0]

    def prepend(self, tokens: nn.Embedding, input_ids: Tensor | None, inputs_embeds: Tensor | None,
                attention_mask: Tensor | None, position_ids: Tensor | None, token_type_ids: Tensor | None,
                past: int) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, int]:
        """Embeddings with the virtual tokens in front (only when nothing is cached yet: with a cache they are
        already stored), and masks / positions / token types widened to match. Returns the virtual count added."""
        p = self.num_virtual
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError("prompt tuning does not combine with packed (3-D) attention masks")
            attention_mask = F.pad(attention_mask, (p, 0), value=1)  # (B, P + S)
        embeds = tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        if past:
            return embeds, attention_mask, None if position_ids is None else position_ids + p, token_type_ids, 0
        b = embeds.shape[0]
        virtual = self.embedding.to(embeds.dtype)[None].expand(b, -1, -1)  # (B, P, C)
        embeds = torch.cat([virtual, embeds], dim=1)  # (B, P + T, C)
        if position_ids is not None:
            first = torch.arange(p, device=position_ids.device).expand(b, p)
            position_ids = torch.cat([first, position_ids + p], dim=1)
        if token_type_ids is not None:
            token_type_ids = F.pad(token_type_ids, (p, 0), value=0)
        return embeds, attention_mask, position_ids, token_type_ids, p


def apply_prompt_tuning(model: nn.Module, cfg: PromptConfig, tokenizer=None) -> nn.Module:
    """Freeze `model` and attach P trainable virtual tokens, initialised from `cfg.init_text`'s embeddings."""
    tokens: nn.Embedding = model.embed.tokens
    for p in model.parameters():
        p.requires_grad_(False)
    n = cfg.num_virtual_tokens
    if cfg.init_text and tokenizer is not None:
        ids = tokenizer.encode(cfg.init_text, add_special_tokens=False)
        if not ids:
            raise ValueError(f"prompt.init_text {cfg.init_text!r} encodes to no tokens")
        ids = (ids * (n // len(ids) + 1))[:n]
    else:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, tokens.num_embeddings, (n,), generator=g).tolist()
    with torch.no_grad():
        init = tokens.weight[torch.tensor(ids, device=tokens.weight.device)].detach().clone().float()
    model.prompt = PromptTuning(init)  # trainable (requires_grad by default)
    return model
