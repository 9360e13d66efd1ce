"""Tokenizers (HF `tokenizers`), chat templates and assistant-token masks."""

from .base import DEFAULT_CHAT_TEMPLATE, Tokenizer
from .chat import ChatEncoding, ChatFormatError, encode_chat, render

__all__ = ["Tokenizer", "DEFAULT_CHAT_TEMPLATE", "ChatEncoding", "ChatFormatError", "encode_chat", "render"]
