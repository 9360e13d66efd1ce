"""`Tokenizer`: a Hugging Face `tokenizers.Tokenizer` plus the special tokens and chat template around it."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tokenizers import Tokenizer as _Backend

from ..errors import InputError, one_line, read_json_object

SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token", "sep_token", "cls_token")

# Used when a model ships no chat template: ChatML, the format of SmolLM2 / Qwen2 and many others.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _token_str(v: Any) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v


@dataclass
class Tokenizer:
    """Tokenizer with special tokens and chat template, saved as tokenizer.json + tokenizer_config.json."""

    backend: _Backend
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    mask_token: str | None = None
    sep_token: str | None = None
    cls_token: str | None = None
    chat_template: str | None = None
    model_max_length: int | None = None
    extra_config: dict[str, Any] = field(default_factory=dict)
    """Other tokenizer_config.json entries, kept so a re-save loses nothing."""

    def __post_init__(self) -> None:
        # padding and truncation belong to the callers (batching, max length), never silently to the tokenizer
        self.backend.no_padding()
        self.backend.no_truncation()

    # ---- ids of special tokens
    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self.token_id(self.pad_token)

    @property
    def padding_id(self) -> int:
        """The id batches are padded with: the pad token, else end-of-sequence (decoders without a pad), else 0.
        Padded positions are masked out, so only its being a valid id matters."""
        pad = self.pad_id if self.pad_id is not None else self.eos_id
        return pad or 0

    @property
    def mask_id(self) -> int | None:
        return self.token_id(self.mask_token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ---- encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def fingerprint(self) -> str:
        """Stable hash of the tokenizer (for token shards and lineage)."""
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()[:16]

    # ---- files
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load tokenizer.json, tokenizer_config.json (or special_tokens_map.json) and chat_template.jinja."""
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.exists():
            raise FileNotFoundError(
                f"{tj} not found: lmforge reads tokenizers in the Hugging Face `tokenizers` format (tokenizer.json)")
        conf: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (path / name).exists():
                conf.update(read_json_object(path / name))
        template = conf.pop("chat_template", None)
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        special = {k: _token_str(conf.pop(k, None)) for k in SPECIAL_KEYS}
        max_len = conf.pop("model_max_length", None)
        if isinstance(max_len, (int, float)) and max_len > 1e9:
            max_len = None
        try:
            backend = _Backend.from_file(str(tj))
        except Exception as e:  # noqa: BLE001 - the Rust library raises a bare Exception
            raise InputError(f"{tj}: not a tokenizer the `tokenizers` library can read ({one_line(str(e))[:200]}); "
                             f"expected a Hugging Face tokenizer.json") from None
        return cls(backend=backend, chat_template=template,
                   model_max_length=int(max_len) if max_len else None, extra_config=conf, **special)

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json (with the chat template) into `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        conf = dict(self.extra_config)
        conf.pop("added_tokens_decoder", None)  # rebuilt by transformers from tokenizer.json
        conf.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        conf.setdefault("clean_up_tokenization_spaces", False)
        for k in SPECIAL_KEYS:
            if getattr(self, k) is not None:
                conf[k] = getattr(self, k)
        if self.model_max_length:
            conf["model_max_length"] = self.model_max_length
        if self.chat_template:
            conf["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n",
                                                     encoding="utf-8")

