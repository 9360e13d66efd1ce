"""Chat rendering: the single source of truth for turning conversations into tokens.

`render` produces the text a model's Jinja chat template gives (as `transformers`' `apply_chat_template`
does); `encode_chat` returns token ids plus a mask of exactly the assistant-content tokens (optionally with
the end-of-turn token), which training losses use. Training, evaluation and serving all call this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Sequence

from .base import DEFAULT_CHAT_TEMPLATE, Tokenizer

ROLES = ("system", "user", "assistant", "tool")


class ChatFormatError(ValueError):
    """A conversation that does not match the expected shape."""


def _raise(message: str) -> None:
    raise ChatFormatError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=32)
def _compile(template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def check_messages(messages: Any, where: str = "conversation") -> list[dict[str, Any]]:
    """Validate a list of {"role", "content"} messages; errors name `where` (e.g. "data.jsonl line 7")."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError(f"{where}: expected a non-empty list of messages, found {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatFormatError(f"{where}: message {i} must be an object with 'role' and 'content', found {m!r}")
        if m["role"] not in ROLES:
            raise ChatFormatError(f"{where}: message {i} has unknown role {m['role']!r}; expected one of {ROLES}")
        if not isinstance(m["content"], str):
            raise ChatFormatError(f"{where}: message {i} content must be a string, found {type(m['content']).__name__}")
    return messages


def render(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
           template: str | None = None, **kwargs: Any) -> str:
    """The chat template applied to `messages` (the model's own template, else the default ChatML one)."""
    tpl = template or tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    special = {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return _compile(tpl).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                **special, **kwargs)


@dataclass
class ChatEncoding:
    """Token ids of a rendered conversation and the mask of tokens a chat loss trains on."""

    text: str
    ids: list[int]
    assistant_mask: list[int]
    """1 for tokens of assistant content (and the end-of-turn token when asked), else 0."""


def _assistant_spans(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]], text: str,
                     add_generation_prompt: bool, template: str | None,
                     kwargs: dict[str, Any]) -> list[tuple[int, int]]:
    """Character spans of each assistant message's content inside the rendered `text`."""
    # Render with unique markers in place of assistant contents: the text between markers is template
    # scaffolding, so the real contents sit exactly where the markers were.
    markers = [f"\x00LMFORGE{i}\x00" for i in range(len(messages))]
    marked = [dict(m, content=markers[i]) if m["role"] == "assistant" else m for i, m in enumerate(messages)]
    rendered = render(tokenizer, marked, add_generation_prompt, template=template, **kwargs)
    present = [i for i, m in enumerate(messages) if m["role"] == "assistant" and markers[i] in rendered]
    pieces: list[str] = []  # the rendering rebuilt with real contents
    out: list[tuple[int, int]] = []
    pos = 0
    for i in present:  # a template may drop turns (e.g. earlier reasoning): nothing to train on there
        j = rendered.find(markers[i], pos)
        pieces.append(rendered[pos:j])
        start = sum(map(len, pieces))
        pieces.append(messages[i]["content"])
        out.append((start, start + len(messages[i]["content"])))
        pos = j + len(markers[i])
    pieces.append(rendered[pos:])
    if "".join(pieces) == text:
        return out
    # The template transforms content (e.g. `| trim`): locate each (stripped) content in order instead.
    out, pos = [], 0
    for i in present:
        content = messages[i]["content"].strip()
        j = text.find(content, pos)
        if j < 0:
            raise ChatFormatError(f"cannot locate assistant message {i} in the rendered conversation")
        out.append((j, j + len(content)))
        pos = j + len(content)
    return out


def useful_chars(tokenizer: Tokenizer, max_tokens: int) -> int:
    """Most characters of one message that can reach a row of `max_tokens` tokens: no token spans more characters
    than the longest vocabulary entry, so twice (max_tokens + 1) times its length is a safe bound. Data loaders
    clip longer messages before rendering, so a huge record costs the memory of what a row can use."""
    longest = max(map(len, tokenizer.backend.get_vocab()), default=1)
    return 2 * (max_tokens + 1) * max(longest, 1)


def clip_messages(messages: Sequence[dict[str, Any]], limit: int,
                  keep_end: bool = False) -> tuple[list[dict[str, Any]], bool]:
    """(messages with each string content cut to its first `limit` characters, or its last with `keep_end`;
    whether any was cut)."""
    out, cut = [], False
    for m in messages:
        content = m.get("content")
        if isinstance(content, str) and len(content) > limit:
            m, cut = {**m, "content": content[-limit:] if keep_end else content[:limit]}, True
        out.append(m)
    return out, cut


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                include_end_of_turn: bool = True, template: str | None = None, **kwargs: Any) -> ChatEncoding:
    """Render and tokenize a conversation; mask the assistant-content tokens.

    With `include_end_of_turn`, the first special token right after each assistant content (e.g.
    `<|im_end|>`) is in the mask too, so a model trained on it learns to stop."""
    check_messages(list(messages))
    text = render(tokenizer, messages, add_generation_prompt, template=template, **kwargs)
    spans = _assistant_spans(tokenizer, messages, text, add_generation_prompt, template, kwargs)
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    mask = [0] * len(enc.ids)
    specials = set(tokenizer.backend.get_added_tokens_decoder())
    span_i = 0
    for t, (a, b) in enumerate(enc.offsets):
        while span_i < len(spans) and a >= spans[span_i][1]:
            if include_end_of_turn:
                _mark_end_of_turn(enc, t, spans[span_i][1], text, specials, mask)
            span_i += 1
        if span_i < len(spans) and spans[span_i][0] <= a < spans[span_i][1] and b > a:
            mask[t] = 1
    return ChatEncoding(text=text, ids=list(enc.ids), assistant_mask=mask)


def _mark_end_of_turn(enc, t: int, end: int, text: str, specials: set[int], mask: list[int]) -> None:
    """Mark the first special token at or after token t if only whitespace separates it from `end`."""
    for u in range(t, len(enc.ids)):
        a, b = enc.offsets[u]
        if enc.ids[u] in specials:
            if text[end:a].strip() == "":
                mask[u] = 1
            return
        if text[a:b].strip():
            return
