"""Chat rendering and the assistant-token mask (the one source of truth for chat losses)."""

from __future__ import annotations

import pytest

import lmforge
from lmforge.tokenizer import ChatFormatError, encode_chat, render

CONV = [
    {"role": "system", "content": "You answer with code."},
    {"role": "user", "content": "Reverse a list?"},
    {"role": "assistant", "content": "Use `xs[::-1]` or `list(reversed(xs))`."},
    {"role": "user", "content": "And a string, 42 times?"},
    {"role": "assistant", "content": " s[::-1] * 42\n"},
]
# Llama-3 style: strips message content, so rendered text differs from the raw content
TRIM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n\n{{ m['content'] | trim }}<|im_end|>"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n\n{% endif %}"
)


@pytest.fixture(scope="module")
def smol_tok(smollm2_gguf):
    return lmforge.load_tokenizer(smollm2_gguf)


def _masked_runs(enc):
    runs, cur = [], []
    for i, m in zip(enc.ids, enc.assistant_mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("which", ["smollm2", "default", "trim"])
def test_mask_covers_exactly_assistant_content(which, smol_tok, gpt2_tokenizer):
    tok = gpt2_tokenizer if which == "default" else smol_tok
    template = TRIM_TEMPLATE if which == "trim" else None
    if which == "default":
        assert tok.chat_template is None  # exercises lmforge's default ChatML template
    enc = encode_chat(tok, CONV, include_end_of_turn=False, template=template)
    contents = [m["content"] for m in CONV if m["role"] == "assistant"]
    if which == "trim":
        contents = [c.strip() for c in contents]
    runs = _masked_runs(enc)
    assert [tok.decode(r, skip_special_tokens=False) for r in runs] == contents
    # everything unmasked is scaffolding or other roles' text
    unmasked = tok.decode([i for i, m in zip(enc.ids, enc.assistant_mask) if not m], skip_special_tokens=False)
    assert "Reverse a list?" in unmasked and "xs[::-1]" not in unmasked


@pytest.mark.parametrize("which", ["smollm2", "default"])
def test_end_of_turn_token_joins_the_mask(which, smol_tok, gpt2_tokenizer):
    tok = gpt2_tokenizer if which == "default" else smol_tok
    without = encode_chat(tok, CONV, include_end_of_turn=False)
    with_eot = encode_chat(tok, CONV)
    assert with_eot.ids == without.ids
    extra = [i for i, (a, b) in enumerate(zip(without.assistant_mask, with_eot.assistant_mask)) if a != b]
    assert len(extra) == 2 and all(with_eot.ids[i] == tok.token_id("<|im_end|>") for i in extra)
    assert all(with_eot.assistant_mask[i - 1] == 1 for i in extra)


def test_generation_prompt_and_no_assistant_turn(smol_tok):
    enc = encode_chat(smol_tok, CONV[:2], add_generation_prompt=True)
    assert enc.text.endswith("<|im_start|>assistant\n") and sum(enc.assistant_mask) == 0
    assert render(smol_tok, CONV[:2], add_generation_prompt=True) == enc.text


def test_smollm2_adds_default_system_prompt(smol_tok):
    text = render(smol_tok, [{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


@pytest.mark.parametrize("bad, match", [
    ([], "non-empty list"),
    ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([{"role": "user", "content": 3}], "must be a string"),
])
def test_malformed_conversations_are_rejected(bad, match, smol_tok):
    with pytest.raises(ChatFormatError, match=match):
        encode_chat(smol_tok, bad)
